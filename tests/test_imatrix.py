"""The multimodal importance matrix: collected like llama.cpp's, really used by the quantizer, and helpful on a
model whose channels matter unevenly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_video

from facellava.calibration.dataset import build_calibration_set
from facellava.calibration.imatrix import (
    IMATRIX_NAME,
    CalibrationPrompt,
    calibration_prompts,
    compute_imatrix,
    questions_for,
)
from facellava.export import llm_parity
from facellava.export.quantize import load_imatrix, quantize_gguf, save_imatrix

OUTLIER_CHANNELS = 8
OUTLIER_SCALE = 8.0


@pytest.fixture(scope="module")
def uneven(tmp_path_factory: pytest.TempPathFactory, face_photo: Path):
    """A tiny checkpoint whose LLM has a few large-magnitude hidden channels (RMSNorm weights scaled by 8 on 8
    channels), as real LLMs have; its F16 GGUF; the multimodal and text-only importance matrices; the reference."""
    from safetensors.torch import load_file, save_file

    from facellava.export.gguf import convert_to_gguf
    from facellava.model import FaceLlava
    from facellava.model.tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("imatrix")
    checkpoint = make_tiny_checkpoint(root / "ckpt", seed=1, weight_format="safetensors", shards=1)
    weights_file = next(checkpoint.glob("*.safetensors"))
    state = load_file(weights_file)
    channels = torch.randperm(256, generator=torch.Generator().manual_seed(0))[:OUTLIER_CHANNELS]
    for key, value in state.items():
        if key.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")):
            value[channels] *= OUTLIER_SCALE
    save_file(state, weights_file, metadata={"format": "pt"})
    model = FaceLlava.from_pretrained(checkpoint).eval()

    media_dir = root / "media"
    media_dir.mkdir()
    shutil.copy(face_photo, media_dir / "face.jpg")
    write_video(media_dir / "face.mp4", 12)
    calibration = build_calibration_set(media_dir, progress=False)
    media = calibration.samples()
    assert len(media) == 2 and not calibration.skipped
    prompts = [CalibrationPrompt(q, p.modality, p.visual_blocks)
               for p in calibration_prompts(model, media, progress=False) for q in questions_for(p.modality)]
    sums, counts, tokens = compute_imatrix(model, prompts, progress=False)
    save_imatrix(root / "multimodal.gguf", sums, counts)
    text = [CalibrationPrompt(q, None, []) for q in questions_for("image") + questions_for("video")]
    text_sums, text_counts, _ = compute_imatrix(model, text, progress=False)
    save_imatrix(root / "text.gguf", text_sums, text_counts)
    convert_to_gguf(checkpoint, root / "f16.gguf", "f16", progress=False)
    reference = llm_parity.build_reference(model, progress=False)
    return {"root": root, "model": model, "channels": channels, "sums": sums, "counts": counts, "tokens": tokens,
            "prompts": prompts, "reference": reference}


def test_statistics_are_llama_cpp_s(uneven) -> None:
    """Every decoder matrix has an entry named as in the GGUF; counts are the tokens seen (prompt with the
    visual tokens, then the continuation), sums are the squared inputs, and the outlier channels dominate."""
    model, sums, counts = uneven["model"], uneven["sums"], uneven["counts"]
    layers = model.config.num_hidden_layers
    assert len(sums) == 7 * layers and "output.weight" not in sums
    assert sums["blk.0.attn_q.weight"].shape == (256,) and sums["blk.0.ffn_down.weight"].shape == (512,)
    prompt = uneven["prompts"][0]
    ids = model.prompt_ids(prompt.question, prompt.modality)
    positions = len(ids) - 1 + sum(len(b) for b in prompt.visual_blocks)
    assert positions > 256  # the visual tokens were in the prompt
    # prompt positions (each visual marker replaced by its block), then the 16 continuation tokens fed back
    per_prompt = []
    for p in uneven["prompts"]:
        ids = model.prompt_ids(p.question, p.modality)
        per_prompt.append(len(ids) - ids.count(-200) + sum(len(b) for b in p.visual_blocks) + 16)
    assert counts["blk.0.attn_q.weight"] == uneven["tokens"] == sum(per_prompt)
    importance = sums["blk.1.ffn_gate.weight"]
    outliers = np.zeros(256, dtype=bool)
    outliers[uneven["channels"].numpy()] = True
    assert importance[outliers].mean() > 10 * importance[~outliers].mean()
    loaded = load_imatrix(uneven["root"] / "multimodal.gguf")
    np.testing.assert_allclose(loaded["blk.0.attn_q.weight"], sums["blk.0.attn_q.weight"] / uneven["tokens"],
                               rtol=1e-6)


def _kl(uneven, gguf_type: str, imatrix_file: str | None) -> tuple[float, Path]:
    root = uneven["root"]
    out = root / f"{gguf_type}-{imatrix_file or 'none'}.gguf"
    if imatrix_file == "uniform":
        data = {k: np.ones_like(v) for k, v in load_imatrix(root / "multimodal.gguf").items()}
    else:
        data = None if imatrix_file is None else load_imatrix(root / imatrix_file)
    quantize_gguf(root / "f16.gguf", out, gguf_type, imatrix=data)
    return llm_parity.measure_gguf(out, uneven["reference"])["mean_kl"], out


def test_matrix_is_used_and_lowers_kl(uneven) -> None:
    import gguf

    without, plain_file = _kl(uneven, "q4_k_s", None)
    with_matrix, matrix_file = _kl(uneven, "q4_k_s", "multimodal.gguf")
    tensors = [{t.name: bytes(t.data) for t in gguf.GGUFReader(f).tensors} for f in (plain_file, matrix_file)]
    assert tensors[0]["blk.0.ffn_gate.weight"] != tensors[1]["blk.0.ffn_gate.weight"]
    assert tensors[0]["blk.0.attn_norm.weight"] == tensors[1]["blk.0.attn_norm.weight"]  # F32, not quantized
    print(f"q4_k_s mean KL: no imatrix {without:.4f}, multimodal imatrix {with_matrix:.4f}")
    assert with_matrix < 0.85 * without
    # iq4_xs needs a matrix: the measured one against a flat one (every column equally important)
    flat, _ = _kl(uneven, "iq4_xs", "uniform")
    measured, _ = _kl(uneven, "iq4_xs", "multimodal.gguf")
    text, _ = _kl(uneven, "iq4_xs", "text.gguf")
    print(f"iq4_xs mean KL: uniform imatrix {flat:.4f}, text-only imatrix {text:.4f}, multimodal imatrix "
          f"{measured:.4f}")
    assert measured < 0.85 * flat


def test_calibrate_llm_cli_into_bundle(tiny_bundle: Path, tiny_checkpoint: Path, face_photo: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    from facellava.cli import main

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(face_photo, data / "a.jpg")
    (data / "broken.jpg").write_bytes(b"not an image")
    before = (bundle / "manifest.json").read_bytes()
    # the checkpoint is the user's to give (the manifest's path lies outside the bundle) and must be the source
    other = Path(shutil.copytree(tiny_checkpoint, tmp_path / "other"))
    (other / "config.json").write_text((other / "config.json").read_text() + "\n")
    assert main(["calibrate", "llm", str(bundle), "--data", str(data), "--checkpoint", str(other)]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "is not the checkpoint" in error
    assert f"(the bundle records '{tiny_checkpoint.resolve()}')" in error
    assert (bundle / "manifest.json").read_bytes() == before
    assert main(["calibrate", "llm", str(bundle), "--data", str(data), "--checkpoint", str(tiny_checkpoint),
                 "--types", "iq4_xs", "--allow-drift"]) == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    entry = manifest["files"][IMATRIX_NAME]
    assert entry["kind"] == "data" and entry["prompts"] == 1 and entry["files_skipped"] == 1
    assert manifest["files"]["llm-iq4_xs.gguf"]["imatrix"] == IMATRIX_NAME
    assert "llm-f32.gguf" in manifest["files"]
    from facellava.bundle import Bundle

    Bundle.open(bundle).path_of(IMATRIX_NAME)  # hash recorded and matching
    assert main(["calibrate", "llm", str(bundle), "--data", str(tmp_path / "empty"), "--checkpoint",
                 str(tiny_checkpoint)]) == 1
