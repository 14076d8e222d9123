"""`facellava run`: answer a question about a photo, a video or a camera frame with an exported bundle."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from facellava.errors import FaceLlavaError
from facellava.model.cli import tower_arguments
from facellava.runtime.ort_providers import DEVICES

MAX_TOKENS_DEFAULT = 256


def run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", type=Path, help="an exported bundle directory")
    parser.add_argument("question", help="the question, e.g. \"What emotion is shown in the video?\" (with --task, "
                                         "\"\" asks the task's official question)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", type=Path, help="a photograph")
    source.add_argument("--video", type=Path, help="a video (8 frames are taken as the official processor does)")
    source.add_argument("--camera", type=int, metavar="INDEX", help="one frame from an OpenCV camera")
    marks = parser.add_mutually_exclusive_group()
    marks.add_argument("--landmarks", type=Path, metavar="NPY", help="precomputed 68-point landmarks (official .npy)")
    marks.add_argument("--no-landmarks", action="store_true", help="run without FRLP/FRGCA (the official demo's path)")
    parser.add_argument("--no-face-crop", action="store_true", help="use the whole image when no face is found")
    parser.add_argument("--face-index", type=int, help="which face, counted left to right (default: the largest)")
    pipeline_arguments(parser, torch=True)
    parser.add_argument("--max-tokens", type=int,
                        help=f"default {MAX_TOKENS_DEFAULT}; with --task, the task schema's longest answer")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    parser.add_argument("--task", help="answer as JSON in the task's schema: emotion, action_units, age, attributes "
                                       "or deepfake (constrained decoding; see facellava.runtime.structured)")


def pipeline_arguments(parser: argparse.ArgumentParser, torch: bool = False, priority: str = "normal") -> None:
    """How `run` and `serve` open a bundle: the GGUF type, the vision backend and precision, llama.cpp's context,
    cache, attention and CPU thread policy, the process's CPU priority (`priority`: its default; a default other
    than normal that the system refuses is a warning, an explicit one an error), and with `torch` PyTorch vision
    from the source checkpoint."""
    parser.add_argument("--llm", help="GGUF type (default: the most precise in the bundle)")
    parser.add_argument("--vision", default="auto",
                        help="auto, onnxruntime, tensorrt" + (" or torch" if torch else ""))
    if torch:
        parser.add_argument("--checkpoint", type=Path,
                            help="with --vision torch: the PyTorch checkpoint the bundle was exported from")
        tower_arguments(parser)
    parser.add_argument("--front-end", choices=["auto", "graphs", "mediapipe"], default="auto",
                        help="the face front end: the bundle's ONNX graphs (export front-end) or MediaPipe (default "
                             "auto: the graphs when the bundle has them)")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="ONNX Runtime's execution providers for the ONNX graphs (vision and face front end): "
                             "auto (default: the best installed; TensorRT keeps its engines in the user's cache "
                             "directory), cpu, cuda or tensorrt (insisting)")
    parser.add_argument("--vision-precision", default="fp32",
                        help="fp32, fp16 (export vision) or int8 (calibrate vision)")
    parser.add_argument("--n-gpu-layers", type=int, default=0, help="LLM layers offloaded to the GPU (-1: all)")
    parser.add_argument("--n-ctx", type=int, default=4096, help="the LLM's context in tokens")
    parser.add_argument("--kv-cache", choices=["f16", "f32"], default="f16", help="llama.cpp's KV cache type")
    parser.add_argument("--flash-attn", choices=["auto", "on", "off"], default="auto",
                        help="llama.cpp's flash attention (off + --kv-cache f32: as exact as the export's parity)")
    parser.add_argument("--threads", type=int, help="llama.cpp's CPU threads for decoding (default: the usable "
                                                     "cores)")
    parser.add_argument("--threads-batch", type=int, help="llama.cpp's CPU threads for prefill (default: the usable "
                                                           "cores)")
    parser.add_argument("--poll", type=int, metavar="0-100",
                        help="how hard llama.cpp's idle threads busy-wait (default 0: they sleep, leaving the cores "
                             "to other work)")
    parser.add_argument("--min-face", type=int, metavar="PX",
                        help="the smallest face searched for, in pixels (default 20); a larger value searches fewer "
                             "tiles of the image and is faster")
    parser.add_argument("--priority", choices=["normal", "medium", "high"],
                        help=f"CPU priority of the whole process: nice 0, -5, -10 (default: {priority}; above normal "
                             "needs root or CAP_SYS_NICE); high keeps decoding at full speed beside other busy work")
    parser.set_defaults(priority_default=priority)


def open_pipeline(args: argparse.Namespace):
    """The bundle opened with `pipeline_arguments`' options."""
    from facellava.runtime.llm import set_priority, thread_policy
    from facellava.runtime.pipeline import Pipeline

    thread_policy(args.threads, args.threads_batch, args.poll)  # checked before the bundle is opened
    if args.n_ctx < 1:
        raise FaceLlavaError(f"n_ctx must be at least 1, got {args.n_ctx}")
    try:  # before the vision and LLM thread pools start: they inherit it
        set_priority(args.priority or args.priority_default)
    except FaceLlavaError as error:
        if args.priority is not None:
            raise
        print(f"facellava: warning: running at normal priority: {error}", file=sys.stderr)
    torch = {name: getattr(args, name) for name in ("checkpoint", "image_tower", "video_tower") if hasattr(args, name)}
    return Pipeline.open(args.bundle, vision=args.vision, llm=args.llm, n_gpu_layers=args.n_gpu_layers,
                         n_ctx=args.n_ctx, vision_precision=args.vision_precision, kv_type=args.kv_cache,
                         flash_attn={"auto": None, "on": True, "off": False}[args.flash_attn],
                         n_threads=args.threads, n_threads_batch=args.threads_batch, poll=args.poll,
                         front_end=args.front_end, device=args.device,
                         **({} if args.min_face is None else {"min_face": args.min_face}), **torch)


def camera_frame(index: int):
    """One RGB frame from an OpenCV camera."""
    import cv2

    capture = cv2.VideoCapture(index)
    try:
        ok, frame = capture.read() if capture.isOpened() else (False, None)
    finally:
        capture.release()
    if not ok:
        raise FaceLlavaError(f"camera {index} cannot be opened or gives no frame")
    return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)


def run(args: argparse.Namespace) -> int:
    from facellava.runtime.session import Sampling, check_max_tokens, check_question

    task = None
    if args.task is not None:
        from facellava.runtime import structured

        task = structured.get_task(args.task)
        if not args.question.strip():
            args.question = task.question
    if args.max_tokens is None:
        args.max_tokens = task.max_tokens if task is not None else MAX_TOKENS_DEFAULT
    # the API's own checks, made before the bundle is opened and the LLM loaded
    check_question(args.question)
    check_max_tokens(args.max_tokens)
    Sampling(args.temperature, args.top_p, args.top_k, args.seed)
    image = camera_frame(args.camera) if args.camera is not None else args.image
    pipeline = open_pipeline(args)
    try:
        stream = pipeline.ask(args.question, image=image, video=args.video, landmarks=args.landmarks,
                              no_landmarks=args.no_landmarks, no_face_crop=args.no_face_crop,
                              face_index=args.face_index, max_tokens=args.max_tokens,
                              temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                              stream=True, grammar=task.grammar if task else None)
        for piece in stream:
            if not args.json:
                sys.stdout.write(piece)
                sys.stdout.flush()
        answer = stream.answer
        assert answer is not None
        if task is not None and answer.finish_reason != "length":
            structured.parse_answer(answer.text, task.schema)  # the grammar guarantees it; a miss is an error
        if args.json:
            print(json.dumps({**answer.to_json(), "vision_backend": pipeline.vision.name}))
        else:
            print()
            print(f"[{answer.modality}, landmarks: {answer.landmarks}, vision: {pipeline.vision.name}, "
                  f"{len(answer.tokens)} tokens, {answer.finish_reason}] {answer.timings.line()}")
    finally:
        pipeline.close()
    return 0
