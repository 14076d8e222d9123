"""The `facellava` command: a thin layer over the stage functions of each subpackage.

Subcommands live in their subpackages' modules: a function `NAME(args) -> int` and `NAME_arguments(parser)`.
Only the chosen one's module is imported, and it imports its heavy packages inside `NAME`, so `facellava run` on a
device never imports torch and every command's `--help` works whatever extras are installed. A command whose extra
is missing says, in one line, which one to install.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NamedTuple

from facellava import __version__
from facellava.errors import FaceLlavaError


class Subcommand(NamedTuple):
    module: str  # imported only when the command is chosen
    function: str  # `function(args) -> int` and `function_arguments(parser)` in that module
    help: str
    extra: str  # the extra that installs what the command needs: pip install 'facellava-edge[extra]'


# command (one or two words) -> where it lives, its one-line help, and the extra it needs
SUBCOMMANDS: dict[str, Subcommand] = {
    "demo": Subcommand("facellava.demo", "demo", "run the main job on a built-in tiny model (no downloads)",
                       "export,runtime"),
    "make-tiny": Subcommand("facellava.model.cli", "make_tiny",
                            "write a tiny random checkpoint in the official layout", "export"),
    "inspect": Subcommand("facellava.model.cli", "inspect", "load a checkpoint, check it, and print what it holds",
                          "export"),
    "export vision": Subcommand("facellava.export.cli_vision", "export_vision",
                                "export the vision graphs to ONNX (FP32, FP16) into a bundle, each checked against "
                                "PyTorch", "export"),
    "export front-end": Subcommand("facellava.export.cli_front_end", "export_front_end",
                                   "convert MediaPipe's face detectors and face mesh to ONNX into a bundle, each "
                                   "checked against MediaPipe", "export"),
    "build-engine": Subcommand("facellava.export.cli_vision", "build_engine",
                               "build TensorRT engines from a bundle's vision graphs on this GPU, checked against ORT",
                               "tensorrt"),
    "run": Subcommand("facellava.runtime.cli", "run", "answer a question about a photo, video or camera frame",
                      "runtime"),
    "serve": Subcommand("facellava.runtime.serve.cli", "serve",
                        "an OpenAI-compatible HTTP server (chat completions with images and videos) on loopback",
                        "serve"),
    "train": Subcommand("facellava.model.cli", "train",
                        "train a checkpoint (stage 1 or 2, optional LoRA) on a data file", "train"),
    "make-synthetic-data": Subcommand("facellava.model.cli", "make_synthetic_data",
                                      "write a small synthetic face instruction data set (the shipped photograph, "
                                      "augmented)", "runtime"),
    "export llm": Subcommand("facellava.export.cli_llm", "export_llm",
                             "write the LLM as GGUF files (F16/F32, llama.cpp quantizations) checked in llama.cpp",
                             "export"),
    "calibrate vision": Subcommand("facellava.calibration.cli", "calibrate_vision",
                                   "write INT8 Q/DQ vision graphs calibrated on face crops, checked against FP32",
                                   "export,runtime"),
    "calibrate llm": Subcommand("facellava.calibration.imatrix", "calibrate_llm",
                                "multimodal importance matrix from PyTorch, then low-bit GGUF types quantized with it",
                                "export,runtime"),
    "bench": Subcommand("facellava.calibration.bench", "bench",
                        "latency, memory and fidelity of every vision precision x GGUF type of a bundle", "bench"),
    "eval": Subcommand("facellava.calibration.eval", "evaluate",
                       "task accuracy (the paper's metrics) of each variant of a bundle on a labelled manifest",
                       "runtime"),
}

# The import names of the packages the extras install, with the name pip knows them by. A ModuleNotFoundError
# for one of these is a missing extra (one line naming it); for any other module it is a bug (a traceback).
EXTRA_PACKAGES: dict[str, str] = {
    "torch": "torch", "transformers": "transformers", "safetensors": "safetensors", "onnx": "onnx",
    "onnxscript": "onnxscript", "gguf": "gguf", "peft": "peft", "matplotlib": "matplotlib",
    "onnxruntime": "onnxruntime", "llama_cpp": "llama-cpp-python", "sentencepiece": "sentencepiece",
    "mediapipe": "mediapipe", "cv2": "opencv (mediapipe's opencv-contrib-python)", "PIL": "pillow",
    "tqdm": "tqdm", "tensorrt": "tensorrt", "cuda": "cuda-python", "jsonschema": "jsonschema",
    "fastapi": "fastapi", "starlette": "fastapi (starlette)", "uvicorn": "uvicorn", "tflite": "tflite",
}


def missing_extra_message(name: str, error: ModuleNotFoundError) -> str | None:
    """The one line for command `name` failing with `error` because its extra is not installed, or None when
    the missing module is no package of an extra (then it is a bug, and the caller re-raises)."""
    package = EXTRA_PACKAGES.get((error.name or "").partition(".")[0])
    if package is None:
        return None
    extra = SUBCOMMANDS[name].extra
    return f"this command needs {package}, which is not installed here: pip install 'facellava-edge[{extra}]'"


def _match(argv: list[str]) -> tuple[str, list[str]] | None:
    """The longest command at the start of argv, and the arguments after it."""
    for words in (2, 1):
        name = " ".join(argv[:words])
        if len(argv) >= words and name in SUBCOMMANDS:
            return name, argv[words:]
    return None


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="facellava",
        description="Face-LLaVA edge toolchain: checkpoint -> ONNX/TensorRT + GGUF -> runtime.",
    )
    parser.add_argument("--version", action="version", version=f"facellava {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in SUBCOMMANDS.items():
        sub.add_parser(name, help=command.help, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run one subcommand, return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    matched = _match(argv)
    if matched is None:
        parser = _top_parser()
        if argv:
            parser.parse_args(argv)  # prints --help/--version, or the usage error, and exits
        parser.print_help()
        return 2
    name, rest = matched
    command = SUBCOMMANDS[name]
    try:
        # the parser is built from the command's own module: a light one, so --help works where the command's
        # extra is missing; the heavy imports happen inside the command
        module = importlib.import_module(command.module)
        parser = argparse.ArgumentParser(prog=f"facellava {name}", description=command.help)
        getattr(module, f"{command.function}_arguments")(parser)
        args = parser.parse_args(rest)
        return int(getattr(module, command.function)(args) or 0)
    except FaceLlavaError as error:
        print(f"facellava {name}: error: {error}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as error:
        message = missing_extra_message(name, error)
        if message is None:
            raise
        print(f"facellava {name}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"facellava {name}: interrupted", file=sys.stderr)
        return 130
