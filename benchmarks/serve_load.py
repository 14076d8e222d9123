"""Load on `facellava serve`: a bounded number of chat requests from concurrent clients against a server on
loopback, as a kiosk fleet or a test harness would send them.

The server runs in its own process (`python -m facellava serve`, the command a user runs); the clients are
threads of this one. Requests carry the shipped photograph as a data URI, moved a few pixels per request among
`--media` variants (so the visual block is mostly recomputed, as with camera frames), the official task questions
in turn, half of them streamed. After a warm-up the server's resident memory is sampled every 0.2 s. Prints
throughput, latency percentiles, the status codes, and resident memory growth from the end of the warm-up to the
end (goal: < 5 %, zero failed requests).

    python benchmarks/serve_load.py [BUNDLE] [--requests 1000] [--clients 4] [--tokens 8] [--time-limit 1800]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def media_uris(count: int) -> list[str]:
    """The shipped photograph shifted by 0..count-1 pixels, as JPEG data URIs."""
    from PIL import Image, ImageChops

    from facellava.runtime.assets import face_photo

    photo = Image.open(face_photo()).convert("RGB")
    uris = []
    for shift in range(count):
        buffer = io.BytesIO()
        ImageChops.offset(photo, shift, shift // 2).save(buffer, format="JPEG", quality=92)
        uris.append("data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode())
    return uris


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(bundle: Path, port: int, extra: list[str]) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "facellava", "serve", str(bundle), "--port", str(port),
                               "--max-queue", "64", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server stopped: {server.stderr.read().strip().splitlines()[-1:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.kill()
    raise SystemExit("the server did not answer /health within 300 s")


def one_request(client, url: str, body: dict, stream: bool) -> tuple[int, str]:
    """(HTTP status, error text or "") of one chat request; a streamed answer must end with [DONE]."""
    if not stream:
        response = client.post(url, json=body)
        if response.status_code != 200:
            return response.status_code, response.text[:200]
        answer = response.json()
        ok = answer["choices"][0]["finish_reason"] in ("stop", "length")
        return 200, "" if ok else f"finish_reason {answer['choices'][0]['finish_reason']}"
    with client.stream("POST", url, json={**body, "stream": True}) as response:
        if response.status_code != 200:
            return response.status_code, response.read().decode()[:200]
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    return 200, "" if lines and lines[-1] == "data: [DONE]" else "stream without [DONE]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", nargs="?", type=Path, help="a bundle (default: the demo's tiny bundle)")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=8, help="max_tokens of each request")
    parser.add_argument("--media", type=int, default=8, help="distinct photographs the requests cycle through")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--time-limit", type=float, default=1800, help="stop sending after this many seconds")
    parser.add_argument("--server-args", default="", help="more arguments for `facellava serve`, e.g. '--poll 0'")
    args = parser.parse_args()

    import httpx

    from facellava.calibration.answers import TASK_PROMPTS
    from facellava.demo import demo_bundle

    bundle = args.bundle or demo_bundle()
    uris, questions = media_uris(args.media), list(TASK_PROMPTS.values())
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    server = start_server(bundle, port, args.server_args.split())

    def body(i: int) -> dict:
        return {"model": "facellava", "max_tokens": args.tokens, "messages": [{"role": "user", "content": [
            {"type": "text", "text": questions[i % len(questions)]},
            {"type": "image_url", "image_url": {"url": uris[i % len(uris)]}}]}]}

    try:
        with httpx.Client(timeout=600) as client:
            for i in range(args.warmup):
                status, error = one_request(client, url, body(i), stream=i % 2 == 1)
                if status != 200 or error:
                    raise SystemExit(f"warm-up request failed: {status} {error}")
        rss_start = rss_bytes(server.pid)
        samples = [rss_start]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.2):
                samples.append(rss_bytes(server.pid))

        next_index = iter(range(args.requests))
        lock = threading.Lock()
        latencies: list[float] = []
        statuses: dict[int, int] = {}
        errors: list[str] = []
        stop_at = time.monotonic() + args.time_limit

        def client_loop() -> None:
            with httpx.Client(timeout=600) as client:
                while time.monotonic() < stop_at:
                    with lock:
                        i = next(next_index, None)
                    if i is None:
                        return
                    start = time.perf_counter()
                    try:
                        status, error = one_request(client, url, body(i), stream=i % 2 == 1)
                    except httpx.HTTPError as exc:
                        status, error = 0, f"{type(exc).__name__}: {exc}"
                    elapsed = time.perf_counter() - start
                    with lock:
                        latencies.append(elapsed)
                        statuses[status] = statuses.get(status, 0) + 1
                        if status != 200 or error:
                            errors.append(f"{status} {error}")

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        start = time.perf_counter()
        clients = [threading.Thread(target=client_loop) for _ in range(args.clients)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join()
        wall = time.perf_counter() - start
        done.set()
        sampler.join()
        rss_end = rss_bytes(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=60)

    latencies.sort()
    quantile = statistics.quantiles(latencies, n=100, method="inclusive")
    result = {
        "bundle": str(bundle), "requests": len(latencies), "clients": args.clients, "max_tokens": args.tokens,
        "cores": len(os.sched_getaffinity(0)), "wall_s": round(wall, 1),
        "requests_per_s": round(len(latencies) / wall, 2),
        "latency_ms": {"p50": round(quantile[49] * 1000, 1), "p90": round(quantile[89] * 1000, 1),
                       "p99": round(quantile[98] * 1000, 1), "max": round(latencies[-1] * 1000, 1)},
        "statuses": statuses, "failed": len(errors), "first_errors": errors[:5],
        "server_rss_mb": {"after_warmup": round(rss_start / 2**20, 1), "end": round(rss_end / 2**20, 1),
                          "peak": round(max(samples) / 2**20, 1)},
        "rss_growth_pct": round(100 * (rss_end - rss_start) / rss_start, 2),
    }
    print(json.dumps(result, indent=2))
    if errors or len(latencies) < args.requests:
        raise SystemExit(f"{len(errors)} failed requests, {args.requests - len(latencies)} not sent")


if __name__ == "__main__":
    main()
