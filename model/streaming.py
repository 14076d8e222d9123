"""The LLaMA decoder run straight from the checkpoint, one layer at a time: PyTorch figures in bounded memory.

The export's parity reference and the importance matrix need PyTorch's float32 activations and logits over a
few long prompts (a video prompt is ~2100 positions). Loading the whole LLM in float32 costs 4 bytes per
parameter (~27 GB for 7B); here only one decoder layer is materialized at a time (its tensors read from the
memory-mapped shards and converted to float32, ~0.8 GB for 7B), and the hidden states of every prompt
([positions, hidden] each) are carried from one layer to the next. The layer itself is transformers'
`LlamaDecoderLayer` with its rotary embedding and causal mask, so the arithmetic is `LlamaForCausalLM`'s.

Without a KV cache, greedy decoding is verified instead of generated (`greedy_continuations`): a proposer (a
GGUF decoded in llama.cpp) suggests each prompt's continuation, one streamed pass reads PyTorch's logits at
every continuation position, and where PyTorch's argmax equals the suggestion at every step the suggestion *is*
PyTorch's greedy decode. Where it differs first at step k, PyTorch's greedy tokens are known up to k + 1; the
proposer continues from there and another pass checks; every pass fixes at least one more token.

```python
stream = LayerStream(checkpoint_dir)
prompts = [StreamedPrompt(ids, blocks), ...]
results = greedy_continuations(stream, prompts, steps=32, propose=my_proposer)
```
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from facellava import contract
from facellava.errors import FaceLlavaError
from facellava.model.checkpoint import CheckpointWeights
from facellava.model.loading import read_config

LOGIT_CHUNK_ROWS = 8192  # lm_head rows converted to float32 at once (32000 x 4096 would be 0.5 GB)
DEFAULT_MAX_POSITIONS = 16384  # hidden states carried at once per group of prompts (0.27 GB at 7B width)


@dataclass
class StreamedPrompt:
    """One prompt for the streamed decoder: ids with IMAGE_TOKEN_INDEX markers, and one visual block [N, D] per
    marker (numpy or torch, float32)."""

    input_ids: list[int]
    visual_blocks: Sequence[np.ndarray | torch.Tensor] = ()

    @property
    def positions(self) -> int:
        """How many LLM positions the prompt fills (each marker replaced by its block)."""
        return contract.spliced_length(self.input_ids, [len(block) for block in self.visual_blocks])


@dataclass
class SquaredInputs:
    """llama.cpp's importance statistics for a set of matrices: per input column the sum of squared inputs
    (float64), and per matrix the number of rows (tokens) seen. Keys are checkpoint module names
    (`model.layers.0.self_attn.q_proj`, `lm_head`)."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, inputs.shape[-1]).double()
        total = (x * x).sum(dim=0)
        self.sums[name] = self.sums[name] + total if name in self.sums else total
        self.counts[name] = self.counts.get(name, 0) + x.shape[0]

    def merge(self, other: SquaredInputs) -> None:
        for name, total in other.sums.items():
            self.sums[name] = self.sums[name] + total if name in self.sums else total.clone()
            self.counts[name] = self.counts.get(name, 0) + other.counts[name]


# (prompts, verified prefix of each, steps) -> a continuation of `steps` tokens for each, starting with its prefix
Proposer = Callable[[Sequence[StreamedPrompt], Sequence[list[int]], int], list[list[int]]]


class LayerStream:
    """A checkpoint's LLaMA decoder, read one layer at a time. Takes the checkpoint directory (official layout);
    raises FaceLlavaError for a config or weights the loader refuses."""

    def __init__(self, checkpoint_dir: str | Path):
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        self.config = read_config(checkpoint_dir)
        self.weights = CheckpointWeights.open(checkpoint_dir)
        self.llama_config = self.config.llama_config()
        # what LlamaForCausalLM picks here (torch's SDPA); with no mask it runs causal attention without ever
        # materializing the [heads, T, T] scores
        self.llama_config._attn_implementation = "sdpa"
        self.rotary = LlamaRotaryEmbedding(config=self.llama_config)

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def tensor(self, key: str) -> torch.Tensor:
        """One checkpoint tensor in float32, its shard released (a mapped shard keeps every page read from it
        resident until closed). Raises FaceLlavaError when the checkpoint lacks it."""
        if key not in self.weights.weight_map:
            raise FaceLlavaError(f"{self.weights.directory}: missing tensor {key}")
        value = self.weights.get(key).to(torch.float32)
        self.weights.release(key)
        return value

    def embed(self, prompt: StreamedPrompt, continuation: Sequence[int] = ()) -> torch.Tensor:
        """The input embeddings [positions, D] of a prompt followed by continuation tokens: text rows looked up in
        the (memory-mapped) embedding table, each IMAGE_TOKEN_INDEX replaced by its visual block, as
        `FaceLlava.embed_prompt` does. Raises ValueError when blocks and markers do not pair up."""
        plan = contract.splice_plan([*prompt.input_ids, *continuation], len(prompt.visual_blocks))
        key = "model.embed_tokens.weight"
        if key not in self.weights.weight_map:
            raise FaceLlavaError(f"{self.weights.directory}: missing tensor {key}")
        table = self.weights.get(key)
        pieces = [table[torch.tensor(run.ids, dtype=torch.long)].to(torch.float32) if run.block is None
                  else torch.as_tensor(prompt.visual_blocks[run.block], dtype=torch.float32) for run in plan]
        self.weights.release(key)
        return torch.cat(pieces)

    def layer(self, index: int) -> torch.nn.Module:
        """Decoder layer `index` with its float32 weights (transformers' LlamaDecoderLayer, eval mode)."""
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        with torch.device("meta"):
            layer = LlamaDecoderLayer(self.llama_config, index)
        prefix = f"model.layers.{index}."
        state = {name: self.tensor(prefix + name) for name in layer.state_dict()}
        layer.load_state_dict(state, assign=True, strict=True)
        return layer.eval()

    @torch.inference_mode()
    def forward(self, sequences: Sequence[torch.Tensor], rows: Sequence[Sequence[int]],
                statistics: Sequence[SquaredInputs] | None = None, include_output: bool = False,
                progress: bool = False) -> list[torch.Tensor]:
        """Run input embeddings through every decoder layer, the final norm and lm_head.

        Takes one [T, D] embedding per sequence, the positions of each whose logits are wanted, and optionally
        one SquaredInputs per sequence that collects the inputs of every decoder nn.Linear (and of lm_head, over
        every position, with `include_output`), as llama.cpp's imatrix does. Returns [len(rows), vocab] float32
        logits per sequence. The embeddings are consumed (replaced layer by layer).
        """
        from transformers.masking_utils import create_causal_mask
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        hidden = [s[None] for s in sequences]
        positions = [torch.arange(h.shape[1])[None] for h in hidden]
        rope = [self.rotary(h, position_ids=p) for h, p in zip(hidden, positions, strict=True)]
        masks = [create_causal_mask(config=self.llama_config, inputs_embeds=h, attention_mask=None, cache=None,
                                    position_ids=p) for h, p in zip(hidden, positions, strict=True)]
        for index in tqdm(range(self.num_layers), desc="PyTorch layers", unit="layer", disable=not progress):
            layer = self.layer(index)
            for i in range(len(hidden)):
                handles = [] if statistics is None else collect_inputs(layer, f"model.layers.{index}.", statistics[i])
                hidden[i] = layer(hidden[i], attention_mask=masks[i], position_ids=positions[i],
                                  position_embeddings=rope[i])
                for handle in handles:
                    handle.remove()
            del layer
        norm = LlamaRMSNorm(self.config.hidden_size, eps=self.config.rms_norm_eps)
        norm.weight = torch.nn.Parameter(self.tensor("model.norm.weight"), requires_grad=False)
        selected = []
        for i in range(len(rows)):
            normed = norm(hidden.pop(0))[0]  # each sequence's states go as soon as it is done
            if statistics is not None and include_output:
                statistics[i].add("lm_head", normed)
            selected.append(normed[list(rows[i])])
        return self.logits(selected)

    def logits(self, normed: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """lm_head on final-norm outputs ([n, D] each) -> [n, vocab] float32 each, the weight converted to float32
        a slice of rows at a time."""
        key = "lm_head.weight"
        if key not in self.weights.weight_map:
            raise FaceLlavaError(f"{self.weights.directory}: missing tensor {key}")
        weight = self.weights.get(key)
        out = [torch.empty(len(x), weight.shape[0]) for x in normed]
        for start in range(0, weight.shape[0], LOGIT_CHUNK_ROWS):
            chunk = weight[start:start + LOGIT_CHUNK_ROWS].to(torch.float32)
            for x, logits in zip(normed, out, strict=True):
                logits[:, start:start + len(chunk)] = torch.nn.functional.linear(x, chunk)
        self.weights.release(key)
        return out


def collect_inputs(module: torch.nn.Module, prefix: str, statistics: SquaredInputs) -> list[Any]:
    """Forward pre-hooks that add the inputs of every nn.Linear in `module` (a decoder layer, or a whole LLaMA) to
    `statistics` under `prefix + module name`; returns their handles, for the caller to remove."""
    def hook(name: str) -> Callable[..., None]:
        return lambda _module, inputs: statistics.add(name, inputs[0])

    return [linear.register_forward_pre_hook(hook(prefix + name)) for name, linear in module.named_modules()
            if isinstance(linear, torch.nn.Linear)]


@dataclass
class GreedyResult:
    """PyTorch's greedy continuation of one prompt: the tokens, the float32 logits each was chosen from
    ([steps, vocab]; row 0 is the first-token logits), the streamed passes it took, and (when collected) the
    squared inputs of the pass over the prompt and these tokens."""

    tokens: list[int]
    logits: torch.Tensor
    passes: int
    statistics: SquaredInputs | None = None


def position_groups(prompts: Sequence[StreamedPrompt], extra: int, max_positions: int) -> list[list[int]]:
    """Prompt indices in consecutive groups of at most `max_positions` positions (each prompt counted with
    `extra` more); a prompt longer than that is a group alone."""
    groups: list[list[int]] = []
    used = 0
    for i, prompt in enumerate(prompts):
        size = prompt.positions + extra
        if not groups or used + size > max_positions:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += size
    return groups


def greedy_continuations(stream: LayerStream, prompts: Sequence[StreamedPrompt], steps: int,
                         propose: Proposer | None = None, collect: bool = False, include_output: bool = False,
                         max_positions: int = DEFAULT_MAX_POSITIONS, progress: bool = True) -> list[GreedyResult]:
    """PyTorch's greedy decode of `steps` tokens after each prompt, verified by streamed passes.

    Takes the stream, the prompts, the number of tokens, a proposer (None: each pass fixes exactly one token,
    `steps` + 1 passes), whether to collect the squared inputs of every decoder matrix (and of lm_head with
    `include_output`) over the prompt and all `steps` tokens (what `FaceLlava.generate_reference` feeds
    through the model), and how many positions to hold at once (prompts are run in groups within it). Returns
    one GreedyResult per prompt, in order. Raises RuntimeError if the passes stop making progress (float noise
    flipping a near-tie between passes; bounded at `steps` + 1 passes).
    """
    if steps < 0:
        raise ValueError(f"steps must not be negative, got {steps}")
    results: list[GreedyResult | None] = [None] * len(prompts)
    for group in position_groups(prompts, steps, max_positions):
        known: dict[int, list[int]] = {i: [] for i in group}
        for attempt in range(1, steps + 2):
            pending = [i for i in group if results[i] is None]
            if not pending:
                break
            prefixes = [known[i] for i in pending]
            if propose is None:
                continuations = [list(p) for p in prefixes]
            else:
                continuations = [list(c[:steps]) for c in propose([prompts[i] for i in pending], prefixes, steps)]
            # feed every proposed token: row r holds the logits after the prompt and continuation[:r]
            sequences = [stream.embed(prompts[i], c) for i, c in zip(pending, continuations, strict=True)]
            rows = [range(prompts[i].positions - 1, prompts[i].positions + len(c))
                    for i, c in zip(pending, continuations, strict=True)]
            statistics = [SquaredInputs() for _ in pending] if collect else None
            logits = stream.forward(sequences, rows, statistics, include_output, progress)
            for j, (i, proposal) in enumerate(zip(pending, continuations, strict=True)):
                chosen = logits[j].argmax(dim=-1).tolist()
                greedy: list[int] = []
                for r, token in enumerate(chosen):
                    greedy.append(token)
                    if r >= len(proposal) or token != proposal[r]:
                        break
                # the last row may be a new token (not fed): enough for the logits, but the statistics must
                # have seen the prompt and every one of the `steps` tokens
                if len(greedy) >= steps and (not collect or proposal[:steps] == greedy[:steps]):
                    results[i] = GreedyResult(greedy[:steps], logits[j][:steps].clone(), attempt,
                                              statistics[j] if statistics is not None else None)
                else:
                    known[i] = greedy[:steps]
        if any(results[i] is None for i in group):
            raise RuntimeError(f"streamed greedy decoding did not settle in {steps + 1} passes")
    return [r for r in results if r is not None]
