"""The LLM export on the tiny checkpoint: GGUF conversion, llama.cpp quantization, parity with PyTorch in
llama.cpp itself, the bundle, and the errors a user can cause. The expensive exports run once per module."""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from facellava import contract
from facellava.bundle import BOOKKEEPING
from facellava.cli import main
from facellava.export import llm_parity
from facellava.export.gguf import convert_to_gguf, llava_v1_chat_template, rope_permute, tensor_plan
from facellava.export.quantize import QUANT_TYPES, load_imatrix, save_imatrix
from facellava.model.checkpoint import CheckpointWeights
from facellava.model.loading import read_config
from facellava.runtime.llm import LlamaModel

PLAIN_TYPES = ["f32", "f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"]
IMATRIX_TYPES = ["iq4_xs", "q3_k_s", "q2_k", "q4_k_m"]


def _export(checkpoint: Path, out: Path, types: list[str], *extra: str) -> int:
    return main(["export", "llm", "--checkpoint", str(checkpoint), "--out", str(out), "--types", ",".join(types),
                 "--quiet", *extra])


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / contract.MANIFEST_NAME).read_text())


def _listing(directory: Path) -> dict[str, bytes]:
    """Every file under a directory (hidden ones too) with its content, to prove a failed export changed nothing."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _fields(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {field.name: field.contents() for field in reader.fields.values()}


@pytest.fixture(scope="module")
def llm_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("llm") / "bundle"
    assert _export(tiny_checkpoint, out, PLAIN_TYPES) == 0
    return out


@pytest.fixture(scope="module")
def activation_imatrix(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An importance matrix from real activations: the squared inputs of every LLM matrix over the parity prompts,
    written in llama.cpp's GGUF format and in its legacy .dat format."""
    plan = tensor_plan(tiny_model.config)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, float] = {}

    def record(name):
        def hook(_module, inputs, _output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0).numpy()
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    hooks = [module.register_forward_hook(record(plan[f"{name}.weight"].name))
             for name, module in tiny_model.llm.named_modules() if isinstance(module, torch.nn.Linear)]
    try:
        with torch.no_grad():
            for question, modality in llm_parity.PARITY_PROMPTS:
                blocks = [torch.from_numpy(b) for b in llm_parity.fixed_visual_blocks(tiny_model, modality)]
                ids = tiny_model.prompt_ids(question, modality)
                tiny_model.llm(inputs_embeds=tiny_model.embed_prompt(ids, blocks)[None])
    finally:
        for hook in hooks:
            hook.remove()
    directory = tmp_path_factory.mktemp("imatrix")
    gguf_path = directory / "tiny.imatrix.gguf"
    save_imatrix(gguf_path, sums, counts, datasets=["parity prompts"])
    # the legacy format stores mean * calls per entry and the call count
    dat_path = directory / "tiny.imatrix.dat"
    calls = 7
    blob = struct.pack("<i", len(sums))
    for name, values in sums.items():
        encoded = name.encode()
        scaled = (values / counts[name] * calls).astype(np.float32)
        blob += struct.pack("<i", len(encoded)) + encoded + struct.pack("<ii", calls, len(scaled)) + scaled.tobytes()
    dat_path.write_bytes(blob + struct.pack("<i", 1) + struct.pack("<i", 6) + b"prompt")
    expected = {name: (values / counts[name]).astype(np.float32) for name, values in sums.items()}
    return {"gguf": gguf_path, "dat": dat_path, "expected": expected}


@pytest.fixture(scope="module")
def imatrix_bundle(tiny_checkpoint: Path, activation_imatrix: dict, tmp_path_factory: pytest.TempPathFactory
                   ) -> Path:
    out = tmp_path_factory.mktemp("llm-imatrix") / "bundle"
    assert _export(tiny_checkpoint, out, IMATRIX_TYPES, "--imatrix", str(activation_imatrix["gguf"])) == 0
    return out


# --- parity -------------------------------------------------------------------------------------------------


def test_f32_and_f16_reproduce_pytorch(llm_bundle: Path):
    parity = _manifest(llm_bundle)["parity"]
    for gguf_type in ("f32", "f16"):
        figures = parity[f"llm-{gguf_type}.gguf"]
        assert figures["passed"], figures
        assert figures["prompts"] == len(llm_parity.PARITY_PROMPTS) == 5
        assert figures["first_token_rel_error"] <= 1e-2
        assert figures["greedy_identical"] == figures["prompts"]  # 32 tokens each, image and video prompts
        assert figures["tokenization_mismatches"] == 0
    # F32 is the same arithmetic as PyTorch: only float rounding remains; F16 rounds the weights
    assert parity["llm-f32.gguf"]["first_token_rel_error"] < 1e-5
    assert parity["llm-f32.gguf"]["top1_agreement"] == 1.0
    assert 1e-5 < parity["llm-f16.gguf"]["first_token_rel_error"] < 5e-3


def test_quantized_types_within_limits_and_ordered_by_bits(llm_bundle: Path):
    parity = _manifest(llm_bundle)["parity"]
    kl = {}
    for gguf_type in PLAIN_TYPES[2:]:
        figures = parity[f"llm-{gguf_type}.gguf"]
        min_top1, max_kl = llm_parity.QUANT_LIMITS[gguf_type]
        assert figures["passed"], (gguf_type, figures)
        assert figures["top1_agreement"] >= min_top1 and figures["mean_kl"] <= max_kl
        assert figures["tokenization_mismatches"] == 0
        kl[gguf_type] = figures["mean_kl"]
    assert 0 < kl["q8_0"] < kl["q6_k"] < kl["q4_k_m"]
    assert kl["q8_0"] < kl["q4_0"]


def test_llama_cpp_tokenizes_like_sentencepiece(llm_bundle: Path, tiny_model):
    reference = llm_parity.Reference([], tiny_model.tokenizer, tiny_model.config.bos_token_id)
    with LlamaModel.open(llm_bundle / "llm-q4_0.gguf", n_ctx=512) as llm:
        assert llm_parity.tokenization_mismatches(llm, reference) == []
        video = contract.build_prompt("What emotion is shown in the video?", "video")
        ids = llm.tokenize_prompt(video)
        assert ids[0] == 1 and ids.count(contract.IMAGE_TOKEN_INDEX) == 8 and ids.count(1) == 1
        assert llm.tokenize("</s>") != [2]  # text that looks special stays text
        text = "Café 😀 AU12"
        assert llm.detokenize(llm.tokenize(text, add_bos=True)) == tiny_model.tokenizer.decode(
            tiny_model.tokenizer.encode(text))


# --- the files ----------------------------------------------------------------------------------------------


def test_every_type_loads_in_llama_cpp_and_matches_the_manifest(llm_bundle: Path):
    import llama_cpp

    manifest = _manifest(llm_bundle)
    assert sorted(manifest["files"]) == sorted(f"llm-{t}.gguf" for t in PLAIN_TYPES)
    assert sorted(p.name for p in llm_bundle.iterdir() if p.name not in BOOKKEEPING) == sorted(
        [*manifest["files"], contract.MANIFEST_NAME])
    for name, entry in manifest["files"].items():
        path = llm_bundle / name
        assert entry["kind"] == "llm" and entry["bytes"] == path.stat().st_size
        assert entry["sha256"] == contract.file_sha256(path)
        gguf_type = entry["type"]
        expected_ftype = {"f32": llama_cpp.LLAMA_FTYPE_ALL_F32, "f16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16}.get(
            gguf_type) if gguf_type in ("f32", "f16") else getattr(llama_cpp, QUANT_TYPES[gguf_type].ftype)
        assert _fields(path)["general.file_type"] == expected_ftype
        with LlamaModel.open(path, n_ctx=256) as llm:
            logits = llm.eval_tokens([1, 100, 200])
            assert logits.shape == (512,) and np.isfinite(logits).all()
    sizes = {manifest["files"][f"llm-{t}.gguf"]["bytes"] for t in ("f32", "f16", "q8_0", "q4_0")}
    assert len(sizes) == 4  # four different precisions, four different sizes
    assert manifest["source"]["llm"]["hidden_size"] == 256


def test_stripped_tensors_are_absent(llm_bundle: Path, tiny_checkpoint: Path):
    reader = gguf.GGUFReader(llm_bundle / "llm-f16.gguf")
    names = {t.name for t in reader.tensors}
    config = read_config(tiny_checkpoint)
    assert names == {item.name for item in tensor_plan(config).values()}
    assert len(names) == 3 + 9 * config.num_hidden_layers
    weights = CheckpointWeights.open(tiny_checkpoint)
    projector = weights.get("model.mm_projector.0.weight")  # in the checkpoint ...
    assert tuple(projector.shape) == (256, 128)
    shapes = {tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    assert (256, 128) not in shapes  # ... and nothing of its shape in the GGUF
    assert not any(word in name for name in names for word in ("mm", "landmark", "cross", "tower", "proj"))


def test_metadata_hparams_vocabulary_and_template(llm_bundle: Path, tiny_checkpoint: Path, tiny_model):
    import jinja2

    fields = _fields(llm_bundle / "llm-f16.gguf")
    config = read_config(tiny_checkpoint)
    assert fields["general.architecture"] == "llama"
    assert fields["general.name"].startswith("Face-LLaVA LLM")
    assert fields["general.source.checkpoint_sha256"] == _manifest(llm_bundle)["source"]["checkpoint_sha256"]
    assert fields["llama.context_length"] == 4096
    assert fields["llama.embedding_length"] == 256
    assert fields["llama.block_count"] == 2
    assert fields["llama.feed_forward_length"] == 512
    assert fields["llama.rope.dimension_count"] == 64
    assert fields["llama.attention.head_count"] == fields["llama.attention.head_count_kv"] == 4
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert fields["llama.rope.freq_base"] == 10000.0
    assert fields["llama.vocab_size"] == config.vocab_size
    assert fields["tokenizer.ggml.model"] == "llama"
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"],
            fields["tokenizer.ggml.unknown_token_id"]) == (1, 2, 0)
    assert fields["tokenizer.ggml.add_bos_token"] is True and fields["tokenizer.ggml.add_eos_token"] is False
    assert fields["tokenizer.ggml.add_space_prefix"] is True
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    sp = tiny_model.tokenizer
    assert tokens == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert fields["tokenizer.ggml.scores"] == pytest.approx([sp.get_score(i) for i in range(sp.get_piece_size())])
    assert types[0] == gguf.TokenType.UNKNOWN and types[1] == types[2] == gguf.TokenType.CONTROL
    assert types[tokens.index("<0x0A>")] == gguf.TokenType.BYTE
    assert sum(t == gguf.TokenType.BYTE for t in types) == 256
    assert all(t == gguf.TokenType.NORMAL for t in types[3 + 256:])
    # the chat template writes exactly the contract's llava_v1 prompt
    assert fields["tokenizer.chat_template"] == llava_v1_chat_template()
    template = jinja2.Environment().from_string(fields["tokenizer.chat_template"])
    question = "<image>\nWhat emotion does the person show?"
    rendered = template.render(messages=[{"role": "user", "content": question}], add_generation_prompt=True,
                               bos_token="<s>", eos_token="</s>")
    assert rendered == "<s>" + contract.build_prompt("What emotion does the person show?", "image")


def test_bin_and_safetensors_give_identical_tensors(tiny_checkpoint: Path, tmp_path: Path):
    from facellava.model.tiny import make_tiny_checkpoint

    safetensors_checkpoint = make_tiny_checkpoint(tmp_path / "st", seed=0, weight_format="safetensors", shards=1,
                                                  towers="none")
    readers = {}
    for label, checkpoint in (("bin", tiny_checkpoint), ("safetensors", safetensors_checkpoint)):
        out = tmp_path / f"{label}.gguf"
        summary = convert_to_gguf(checkpoint, out, "f16", progress=False)
        assert summary.tensors == 21
        readers[label] = {t.name: t for t in gguf.GGUFReader(out).tensors}
    assert readers["bin"].keys() == readers["safetensors"].keys()
    for name, tensor in readers["bin"].items():
        other = readers["safetensors"][name]
        assert tensor.tensor_type == other.tensor_type and list(tensor.shape) == list(other.shape)
        assert np.asarray(tensor.data).tobytes() == np.asarray(other.data).tobytes(), name


def test_rope_permutation_interleaves_the_halves_of_each_head():
    heads, head_dim, columns = 2, 6, 3
    weight = torch.arange(heads * head_dim * columns, dtype=torch.float32).reshape(heads * head_dim, columns)
    permuted = rope_permute(weight, heads)
    half = head_dim // 2
    for h in range(heads):
        for i in range(half):  # rotate-half pair (i, i + d/2) becomes the adjacent pair (2i, 2i + 1)
            assert torch.equal(permuted[h * head_dim + 2 * i], weight[h * head_dim + i])
            assert torch.equal(permuted[h * head_dim + 2 * i + 1], weight[h * head_dim + half + i])


# --- importance matrix --------------------------------------------------------------------------------------


def test_both_imatrix_formats_load_to_the_same_values(activation_imatrix: dict):
    expected = activation_imatrix["expected"]
    for fmt in ("gguf", "dat"):
        loaded = load_imatrix(activation_imatrix[fmt])
        assert loaded.keys() == expected.keys() and len(loaded) == 15
        for name, values in expected.items():
            np.testing.assert_allclose(loaded[name], values, rtol=1e-6)


def test_imatrix_export_quantizes_low_bit_types_and_helps(imatrix_bundle: Path, llm_bundle: Path):
    manifest = _manifest(imatrix_bundle)
    # the F16 intermediate the quantizer read does not stay in the bundle
    assert sorted(p.name for p in imatrix_bundle.iterdir() if p.name not in BOOKKEEPING) == sorted(
        [*(f"llm-{t}.gguf" for t in IMATRIX_TYPES), contract.MANIFEST_NAME])
    for gguf_type in IMATRIX_TYPES:
        name = f"llm-{gguf_type}.gguf"
        assert manifest["parity"][name]["passed"], manifest["parity"][name]
        assert manifest["files"][name]["imatrix"] == "tiny.imatrix.gguf"
        fields = _fields(imatrix_bundle / name)
        assert fields["quantize.imatrix.entries_count"] == 15
        assert fields["quantize.imatrix.file"] == "tiny.imatrix.gguf"
    # the importance matrix reaches llama.cpp's quantizer: the same type diverges less with it
    with_imatrix = manifest["parity"]["llm-q4_k_m.gguf"]["mean_kl"]
    without = _manifest(llm_bundle)["parity"]["llm-q4_k_m.gguf"]["mean_kl"]
    assert with_imatrix < 0.8 * without


# --- errors -------------------------------------------------------------------------------------------------


def _without_tokenizer(checkpoint: Path) -> None:
    (checkpoint / "tokenizer.model").unlink()


def _gelu_llm(checkpoint: Path) -> None:
    config = json.loads((checkpoint / "config.json").read_text())
    config["hidden_act"] = "gelu"
    (checkpoint / "config.json").write_text(json.dumps(config))


def _biased_attention(checkpoint: Path) -> None:
    index_path = checkpoint / "pytorch_model.bin.index.json"
    index = json.loads(index_path.read_text())
    shard_name = index["weight_map"]["model.layers.0.self_attn.q_proj.weight"]
    shard = torch.load(checkpoint / shard_name, weights_only=True)
    shard["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(256)
    torch.save(shard, checkpoint / shard_name)
    index["weight_map"]["model.layers.0.self_attn.q_proj.bias"] = shard_name
    index_path.write_text(json.dumps(index))


def _corrupt_shard(checkpoint: Path) -> None:
    shard = sorted(checkpoint.glob("pytorch_model-*.bin"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def _foreign_imatrix(checkpoint: Path) -> None:
    save_imatrix(checkpoint / "foreign.imatrix", {"blk.0.attn_q.weight": np.ones(100, np.float32)},
                 {"blk.0.attn_q.weight": 1.0})


ERROR_CASES = {
    "missing tokenizer": (_without_tokenizer, ["f16"], [], "has no tokenizer.model"),
    "gelu LLM": (_gelu_llm, ["f16"], [], "not LLaMA-shaped: hidden_act 'gelu'"),
    "attention bias": (_biased_attention, ["f16"], [], "not LLaMA-shaped: unexpected "
                                                       "model.layers.0.self_attn.q_proj.bias"),
    "unknown type": (None, ["f16", "q4_k_x"], [], "unknown GGUF type 'q4_k_x'; valid: f32, f16, q8_0"),
    "imatrix type without imatrix": (None, ["iq4_xs"], [], "iq4_xs needs an importance matrix"),
    "corrupt shard": (_corrupt_shard, ["f16"], [], "cannot read shard"),
    "foreign imatrix": (_foreign_imatrix, ["q4_k_m"], ["--imatrix", "{checkpoint}/foreign.imatrix"],
                        "does not fit this model: blk.0.attn_q.weight has 100 values for 256 input columns"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_user_errors_are_one_line_and_leave_the_bundle_alone(case: str, tiny_checkpoint: Path, llm_bundle: Path,
                                                              tmp_path: Path, capsys: pytest.CaptureFixture):
    damage, types, extra, message = ERROR_CASES[case]
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, checkpoint)
    if damage:
        damage(checkpoint)
    extra = [arg.format(checkpoint=checkpoint) for arg in extra]
    existing = tmp_path / "existing"
    shutil.copytree(llm_bundle, existing)
    before = _listing(existing)
    for bundle in (existing, tmp_path / "new"):
        capsys.readouterr()
        assert _export(checkpoint, bundle, types, *extra) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("facellava export llm: error: "), lines
        assert message in lines[0]
    assert _listing(existing) == before
    assert not (tmp_path / "new").exists()


def test_parity_miss_fails_unless_drift_is_allowed(tiny_checkpoint: Path, llm_bundle: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(llm_parity.QUANT_LIMITS, "q4_0", (0.999, 1e-4))  # limits no 4-bit file can meet
    bundle = tmp_path / "bundle"
    shutil.copytree(llm_bundle, bundle)
    before = _listing(bundle)
    capsys.readouterr()
    assert _export(tiny_checkpoint, bundle, ["q4_0"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and re.search(r"q4_0: top-1 agreement 0\.\d+ < 0\.999", lines[0]), lines
    assert re.search(r"mean KL 0\.\d+ > 0\.0001", lines[0]) and "--allow-drift" in lines[0]
    assert _listing(bundle) == before

    assert _export(tiny_checkpoint, bundle, ["q4_0"], "--allow-drift") == 0
    manifest = _manifest(bundle)
    figures = manifest["parity"]["llm-q4_0.gguf"]
    assert figures["passed"] is False and figures["limits"]["top1_agreement_min"] == 0.999
    assert manifest["parity"]["llm-f32.gguf"]["passed"]  # the other files of the bundle stay recorded
    assert sorted(manifest["files"]) == sorted(f"llm-{t}.gguf" for t in PLAIN_TYPES)


def test_runtime_llm_is_torch_free():
    import subprocess
    import sys

    code = ("import sys, facellava.runtime.llm; "
            "print(sorted(m for m in ('torch', 'transformers', 'gguf') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
