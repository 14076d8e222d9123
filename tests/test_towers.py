"""One tower resolver: a flag, the config's value as a directory, the Hugging Face hub cache by repo id (offline),
then tower weights inside the checkpoint; a miss names every place it looked."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from facellava.errors import FaceLlavaError
from facellava.model import FaceLlava
from facellava.model.loading import find_tower, hub_snapshot, read_config
from facellava.model.tiny import move_towers_to_hub_cache


@pytest.fixture
def hub_checkpoint(tmp_path, tiny_checkpoint) -> tuple[Path, Path]:
    """A copy of the tiny checkpoint whose config.json names the towers by hub id, as the released one does,
    and a hub cache (`HF_HOME/hub`) holding them. Returns (checkpoint, HF_HOME)."""
    checkpoint = Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))
    home = tmp_path / "hf"
    move_towers_to_hub_cache(checkpoint, home / "hub")
    assert not (checkpoint / "LanguageBind_Image").exists()
    return checkpoint, home


@pytest.fixture
def clean_env(tmp_path, monkeypatch) -> dict[str, str]:
    """No hub cache anywhere: HF_* unset, an empty XDG cache and home, a working directory without ./cache_dir.
    Returns the environment for subprocesses."""
    for name in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "home").mkdir()
    (tmp_path / "work").mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home" / ".cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path / "work")
    return dict(os.environ)


def cli(*args, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "facellava", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd)


def same_model(a: FaceLlava, b: FaceLlava) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_commands_find_hub_cached_towers_without_flags(hub_checkpoint, clean_env, tmp_path, tiny_model, monkeypatch):
    checkpoint, home = hub_checkpoint
    env = {**clean_env, "HF_HOME": str(home)}
    work = Path.cwd()
    info = cli("inspect", checkpoint, "--json", env=env, cwd=work)
    assert info.returncode == 0, info.stderr
    towers = json.loads(info.stdout)["towers"]
    assert set(towers) == {"image", "video"}
    assert "models--LanguageBind--LanguageBind_Image/snapshots/" in towers["image"]["source"]
    assert "models--LanguageBind--LanguageBind_Video_merge/snapshots/" in towers["video"]["source"]

    bundle = tmp_path / "bundle"
    vision = cli("export", "vision", "--checkpoint", checkpoint, "--out", bundle, "--precision", "fp32",
                 "--no-front-end", env=env, cwd=work)  # the front end needs no tower: not this test's subject
    assert vision.returncode == 0, vision.stderr
    llm = cli("export", "llm", "--checkpoint", checkpoint, "--out", bundle, "--types", "f32", "--quiet",
              env=env, cwd=work)
    assert llm.returncode == 0, llm.stderr
    files = json.loads((bundle / "manifest.json").read_text())["files"]
    assert {"vision_image.onnx", "vision_video.onnx", "llm-f32.gguf"} <= set(files)

    # the same weights as the towers beside the checkpoint: the hub snapshot is what was loaded
    monkeypatch.setenv("HF_HOME", str(home))
    same_model(FaceLlava.from_pretrained(checkpoint), tiny_model)


def test_a_miss_names_every_place_it_looked(hub_checkpoint, clean_env, tmp_path):
    checkpoint, _home = hub_checkpoint
    env = {**clean_env, "HF_HOME": str(tmp_path / "empty-hf"), "HF_HUB_CACHE": str(tmp_path / "empty-hub")}
    result = cli("export", "vision", "--checkpoint", checkpoint, "--out", tmp_path / "bundle",
                 "--modalities", "image", "--precision", "fp32", env=env, cwd=Path.cwd())
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert "no image tower found" in line and "--image-tower DIR" in line
    for place in (f"mm_image_tower 'LanguageBind/LanguageBind_Image' as a directory ({checkpoint}",
                  f"$HF_HUB_CACHE {tmp_path / 'empty-hub' / 'models--LanguageBind--LanguageBind_Image'}",
                  f"$HF_HOME/hub {tmp_path / 'empty-hf' / 'hub' / 'models--LanguageBind--LanguageBind_Image'}",
                  f"the default hub cache {tmp_path / 'home' / '.cache' / 'huggingface' / 'hub'}",
                  f"./cache_dir {Path.cwd() / 'cache_dir' / 'models--LanguageBind--LanguageBind_Image'}",
                  "model.image_tower.* weights inside"):
        assert place in line, (place, line)
    assert not (tmp_path / "bundle" / "vision_image.onnx").exists()

    llm = cli("export", "llm", "--checkpoint", checkpoint, "--out", tmp_path / "bundle", "--types", "f32",
              "--quiet", env=env, cwd=Path.cwd())
    assert llm.returncode == 1 and len(llm.stderr.strip().splitlines()) == 1, llm.stderr
    assert "no image tower found" in llm.stderr and "$HF_HOME/hub" in llm.stderr

    inspect = cli("inspect", checkpoint, env=env, cwd=Path.cwd())
    assert inspect.returncode == 0, inspect.stderr
    assert "image tower  none: no image tower found (looked in:" in inspect.stdout


def test_the_official_cache_dir_and_hub_cache_order(hub_checkpoint, clean_env, tmp_path, monkeypatch):
    checkpoint, home = hub_checkpoint
    config = read_config(checkpoint)
    assert find_tower("image", config, checkpoint).directory is None

    # the official code's ./cache_dir, relative to the working directory
    shutil.copytree(home / "hub", Path.cwd() / "cache_dir", symlinks=True)
    found = find_tower("image", config, checkpoint).directory
    assert found is not None and found.is_relative_to(Path.cwd() / "cache_dir")
    assert FaceLlava.from_pretrained(checkpoint).image_tower is not None

    # $HF_HUB_CACHE comes before $HF_HOME/hub, which comes before ./cache_dir
    monkeypatch.setenv("HF_HOME", str(home))
    assert find_tower("image", config, checkpoint).directory.is_relative_to(home / "hub")
    other = tmp_path / "other-hub"
    shutil.copytree(home / "hub", other, symlinks=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(other))
    assert find_tower("video", config, checkpoint).directory.is_relative_to(other)

    # an explicit directory wins over every cache; a missing one is an error
    explicit = find_tower("image", config, checkpoint, explicit=home).directory
    assert explicit == home
    with pytest.raises(FaceLlavaError, match="image tower directory .* does not exist"):
        find_tower("image", config, checkpoint, explicit=tmp_path / "nowhere")


def test_hub_snapshot_follows_refs_main_else_the_newest(tmp_path):
    repo = tmp_path / "models--LanguageBind--LanguageBind_Image"
    for name in ("a" * 40, "b" * 40):
        (repo / "snapshots" / name).mkdir(parents=True)
    os.utime(repo / "snapshots" / ("a" * 40), (1, 1))
    assert hub_snapshot(tmp_path, "LanguageBind/LanguageBind_Image") == repo / "snapshots" / ("b" * 40)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40 + "\n")
    assert hub_snapshot(tmp_path, "LanguageBind/LanguageBind_Image") == repo / "snapshots" / ("a" * 40)
    (repo / "refs" / "main").write_text("c" * 40)  # a ref to a snapshot not downloaded: the newest one
    assert hub_snapshot(tmp_path, "LanguageBind/LanguageBind_Image") == repo / "snapshots" / ("b" * 40)
    assert hub_snapshot(tmp_path, "LanguageBind/LanguageBind_Video_merge") is None
