"""Visual-token reuse, in one run: five task questions about one video, asked as a kiosk does (the visual block
stays in the KV cache; the vision graph runs once), against the same five asked independently (each from a cold
medium: vision graph and the whole prompt prefilled), and against one single ask.

Both ways run in turns, repeat after repeat, so that load on a shared machine hits them alike; each answer is
capped at the same number of tokens, and the answers are checked token for token alike. Reports the medians and
the ratios (goal: five questions with reuse in <= 1.5x the time of one).

    python benchmarks/serve_reuse.py [BUNDLE] [--llm f32] [--repeats 3] [--tokens 16]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def write_video(path: Path, photo: Path, frames: int = 16) -> Path:
    """A short mp4 of the photograph drifting a few pixels per frame."""
    import cv2
    import numpy as np

    image = cv2.imread(str(photo))
    height, width = image.shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 24, (width, height))
    for i in range(frames):
        shift = np.float32([[1, 0, 2 * i], [0, 1, i]])
        writer.write(cv2.warpAffine(image, shift, (width, height), borderMode=cv2.BORDER_REFLECT))
    writer.release()
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", nargs="?", type=Path, help="a bundle (default: the demo's tiny bundle)")
    parser.add_argument("--llm", default="f32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=16, help="max tokens per answer")
    args = parser.parse_args()

    from facellava.calibration.answers import TASK_PROMPTS
    from facellava.demo import demo_bundle
    from facellava.runtime.assets import face_photo
    from facellava.runtime.pipeline import Pipeline

    bundle = args.bundle or demo_bundle()
    questions = list(TASK_PROMPTS.values())  # the five official task questions
    pipeline = Pipeline.open(bundle, vision="onnxruntime", llm=args.llm)
    with tempfile.TemporaryDirectory() as work:
        video = write_video(Path(work) / "face.mp4", face_photo())
        pipeline.ask(questions[0], video=video, max_tokens=2)  # warm-up: the system prefix cached, as in use

        def five(reuse: bool) -> tuple[float, list[list[int]], list[float]]:
            pipeline.session.forget_medium()
            start = time.perf_counter()
            answers = []
            for question in questions:
                if not reuse:
                    pipeline.session.forget_medium()
                answers.append(pipeline.ask(question, video=video, max_tokens=args.tokens))
            elapsed = time.perf_counter() - start
            return elapsed, [a.tokens for a in answers], [a.timings.time_to_first_token_ms for a in answers]

        def one() -> float:
            pipeline.session.forget_medium()
            start = time.perf_counter()
            pipeline.ask(questions[0], video=video, max_tokens=args.tokens)
            return time.perf_counter() - start

        times: dict[str, list[float]] = {"one": [], "five independent": [], "five reused": []}
        ttft: dict[str, list[float]] = {"independent": [], "reused": []}
        for _ in range(args.repeats):
            times["one"].append(one())
            elapsed, independent_tokens, first = five(reuse=False)
            times["five independent"].append(elapsed)
            ttft["independent"] += first[1:]
            elapsed, reused_tokens, first = five(reuse=True)
            times["five reused"].append(elapsed)
            ttft["reused"] += first[1:]
            if reused_tokens != independent_tokens:
                raise SystemExit("reuse changed the answers: a bug")
    pipeline.close()

    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"bundle {bundle} ({args.llm}), video of 8 frames x 257 tokens, 5 task questions, max {args.tokens} tokens "
          f"each, {args.repeats} repeats (medians)")
    for name, value in median.items():
        print(f"  {name:17s} {value * 1000:9.1f} ms")
    print(f"  time to first token, questions 2-5: independent {statistics.median(ttft['independent']):.1f} ms, "
          f"reused {statistics.median(ttft['reused']):.1f} ms")
    print(f"  five reused / one          = {median['five reused'] / median['one']:.2f}x  (goal <= 1.5x)")
    print(f"  five independent / one     = {median['five independent'] / median['one']:.2f}x")
    print(f"  five reused / independent  = {median['five reused'] / median['five independent']:.2f}x")
    print("  answers token for token alike with and without reuse: yes")


if __name__ == "__main__":
    main()
