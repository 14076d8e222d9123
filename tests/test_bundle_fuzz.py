"""Bounded fuzzing (hypothesis) of what a stranger controls: the manifest's contents and `facellava run`'s
arguments. Every case must end in success or in one clean error line; nothing outside the bundle may be
touched. The case counts are fixed so the suite's time stays bounded."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from facellava import contract
from facellava.bundle import Bundle
from facellava.cli import main
from facellava.errors import FaceLlavaError

MANIFEST_CASES = 400
RUN_CASES = 30

NASTY_NAMES = st.sampled_from(["../outside/victim.gguf", "/etc/passwd", "a/../../outside/x", "sub/./x", "", ".",
                               "..", "x\\..\\y", "x\0y", "C:/x", "llm-f32.gguf/", "//x", "outside", "manifest.json",
                               ".commit.json", ".lock", "engines/../../x", "a" * 5000])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30), NASTY_NAMES)
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(st.one_of(st.text(max_size=12), NASTY_NAMES),
                                                                     inner, max_size=4)), max_leaves=12)


def _paths(value, prefix=()):
    """Every (path, value) in a JSON tree."""
    yield prefix, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*prefix, index))


@st.composite
def mutated_manifests(draw, original: dict):
    manifest = json.loads(json.dumps(original))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        paths = [p for p, _ in _paths(manifest) if p]
        path = draw(st.sampled_from(paths))
        parent = manifest
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "delete", "rename", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(JSON)
        elif action == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif action == "rename" and isinstance(parent, dict):
            parent[draw(NASTY_NAMES)] = parent.pop(path[-1])
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.one_of(NASTY_NAMES, st.text(max_size=8)))] = draw(JSON)
    return manifest


@pytest.fixture(scope="module")
def fuzz_bundle(tiny_bundle, tmp_path_factory, make_sentinel):
    root = tmp_path_factory.mktemp("fuzz")
    bundle = Path(shutil.copytree(tiny_bundle, root / "bundle"))
    return bundle, make_sentinel(root / "outside", bundle), json.loads((bundle / contract.MANIFEST_NAME).read_text())


def test_fuzzed_manifests_open_or_fail_cleanly(fuzz_bundle):
    bundle, sentinel, original = fuzz_bundle
    outcomes = {"opened": 0, "refused": 0}

    @settings(max_examples=MANIFEST_CASES, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(mutated_manifests(original))
    def case(manifest):
        try:
            text = json.dumps(manifest)
        except ValueError:
            return
        (bundle / contract.MANIFEST_NAME).write_text(text)
        try:
            opened = Bundle.open(bundle)
            opened.verify_all()
            for kind in ("vision", "llm", "engine"):
                opened.find(kind, modality="image")
            outcomes["opened"] += 1
        except FaceLlavaError as error:
            assert "\n" not in str(error) and len(str(error)) < 600, str(error)
            assert "SECRET" not in str(error)
            outcomes["refused"] += 1

    with sentinel:
        case()
    (bundle / contract.MANIFEST_NAME).write_text(json.dumps(original))
    assert outcomes["opened"] > 10 and outcomes["refused"] > 100, outcomes
    print(f"manifest fuzz: {outcomes}")


QUESTIONS = st.one_of(st.text(min_size=0, max_size=40), st.sampled_from(
    ["<image>", "what <image> is this", "\udcff\udcfe", "é" * 50, "</s>", "\0", "USER: <image>\nASSISTANT:"]))
NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 2**40)).map(
    lambda v: repr(v) if isinstance(v, float) and math.isfinite(v) else str(v))


def test_fuzzed_run_arguments_answer_or_fail_cleanly(fuzz_bundle, face_photo, capsys):
    bundle, sentinel, _ = fuzz_bundle
    outcomes = {"answered": 0, "refused": 0, "usage": 0}

    @settings(max_examples=RUN_CASES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(question=QUESTIONS, options=st.lists(st.tuples(
        st.sampled_from(["--temperature", "--top-p", "--top-k", "--seed", "--max-tokens", "--face-index", "--llm",
                         "--vision", "--vision-precision", "--landmarks"]),
        st.one_of(NUMBERS, NASTY_NAMES, st.sampled_from(["f32", "q8_0", "fp16", "int8", "tensorrt", "torch"]))),
        max_size=3))
    def case(question, options):
        argv = ["run", str(bundle), "--image", str(face_photo), "--max-tokens", "2"]
        for flag, value in options:
            argv += [flag, value]
        try:
            rc = main([*argv, "--", question] if question.startswith("-") else [*argv, question])
        except SystemExit as exit_:  # argparse: a usage line and an error line, status 2
            assert exit_.code == 2
            outcomes["usage"] += 1
            capsys.readouterr()
            return
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err, err
        if rc == 0:
            outcomes["answered"] += 1
        else:
            assert rc == 1 and len(err.splitlines()) == 1, err
            outcomes["refused"] += 1

    with sentinel:
        case()
    assert outcomes["answered"] > 0 and outcomes["refused"] > 0, outcomes
    print(f"run fuzz: {outcomes}")
