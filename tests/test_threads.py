"""llama.cpp's thread pool as the runtime sets it up: threads and polling change speed, never the numbers."""

from __future__ import annotations

import os

import numpy as np
import pytest

from facellava.errors import FaceLlavaError
from facellava.runtime.llm import LlamaModel


def test_thread_policies_give_identical_logits(tiny_bundle):
    gguf = tiny_bundle / "llm-f32.gguf"
    results = {}
    for threads, poll in [(2, 50), (2, 0), (1, 0), (2, 100)]:
        with LlamaModel.open(gguf, n_ctx=128, n_threads=threads, poll=poll) as llm:
            first = llm.eval_tokens([llm.bos_id, 100, 200, 300])
            tokens = [int(first.argmax())]
            for _ in range(8):
                tokens.append(int(llm.eval_tokens(tokens[-1:]).argmax()))
            results[(threads, poll)] = (first, tokens)
    reference_logits, reference_tokens = results[(2, 50)]
    for (first, tokens) in results.values():
        np.testing.assert_allclose(first, reference_logits, rtol=1e-5, atol=1e-5)
        assert tokens == reference_tokens


@pytest.mark.parametrize("poll", [-1, 101])
def test_a_polling_level_out_of_range_is_refused(tiny_bundle, poll):
    with pytest.raises(FaceLlavaError, match="poll must be from 0 to 100"):
        LlamaModel.open(tiny_bundle / "llm-f32.gguf", n_ctx=128, poll=poll)


PRIORITY_CHILD = r"""
import json, os, sys, threading
from facellava.errors import FaceLlavaError
from facellava.runtime.llm import set_priority
if sys.argv[1] == "nobody":
    os.setgroups([]); os.setgid(65534); os.setuid(65534)
elif sys.argv[1] == "already-higher":  # every thread the interpreter has (BLAS's, ...), as `Nice=` would
    for tid in os.listdir("/proc/self/task"):
        try:
            os.setpriority(os.PRIO_PROCESS, int(tid), -15)
        except ProcessLookupError:  # a thread that ended meanwhile
            pass
before = threading.Thread(target=threading.Event().wait, daemon=True)  # a thread that exists before
before.start()
try:
    set_priority(sys.argv[2])
except FaceLlavaError as error:
    print(json.dumps({"error": str(error)}))
    sys.exit(0)
after = {}
later = threading.Thread(target=lambda: after.update(nice=os.getpriority(os.PRIO_PROCESS, 0)))
later.start(); later.join()
nices = []
for tid in os.listdir("/proc/self/task"):
    try:
        nices.append(os.getpriority(os.PRIO_PROCESS, int(tid)))
    except ProcessLookupError:  # a thread that ended between the listing and the reading (`later`, just joined)
        pass
print(json.dumps({"threads": nices, "started_after": after["nice"]}))
"""


def priority_child(who: str, level: str) -> dict:
    import json
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", PRIORITY_CHILD, who, level], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.skipif(os.geteuid() != 0, reason="raising a priority needs root (or CAP_SYS_NICE)")
@pytest.mark.parametrize(("level", "nice"), [("normal", 0), ("medium", -5), ("high", -10)])
def test_a_priority_reaches_every_thread_and_the_threads_started_later(level, nice):
    figures = priority_child("root", level)
    assert len(figures["threads"]) >= 2 and set(figures["threads"]) == {nice}
    assert figures["started_after"] == nice


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to set a priority first")
def test_a_higher_priority_given_by_the_system_stays():
    figures = priority_child("already-higher", "high")
    assert set(figures["threads"]) == {-15} and figures["started_after"] == -15


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a command as another user")
def test_a_priority_the_system_refuses_is_one_clear_error(tmp_path):
    assert priority_child("nobody", "normal")["started_after"] == 0
    error = priority_child("nobody", "high")["error"]
    assert error == ("priority high (nice -10) needs root or CAP_SYS_NICE (systemd: "
                     "AmbientCapabilities=CAP_SYS_NICE, or Nice= in the unit)")

    import subprocess
    import sys

    drop = ("import os, sys, locale, gettext, facellava.cli, facellava.runtime.cli, facellava.runtime.llm, "
            "facellava.runtime.serve.cli, facellava.runtime.serve.app, facellava.runtime.pipeline, uvicorn, "
            "facellava.bundle, encodings.idna; "
            "os.setgroups([]); os.setgid(65534); os.setuid(65534); sys.exit(facellava.cli.main(sys.argv[1:]))")
    run = subprocess.run([sys.executable, "-c", drop, "run", str(tmp_path / "no-bundle"), "--image", "x.jpg",
                          "--priority", "high", "Q?"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and run.stderr.strip().splitlines() == [f"facellava run: error: {error}"]
    # serve raises its priority by default: refused, that is a warning and the server goes on (here to a
    # bundle in pytest's folder, which this user may not enter: one line too)
    serve = subprocess.run([sys.executable, "-c", drop, "serve", str(tmp_path / "no-bundle")], capture_output=True,
                           text=True, timeout=120)
    lines = serve.stderr.strip().splitlines()
    assert serve.returncode == 1 and len(lines) == 2 and "Traceback" not in serve.stderr
    assert lines[0] == f"facellava: warning: running at normal priority: {error}"
    assert lines[1] == f"facellava serve: error: bundle {tmp_path / 'no-bundle'} cannot be reached: Permission denied"
