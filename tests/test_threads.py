"""llama.cpp's thread pool as the runtime sets it up: threads and polling change speed, never the numbers."""

from __future__ import annotations

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
