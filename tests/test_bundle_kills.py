"""Crash safety: a writing command killed (SIGKILL) at any instant, the commit's every step included, leaves a
bundle that opens, verifies and answers with either the old or the new set of files; the next write removes
what the killed run left behind.

The kill points inside the commit are exact: a driver runs the command in a child process with the bundle
module's file-system calls (rename, unlink, rmdir, rmtree, atomic writes) counted, and the child kills itself
with SIGKILL at the Nth one. Kills during the long work before the commit are timed."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from facellava import contract
from facellava.bundle import STAGING_PREFIX, Bundle, BundleWriter

# The child: count facellava.bundle's file-system steps and SIGKILL itself at step KILL_AT (0: never), then run
# either a synthetic transaction or a facellava command line.
DRIVER = r"""
import os, shutil, signal, sys, time
import facellava.bundle as bundle

kill_at, steps = int(sys.argv[1]), [0]

def step():
    steps[0] += 1
    if steps[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

class Counted:
    def __init__(self, module, names):
        self._module, self._names = module, names
    def __getattr__(self, name):
        value = getattr(self._module, name)
        if name not in self._names:
            return value
        def counted(*args, **kwargs):
            step()
            return value(*args, **kwargs)
        return counted

bundle.os = Counted(os, {"replace", "unlink", "rmdir"})
bundle.shutil = Counted(shutil, {"rmtree"})
write = bundle.write_text_atomically
def counted_write(*args, **kwargs):
    step()
    return write(*args, **kwargs)
bundle.write_text_atomically = counted_write

if sys.argv[2] == "synthetic":
    path = sys.argv[3]
    with bundle.BundleWriter.transaction(path) as tx:
        tx.stage("llm-f32.gguf").write_bytes(b"GGUF new f32")
        tx.add("llm-f32.gguf", "llm", type="f32")
        tx.stage("engines/gpu-trt10/llm.plan").write_bytes(b"new engine")
        tx.add("engines/gpu-trt10/llm.plan", "data")
        tx.stage("llm-q8_0.gguf").write_bytes(b"GGUF new q8_0")
        tx.add("llm-q8_0.gguf", "llm", type="q8_0")
        tx.remove("vision.bin")
        time.sleep(float(sys.argv[4]))  # the long work a real export does here
    print("steps", steps[0])
else:
    from facellava.cli import main
    status = main(sys.argv[3:])
    print("steps", steps[0])
    sys.exit(status)
"""

OLD = {"llm-f32.gguf": b"GGUF old f32", "vision.bin": b"old graph", "vision.bin.data": b"weights",
       "engines/gpu-trt10/old.plan": b"old engine"}
NEW = {"llm-f32.gguf": b"GGUF new f32", "llm-q8_0.gguf": b"GGUF new q8_0",
       "engines/gpu-trt10/llm.plan": b"new engine", "engines/gpu-trt10/old.plan": b"old engine"}


def run_driver(kill_at: int, *args: str, timeout: float = 600, kill_after: float | None = None
               ) -> subprocess.CompletedProcess | None:
    """Run the driver; with `kill_after`, SIGKILL it after that many seconds (None when it was killed)."""
    process = subprocess.Popen([sys.executable, "-c", DRIVER, str(kill_at), *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    if kill_after is not None:
        try:
            out, err = process.communicate(timeout=kill_after)
            return subprocess.CompletedProcess(process.args, process.returncode, out, err)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.communicate()
            return None
    out, err = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def contents(bundle: Path) -> dict[str, bytes]:
    """What the bundle holds, as a reader sees it: opened (finishing an interrupted commit) and verified."""
    opened = Bundle.open(bundle)
    opened.verify_all()
    return {name: opened.path_of(name).read_bytes() for name in opened.files}


def make_old_bundle(path: Path) -> Path:
    with BundleWriter.transaction(path) as tx:
        for name, data in OLD.items():
            tx.stage(name).write_bytes(data)
        tx.add("vision.bin.data", "data", part_of="vision.bin")
        tx.add("vision.bin", "vision", modality="image", precision="fp32", landmarks=True,
               external_data=["vision.bin.data"])
        tx.add("llm-f32.gguf", "llm", type="f32")
        tx.add("engines/gpu-trt10/old.plan", "data")
    return path


def test_a_transaction_killed_at_every_step_leaves_the_old_or_the_new_bundle(tmp_path):
    outcomes = []
    for kill_at in range(1, 40):
        bundle = make_old_bundle(tmp_path / f"bundle-{kill_at}")
        result = run_driver(kill_at, "synthetic", str(bundle), "0")
        seen = contents(bundle)
        assert seen in (OLD, NEW), (kill_at, sorted(seen))
        outcomes.append("new" if seen == NEW else "old")
        with BundleWriter.transaction(bundle):  # the next write cleans what the killed run left
            pass
        left = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*")}
        assert not [n for n in left if n.startswith((STAGING_PREFIX, ".commit"))], left
        assert contents(bundle) == seen
        if result.returncode == 0:
            steps = int(result.stdout.split()[-1])
            break
        assert result.returncode == -signal.SIGKILL, result.stderr
    else:
        pytest.fail("the transaction never finished")
    assert outcomes[0] == "old" and outcomes[-1] == "new" and "old" in outcomes[:-1] and "new" in outcomes[:-1]
    assert steps >= 8  # journal, 3 moves, manifest, deletes, staging, journal removal: each a kill point


def test_a_transaction_killed_during_its_work_leaves_the_old_bundle(tmp_path):
    bundle = make_old_bundle(tmp_path / "bundle")
    assert run_driver(0, "synthetic", str(bundle), "30", kill_after=3) is None
    assert contents(bundle) == OLD
    assert [p for p in bundle.iterdir() if p.name.startswith(STAGING_PREFIX)]  # left by the kill...
    with BundleWriter.transaction(bundle):
        pass
    assert not [p for p in bundle.iterdir() if p.name.startswith(STAGING_PREFIX)]  # ...removed by the next write


def answers(bundle: Path, face_photo: Path) -> str:
    from facellava.runtime.pipeline import Pipeline

    pipeline = Pipeline.open(bundle)
    try:
        return pipeline.ask("What emotion is shown in the picture?", image=face_photo, max_tokens=4).text
    finally:
        pipeline.close()


COMMANDS = {
    "export llm": lambda ckpt, bundle: ["export", "llm", "--checkpoint", str(ckpt), "--out", str(bundle),
                                        "--types", "f32,q8_0"],
    "export vision": lambda ckpt, bundle: ["export", "vision", "--checkpoint", str(ckpt), "--out", str(bundle),
                                           "--modalities", "image", "--precision", "fp32", "--seed", "5"],
}


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_writing_command_killed_at_many_instants_leaves_a_bundle_that_answers(command, tiny_bundle,
                                                                               tiny_checkpoint, face_photo,
                                                                               tmp_path):
    old = contents(tiny_bundle)
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))
    start = time.perf_counter()
    done = run_driver(0, "command", *COMMANDS[command](tiny_checkpoint, bundle))
    duration = time.perf_counter() - start
    assert done.returncode == 0, done.stderr
    new = contents(bundle)
    assert new != old
    steps = int(done.stdout.split()[-1])
    # instants: in the middle of the work (timed) and a step in the middle of the commit, past its journal (the
    # synthetic test above kills at every step of a commit; each instant here is a whole export)
    kills = [("after", duration * 0.5), ("step", (steps + 1) // 2)]
    seen_states = set()
    for how, when in kills:
        trial = Path(shutil.copytree(tiny_bundle, tmp_path / f"{how}-{when}"))
        if how == "after":
            result = run_driver(0, "command", *COMMANDS[command](tiny_checkpoint, trial), kill_after=when)
        else:
            result = run_driver(int(when), "command", *COMMANDS[command](tiny_checkpoint, trial))
            assert result.returncode in (0, -signal.SIGKILL), result.stderr
        state = contents(trial)
        assert state in (old, new), (how, when)
        seen_states.add("new" if state == new else "old")
        assert answers(trial, face_photo)
        shutil.rmtree(trial)
    assert seen_states == {"old", "new"}
    manifest = json.loads((bundle / contract.MANIFEST_NAME).read_text())
    assert all(figures["passed"] for figures in manifest["parity"].values())
