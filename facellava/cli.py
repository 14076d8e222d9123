"""The `facellava` command: a thin layer over the stage functions of each subpackage.

Subcommands live in their subpackages' `cli` modules: a function `NAME(args) -> int` and `NAME_arguments(parser)`.
Only the chosen one's module is imported, so `facellava run` on a device never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from facellava import __version__
from facellava.errors import FaceLlavaError

# command (one or two words) -> (module, function, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("facellava.demo", "demo", "run the main job on a built-in tiny model (no downloads)"),
    "make-tiny": ("facellava.model.cli", "make_tiny", "write a tiny random checkpoint in the official layout"),
    "inspect": ("facellava.model.cli", "inspect", "load a checkpoint, check it, and print what it holds"),
    "export vision": ("facellava.export.cli_vision", "export_vision",
                      "export the vision graphs to ONNX (FP32, FP16) into a bundle, each checked against PyTorch"),
    "build-engine": ("facellava.export.cli_vision", "build_engine",
                     "build TensorRT engines from a bundle's vision graphs on this GPU, checked against ORT"),
    "run": ("facellava.runtime.cli", "run", "answer a question about a photo, video or camera frame"),
    "train": ("facellava.model.cli", "train", "train a checkpoint (stage 1 or 2, optional LoRA) on a data file"),
    "make-synthetic-data": ("facellava.model.cli", "make_synthetic_data",
                            "write a small synthetic face instruction data set (the shipped photograph, augmented)"),
    "export llm": ("facellava.export.cli_llm", "export_llm",
                   "write the LLM as GGUF files (F16/F32, llama.cpp quantizations) checked in llama.cpp"),
    "calibrate vision": ("facellava.calibration.cli", "calibrate_vision",
                         "write INT8 Q/DQ vision graphs calibrated on face crops, checked against FP32"),
    "calibrate llm": ("facellava.calibration.imatrix", "calibrate_llm",
                      "multimodal importance matrix from PyTorch, then low-bit GGUF types quantized with it"),
    "bench": ("facellava.calibration.bench", "bench",
              "latency, memory and fidelity of every vision precision x GGUF type of a bundle"),
    "eval": ("facellava.calibration.eval", "evaluate",
             "task accuracy (the paper's metrics) of each variant of a bundle on a labelled manifest"),
}


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
    for name, (_, _, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
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
    module_name, function, help_text = SUBCOMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"facellava {name}", description=help_text)
    getattr(module, f"{function}_arguments")(parser)
    args = parser.parse_args(rest)
    try:
        return int(getattr(module, function)(args) or 0)
    except FaceLlavaError as error:
        print(f"facellava {name}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"facellava {name}: interrupted", file=sys.stderr)
        return 130
