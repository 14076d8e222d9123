"""Training on the tiny checkpoint and the synthetic data set: the loss falls, stage 1 freezes what it must, a
resumed run ends where an uninterrupted one does, LoRA merges, the result loads, the labels are the official ones,
and bad records are counted or refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from facellava import contract
from facellava.cli import main
from facellava.errors import FaceLlavaError
from facellava.model import FaceLlava
from facellava.model.checkpoint import CheckpointWeights
from facellava.model.data import (
    ConversationDataset,
    ConversationTokenizer,
    conversation_prompt,
    supervised_labels,
)
from facellava.model.modeling import IGNORE_INDEX
from facellava.model.synthetic import make_synthetic_data
from facellava.model.train import TrainConfig, train

LANDMARK_KEYS = ("model.landmarks_projector.", "model.global_landmarks_projector.", "model.landmarks_cross_attn.")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 records: 18 images (every third with a second round) and 2 videos, seed 0."""
    return make_synthetic_data(tmp_path_factory.mktemp("synthetic") / "data", n=20, seed=0, videos=2)


@pytest.fixture(scope="module")
def tokenizer(tiny_model) -> ConversationTokenizer:
    return ConversationTokenizer(tiny_model.tokenizer)


@pytest.fixture(scope="module")
def stage2_run(synthetic: Path, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """30 optimizer steps of stage 2 (batch 2) on the synthetic data."""
    out = tmp_path_factory.mktemp("stage2") / "out"
    config = TrainConfig(stage=2, lr=1e-3, batch_size=2, max_steps=30, save_every=10)
    return train(synthetic, tiny_checkpoint, out, config, progress=False)


def weights(directory: Path) -> dict[str, torch.Tensor]:
    source = CheckpointWeights.open(directory)
    return {key: source.get(key) for key in source.keys()}


def test_thirty_steps_cut_the_loss(stage2_run):
    losses = stage2_run.losses
    assert stage2_run.steps == len(losses) == 30
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    # measured: about 10.4 -> 0.75 on the tiny random model; a clear margin, not a tuned threshold
    assert last < 0.3 * first, (first, last)
    assert stage2_run.skipped == {}


def test_saved_checkpoint_has_the_official_layout_and_loads(stage2_run, tiny_checkpoint: Path):
    out = stage2_run.out
    top_level = {p.name for p in out.iterdir()} - {"checkpoint-30"}
    assert top_level == {p.name for p in tiny_checkpoint.iterdir()}
    assert json.loads((out / "config.json").read_text()) == json.loads((tiny_checkpoint / "config.json").read_text())
    base_index = json.loads((tiny_checkpoint / "pytorch_model.bin.index.json").read_text())["weight_map"]
    out_index = json.loads((out / "pytorch_model.bin.index.json").read_text())["weight_map"]
    assert set(out_index) == set(base_index)
    assert set(out_index.values()) == set(base_index.values())
    base, trained = weights(tiny_checkpoint), weights(out)
    for key, tensor in base.items():
        assert trained[key].dtype == tensor.dtype and trained[key].shape == tensor.shape, key
    assert not torch.equal(trained["lm_head.weight"], base["lm_head.weight"])  # stage 2 trains the LLM
    assert not torch.equal(trained["model.mm_projector.0.weight"], base["model.mm_projector.0.weight"])

    model = FaceLlava.from_pretrained(out)
    assert model.image_tower is not None and model.video_tower is not None  # the tower directories came along
    final_state = torch.load(out / "checkpoint-30" / "trainable.pt", weights_only=True)
    parameters = dict(model.named_parameters())
    assert set(final_state) == {n for n in parameters if not n.startswith(("image_tower.", "video_tower."))}
    for name, tensor in final_state.items():
        assert torch.equal(parameters[name], tensor), name


def test_trained_checkpoint_exports_to_onnx_and_gguf(stage2_run, tmp_path: Path):
    from facellava.export.llm import export_llm_bundle
    from facellava.export.vision import export_vision

    bundle = tmp_path / "bundle"
    vision = export_vision(stage2_run.out, bundle, modalities=("image",), precisions=("fp32",), progress=False)
    llm = export_llm_bundle(stage2_run.out, bundle, types=("f32",), progress=False)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert {"vision_image.onnx", "vision_image_nolm.onnx", "llm-f32.gguf"} <= set(manifest["files"])
    assert all(figures["passed"] for figures in manifest["parity"].values())
    assert llm["llm-f32.gguf"]["greedy_identical"] == llm["llm-f32.gguf"]["prompts"]
    assert set(vision.files) == {"vision_image.onnx", "vision_image_nolm.onnx"}


def test_stage1_leaves_every_frozen_tensor_bit_identical(synthetic: Path, tiny_checkpoint: Path, tmp_path: Path):
    data = tmp_path / "data.json"
    records = json.loads(synthetic.read_text())[:5]
    for record in records:
        for key in ("image", "video", "landmarks_2d"):
            if key in record:
                record[key] = str(synthetic.parent / record[key])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")  # found only when read: skipped during training and counted
    records.append({**records[0], "image": str(broken)})
    data.write_text(json.dumps(records))
    result = train(data, tiny_checkpoint, tmp_path / "out",
                   TrainConfig(stage=1, lr=1e-3, batch_size=2, max_steps=4, save_every=100), progress=False)
    assert result.skipped == {"image file that cannot be decoded": 1}
    base, trained = weights(tiny_checkpoint), weights(result.out)
    assert set(base) == set(trained)
    changed = [key for key in base if not torch.equal(base[key], trained[key])]
    assert changed and all(key.startswith(LANDMARK_KEYS) for key in changed)
    frozen = [key for key in base if not key.startswith(LANDMARK_KEYS)]
    assert all(torch.equal(base[key], trained[key]) for key in frozen)
    assert "model.landmarks_cross_attn.linear_proj.weight" in changed
    assert "model.landmarks_projector.region_layers.lips.weight" in changed
    for tower in ("LanguageBind_Image", "LanguageBind_Video_merge"):
        assert weights(result.out / tower).keys() == weights(tiny_checkpoint / tower).keys()
        assert all(torch.equal(a, b) for a, b in zip(weights(result.out / tower).values(),
                                                     weights(tiny_checkpoint / tower).values(), strict=True))


def test_resumed_run_reaches_the_uninterrupted_weights(synthetic: Path, tiny_checkpoint: Path, tmp_path: Path):
    config = TrainConfig(stage=2, lr=1e-3, batch_size=1, grad_accum=2, max_steps=4, save_every=2)
    whole = train(synthetic, tiny_checkpoint, tmp_path / "whole", config, progress=False)

    def interrupt(step: int, loss: float) -> None:
        if step == 3:  # one step after the checkpoint at step 2: that step is lost and done again
            raise KeyboardInterrupt

    broken_off = tmp_path / "broken_off"
    with pytest.raises(KeyboardInterrupt):
        train(synthetic, tiny_checkpoint, broken_off, config, progress=False, on_step=interrupt)
    assert sorted(p.name for p in broken_off.iterdir()) == ["checkpoint-2"]  # no half-written model
    with pytest.raises(FaceLlavaError, match="not empty"):
        train(synthetic, tiny_checkpoint, broken_off, config, progress=False)
    with pytest.raises(FaceLlavaError, match="other settings .*lr"):
        train(synthetic, tiny_checkpoint, broken_off, TrainConfig(**{**config.__dict__, "lr": 2e-3}),
              progress=False, resume=True)

    resumed = train(synthetic, tiny_checkpoint, broken_off, config, progress=False, resume=True)
    # CPU float arithmetic is deterministic for the same ops in the same order, and everything that decides the
    # ops is restored (weights, AdamW moments, schedule, data order and position, random states): bit-identical.
    assert resumed.losses == whole.losses
    expected, got = weights(whole.out), weights(resumed.out)
    assert all(torch.equal(expected[key], got[key]) for key in expected)


def test_lora_run_merges_into_the_official_keys(synthetic: Path, tiny_checkpoint: Path, tmp_path: Path):
    pytest.importorskip("peft")
    config = TrainConfig(stage=2, lora=True, lora_r=8, lora_alpha=16, lr=1e-3, batch_size=2, max_steps=3,
                         save_every=100)
    result = train(synthetic, tiny_checkpoint, tmp_path / "out", config, progress=False)
    base, merged = weights(tiny_checkpoint), weights(result.out)
    assert set(merged) == set(base)  # no adapter keys left
    adapters = torch.load(result.out / "checkpoint-3" / "trainable.pt", weights_only=True)
    prefix = "llm.base_model.model.model.layers.0.self_attn.q_proj"
    lora_a, lora_b = adapters[f"{prefix}.lora_A.default.weight"], adapters[f"{prefix}.lora_B.default.weight"]
    assert lora_b.abs().max() > 0  # the adapter learned (B starts at zero)
    expected = base["model.layers.0.self_attn.q_proj.weight"] + (lora_b @ lora_a) * (16 / 8)
    torch.testing.assert_close(merged["model.layers.0.self_attn.q_proj.weight"], expected, rtol=0, atol=1e-6)
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                "model.layers.1.input_layernorm.weight"):
        assert torch.equal(merged[key], base[key]), key  # not LoRA targets: frozen
    assert not torch.equal(merged["model.mm_projector.2.weight"], base["model.mm_projector.2.weight"])
    assert FaceLlava.from_pretrained(result.out).llm.lm_head.weight.shape == base["lm_head.weight"].shape


def test_labels_are_the_official_v1_ones(tokenizer: ConversationTokenizer, tiny_model):
    """A hand-checked example: the two answers and their </s> are learned, nothing else."""
    turns = [("human", "<image>\nHow old is the person?"), ("gpt", "About 35."),
             ("human", "Is she smiling?"), ("gpt", "Yes.")]
    prompt = conversation_prompt(turns)
    assert prompt.startswith("A chat between a curious user ")  # the training template, not the inference one
    assert prompt.endswith(" USER: <image>\nHow old is the person? ASSISTANT: About 35.</s>"
                           "USER: Is she smiling? ASSISTANT: Yes.</s>")
    ids = tokenizer.tokenize(prompt)
    labels = supervised_labels(prompt, ids, tokenizer)
    piece = tiny_model.tokenizer.id_to_piece
    learned = [piece(token) for token, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    assert learned == ["▁A", "b", "out", "▁", "3", "5", ".", "</s>", "▁", "<0x59>", "es", ".", "</s>"]
    assert all(label == token for token, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX)
    # the last masked token before each answer is the ':' of "ASSISTANT:"
    starts = [i for i in range(1, len(labels)) if labels[i] != IGNORE_INDEX and labels[i - 1] == IGNORE_INDEX]
    assert [piece(ids[i - 1]) for i in starts] == [":", ":"]
    assert labels[0] == IGNORE_INDEX and ids[0] == 1


def test_video_is_eight_placeholders_and_visual_positions_are_ignored(tokenizer: ConversationTokenizer):
    from facellava.model.modeling import spliced_labels

    prompt = conversation_prompt([("human", "<image>" * 8 + "\nWhat emotion is shown in the video?"),
                                  ("gpt", "Happiness.")])
    ids = tokenizer.tokenize(prompt)
    first = ids.index(contract.IMAGE_TOKEN_INDEX)
    assert ids[first:first + 8] == [contract.IMAGE_TOKEN_INDEX] * 8  # no space tokens between the frames
    labels = supervised_labels(prompt, ids, tokenizer)
    spliced = spliced_labels(ids, labels, [contract.VIDEO_FRAME_TOKENS] * 8)
    assert len(spliced) == len(ids) - 8 + 8 * 257
    assert spliced[first:first + 8 * 257] == [IGNORE_INDEX] * (8 * 257)
    assert [label for label in spliced if label != IGNORE_INDEX] == [label for label in labels
                                                                     if label != IGNORE_INDEX]


def test_mismatched_rounds_are_masked_whole_as_officially(tokenizer: ConversationTokenizer):
    """An answer containing ' ASSISTANT: ' breaks the official round walk: the sample teaches nothing."""
    prompt = conversation_prompt([("human", "Repeat after me."), ("gpt", "USER: hi ASSISTANT: hello")])
    ids = tokenizer.tokenize(prompt)
    assert set(supervised_labels(prompt, ids, tokenizer)) == {IGNORE_INDEX}


def write_bad_data(synthetic: Path, folder: Path) -> Path:
    """The synthetic records plus a missing image, a conversation without an answer, landmarks of a wrong
    shape, and roles out of order."""
    records = json.loads(synthetic.read_text())[:4]
    for record in records:
        for key in ("image", "video", "landmarks_2d"):
            if key in record:
                record[key] = str(synthetic.parent / record[key])
    good = records[0]
    np.save(folder / "ten_points.npy", np.zeros((10, 2), np.float32))
    records += [
        {**good, "image": str(folder / "nowhere.jpg")},
        {**good, "conversations": [good["conversations"][0]]},
        {**good, "conversations": [good["conversations"][0], {"from": "gpt", "value": "  "}]},
        {**good, "landmarks_2d": str(folder / "ten_points.npy")},
        {**good, "conversations": [good["conversations"][0], good["conversations"][0]]},
    ]
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


def test_bad_records_are_skipped_and_counted(synthetic: Path, tokenizer: ConversationTokenizer, tmp_path: Path):
    dataset = ConversationDataset.load(write_bad_data(synthetic, tmp_path), tokenizer, max_length=3072)
    assert len(dataset) == 4
    assert dict(dataset.skipped) == {"missing image file": 1, "conversation without an answer": 2,
                                     "landmarks of the wrong shape": 1,
                                     "conversation turns do not alternate human/gpt": 1}
    assert dataset.skipped_summary().startswith("skipped 5 of 9 records: 2 conversation without an answer")
    example = dataset.load_example(dataset.records[0])
    assert example.pixel_values.shape == (3, 224, 224)
    assert example.landmarks.shape == (68, 2) and 0 < float(example.landmarks.mean()) < 1  # pixels / 256


def test_nothing_usable_is_a_clear_error(synthetic: Path, tiny_checkpoint: Path, tmp_path: Path, capsys):
    records = json.loads(write_bad_data(synthetic, tmp_path).read_text())[4:]
    data = tmp_path / "all_bad.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "out"
    status = main(["train", "--stage", "2", "--data", str(data), "--checkpoint", str(tiny_checkpoint),
                   "--out", str(out)])
    error = capsys.readouterr().err.strip().splitlines()
    assert status == 1
    assert error[-1].startswith("facellava train: error: no usable training record in ")
    assert "5 of 5 records" in error[-1] and "Traceback" not in "".join(error)
    assert not (out / "config.json").exists()


def test_cli_trains_and_reports(synthetic: Path, tiny_checkpoint: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    status = main(["train", "--stage", "2", "--data", str(synthetic), "--checkpoint", str(tiny_checkpoint),
                   "--out", str(out), "--max-steps", "2", "--lr", "1e-3", "--save-every", "1"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "trained 2 steps" in printed and str(out) in printed
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # only the latest is kept
    assert FaceLlava.from_pretrained(out).tokenizer is not None
    assert main(["train", "--stage", "1", "--lora", "--data", str(synthetic), "--checkpoint",
                 str(tiny_checkpoint), "--out", str(tmp_path / "lora1")]) == 1


def test_synthetic_data_is_seeded_and_official(synthetic: Path, tmp_path: Path):
    again = make_synthetic_data(tmp_path / "again", n=20, seed=0, videos=2)
    assert again.read_text() == synthetic.read_text()
    records = json.loads(synthetic.read_text())
    assert sum("video" in r for r in records) == 2 and sum("image" in r for r in records) == 18
    for record in records:
        landmarks = np.load(synthetic.parent / record["landmarks_2d"])
        assert landmarks.shape == ((12, 68, 2) if "video" in record else (68, 2))
        assert landmarks.min() > 0 and landmarks.max() < contract.FACE_CROP_SIZE
        assert record["conversations"][0]["value"].startswith("<video>\n" if "video" in record else "<image>\n")
    name = "landmarks/0003.npy"
    assert np.array_equal(np.load(again.parent / name), np.load(synthetic.parent / name))
    with pytest.raises(FaceLlavaError, match="not an empty directory"):
        make_synthetic_data(synthetic.parent, n=2)
    shutil.rmtree(again.parent)
    assert main(["make-synthetic-data", str(tmp_path / "cli"), "--n", "3", "--seed", "1"]) == 0
    assert len(json.loads((tmp_path / "cli" / "data.json").read_text())) == 3
    assert main(["make-synthetic-data", str(tmp_path / "cli"), "--n", "3"]) == 1  # exists: refused


def test_other_base_layouts_are_kept(synthetic: Path, tmp_path: Path):
    """A single safetensors file with the towers stored inside: the result keeps both, tower tensors untouched."""
    from facellava.model.tiny import make_tiny_checkpoint

    base = make_tiny_checkpoint(tmp_path / "base", seed=1, weight_format="safetensors", shards=1, towers="embedded")
    records = [r for r in json.loads(synthetic.read_text()) if "image" in r][:2]
    for record in records:
        for key in ("image", "landmarks_2d"):
            record[key] = str(synthetic.parent / record[key])
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    result = train(data, base, tmp_path / "out", TrainConfig(stage=2, lr=1e-3, batch_size=2, max_steps=2),
                   progress=False)
    assert {p.name for p in result.out.iterdir()} - {"checkpoint-2"} == {p.name for p in base.iterdir()}
    before, after = weights(base), weights(result.out)
    assert set(before) == set(after)
    towers = [key for key in before if key.startswith(("model.image_tower.", "model.video_tower."))]
    assert towers and all(torch.equal(before[key], after[key]) for key in towers)
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])
    assert FaceLlava.from_pretrained(result.out).image_tower is not None


def test_padding_does_not_change_the_loss(synthetic: Path, tokenizer: ConversationTokenizer, tiny_model):
    """The batch loss is the token-weighted mean of the samples' own losses: right padding without an attention
    mask changes nothing that is learned from."""
    from facellava.model.modeling import spliced_labels
    from facellava.model.train import visual_blocks

    dataset = ConversationDataset.load(synthetic, tokenizer, max_length=3072)
    records = [dataset.records[0], dataset.records[2], dataset.records[-1]]  # short, two-round, video
    examples = [dataset.load_example(record) for record in records]
    assert [r.kind for r in records] == ["image", "image", "video"]
    with torch.no_grad():
        blocks = visual_blocks(tiny_model, examples, torch.device("cpu"))
        ids, labels = [r.input_ids for r in records], [r.labels for r in records]
        batch = tiny_model.forward_train(ids, labels, blocks)
        alone = [tiny_model.forward_train([i], [label], [b]) for i, label, b in zip(ids, labels, blocks, strict=True)]
    counts = [sum(x != IGNORE_INDEX for x in spliced_labels(i, label, [len(b) for b in block])[1:])
              for i, label, block in zip(ids, labels, blocks, strict=True)]
    expected = sum(loss * n for loss, n in zip(alone, counts, strict=True)) / sum(counts)
    torch.testing.assert_close(batch, expected, rtol=1e-5, atol=1e-5)
