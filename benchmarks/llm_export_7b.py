"""Scale benchmark: the README's real-model commands on a 7B-shaped Face-LLaVA checkpoint in the released layout.

It writes a random checkpoint exactly as a user gets the released one: `config.json` naming the towers by hub id
(`LanguageBind/LanguageBind_Image`, `LanguageBind/LanguageBind_Video_merge`), sharded `pytorch_model-*.bin`
with an index, LLaMA-2-7B shapes (hidden 4096, 32 layers, 32 heads, FFN 11008, vocab 32000, fp16) plus the
multimodal tensors (mm projector 1024->4096->4096, FRLP, FRGCA), a SentencePiece tokenizer grown to 32000 pieces
(`model.tiny.pad_tokenizer`), and two full-size LanguageBind-shaped towers (ViT-L/14: hidden 1024, 24 layers,
16 heads, MLP 4096, fp32; the video one with its temporal blocks, 8 frames) placed in a Hugging Face hub cache
under `$HF_HOME` (`model.tiny.move_towers_to_hub_cache`). The face data is the shipped photograph and one
synthetic video (`facellava make-synthetic-data`).

Then it runs the README's commands as written (paths substituted), each as its own `facellava` process with
`HF_HOME` set and no tower flag:

    inspect CKPT
    export vision --checkpoint CKPT --out BUNDLE --precision fp32,fp16
    export llm --checkpoint CKPT --out BUNDLE --types f16,q4_k_m          (parity included; + --allow-drift)
    calibrate llm BUNDLE --checkpoint CKPT --data FACES/ --types iq4_xs,q3_k_s,q2_k    (+ --allow-drift)
    run BUNDLE --image face.jpg "..."  and  run BUNDLE --video clip.mp4 "..."
        (+ --json --llm T --max-tokens N --flash-attn off)
    bench BUNDLE --checkpoint CKPT --out results/ --variants V --repeats 1

For each it reports wall time, peak anonymous memory (RssAnon of the command's process tree, summed, sampled every
0.5 s by a thread of its own while the main thread blocks in wait4: a spike shorter than that can be missed; the
longest gap between samples is reported) and peak RSS (the largest of the VmHWM samples and wait4's
ru_maxrss; this parent never imports torch, so the RSS a child inherits at exec is this small process's). A command
whose tree's RssAnon passes --memory-cap-gb is killed (the machine is shared: the kernel's OOM killer would pick
any process) and reported as such. For `run`, the time to first token and decode tokens/s it reports are set
against llama-cpp-python (`llama_cpp.Llama`: one `eval` of a text prompt of the same number of positions, then
greedy `eval` + argmax for the same number of tokens, same threads, F16 KV cache) on the same GGUF, in a process
of its own. Goals (issue 11): peak anonymous memory <= 3 GB for `export llm` and `calibrate llm` at 7B, <= 6 GB
for `export vision`.

`--layers N` (and `--hidden`, `--tower-layers`) make quick runs; `--stop-at HH:MM` (UTC) kills the command running
at that time, skips the rest and still prints the table. Everything is deleted at the end unless --keep.
The figures so far are written to `WORKDIR/results.json` after each command; `--resume` (implies --keep) goes on in
an existing workdir: the checkpoint and every command that succeeded are kept with their figures, the others run
(the full 32-layer run takes longer than one sitting on 2 cores).

    python benchmarks/llm_export_7b.py [--layers 32] [--workdir /tmp/facellava-scale] [--keep] [--stop-at 18:30]
    python benchmarks/llm_export_7b.py --resume [--commands ...] [--stop-at 01:00]   (same workdir and shape flags)

`write_checkpoint` is also used by `llm_reference_memory.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

LLAMA_7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                rope_theta=10000.0)
MM_HIDDEN = 1024
# LanguageBind_Image / LanguageBind_Video_merge: CLIP ViT-L/14 at 224 (exact GELU); the video tower adds temporal
# attention in every layer over 8 frames.
LANGUAGEBIND_VISION = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                           patch_size=14, image_size=224, layer_norm_eps=1e-5, hidden_act="gelu")
GOALS_GB = {"export llm": 3.0, "calibrate llm": 3.0, "export vision": 6.0}
SAMPLE_S = 0.5  # a thread of its own samples this often (see Sampler)
COMMANDS = ("inspect", "export vision", "export llm", "calibrate llm", "run image", "run video", "bench")
IMAGE_QUESTION = "How old is this person?"
VIDEO_QUESTION = "What emotion is shown in the video?"


# --- the checkpoint (written in a child process: this parent stays free of torch) ---------------------------


def _layer_tensors(layer: int, h: int = LLAMA_7B["hidden_size"], f: int = LLAMA_7B["intermediate_size"]
                   ) -> dict[str, tuple[int, ...]]:
    prefix = f"model.layers.{layer}."
    return {prefix + "input_layernorm.weight": (h,), prefix + "post_attention_layernorm.weight": (h,),
            **{prefix + f"self_attn.{p}_proj.weight": (h, h) for p in "qkvo"},
            prefix + "mlp.gate_proj.weight": (f, h), prefix + "mlp.up_proj.weight": (f, h),
            prefix + "mlp.down_proj.weight": (h, f)}


def _multimodal_tensors(h: int = LLAMA_7B["hidden_size"]) -> dict[str, tuple[int, ...]]:
    """The tensors of a Face-LLaVA checkpoint that are not the LLM (what the GGUF must leave out)."""
    from facellava import contract

    shapes: dict[str, tuple[int, ...]] = {
        "model.mm_projector.0.weight": (h, MM_HIDDEN), "model.mm_projector.0.bias": (h,),
        "model.mm_projector.2.weight": (h, h), "model.mm_projector.2.bias": (h,),
        "model.global_landmarks_projector.weight": (h, contract.LANDMARK_VALUES),
        "model.global_landmarks_projector.bias": (h,),
    }
    for name, start, stop in contract.LANDMARK_REGIONS:
        shapes[f"model.landmarks_projector.region_layers.{name}.weight"] = (h, 2 * (stop - start))
        shapes[f"model.landmarks_projector.region_layers.{name}.bias"] = (h,)
    cross = "model.landmarks_cross_attn."
    shapes.update({cross + "cross_attn.attn.in_proj_weight": (3 * h, h),
                   cross + "cross_attn.attn.in_proj_bias": (3 * h,),
                   cross + "cross_attn.attn.out_proj.weight": (h, h), cross + "cross_attn.attn.out_proj.bias": (h,),
                   cross + "cross_attn.ln.weight": (h,), cross + "cross_attn.ln.bias": (h,),
                   cross + "linear_proj.weight": (h, h), cross + "linear_proj.bias": (h,),
                   cross + "ln.weight": (h,), cross + "ln.bias": (h,)})
    return shapes


def llama_sizes(hidden: int) -> dict:
    """LLaMA-7B's fields at another width (the FFN and heads scaled alike), for quick runs."""
    if hidden == LLAMA_7B["hidden_size"]:
        return {}
    heads = max(1, hidden // 128)
    return dict(hidden_size=hidden, intermediate_size=hidden * LLAMA_7B["intermediate_size"] // 4096,
                num_attention_heads=heads, num_key_value_heads=heads)


def write_checkpoint(directory: Path, layers_per_shard: int, layers: int = LLAMA_7B["num_hidden_layers"],
                     seed: int = 0, sizes: dict | None = None) -> dict:
    """Write the 7B-shaped checkpoint shard by shard (`layers` < 32 only for a quick run; `sizes` overrides
    LLAMA_7B's fields, e.g. a narrower hidden size for a LLaMA-shaped model of another width), one shard in
    memory at a time; `config.json` names the towers by hub id. Return its size figures."""
    import torch

    from facellava.model.tiny import pad_tokenizer, tiny_config, train_tokenizer

    llama = {**LLAMA_7B, **(sizes or {})}
    directory.mkdir(parents=True)
    h, f, v, n_layers = llama["hidden_size"], llama["intermediate_size"], llama["vocab_size"], layers
    groups = [range(i, min(i + layers_per_shard, n_layers)) for i in range(0, n_layers, layers_per_shard)]
    shards: list[dict[str, tuple[int, ...]]] = []
    for i, group in enumerate(groups):
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)} if i == 0 else {}
        for layer in group:
            shapes.update(_layer_tensors(layer, h, f))
        shards.append(shapes)
    shards[-1].update({"model.norm.weight": (h,), "lm_head.weight": (v, h), **_multimodal_tensors(h)})

    generator = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    started = time.perf_counter()
    for i, shapes in enumerate(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
        state = {}
        for key, shape in shapes.items():
            tensor = torch.randn(shape, generator=generator, dtype=torch.float32).to(torch.float16)
            state[key] = tensor.mul_(0.02) if len(shape) == 2 else tensor.mul_(0.1).add_(1.0)
        torch.save(state, directory / name)
        total += sum(t.numel() * 2 for t in state.values())
        weight_map.update({key: name for key in state})
        del state
        print(f"  wrote {name} ({len(shapes)} tensors)", flush=True)
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config = tiny_config(vocab_size=v, cross_attn="simple", towers="none")  # towers named by hub id
    config.update(llama, num_hidden_layers=n_layers, mm_hidden_size=MM_HIDDEN, torch_dtype="float16")
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "tokenizer.model").write_bytes(pad_tokenizer(train_tokenizer(), v))
    return {"checkpoint_gb": total / 1e9, "shards": len(shards), "tensors": len(weight_map),
            "write_s": time.perf_counter() - started}


def write_tower(directory: Path, video: bool, layers: int, seed: int) -> float:
    """A LanguageBind tower directory (`config.json` with its `vision_config`, `pytorch_model.bin` with the
    vision trunk under `vision_model.*` plus the parts the features never use), random fp32 weights at
    ViT-L/14 size. Returns the weights' size in GB."""
    import torch

    from facellava import contract
    from facellava.model.modeling import LanguageBindTower, TowerConfig

    vision = {**LANGUAGEBIND_VISION, "num_hidden_layers": layers}
    frames = contract.NUM_FRAMES if video else 1
    with torch.device("meta"):  # only the names and shapes: every layer, the unused last one included
        shapes = {k: t.shape for k, t in LanguageBindTower(TowerConfig(
            **vision, num_used_layers=layers, num_frames=frames, add_time_attn=video)).state_dict().items()}
    dim = vision["hidden_size"]
    shapes.update({"post_layernorm.weight": (dim,), "post_layernorm.bias": (dim,)})
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        values = torch.randn(shape, generator=generator)
        if name.endswith("bias"):
            values.mul_(0.02)
        elif "norm" in name:
            values.mul_(0.1).add_(1.0)
        elif len(shape) == 1 or "embedding" in name:
            values.mul_(0.5)
        else:  # unit gain, so activations keep their scale through 24 layers
            values.div_(shape[1:].numel() ** 0.5)
        state[f"vision_model.{name}"] = values
    state["visual_projection.weight"] = torch.randn(768, dim, generator=generator) / dim ** 0.5
    state["text_projection.weight"] = torch.randn(768, 768, generator=generator) / 768 ** 0.5
    state["text_model.embeddings.token_embedding.weight"] = 0.02 * torch.randn(49408, 768, generator=generator)
    state["logit_scale"] = torch.tensor(4.6052)
    directory.mkdir(parents=True)
    torch.save(state, directory / "pytorch_model.bin")
    name = "LanguageBindVideo" if video else "LanguageBindImage"
    (directory / "config.json").write_text(json.dumps({
        "architectures": [name], "model_type": name, "projection_dim": 768,
        "text_config": {"hidden_size": 768, "num_hidden_layers": 12, "vocab_size": 49408},
        "vision_config": {**vision, "num_frames": frames, "add_time_attn": video, "force_patch_dropout": 0.0,
                          "num_channels": 3, "projection_dim": 768}}, indent=2))
    return sum(t.numel() * t.element_size() for t in state.values()) / 1e9


def prepare(workdir: Path, layers: int, hidden: int, tower_layers: int, layers_per_shard: int) -> dict:
    """The checkpoint, its towers in a hub cache under workdir/hf_home, and the face data (workdir/faces: the
    shipped photograph and one synthetic video)."""
    from facellava.model.synthetic import make_synthetic_data
    from facellava.model.tiny import HUB_TOWER_REPOS, move_towers_to_hub_cache
    from facellava.runtime.assets import face_photo

    checkpoint = workdir / "checkpoint"
    started = time.perf_counter()
    figures = write_checkpoint(checkpoint, layers_per_shard, layers, sizes=llama_sizes(hidden))
    towers_gb = 0.0
    for seed, (name, repo_id) in enumerate(HUB_TOWER_REPOS.items(), start=1):
        towers_gb += write_tower(checkpoint / name, repo_id.endswith("Video_merge"), tower_layers, seed)
        print(f"  wrote the {repo_id} tower", flush=True)
    snapshots = move_towers_to_hub_cache(checkpoint, workdir / "hf_home" / "hub")
    faces = workdir / "faces"
    faces.mkdir()
    shutil.copy(face_photo(), faces / "face.jpg")
    synthetic = make_synthetic_data(workdir / "synthetic", n=1, videos=1)
    shutil.move(next(synthetic.parent.rglob("*.mp4")), faces / "clip.mp4")
    shutil.rmtree(synthetic.parent)
    return {**figures, "towers_gb": towers_gb, "towers": {k: str(v) for k, v in snapshots.items()},
            "prepare_s": time.perf_counter() - started}


# --- llama-cpp-python on the same GGUF (its own process) -----------------------------------------------------


def llama_cpp_speed(gguf: str, positions: int, tokens: int) -> dict:
    """Plain llama-cpp-python: time to first token of a text prompt of `positions` tokens (one `eval`, then the
    argmax), and greedy decode tokens/s over `tokens` tokens (`calibration.bench.llama_cpp_greedy`), with the
    runtime's threads and llama_cpp.Llama's defaults otherwise (F16 KV cache)."""
    import llama_cpp

    from facellava.calibration.bench import llama_cpp_greedy, llama_cpp_prompt
    from facellava.runtime.llm import usable_cores

    threads = usable_cores()
    llm = llama_cpp.Llama(model_path=gguf, n_ctx=positions + tokens + 8, n_batch=512, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    try:
        _, first_ms, rate = llama_cpp_greedy(llm, llama_cpp_prompt(llm, positions), None, tokens)
    finally:
        llm.close()
    return {"time_to_first_token_ms": first_ms, "decode_tokens_per_s": rate, "threads": threads}


# --- measuring one command -----------------------------------------------------------------------------------


def _status(pid: int) -> dict[str, int]:
    """RssAnon, VmRSS, VmHWM (kB) of a process; empty once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in handle)
                    if k in ("RssAnon", "VmRSS", "VmHWM")}
    except (OSError, ValueError):
        return {}


def _tree(pid: int) -> list[int]:
    """The process and its descendants (through /proc/<pid>/task/<tid>/children)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    todo.extend(int(c) for c in handle.read().split())
        except OSError:
            pass
    return found


class Stopped(Exception):
    """The --stop-at time came: the command was killed and the rest are skipped."""


class Sampler(threading.Thread):
    """Samples a process tree's memory every `interval` seconds in a thread of its own (the main thread only waits
    for the command), keeping the peaks; kills the tree's process group when RssAnon passes `cap_kb` or `stop_at`
    comes. A thread that is starved can still miss a spike; `longest_gap_s` says how long it went unsampled."""

    def __init__(self, pid: int, cap_kb: int, stop_at: datetime.datetime | None, interval: float = SAMPLE_S):
        super().__init__(daemon=True)
        self.pid, self.cap_kb, self.stop_at, self.interval = pid, cap_kb, stop_at, interval
        self.peak_anon = self.peak_rss = self.hwm = self.anon = 0
        self.killed: str | None = None
        self.longest_gap_s = 0.0
        self.samples = 0
        self.trace: list[tuple[float, int]] = []  # (seconds since start, RssAnon kB of the tree)
        self.done = threading.Event()

    def run(self) -> None:
        last = start = time.perf_counter()
        while not self.done.is_set():
            now = time.perf_counter()
            self.longest_gap_s, last = max(self.longest_gap_s, now - last), now
            statuses = [_status(p) for p in _tree(self.pid)]
            self.anon = sum(s.get("RssAnon", 0) for s in statuses)
            self.peak_anon = max(self.peak_anon, self.anon)
            self.peak_rss = max(self.peak_rss, sum(s.get("VmRSS", 0) for s in statuses))
            self.hwm = max(self.hwm, statuses[0].get("VmHWM", 0) if statuses else 0)
            self.samples += 1
            self.trace.append((now - start, self.anon))
            reason = (f"RssAnon {self.anon / 2**20:.2f} GB passed the cap of {self.cap_kb / 2**20:.1f} GB"
                      if self.anon > self.cap_kb else "the --stop-at time came"
                      if self.stop_at and datetime.datetime.now(datetime.timezone.utc) >= self.stop_at else None)
            if reason and self.killed is None:
                self.killed = reason
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)  # the group this benchmark started for the command
            self.done.wait(self.interval)


def measure(name: str, argv: list[str], env: dict[str, str], logs: Path, cap_kb: int,
            stop_at: datetime.datetime | None) -> dict:
    """Run one command in its own process (group), sampling its tree's memory (`Sampler`); return its figures."""
    out, err = logs / f"{name.replace(' ', '_')}.out", logs / f"{name.replace(' ', '_')}.err"
    print(f"[{name}] {' '.join(argv)}", flush=True)
    started = time.perf_counter()
    with open(out, "w") as stdout, open(err, "w") as stderr:
        process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                   start_new_session=True)
    sampler = Sampler(process.pid, cap_kb, stop_at)
    sampler.start()
    _, status, usage = os.wait4(process.pid, 0)  # blocks without the GIL: the sampler thread runs meanwhile
    sampler.done.set()
    sampler.join()
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    killed, gap = sampler.killed, sampler.longest_gap_s
    trace = logs / f"{name.replace(' ', '_')}.memory.tsv"  # RssAnon over time, to find where a peak happens
    trace.write_text("seconds\trss_anon_mb\n" + "".join(f"{t:.1f}\t{kb / 1024:.0f}\n" for t, kb in sampler.trace))
    figures = {"command": name, "argv": argv, "wall_s": wall, "returncode": process.returncode,
               "peak_anon_gb": sampler.peak_anon / 2**20,
               "peak_rss_gb": max(sampler.hwm, sampler.peak_rss, usage.ru_maxrss) / 2**20,
               "killed": killed, "longest_sample_gap_s": gap, "samples": sampler.samples, "stdout": str(out),
               "stderr": str(err)}
    if process.returncode != 0:
        lines = [line for line in err.read_text(errors="replace").splitlines() if line.strip()]
        figures["error"] = killed or (lines[-1] if lines else f"exit status {process.returncode}")
    print(f"  [{name}] {'ok' if process.returncode == 0 else 'FAILED: ' + figures['error']}: {wall:.0f} s, "
          f"peak RssAnon {figures['peak_anon_gb']:.2f} GB, peak RSS {figures['peak_rss_gb']:.2f} GB, longest gap "
          f"between samples {gap:.1f} s ({sampler.samples} samples)", flush=True)
    if killed == "the --stop-at time came":
        raise Stopped(figures)
    return figures


# --- the whole benchmark -------------------------------------------------------------------------------------


def _commands(work: Path, args: argparse.Namespace) -> dict[str, list[str]]:
    """The README's commands with this run's paths (each one a `facellava` process)."""
    cli = [str(Path(sys.executable).with_name("facellava"))]
    ckpt, bundle, faces = str(work / "checkpoint"), str(work / "bundle"), work / "faces"
    # llama.cpp's flash attention off on both sides of the comparison (llama_cpp.Llama's default; run's is auto)
    run_extra = ["--json", "--llm", args.run_llm, "--max-tokens", str(args.max_tokens), "--flash-attn", "off"]
    return {
        "inspect": cli + ["inspect", ckpt],
        "export vision": cli + ["export", "vision", "--checkpoint", ckpt, "--out", bundle, "--modalities",
                                args.vision_modalities, "--precision", args.vision_precision],
        # --allow-drift: random weights give near-flat logits, whose argmax any quantization moves (the 32-layer
        # run: Q4_K_M top-1 agreement 0.144 < 0.7, and the 2 h export wrote nothing); the figures are still recorded
        "export llm": cli + ["export", "llm", "--checkpoint", ckpt, "--out", bundle, "--types", args.llm_types,
                             "--allow-drift"],
        "calibrate llm": cli + ["calibrate", "llm", bundle, "--checkpoint", ckpt, "--data", f"{faces}/",
                                "--types", args.calibrate_types, "--allow-drift"],
        "run image": cli + ["run", bundle, "--image", str(faces / "face.jpg"), IMAGE_QUESTION, *run_extra],
        "run video": cli + ["run", bundle, "--video", str(faces / "clip.mp4"), VIDEO_QUESTION, *run_extra],
        "bench": cli + ["bench", bundle, "--checkpoint", ckpt, "--out", str(work / "results"),
                        "--variants", args.bench_variant, "--repeats", "1"],
    }


def _run_speeds(row: dict, bundle: Path, env: dict[str, str], logs: Path, cap_kb: int,
                stop_at: datetime.datetime | None) -> None:
    """The run's TTFT and decode speed, and llama-cpp-python's on the same GGUF in a process of its own."""
    answer = json.loads(Path(row["stdout"]).read_text().strip().splitlines()[-1])
    timings = answer["timings"]
    row["runtime"] = {"time_to_first_token_ms": timings["time_to_first_token_ms"],
                      "decode_tokens_per_s": timings["decode_tokens_per_s"],
                      "prompt_positions": answer["prompt_positions"], "tokens": len(answer["tokens"]),
                      "reused_prefix_positions": answer["reused_prefix_positions"]}
    gguf = next(bundle.glob(f"llm-{row['llm']}.gguf"))
    # the positions the runtime prefilled in its time to first token (a system prompt it decoded at open is not)
    prefilled = answer["prompt_positions"] - answer["reused_prefix_positions"]
    side = measure(f"llama-cpp-python {row['command'].split()[-1]}",
                   [sys.executable, __file__, "--child-llama", str(gguf), str(prefilled), str(len(answer["tokens"]))],
                   env, logs, cap_kb, stop_at)
    if side["returncode"] == 0:
        row["llama_cpp"] = {**json.loads(Path(side["stdout"]).read_text().strip().splitlines()[-1]),
                            "peak_anon_gb": side["peak_anon_gb"], "peak_rss_gb": side["peak_rss_gb"]}
    else:
        row["llama_cpp"] = {"error": side["error"]}


def _print_table(rows: list[dict], args: argparse.Namespace, prepared: dict | None) -> None:
    shape = "7B" if args.hidden == LLAMA_7B["hidden_size"] else f"hidden {args.hidden}"
    print(f"\n== scale benchmark: {args.layers}-layer LLaMA ({shape}) Face-LLaVA, LanguageBind towers "
          f"{args.tower_layers} layers ==")
    if prepared:
        print(f"checkpoint {prepared['checkpoint_gb']:.2f} GB fp16 in {prepared['shards']} shards, towers "
              f"{prepared['towers_gb']:.2f} GB fp32 in a hub cache; written in {prepared['prepare_s']:.0f} s")
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} cores, load {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}, "
          f"{Path('/proc/meminfo').read_text().split()[1]} kB memory; memory cap per command "
          f"{args.memory_cap_gb} GB")
    print("\n| command | result | wall s | peak anon GB | peak RSS GB | longest sample gap s | goal |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        goal = GOALS_GB.get(row["command"])
        verdict = "" if goal is None else f"<= {goal} GB: {'met' if row['peak_anon_gb'] <= goal else 'MISSED'}"
        result = "ok" if row["returncode"] == 0 else f"FAILED: {row['error']}"
        print(f"| {row['command']} | {result} | {row['wall_s']:.0f} | {row['peak_anon_gb']:.2f} | "
              f"{row['peak_rss_gb']:.2f} | {row['longest_sample_gap_s']:.1f} | {verdict} |")
    runs = [r for r in rows if "runtime" in r]
    if runs:
        print("\n| run | GGUF | prompt positions (prefilled) | tokens | TTFT ms (runtime / llama-cpp-python) | "
              "decode tok/s (runtime / llama-cpp-python) | decode ratio |")
        print("|---|---|---|---|---|---|---|")
        for row in runs:
            ours, theirs = row["runtime"], row.get("llama_cpp", {})
            positions = f"{ours['prompt_positions']} ({ours['prompt_positions'] - ours['reused_prefix_positions']})"
            if "error" in theirs:
                print(f"| {row['command']} | {row['llm']} | {positions} | {ours['tokens']} | "
                      f"{ours['time_to_first_token_ms']:.0f} / - | {ours['decode_tokens_per_s']:.2f} / - | "
                      f"llama-cpp-python failed: {theirs['error']} |")
                continue
            ratio = ours["decode_tokens_per_s"] / theirs["decode_tokens_per_s"] if theirs["decode_tokens_per_s"] else 0
            print(f"| {row['command']} | {row['llm']} | {positions} | {ours['tokens']} | "
                  f"{ours['time_to_first_token_ms']:.0f} / {theirs['time_to_first_token_ms']:.0f} | "
                  f"{ours['decode_tokens_per_s']:.2f} / {theirs['decode_tokens_per_s']:.2f} | {ratio:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=LLAMA_7B["num_hidden_layers"],
                        help="decoder layers (32 for 7B; fewer for a quick run)")
    parser.add_argument("--hidden", type=int, default=LLAMA_7B["hidden_size"],
                        help="LLM width (4096 for 7B; FFN and heads scale with it; narrower only for a quick run)")
    parser.add_argument("--tower-layers", type=int, default=LANGUAGEBIND_VISION["num_hidden_layers"],
                        help="LanguageBind tower layers (24; fewer only for a quick run)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/facellava-scale"))
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint, the bundle and the logs")
    parser.add_argument("--resume", action="store_true",
                        help="go on in an existing --workdir: keep its checkpoint and the commands that succeeded")
    parser.add_argument("--layers-per-shard", type=int, default=4)
    parser.add_argument("--commands", default=",".join(COMMANDS), help="which commands, in this order")
    parser.add_argument("--vision-modalities", default="image,video",
                        help="export vision --modalities (one only for a shorter run; run and bench need both)")
    parser.add_argument("--vision-precision", default="fp32,fp16", help="export vision --precision")
    parser.add_argument("--llm-types", default="f16,q4_k_m", help="export llm --types")
    parser.add_argument("--calibrate-types", default="iq4_xs,q3_k_s,q2_k", help="calibrate llm --types")
    parser.add_argument("--run-llm", default="q4_k_m", help="the GGUF type `run` answers with")
    parser.add_argument("--max-tokens", type=int, default=32, help="run --max-tokens")
    parser.add_argument("--bench-variant", default="fp32+q4_k_m")
    parser.add_argument("--memory-cap-gb", type=float, default=12.0,
                        help="kill a command whose process tree holds more anonymous memory (a shared machine)")
    parser.add_argument("--stop-at", help="HH:MM (UTC): kill the command running then, skip the rest, print the table")
    parser.add_argument("--child-prepare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-llama", nargs=3, metavar=("GGUF", "POSITIONS", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_llama:
        gguf, positions, tokens = args.child_llama
        print(json.dumps(llama_cpp_speed(gguf, int(positions), int(tokens))))
        return
    if args.child_prepare:
        print(json.dumps(prepare(args.workdir, args.layers, args.hidden, args.tower_layers, args.layers_per_shard)))
        return

    chosen = [c.strip() for c in args.commands.split(",") if c.strip()]
    if unknown := [c for c in chosen if c not in COMMANDS]:
        raise SystemExit(f"unknown commands {unknown}; choose from {', '.join(COMMANDS)}")
    stop_at = None
    if args.stop_at:
        hour, minute = (int(x) for x in args.stop_at.split(":"))
        now = datetime.datetime.now(datetime.timezone.utc)
        stop_at = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
        if stop_at <= now:  # the next such time: 00:40 given at 22:30 is tomorrow's
            stop_at += datetime.timedelta(days=1)
    results = args.workdir / "results.json"
    earlier: dict = {"prepared": None, "rows": []}
    if args.resume:
        args.keep = True
        if not results.is_file():
            raise SystemExit(f"--resume: {results} does not exist (no earlier run in {args.workdir})")
        earlier = json.loads(results.read_text())
    elif args.workdir.exists():
        raise SystemExit(f"{args.workdir} exists; remove it, choose another --workdir, or --resume")
    args.workdir.mkdir(parents=True, exist_ok=args.resume)
    logs = args.workdir / "logs"
    logs.mkdir(exist_ok=args.resume)
    done = {row["command"]: row for row in earlier["rows"] if row["returncode"] == 0}
    env = {**os.environ, "HF_HOME": str(args.workdir / "hf_home"), "FACELLAVA_CACHE": str(args.workdir / "cache"),
           "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    cap_kb = int(args.memory_cap_gb * 2**20)
    rows: list[dict] = []
    prepared = earlier["prepared"]

    def save() -> None:  # after every step, so that a stopped or killed run can be resumed
        kept = [row for name, row in done.items() if name not in {r["command"] for r in rows}]
        results.write_text(json.dumps({"prepared": prepared, "rows": kept + rows}, indent=1))

    print(f"{datetime.datetime.now(datetime.timezone.utc):%H:%M:%S} UTC, workdir {args.workdir}", flush=True)
    try:
        if prepared is None:
            step = measure("write checkpoint", [sys.executable, __file__, "--child-prepare", "--workdir",
                                                str(args.workdir), "--layers", str(args.layers), "--hidden",
                                                str(args.hidden), "--tower-layers", str(args.tower_layers),
                                                "--layers-per-shard", str(args.layers_per_shard)],
                           env, logs, cap_kb, stop_at)
            if step["returncode"] != 0:
                raise SystemExit(f"writing the checkpoint failed: {step['error']}")
            prepared = json.loads(Path(step["stdout"]).read_text().strip().splitlines()[-1])
            save()
        commands = _commands(args.workdir, args)
        for name in chosen:
            if name in done:
                print(f"[{name}] kept from the earlier run: {done[name]['wall_s']:.0f} s, peak RssAnon "
                      f"{done[name]['peak_anon_gb']:.2f} GB", flush=True)
                rows.append(done[name])
                continue
            row = measure(name, commands[name], env, logs, cap_kb, stop_at)
            rows.append(row)
            if name.startswith("run") and row["returncode"] == 0:
                row["llm"] = args.run_llm
                _run_speeds(row, args.workdir / "bundle", env, logs, cap_kb, stop_at)
            save()
    except Stopped as stopped:
        rows.append(stopped.args[0])
        save()
        print(f"stopped at {args.stop_at} UTC; not run: {', '.join(chosen[len(rows):]) or 'none'}", flush=True)
    finally:
        _print_table(rows, args, prepared)
        print(json.dumps({"prepared": prepared, "rows": rows}, indent=1))
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
