"""The loader on every official layout, strictness, and the CLI's one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from facellava.errors import FaceLlavaError
from facellava.model import FaceLlava, make_tiny_checkpoint


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(21)
    return {
        "image": torch.randn(1, 3, 224, 224, generator=g),
        "image_lm": 0.2 + 0.6 * torch.rand(1, 68, 2, generator=g),
        "video": torch.randn(1, 3, 8, 224, 224, generator=g),
        "video_lm": 0.2 + 0.6 * torch.rand(1, 8, 68, 2, generator=g),
    }


@torch.no_grad()
def outputs(model: FaceLlava, inputs) -> dict[str, torch.Tensor]:
    image = model.encode_image(inputs["image"], inputs["image_lm"])
    ids = model.prompt_ids("How old is this person?", "image")
    return {
        "image": image,
        "video": model.encode_video(inputs["video"], inputs["video_lm"]),
        "logits": model.llm(inputs_embeds=model.embed_prompt(ids, [image[0]])[None]).logits,
    }


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_same_weights(a: FaceLlava, b: FaceLlava) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("weight_format,shards", [("safetensors", 2), ("safetensors", 1), ("bin", 1)])
def test_every_weight_layout_gives_identical_outputs(tmp_path, tiny_model, inputs, weight_format, shards):
    checkpoint = make_tiny_checkpoint(tmp_path / "ckpt", seed=0, weight_format=weight_format, shards=shards)
    index = {"safetensors": "model.safetensors", "bin": "pytorch_model.bin"}[weight_format]
    assert (checkpoint / (index + ".index.json" if shards > 1 else index)).is_file()
    model = FaceLlava.from_pretrained(checkpoint)
    assert_same_weights(model, tiny_model)
    assert_same(outputs(model, inputs), outputs(tiny_model, inputs))


def test_tower_sources(tmp_path, tiny_checkpoint, tiny_model, inputs):
    reference = outputs(tiny_model, inputs)
    embedded = make_tiny_checkpoint(tmp_path / "embedded", seed=0, towers="embedded")
    assert not (embedded / "LanguageBind_Image").exists()
    model = FaceLlava.from_pretrained(embedded)
    assert_same_weights(model, tiny_model)
    assert_same(outputs(model, inputs), reference)

    bare = make_tiny_checkpoint(tmp_path / "bare", seed=0, towers="none")
    without = FaceLlava.from_pretrained(bare)
    assert without.image_tower is None and without.video_tower is None
    with pytest.raises(FaceLlavaError, match="no image tower"):
        without.encode_image(inputs["image"])
    given = FaceLlava.from_pretrained(bare, image_tower=tiny_checkpoint / "LanguageBind_Image",
                                      video_tower=tiny_checkpoint / "LanguageBind_Video_merge")
    assert_same(outputs(given, inputs), reference)


def rewrite_index(checkpoint: Path, edit) -> None:
    path = checkpoint / "pytorch_model.bin.index.json"
    index = json.loads(path.read_text())
    edit(index["weight_map"])
    path.write_text(json.dumps(index))


def edit_shard(checkpoint: Path, key_owner: str, edit) -> None:
    """Load the shard that holds key_owner, change it, save it back, keep the index in step."""
    index = json.loads((checkpoint / "pytorch_model.bin.index.json").read_text())
    shard = checkpoint / index["weight_map"][key_owner]
    state = torch.load(shard, weights_only=True)
    edit(state)
    torch.save(state, shard)

    def sync(weight_map):
        for key in [k for k, v in weight_map.items() if v == shard.name and k not in state]:
            del weight_map[key]
        weight_map.update({k: shard.name for k in state})
    rewrite_index(checkpoint, sync)


@pytest.fixture
def checkpoint_copy(tmp_path, tiny_checkpoint) -> Path:
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "copy"))


def test_strict_loading_names_a_missing_key(checkpoint_copy):
    key = "model.landmarks_cross_attn.linear_proj.weight"
    edit_shard(checkpoint_copy, key, lambda state: state.pop(key))
    with pytest.raises(FaceLlavaError, match=r"missing tensors landmarks_cross_attn\.linear_proj\.weight"):
        FaceLlava.from_pretrained(checkpoint_copy)


def test_strict_loading_names_an_unexpected_key(checkpoint_copy):
    key = "model.landmarks_cross_attn.linear_proj.weight"
    edit_shard(checkpoint_copy, key, lambda state: state.update({"model.landmarks_projector.extra.weight":
                                                                 torch.zeros(2)}))
    with pytest.raises(FaceLlavaError, match=r"unexpected tensors model\.landmarks_projector\.extra\.weight"):
        FaceLlava.from_pretrained(checkpoint_copy)


def test_a_config_that_names_the_other_frgca_variant_fails_loudly(checkpoint_copy):
    config = json.loads((checkpoint_copy / "config.json").read_text())
    config["cross_attn_type"] = "masked"
    (checkpoint_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(FaceLlavaError, match=r"missing tensors .*q_proj"):
        FaceLlava.from_pretrained(checkpoint_copy)


def test_old_rotary_buffers_are_ignored(checkpoint_copy, tiny_model, inputs):
    key = "model.layers.0.self_attn.q_proj.weight"
    edit_shard(checkpoint_copy, key, lambda state: state.update(
        {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(32)}))
    assert_same(outputs(FaceLlava.from_pretrained(checkpoint_copy), inputs), outputs(tiny_model, inputs))


def run_cli(*args: str, subprocess_run: bool = False) -> subprocess.CompletedProcess:
    """The CLI on args: in this process (fast), or as `python -m facellava` to see exactly what a user sees."""
    argv = [str(a) for a in args]
    if subprocess_run:
        return subprocess.run([sys.executable, "-m", "facellava", *argv], capture_output=True, text=True)
    import contextlib
    import io

    from facellava.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def assert_one_line_error(result: subprocess.CompletedProcess, pattern: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and pattern in lines[0], result.stderr


def test_cli_user_errors(tmp_path, checkpoint_copy):
    assert_one_line_error(run_cli("inspect", tmp_path / "nowhere", subprocess_run=True), "does not exist")

    not_face_llava = tmp_path / "bert"
    not_face_llava.mkdir()
    (not_face_llava / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    assert_one_line_error(run_cli("inspect", not_face_llava), "model_type 'bert'")

    broken_json = tmp_path / "broken"
    broken_json.mkdir()
    (broken_json / "config.json").write_text("{not json")
    assert_one_line_error(run_cli("inspect", broken_json), "not valid JSON")

    wrong_shapes = Path(shutil.copytree(checkpoint_copy, tmp_path / "shapes"))
    config = json.loads((wrong_shapes / "config.json").read_text())
    config["intermediate_size"] = 768
    (wrong_shapes / "config.json").write_text(json.dumps(config))
    assert_one_line_error(run_cli("inspect", wrong_shapes), "has shape (512, 256), expected (768, 256)")

    corrupt = Path(shutil.copytree(checkpoint_copy, tmp_path / "corrupt"))
    shard = corrupt / "pytorch_model-00002-of-00003.bin"
    shard.write_bytes(shard.read_bytes()[:1000])
    assert_one_line_error(run_cli("inspect", corrupt), "cannot read shard")

    missing_shard = checkpoint_copy
    (missing_shard / "pytorch_model-00003-of-00003.bin").unlink()
    assert_one_line_error(run_cli("inspect", missing_shard), "shard pytorch_model-00003-of-00003.bin listed")

    no_weights = tmp_path / "noweights"
    no_weights.mkdir()
    shutil.copy(checkpoint_copy / "config.json", no_weights / "config.json")
    assert_one_line_error(run_cli("inspect", no_weights), "holds no weights")


def test_cli_make_tiny_and_inspect(tmp_path):
    out = tmp_path / "tiny"
    result = run_cli("make-tiny", out, "--format", "safetensors", "--shards", "2", "--cross-attn", "masked")
    assert result.returncode == 0, result.stderr
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.model").is_file()
    assert (out / "LanguageBind_Video_merge" / "config.json").is_file()
    info = run_cli("inspect", out, "--json", subprocess_run=True)
    assert info.returncode == 0, info.stderr
    described = json.loads(info.stdout)
    assert described["landmarks"]["cross_attn_type"] == "masked"
    assert described["towers"]["video"]["frames"] == 8 and described["towers"]["image"]["layers_used"] == 2
    assert_one_line_error(run_cli("make-tiny", out), "already exists")
    assert_one_line_error(run_cli("make-tiny", tmp_path / "x", "--shards", "0"), "shards")


def test_a_tokenizer_that_is_not_the_configs_vocabulary_is_one_line(tmp_path, checkpoint_copy):
    from facellava.model.tiny import train_tokenizer

    (checkpoint_copy / "tokenizer.model").write_bytes(train_tokenizer(vocab_size=400))
    expected = "tokenizer.model has 400 pieces but config.json's vocab_size is 512"
    assert_one_line_error(run_cli("inspect", checkpoint_copy), expected)
    # before this check, export llm decoded a parity answer past the tokenizer: a SentencePiece traceback
    assert_one_line_error(run_cli("export", "llm", "--checkpoint", checkpoint_copy, "--out", tmp_path / "bundle",
                                  "--types", "f32", "--quiet", subprocess_run=True), expected)
    assert not (tmp_path / "bundle" / "llm-f32.gguf").exists()


@pytest.mark.parametrize("field,value,message", [
    ("hidden_size", "256", "hidden_size is '256'; expected a positive integer"),
    ("vocab_size", 0, "vocab_size is 0; expected a positive integer"),
    ("num_attention_heads", 3, "hidden_size 256 does not split into 3 attention heads"),
    ("num_key_value_heads", 3, "4 attention heads do not group over 3 key/value heads"),
    ("eos_token_id", 512, "eos_token_id 512 is not a token id of the 512-token vocabulary"),
    ("mm_vision_select_layer", "-2", "mm_vision_select_layer is '-2'"),
    ("rms_norm_eps", -1, "rms_norm_eps is -1; expected a positive number"),
    ("mm_hidden_size", 256, "is 128 wide but config.json's mm_hidden_size is 256"),
])
def test_inconsistent_configs_are_one_line(checkpoint_copy, field, value, message):
    config = json.loads((checkpoint_copy / "config.json").read_text())
    config[field] = value
    (checkpoint_copy / "config.json").write_text(json.dumps(config))
    assert_one_line_error(run_cli("inspect", checkpoint_copy), message)


def test_checking_the_llm_reads_no_llm_tensor(checkpoint_copy, tiny_model):
    """inspect's load: the LLM's tensors are checked from the shard headers and stay on the meta device (a 7B LLM
    in float32 is 27 GB), the vision half is loaded as usual, and the counts are those of the whole model."""
    from facellava.model.loading import load_face_llava

    model = load_face_llava(checkpoint_copy, llm=False, check_llm=True)
    assert all(p.is_meta for p in model.llm.parameters())
    assert not any(p.is_meta for name, p in model.named_parameters() if not name.startswith("llm."))
    assert sum(p.numel() for p in model.llm.parameters()) == sum(p.numel() for p in tiny_model.llm.parameters())
    torch.testing.assert_close(model.mm_projector[0].weight, tiny_model.mm_projector[0].weight)

    config = json.loads((checkpoint_copy / "config.json").read_text())
    config["intermediate_size"] = 768
    (checkpoint_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(FaceLlavaError, match=r"has shape \(512, 256\), expected \(768, 256\)"):
        load_face_llava(checkpoint_copy, llm=False, check_llm=True)
    load_face_llava(checkpoint_copy, llm=False)  # without the check the LLM is not looked at


def test_loading_one_tower_reads_only_that_one(checkpoint_copy, tiny_model, inputs):
    """`towers=` (the vision export and bench load one tower at a time): the other tower is neither looked for nor
    read, so even a missing one does not matter; the loaded one gives the whole model's visual tokens."""
    from facellava.model.loading import load_face_llava

    image_only = load_face_llava(checkpoint_copy, llm=False, towers=("image",))
    assert image_only.video_tower is None and "video tower was not loaded" in image_only.no_tower("video")
    with torch.no_grad():
        assert torch.equal(image_only.encode_image(inputs["image"], inputs["image_lm"]),
                           tiny_model.encode_image(inputs["image"], inputs["image_lm"]))
    video_dirs = [d for d in checkpoint_copy.iterdir() if d.is_dir() and "video" in d.name.lower()]
    assert video_dirs, "the tiny checkpoint keeps its video tower in a directory of its own"
    for directory in video_dirs:
        shutil.rmtree(directory)
    assert load_face_llava(checkpoint_copy, llm=False, towers=("image",)).image_tower is not None
    assert "no video tower found" in load_face_llava(checkpoint_copy, llm=False).no_tower("video")
    with pytest.raises(ValueError, match="unknown towers"):
        load_face_llava(checkpoint_copy, llm=False, towers=("audio",))
