"""The server's Prometheus metrics, written in the plain text exposition format (no extra package): requests by
path and status, the queue, per-stage latency sums and counts, tokens generated and decode speed."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import asdict

from facellava.runtime.pipeline import Answer

PATHS = ("/v1/chat/completions", "/v1/models", "/health", "/metrics", "/")
STAGES = ("face_detection_ms", "landmarks_ms", "preprocessing_ms", "vision_ms", "time_to_first_token_ms",
          "total_ms")


class Metrics:
    """Counters updated by the server's handlers and worker thread (under one lock), rendered on `/metrics`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, int]] = Counter()
        self._stage_seconds: Counter[str] = Counter()
        self._answers = 0
        self._tokens = 0
        self._reused_positions = 0
        self._decode_tokens_per_s = 0.0

    def count_request(self, path: str, status: int) -> None:
        """Count one HTTP request by its path (unknown paths as "other", to bound the label set) and status."""
        label = path if path in PATHS else "other"
        with self._lock:
            self._requests[(label, status)] += 1

    def observe_answer(self, answer: Answer) -> None:
        """Add one answer's stage latencies, tokens and cache reuse."""
        timings = asdict(answer.timings)
        with self._lock:
            for stage in STAGES:
                self._stage_seconds[stage] += timings[stage] / 1000
            self._answers += 1
            self._tokens += len(answer.tokens)
            self._reused_positions += answer.reused_prefix_positions
            if answer.timings.decode_tokens_per_s > 0:
                self._decode_tokens_per_s = answer.timings.decode_tokens_per_s

    def render(self, waiting: int, running: int) -> str:
        """The exposition text."""
        with self._lock:
            lines = ["# HELP facellava_requests_total HTTP requests by path and status.",
                     "# TYPE facellava_requests_total counter"]
            for (path, status), count in sorted(self._requests.items()):
                lines.append(f'facellava_requests_total{{path="{path}",code="{status}"}} {count}')
            lines += ["# HELP facellava_queue_length Requests admitted and waiting for the model.",
                      "# TYPE facellava_queue_length gauge", f"facellava_queue_length {waiting}",
                      "# HELP facellava_requests_running Requests the model is answering (0 or 1).",
                      "# TYPE facellava_requests_running gauge", f"facellava_requests_running {running}",
                      "# HELP facellava_stage_seconds Time spent per stage of the answers.",
                      "# TYPE facellava_stage_seconds summary"]
            for stage in STAGES:
                name = stage.removesuffix("_ms")
                lines.append(f'facellava_stage_seconds_sum{{stage="{name}"}} {self._stage_seconds[stage]:.6f}')
                lines.append(f'facellava_stage_seconds_count{{stage="{name}"}} {self._answers}')
            lines += ["# HELP facellava_generated_tokens_total Tokens generated.",
                      "# TYPE facellava_generated_tokens_total counter",
                      f"facellava_generated_tokens_total {self._tokens}",
                      "# HELP facellava_reused_prompt_positions_total Prompt positions taken from the KV cache.",
                      "# TYPE facellava_reused_prompt_positions_total counter",
                      f"facellava_reused_prompt_positions_total {self._reused_positions}",
                      "# HELP facellava_decode_tokens_per_second Decode speed of the last answer.",
                      "# TYPE facellava_decode_tokens_per_second gauge",
                      f"facellava_decode_tokens_per_second {self._decode_tokens_per_s:.3f}"]
        return "\n".join(lines) + "\n"
