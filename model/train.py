"""Training Face-LLaVA: the two official stages, optional LoRA, resumable, saved in the official layout.

`train(data, checkpoint, out, TrainConfig(...))` goes from a checkpoint and a data file to a checkpoint:

- stage 1 trains only the landmark modules (FRLP's `landmarks_projector` and `global_landmarks_projector`, and
  FRGCA's `landmarks_cross_attn`); stage 2 trains everything but the towers (LLM, mm projector, landmark
  modules), or with LoRA the LLM's adapters instead of the LLM, as the official `--lora_enable` does;
- the loss is the causal-LM cross-entropy on the answer tokens that the official `preprocess_v1` labels
  (`facellava.model.data`), averaged per micro-batch and over the micro-batches of a step;
- AdamW, a cosine schedule with 3% warm-up, gradient accumulation, gradient clipping, bf16 autocast on request;
- every `save_every` steps and at the end, the training state (trainable weights, optimizer, scheduler, data
  position, random states) goes to `OUT/checkpoint-<step>/`, written under a temporary name and renamed, so
  that `resume=True` continues exactly where it stopped;
- at the end the model (LoRA merged) is written into OUT in the official layout: config.json, the weights in
  the base checkpoint's format and sharding, tokenizer files, the LanguageBind tower directories that config.json
  names. config.json is moved in last, so an interrupted save never looks like a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from facellava import contract
from facellava.atomic import staged_directory
from facellava.errors import FaceLlavaError
from facellava.model.checkpoint import (
    CONFIG_NAME,
    TOKENIZER_NAME,
    TOWER_PREFIXES,
    CheckpointWeights,
    official_state_dict,
    weight_layout,
    write_weights,
)
from facellava.model.data import ConversationDataset, ConversationTokenizer, Example, Record, UnusableRecord
from facellava.model.loading import read_config, tower_directory
from facellava.model.modeling import FaceLlava

LANDMARK_MODULES = ("landmarks_projector", "global_landmarks_projector", "landmarks_cross_attn")
DEFAULT_LR = {1: 1e-4, 2: 2e-5}  # the released scripts' learning rates
TOKENIZER_FILES = (TOKENIZER_NAME, "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "generation_config.json")
STATE_PREFIX = "checkpoint-"


@dataclass
class TrainConfig:
    """What a training run does. Every field is part of a run's identity: a resume must repeat them all."""

    stage: int = 2
    lora: bool = False
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    epochs: int = 1
    lr: float | None = None  # None: the official rate of the stage
    batch_size: int = 1
    grad_accum: int = 1
    max_length: int = 3072  # spliced positions (text + visual), the official tokenizer_model_max_length
    bf16: bool = False
    max_steps: int | None = None  # None: epochs x steps per epoch
    seed: int = 0
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    save_every: int = 200  # optimizer steps between training checkpoints

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.stage]

    def check(self) -> None:
        """Raise FaceLlavaError for settings that cannot work."""
        if self.stage not in (1, 2):
            raise FaceLlavaError(f"--stage must be 1 or 2, not {self.stage}")
        if self.lora and self.stage == 1:
            raise FaceLlavaError("LoRA adapts the LLM, which stage 1 keeps frozen; use --lora with --stage 2")
        for name in ("epochs", "batch_size", "grad_accum", "max_length", "save_every", "lora_r"):
            if getattr(self, name) < 1:
                raise FaceLlavaError(f"{name.replace('_', '-')} must be at least 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise FaceLlavaError("max-steps must be at least 1")
        if not self.learning_rate > 0:
            raise FaceLlavaError("the learning rate must be positive")


@dataclass
class TrainResult:
    """What a run did: where the model is, how many optimizer steps it took, the loss of each step."""

    out: Path
    steps: int
    losses: list[float]
    skipped: dict[str, int]
    trainable_parameters: int
    seconds: float
    samples: int  # samples trained on in this process (not counting a resumed run's earlier part)


StepHook = Callable[[int, float], None]


# --- which parameters learn -------------------------------------------------------------------------------------


def lora_target_modules(llm: nn.Module) -> list[str]:
    """The official `find_all_linear_names`: the names of every nn.Linear of the LLM, except lm_head."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in llm.named_modules()
                   if isinstance(module, nn.Linear)} - {"lm_head"})


def set_trainable(model: FaceLlava, config: TrainConfig) -> list[str]:
    """Freeze what the stage keeps fixed (adding LoRA adapters first when asked); return the trainable names.

    Stage 1: only the landmark modules. Stage 2: everything but the towers; with LoRA the LLM's own weights stay
    frozen and its adapters learn instead. Raises FaceLlavaError for stage 1 on a checkpoint without landmark
    modules.
    """
    model.requires_grad_(False)
    if config.stage == 1:
        if model.landmarks_projector is None:
            raise FaceLlavaError("stage 1 trains the landmark modules, and this checkpoint has none "
                                 "(no landmarks_projector_type in its config.json)")
        learning = [getattr(model, name) for name in LANDMARK_MODULES]
    else:
        learning = [model.mm_projector] + [getattr(model, name) for name in LANDMARK_MODULES
                                           if getattr(model, name) is not None]
        if config.lora:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                              target_modules=lora_target_modules(model.llm), bias="none")
            model.llm = get_peft_model(model.llm, lora)  # freezes the LLM, adapters trainable
        else:
            learning.append(model.llm)
    for module in learning:
        module.requires_grad_(True)
    return [name for name, p in model.named_parameters() if p.requires_grad]


def merge_lora(model: FaceLlava) -> None:
    """Fold LoRA adapters into the LLM's weights and drop them, so that the model has the official keys again."""
    if hasattr(model.llm, "merge_and_unload"):
        model.llm = model.llm.merge_and_unload()


# --- data order and batches ---------------------------------------------------------------------------------------


def epoch_order(size: int, seed: int, epoch: int) -> list[int]:
    """The order of the records in an epoch: a permutation seeded by (seed, epoch), so a resume recomputes it."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(size, generator=generator).tolist()


def visual_blocks(model: FaceLlava, examples: Sequence[Example], device: torch.device) -> list[list[torch.Tensor]]:
    """Each example's visual blocks: one [256, D] per image, eight [257, D] per video, none for text.

    The towers are frozen and run without gradients; examples of one kind run through them together.
    """
    blocks: list[list[torch.Tensor]] = [[] for _ in examples]
    groups: dict[tuple[str, bool], list[int]] = defaultdict(list)
    for row, example in enumerate(examples):
        if example.record.kind is not None:
            groups[(example.record.kind, example.landmarks is not None)].append(row)
    for (_kind, has_landmarks), rows in groups.items():
        pixels = torch.stack([examples[row].pixel_values for row in rows]).to(device)
        landmarks = torch.stack([examples[row].landmarks for row in rows]).to(device) if has_landmarks else None
        with torch.no_grad():
            features = model.visual_features(pixels)
        tokens = model.project_visual(features, landmarks)
        for row, sample_tokens in zip(rows, tokens, strict=True):
            blocks[row] = list(sample_tokens.reshape(-1, *tokens.shape[-2:]))  # 1 block per image, 8 per video
    return blocks


# --- training state -------------------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _identity(config: TrainConfig, data: Path, checkpoint: Path) -> dict[str, Any]:
    """What must be the same for a resume to continue the same run."""
    return {"config": dataclasses.asdict(config), "data_sha256": contract.file_sha256(data),
            "checkpoint_config_sha256": contract.file_sha256(checkpoint / CONFIG_NAME)}


def _state_dirs(out: Path) -> list[tuple[int, Path]]:
    found = []
    for path in out.glob(f"{STATE_PREFIX}*"):
        suffix = path.name[len(STATE_PREFIX):]
        if path.is_dir() and suffix.isdigit() and (path / "trainer_state.json").is_file():
            found.append((int(suffix), path))
    return sorted(found)


def save_training_state(out: Path, step: int, model: FaceLlava, optimizer: torch.optim.Optimizer,
                        scheduler: Any, progress: dict[str, Any]) -> Path:
    """Write `OUT/checkpoint-<step>/` (under a temporary name, then renamed) and remove older ones."""
    final = out / f"{STATE_PREFIX}{step}"
    with staged_directory(final) as staging:
        trainable = {name: p.detach().cpu() for name, p in model.named_parameters() if p.requires_grad}
        torch.save(trainable, staging / "trainable.pt")
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
        torch.save(scheduler.state_dict(), staging / "scheduler.pt")
        torch.save(_rng_state(), staging / "rng.pt")
        (staging / "trainer_state.json").write_text(json.dumps(progress, indent=1))
    for older_step, older in _state_dirs(out):
        if older_step != step:
            shutil.rmtree(older, ignore_errors=True)
    return final


def _restore_training_state(state_dir: Path, model: FaceLlava, optimizer: torch.optim.Optimizer,
                            scheduler: Any) -> None:
    """Load a training checkpoint's trainable weights, optimizer, scheduler and random states into this run."""
    trainable = torch.load(state_dir / "trainable.pt", weights_only=True)
    parameters = dict(model.named_parameters())
    names = [name for name, p in parameters.items() if p.requires_grad]
    if sorted(names) != sorted(trainable):
        raise FaceLlavaError(f"{state_dir} holds other trainable weights than this run trains")
    with torch.no_grad():
        for name, tensor in trainable.items():
            parameters[name].copy_(tensor)
    device = next(iter(parameters.values())).device
    optimizer.load_state_dict(torch.load(state_dir / "optimizer.pt", weights_only=True, map_location=device))
    scheduler.load_state_dict(torch.load(state_dir / "scheduler.pt", weights_only=True))
    _set_rng_state(torch.load(state_dir / "rng.pt", weights_only=False))


# --- saving the model in the official layout ------------------------------------------------------------------


def _link_tree(source: Path, target: Path) -> None:
    """Copy a directory as hard links where the file system allows it (a 7B run's towers cost no space)."""
    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link_or_copy)


def save_face_llava(model: FaceLlava, out: str | Path, base_checkpoint: str | Path,
                    image_tower: str | Path | None = None, video_tower: str | Path | None = None) -> Path:
    """Write a trained model into `out` in the official layout of `base_checkpoint`.

    The weights take the base's format, sharding and dtype; config.json, the tokenizer files and any tower
    tensors stored in the base's weights are carried over; each tower directory the base's config.json names
    (or that was given) is linked into `out` under that name, so that `FaceLlava.from_pretrained(out)` finds it.
    LoRA adapters must be merged first (`merge_lora`). Files are staged in `out` and moved into place with
    config.json last. Returns `out`.
    """
    out, base = Path(out), Path(base_checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    raw_config = json.loads((base / CONFIG_NAME).read_text())
    config = read_config(base)
    weights = CheckpointWeights.open(base)
    weight_format, shards = weight_layout(base)
    first_llm_key = next(key for key in weights.keys() if key.startswith("model.layers."))
    dtype = weights.get(first_llm_key).dtype

    if any(name.startswith("llm.base_model.") for name, _ in model.named_parameters()):
        raise ValueError("merge the LoRA adapters (merge_lora) before saving")
    state = {key: tensor.detach().to("cpu", dtype) for key, tensor in official_state_dict(model).items()}
    for key in weights.keys():  # tower tensors inside the base checkpoint stay as they are
        if key.startswith(tuple(TOWER_PREFIXES.values())):
            state[key] = weights.get(key)

    staging = Path(tempfile.mkdtemp(prefix=".model.", dir=out))
    try:
        write_weights(staging, state, weight_format, shards)
        for name in TOKENIZER_FILES:
            if (base / name).is_file():
                shutil.copy2(base / name, staging / name)
        for kind, explicit in (("image", image_tower), ("video", video_tower)):
            source = tower_directory(kind, config, base, explicit)
            if source is None:
                continue
            named = raw_config.get(f"mm_{kind}_tower")
            if named and Path(named).is_absolute() and Path(named).resolve() == source.resolve():
                continue  # an absolute path keeps working as it is
            relative = named if named and not Path(named).is_absolute() else source.name
            _link_tree(source, staging / relative)
            raw_config[f"mm_{kind}_tower"] = relative
        (staging / CONFIG_NAME).write_text(json.dumps(raw_config, indent=2))
        _move_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _move_into_place(staging: Path, out: Path) -> None:
    """Replace the model files in `out` by the staged ones: old config.json out first, new config.json in last."""
    (out / CONFIG_NAME).unlink(missing_ok=True)
    stale = [p for pattern in ("pytorch_model*.bin", "model*.safetensors", "*.index.json") for p in out.glob(pattern)]
    for path in stale:
        path.unlink()
    for entry in sorted(staging.iterdir()):
        if entry.name == CONFIG_NAME:
            continue
        # the first part of a nested tower name ("LanguageBind/LanguageBind_Image") is replaced whole
        target = out / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        entry.rename(target)
    (staging / CONFIG_NAME).rename(out / CONFIG_NAME)


# --- the loop -------------------------------------------------------------------------------------------------------


def _prepare_out(out: Path, resume: bool) -> Path | None:
    """Check the output directory; return the training checkpoint to resume from, if any."""
    if out.exists() and not out.is_dir():
        raise FaceLlavaError(f"{out} is a file; --out needs a directory")
    if resume:
        states = _state_dirs(out) if out.is_dir() else []
        if not states:
            raise FaceLlavaError(f"no training checkpoint ({STATE_PREFIX}<step>) in {out} to resume from; "
                                 "run without --resume")
        return states[-1][1]
    if out.is_dir() and any(out.iterdir()):
        raise FaceLlavaError(f"{out} is not empty; pass --resume to continue the run in it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    return None


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train(data: str | Path, checkpoint: str | Path, out: str | Path, config: TrainConfig | None = None, *,
          image_tower: str | Path | None = None, video_tower: str | Path | None = None, resume: bool = False,
          device: str | torch.device | None = None, progress: bool = True, on_step: StepHook | None = None
          ) -> TrainResult:
    """Train a Face-LLaVA checkpoint on a data file and write the result into `out` in the official layout.

    Takes the data file (official JSON format, see `facellava.model.data`), the base checkpoint directory, the
    output directory (must be empty or absent, unless `resume`), the settings, optional LanguageBind tower
    directories (else those the checkpoint names), whether to continue from the latest `out/checkpoint-<step>`,
    the device (default: CUDA when available), whether to show a progress bar, and an optional hook called as
    `on_step(step, loss)` after every optimizer step (and after that step's training checkpoint). Returns a
    TrainResult. Raises FaceLlavaError for unusable inputs (no usable record, a resume with other settings, ...).
    An interruption (KeyboardInterrupt) leaves the last training checkpoint, and no half-written model.
    """
    config = config or TrainConfig()
    config.check()
    data, base, out = Path(data), Path(checkpoint), Path(out)
    resume_from = _prepare_out(out, resume)
    device = torch.device(device) if device is not None else _default_device()
    started = time.perf_counter()

    model = FaceLlava.from_pretrained(base, image_tower=image_tower, video_tower=video_tower)
    if model.tokenizer is None:
        raise FaceLlavaError(f"{base} has no {TOKENIZER_NAME}; training needs the tokenizer")
    tokenizer = ConversationTokenizer(model.tokenizer, model.config.bos_token_id, model.config.eos_token_id)
    dataset = ConversationDataset.load(data, tokenizer, config.max_length)
    kinds = Counter(record.kind for record in dataset.records)
    for kind in ("image", "video"):
        if kinds[kind] and getattr(model, f"{kind}_tower") is None:
            raise FaceLlavaError(f"the data has {kinds[kind]} {kind} records: {model.no_tower(kind)}")

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    set_trainable(model, config)
    model.to(device)
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    per_step = config.batch_size * config.grad_accum
    steps_per_epoch = math.ceil(len(dataset) / per_step)
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    from transformers import get_cosine_schedule_with_warmup

    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(config.warmup_ratio * total_steps), total_steps)

    identity = _identity(config, data, base)
    step, epoch, position, losses = 0, 0, 0, []
    unreadable: dict[int, str] = {}
    if resume_from is not None:
        step, epoch, position, losses, unreadable = _resume(resume_from, identity, model, optimizer, scheduler)

    def progress_record() -> dict[str, Any]:
        return {"identity": identity, "step": step, "epoch": epoch, "position": position, "losses": losses,
                "total_steps": total_steps, "unreadable": unreadable}

    print(f"training stage {config.stage}{' with LoRA' if config.lora else ''}: {len(dataset)} records "
          f"({dataset.skipped_summary()}), {sum(p.numel() for p in parameters):,} trainable parameters, "
          f"{total_steps} steps on {device}" + (f", resuming at step {step}" if resume_from else ""),
          file=sys.stderr)
    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=step, unit="step", disable=not progress, dynamic_ncols=True)
    samples, last_save = 0, step
    try:
        while step < total_steps:
            order = epoch_order(len(dataset), config.seed, epoch)
            while position < len(order) and step < total_steps:
                tick = time.perf_counter()
                group = order[position:position + per_step]
                step_losses, used = accumulate_gradients(model, dataset, group, config, device, unreadable)
                samples += used
                position += len(group)
                if not step_losses:
                    continue
                torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                losses.append(sum(step_losses) / len(step_losses))
                if step % config.save_every == 0 or step == total_steps:
                    save_training_state(out, step, model, optimizer, scheduler, progress_record())
                    last_save = step
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}", samples_s=f"{len(group) / (time.perf_counter() - tick):.1f}")
                if on_step is not None:
                    on_step(step, losses[-1])
            if position >= len(order):
                epoch, position = epoch + 1, 0
    except KeyboardInterrupt:
        bar.close()
        where = f"{out / f'{STATE_PREFIX}{last_save}'}" if last_save else "no training checkpoint yet"
        print(f"interrupted at step {step}; last training checkpoint: {where}; "
              "run again with --resume to continue", file=sys.stderr)
        raise
    bar.close()

    skipped = Counter(dataset.skipped) + Counter(unreadable.values())
    model.eval()
    merge_lora(model)
    save_face_llava(model, out, base, image_tower=image_tower, video_tower=video_tower)
    return TrainResult(out=out, steps=step, losses=losses, skipped=dict(skipped),
                       trainable_parameters=sum(p.numel() for p in parameters),
                       seconds=time.perf_counter() - started, samples=samples)


def accumulate_gradients(model: FaceLlava, dataset: ConversationDataset, group: Sequence[int], config: TrainConfig,
                         device: torch.device, unreadable: dict[int, str]) -> tuple[list[float], int]:
    """Forward and backward over the micro-batches of one optimizer step; return their losses and the samples used.

    Each micro-batch's loss (a mean over its supervised tokens) is divided by the number of micro-batches, so the
    gradient is that of their mean, as the official trainer's accumulation gives. Records whose files turn out
    unreadable are skipped and remembered in `unreadable`.
    """
    micro_batches = [group[i:i + config.batch_size] for i in range(0, len(group), config.batch_size)]
    losses, used = [], 0
    for micro in micro_batches:
        examples = _load_examples([dataset.records[i] for i in micro], dataset, unreadable)
        if not examples:
            continue
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
            blocks = visual_blocks(model, examples, device)
            loss = model.forward_train([e.record.input_ids for e in examples], [e.record.labels for e in examples],
                                       blocks, config.max_length)
        (loss / len(micro_batches)).backward()
        losses.append(loss.item())
        used += len(examples)
    return losses, used


def _resume(state_dir: Path, identity: dict[str, Any], model: FaceLlava, optimizer: torch.optim.Optimizer,
            scheduler: Any) -> tuple[int, int, int, list[float], dict[int, str]]:
    """Check that a training checkpoint belongs to this run and restore it; return step, epoch, position in the
    epoch, the losses so far and the records found unreadable."""
    saved = json.loads((state_dir / "trainer_state.json").read_text())
    if saved["identity"] != identity:
        before, now = saved["identity"]["config"], identity["config"]
        differing = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        what = ", ".join(differing) or "the data file or the base checkpoint"
        raise FaceLlavaError(f"{state_dir} belongs to a run with other settings ({what} differ); "
                             "resume with the same arguments")
    _restore_training_state(state_dir, model, optimizer, scheduler)
    unreadable = {int(k): v for k, v in saved["unreadable"].items()}
    return saved["step"], saved["epoch"], saved["position"], saved["losses"], unreadable


def _load_examples(records: Sequence[Record], dataset: ConversationDataset, unreadable: dict[int, str]
                   ) -> list[Example]:
    """Read the records of a micro-batch; records whose files turn out unreadable are skipped and remembered."""
    examples = []
    for record in records:
        if record.index in unreadable:
            continue
        try:
            examples.append(dataset.load_example(record))
        except UnusableRecord as reason:
            unreadable[record.index] = str(reason)
            print(f"skipping record {record.index} of {dataset.path}: {reason}", file=sys.stderr)
    return examples
