"""Errors a user can cause end as one line, never a traceback, and user text stays text.

- a question containing `<image>` is tokenized as ordinary text (the runtime alone places visual blocks);
- sampling values out of range are refused by one check, for the Python API and the CLI alike;
- a question that is not valid UTF-8 (argv bytes arrive as lone surrogates) is refused;
- in a runtime-only install (torch, transformers, onnx, ... hidden from the import system) every subcommand's
  `--help` works and a command that needs a missing extra names it;
- vision graphs and GGUFs that cannot be loaded, or do not match the contract, are refused naming the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO

from facellava import contract
from facellava.cli import EXTRA_PACKAGES, SUBCOMMANDS, main, missing_extra_message
from facellava.errors import FaceLlavaError
from facellava.runtime.session import SEED_MAX, Sampling, check_question
from facellava.runtime.vision import check_vision_io

QUESTION = "What emotion is shown?"
TAGGED = "Is this <image> a face? Compare it with <image>."


def run_cli(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def one_line_error(code: int, err: str, *fragments: str) -> str:
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# --- 1. user text is text -----------------------------------------------------------------------------------


@pytest.mark.parametrize("question", [QUESTION, "", "  spaces  ", "unicode café 😀", "looks special: </s> <s>",
                                      "newline\nand tab\t"])
@pytest.mark.parametrize("modality", ["image", "video"])
def test_prompt_chunks_are_the_template_split_at_its_placeholders(question, modality):
    chunks = contract.prompt_chunks(question, modality)
    assert chunks == contract.build_prompt(question, modality).split(contract.IMAGE_PLACEHOLDER)
    assert len(chunks) == (1 if modality == "image" else contract.NUM_FRAMES) + 1


@pytest.mark.parametrize("modality", ["image", "video"])
def test_a_question_with_image_tags_keeps_them_as_text(modality):
    chunks = contract.prompt_chunks(TAGGED, modality)
    assert len(chunks) == len(contract.prompt_chunks(QUESTION, modality))
    assert chunks[-1] == f"\n{TAGGED} ASSISTANT:"
    ids = contract.tokenize_chunks(chunks, lambda text: [ord(c) for c in text], bos_id=1)
    assert ids.count(contract.IMAGE_TOKEN_INDEX) == len(chunks) - 1


def test_the_model_and_the_runtime_give_a_tagged_question_the_same_ids_and_one_visual_slot(pipeline, tiny_model):
    for modality, blocks in (("image", 1), ("video", contract.NUM_FRAMES)):
        ids = tiny_model.prompt_ids(TAGGED, modality)
        assert ids == pipeline.session.prompt_ids(TAGGED, modality)
        assert ids.count(contract.IMAGE_TOKEN_INDEX) == blocks
        assert tiny_model.prompt_ids(QUESTION, modality).count(contract.IMAGE_TOKEN_INDEX) == blocks
        # the question's text, tags included, decodes back from the last chunk
        last = ids[len(ids) - ids[::-1].index(contract.IMAGE_TOKEN_INDEX):]
        assert TAGGED in tiny_model.tokenizer.decode(last)
    # questions without a tag get exactly the ids of the official rule on the whole prompt
    official = contract.tokenize_prompt(contract.build_prompt(QUESTION, "video"), tiny_model.tokenizer.encode, 1)
    assert tiny_model.prompt_ids(QUESTION, "video") == official


def test_the_runtime_answers_a_tagged_question_like_the_reference(pipeline, tiny_model, face_photo):
    answer = pipeline.ask(TAGGED, image=face_photo, max_tokens=8)
    ids = tiny_model.prompt_ids(TAGGED, "image")
    assert answer.prompt_positions == len(ids) - 1 + contract.IMAGE_TOKENS
    prepared = pipeline.prepare(image=face_photo)
    with torch.no_grad():
        block = tiny_model.encode_image(torch.from_numpy(prepared.pixel_values),
                                        torch.from_numpy(prepared.landmarks))[0]
    reference = tiny_model.generate_reference(ids, [block], max_new_tokens=8, stop_at_eos=True)
    assert answer.tokens == [t for t in reference.tokens if t != tiny_model.config.eos_token_id]

    code, out, err = run_cli("run", pipeline.bundle.path, "--image", face_photo, "--json", "--max-tokens", "4",
                             "<image>")
    assert code == 0, err
    assert json.loads(out)["prompt_positions"] == len(tiny_model.prompt_ids("<image>", "image")) - 1 + 256


# --- 2. sampling values -------------------------------------------------------------------------------------

BAD_SAMPLING = [
    ({"temperature": math.nan}, "temperature"), ({"temperature": math.inf}, "temperature"),
    ({"temperature": -math.inf}, "temperature"), ({"temperature": -0.1}, "temperature"),
    ({"temperature": "0.5"}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": -0.5}, "top_p"),
    ({"top_p": 1.01}, "top_p"), ({"top_p": math.nan}, "top_p"), ({"top_p": math.inf}, "top_p"),
    ({"top_k": -1}, "top_k"), ({"top_k": 2.5}, "top_k"), ({"top_k": 2**31}, "top_k"), ({"seed": -1}, "seed"),
    ({"seed": SEED_MAX + 1}, "seed"), ({"seed": 2**40}, "seed"), ({"seed": 3.0}, "seed"), ({"seed": True}, "seed"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": -3}, "max_tokens"), ({"max_tokens": 8.0}, "max_tokens"),
]


@pytest.mark.parametrize(("values", "name"), BAD_SAMPLING)
def test_sampling_values_out_of_range_are_refused_before_any_work(pipeline, tmp_path, values, name):
    # the image does not exist: the sampling check must come first, before the face front end and vision run
    with pytest.raises(FaceLlavaError, match=name) as caught:
        pipeline.ask(QUESTION, image=tmp_path / "missing.jpg", **values)
    assert "\n" not in str(caught.value)


def test_the_session_and_sampling_check_the_same_way(pipeline):
    with pytest.raises(FaceLlavaError, match="temperature"):
        Sampling(temperature=math.nan)
    block = np.zeros((contract.IMAGE_TOKENS, pipeline.session.llm.n_embd), np.float32)
    with pytest.raises(FaceLlavaError, match="max_tokens"):
        list(pipeline.session.stream(QUESTION, "image", [block], max_tokens=0))
    # the edges of each range are accepted, numpy scalars too
    Sampling(temperature=0.0, top_p=1.0, top_k=0, seed=0)
    Sampling(temperature=np.float32(0.7), top_p=np.float64(1e-9), top_k=np.int64(2**31 - 1), seed=np.uint32(SEED_MAX))


def test_extreme_but_valid_sampling_values_answer(pipeline, face_photo):
    answer = pipeline.ask(QUESTION, image=face_photo, max_tokens=3, temperature=1e-6, top_p=1e-9, top_k=1,
                          seed=SEED_MAX)
    greedy = pipeline.ask(QUESTION, image=face_photo, max_tokens=3)
    assert answer.tokens == greedy.tokens  # top-k 1 and a vanishing top-p leave only the greedy token


@pytest.mark.parametrize(("flag", "value", "name"), [
    ("--temperature", "nan", "temperature"), ("--temperature", "inf", "temperature"),
    ("--temperature", "-1", "temperature"), ("--top-p", "0", "top_p"), ("--top-p", "1.5", "top_p"),
    ("--top-p", "nan", "top_p"), ("--top-k", "-1", "top_k"), ("--seed", "-1", "seed"),
    ("--seed", str(SEED_MAX + 1), "seed"), ("--max-tokens", "0", "max_tokens"),
    ("--threads", "0", "threads"), ("--threads-batch", "0", "threads_batch"), ("--poll", "101", "poll"),
    ("--poll", "-1", "poll"), ("--n-ctx", "0", "n_ctx"), ("--min-face", "0", "min_face"),
])
def test_cli_refuses_sampling_values_in_one_line_before_opening_the_bundle(tmp_path, face_photo, flag, value, name):
    # a bundle that does not exist: the values are checked before the bundle is opened and the LLM loaded
    code, _, err = run_cli("run", tmp_path / "no-bundle", "--image", face_photo, flag, value, QUESTION)
    one_line_error(code, err, name, "facellava run: error:")


@pytest.mark.parametrize(("flag", "value", "name"), [("--threads", "0", "threads"), ("--poll", "101", "poll")])
def test_serve_refuses_a_bad_thread_policy_in_one_line(tmp_path, flag, value, name):
    code, _, err = run_cli("serve", tmp_path / "no-bundle", flag, value)
    one_line_error(code, err, name, "facellava serve: error:")


def test_cli_refuses_a_nan_temperature_with_a_real_bundle(tiny_bundle, face_photo):
    code, out, err = run_cli("run", tiny_bundle, "--image", face_photo, "--temperature", "nan", QUESTION)
    one_line_error(code, err, "temperature must be a finite number")
    assert out == ""


# --- 3. invalid UTF-8 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("question", "what"), [("caf\udce9?", "byte 0xe9"), ("\ud800 lone", "U+D800"),
                                                ("fine \udcff\udcfe", "byte 0xff")])
def test_a_question_that_is_not_utf8_is_refused_by_the_api(pipeline, face_photo, question, what):
    with pytest.raises(FaceLlavaError, match="not valid UTF-8") as caught:
        pipeline.ask(question, image=face_photo)
    assert what in str(caught.value)
    with pytest.raises(FaceLlavaError, match="must be text"):
        pipeline.ask(b"bytes are not text", image=face_photo)
    assert check_question("café 😀, 日本の顔?") == "café 😀, 日本の顔?"


def test_cli_refuses_argv_bytes_that_are_not_utf8(tiny_bundle, face_photo):
    # on Linux Python hands undecodable argv bytes over as lone surrogates (surrogateescape)
    result = subprocess.run([sys.executable, "-m", "facellava", "run", str(tiny_bundle), "--image", str(face_photo),
                             b"caf\xe9 \xff?"], capture_output=True, text=True)
    one_line_error(result.returncode, result.stderr, "not valid UTF-8", "byte 0xe9")
    assert result.stdout == ""


# --- 4. a runtime-only install ------------------------------------------------------------------------------

# Packages that `pip install facellava-edge[runtime]` does not bring.
NOT_IN_RUNTIME = ("torch", "transformers", "onnx", "onnxscript", "gguf", "peft", "matplotlib", "safetensors",
                  "fastapi", "starlette", "uvicorn")

# Run first in a fresh interpreter: every meta-path finder is wrapped so that none finds those packages (or their
# submodules), exactly as when they are not installed (`import torch` raises ModuleNotFoundError,
# `importlib.util.find_spec("torch")` is None); then the CLI runs and the process reports what got imported.
HIDE_PACKAGES = """
import sys
HIDDEN = set(sys.argv[1].split(","))

class NotInstalled:
    def __init__(self, finder):
        self._finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            return None
        find = getattr(self._finder, "find_spec", None)
        return find(name, path, target) if find else None

    def __getattr__(self, attribute):
        return getattr(self._finder, attribute)

sys.meta_path[:] = [NotInstalled(finder) for finder in sys.meta_path]
try:
    import torch
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("torch is still importable")
from facellava.cli import main
try:
    code = main(sys.argv[2:])
except SystemExit as exit:
    code = exit.code
leaked = sorted(HIDDEN & {m.partition(".")[0] for m in sys.modules})
print("LEAKED", leaked, file=sys.stderr)
sys.exit(code)
"""


def runtime_only(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-c", HIDE_PACKAGES, ",".join(NOT_IN_RUNTIME), *args],
                            capture_output=True, text=True, env=env, cwd=REPO)
    assert "LEAKED []" in result.stderr, result.stderr
    result.stderr = result.stderr.replace("LEAKED []\n", "")
    return result


@pytest.mark.parametrize("command", list(SUBCOMMANDS))
def test_every_help_works_in_a_runtime_only_install(command):
    result = runtime_only(*command.split(), "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: facellava {command}") and result.stderr == ""


def test_commands_that_need_torch_name_their_extra_in_a_runtime_only_install(tmp_path):
    result = runtime_only("make-tiny", str(tmp_path / "tiny"))
    one_line_error(result.returncode, result.stderr, "facellava make-tiny: error:", "torch",
                   "pip install 'facellava-edge[export]'")
    assert not (tmp_path / "tiny").exists()
    result = runtime_only("inspect", str(tmp_path))
    one_line_error(result.returncode, result.stderr, "pip install 'facellava-edge[export]'")


def test_the_demo_says_it_needs_the_export_extra_in_a_runtime_only_install(tmp_path):
    # The demo builds its tiny checkpoint and exports it with torch, so it always needs the export extra (even with
    # its bundle cached); a runtime-only install answers with `facellava run` on an exported bundle.
    env = {**os.environ, "FACELLAVA_CACHE": str(tmp_path / "cache")}
    result = runtime_only("demo", env=env)
    one_line_error(result.returncode, result.stderr, "facellava demo: error:",
                   "pip install 'facellava-edge[export,runtime]'")


def test_the_extra_table_covers_every_command_with_real_extras():
    extras = metadata.metadata("facellava-edge").get_all("Provides-Extra")
    for name, command in SUBCOMMANDS.items():
        assert command.extra and all(extra in extras for extra in command.extra.split(",")), name
    for package in NOT_IN_RUNTIME:
        assert package in EXTRA_PACKAGES
    message = missing_extra_message("export vision", ModuleNotFoundError("No module named 'torch.nn'",
                                                                         name="torch.nn"))
    assert message == "this command needs torch, which is not installed here: pip install 'facellava-edge[export]'"
    # a missing module of no extra is a bug: no message, the traceback stays
    assert missing_extra_message("run", ModuleNotFoundError("x", name="facellava.nothing")) is None


# --- 5. unloadable or mismatched graphs and GGUFs -----------------------------------------------------------


def bundle_with(tiny_bundle: Path, tmp_path: Path, name: str, data: bytes) -> Path:
    """A copy of the tiny bundle with file `name` replaced by `data`, its manifest hash and size made to match (so
    the hash check passes and what is tested is the loader's)."""
    copy = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    (copy / name).write_bytes(data)
    manifest_path = copy / contract.MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][name].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    manifest_path.write_text(json.dumps(manifest))
    return copy


def onnx_graph(inputs: dict[str, list], outputs: dict[str, list], op: str = "Identity",
               reshape_to: list[int] | None = None) -> bytes:
    """A small ONNX graph from the first input to the first output: one `op` node, or a Reshape to `reshape_to`
    whose target shape is computed from the input's values, so that no shape inference can know it before it runs."""
    from onnx import TensorProto, helper, numpy_helper

    source, target = next(iter(inputs)), next(iter(outputs))
    initializers = []
    if reshape_to is None:
        nodes = [helper.make_node(op, [source], [target])]
    else:
        initializers = [numpy_helper.from_array(np.array(reshape_to, np.int64), "shape"),
                        numpy_helper.from_array(np.array(0, np.float32), "zero")]
        nodes = [helper.make_node("ReduceMin", [source], ["low"], keepdims=0),  # shape + int(0 * min(x))
                 helper.make_node("Mul", ["low", "zero"], ["nothing"]),
                 helper.make_node("Cast", ["nothing"], ["nothing64"], to=TensorProto.INT64),
                 helper.make_node("Add", ["shape", "nothing64"], ["runtime_shape"]),
                 helper.make_node("Reshape", [source, "runtime_shape"], [target])]
    graph = helper.make_graph(
        nodes, "wrong", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs.items()], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8).SerializeToString()


IMAGE_IO = {"inputs": {"pixel_values": ["B", 3, 224, 224], "landmarks": ["B", 68, 2]},
            "outputs": {"visual_tokens": ["B", 256, 64]}}


@pytest.mark.parametrize(("data", "fragments"), [
    (b"\x08\x07garbage, not a protobuf" * 100, ("vision_image.onnx", "export the bundle again")),
    # a well-formed model ONNX Runtime refuses: an operator no runtime implements
    (onnx_graph(**IMAGE_IO, op="NoSuchOperator"),
     ("ONNX Runtime cannot load vision_image.onnx", "NoSuchOperator", "export the bundle again")),
])
def test_an_onnx_file_that_cannot_load_with_a_matching_hash_is_one_line(tmp_path, tiny_bundle, face_photo, data,
                                                                        fragments):
    bundle = bundle_with(tiny_bundle, tmp_path, "vision_image.onnx", data)
    code, _, err = run_cli("run", bundle, "--image", face_photo, QUESTION)
    one_line_error(code, err, *fragments)


@pytest.mark.parametrize(("graph", "problem"), [
    (dict(inputs={"pixel_values": ["B", 3]}, outputs={"visual_tokens": ["B", 3]}),
     "pixel_values [?,3], expected [?,3,224,224]"),
    (dict(inputs={"pixel_values": ["B", 3, 224, 224]}, outputs={"visual_tokens": ["B", 3, 224, 224]}),
     "visual_tokens [?,3,224,224], expected [?,256,?]"),
    (dict(inputs={"image": ["B", 3, 224, 224]}, outputs={"visual_tokens": ["B", 3, 224, 224]}),
     "inputs ['image'], expected ['pixel_values']"),
    (dict(inputs={"pixel_values": ["B", 3, 8, 224, 224]}, outputs={"visual_tokens": ["B", 3, 8, 224, 224]}),
     "pixel_values [?,3,8,224,224], expected [?,3,224,224]"),
])
def test_a_graph_that_breaks_the_contract_is_refused_naming_it(tmp_path, tiny_bundle, face_photo, graph, problem):
    bundle = bundle_with(tiny_bundle, tmp_path, "vision_image_nolm.onnx", onnx_graph(**graph))
    code, _, err = run_cli("run", bundle, "--image", face_photo, "--no-landmarks", QUESTION)
    one_line_error(code, err, "vision_image_nolm.onnx is not the contract's image vision graph without landmarks",
                   problem)


def test_a_graph_whose_dynamic_dims_give_the_wrong_tokens_is_refused_when_it_runs(tmp_path, tiny_bundle, face_photo):
    graph = onnx_graph({"pixel_values": ["B", 3, 224, 224]}, {"visual_tokens": ["B", "T", "D"]},
                       reshape_to=[0, 3 * 224, 224])
    bundle = bundle_with(tiny_bundle, tmp_path, "vision_image_nolm.onnx", graph)
    code, _, err = run_cli("run", bundle, "--image", face_photo, "--no-landmarks", QUESTION)
    one_line_error(code, err, "vision_image_nolm.onnx returned visual tokens of shape [1, 672, 224], expected "
                   "[1,256,?]")


def test_engine_bindings_are_checked_against_the_contract():
    # what TensorRTVision passes from `TensorRTRunner.io_specs()` (TensorRT itself cannot run here)
    video_inputs = {"pixel_values": ((None, 3, 8, 224, 224), "float32"), "landmarks": ((None, 8, 68, 2), "float32")}
    video_outputs = {"visual_tokens": ((None, 8, 257, 64), "float32")}
    check_vision_io("v.engine", "video", True, video_inputs, video_outputs)
    with pytest.raises(FaceLlavaError, match=r"v.engine .*outputs \['logits'\], expected \['visual_tokens'\]"):
        check_vision_io("v.engine", "video", True, video_inputs, {"logits": ((None, 8, 257, 64), "float32")})
    with pytest.raises(FaceLlavaError, match=r"landmarks \[\?,8,5,2\], expected \[\?,8,68,2\]"):
        check_vision_io("v.engine", "video", True, {**video_inputs, "landmarks": ((None, 8, 5, 2), "float32")},
                        video_outputs)
    with pytest.raises(FaceLlavaError, match="pixel_values of type float16, expected float32"):
        check_vision_io("v.engine", "video", True,
                        {**video_inputs, "pixel_values": ((None, 3, 8, 224, 224), "float16")}, video_outputs)
    with pytest.raises(FaceLlavaError, match=r"inputs \['landmarks', 'pixel_values'\], expected \['pixel_values'\]"):
        check_vision_io("v.engine", "video", False, video_inputs, video_outputs)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_gguf_llama_cpp_cannot_load_is_one_line(tmp_path, tiny_bundle, face_photo, damage):
    data = (tiny_bundle / "llm-f32.gguf").read_bytes()
    data = b"GGUF" + b"\xff" * 4096 if damage == "garbage" else data[:len(data) // 2]
    bundle = bundle_with(tiny_bundle, tmp_path, "llm-f32.gguf", data)
    code, _, err = run_cli("run", bundle, "--image", face_photo, QUESTION)
    one_line_error(code, err, "llama.cpp cannot load", "llm-f32.gguf")
