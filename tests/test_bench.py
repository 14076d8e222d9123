"""`facellava bench` and `facellava eval` on the tiny bundle: every output file, resume, metrics, bad manifests."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from conftest import write_video

from facellava.calibration import answers, metrics
from facellava.calibration.bench import build_references, pareto_front, proposal_gguf, run_bench
from facellava.calibration.eval import evaluate_bundle, read_manifest
from facellava.cli import main
from facellava.errors import FaceLlavaError


@pytest.fixture(scope="module")
def bundle_copy(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    copy = tmp_path_factory.mktemp("bench-bundle") / "bundle"
    shutil.copytree(tiny_bundle, copy)
    return copy


def test_bench_writes_every_output_and_resumes(bundle_copy: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    from PIL import Image

    out = tmp_path / "bench"
    results = run_bench(bundle_copy, out, repeats=1, decode_tokens=8, progress=False, checkpoint=tiny_checkpoint)
    assert [r["variant"] for r in results] == ["fp32+f32"]
    record = results[0]
    for name in ("bench.json", "bench.csv", "bench.md", "bench.png", "variants/fp32+f32.json"):
        assert (out / name).is_file(), name
    with Image.open(out / "bench.png") as image:
        assert image.format == "PNG" and image.size[0] > 100
    # the F32 GGUF with FP32 vision reproduces PyTorch
    assert record["visual_token_cosine_mean"] > 0.9999
    assert record["first_token_kl"] < 1e-3 and record["top1_agreement"] == 1.0
    assert record["greedy_match_length"] == 8
    for stage in ("face_detection_ms", "vision_ms", "time_to_first_token_ms", "total_ms"):
        assert 0 < record["latency"][stage]["p50"] <= record["latency"][stage]["p90"]
    assert record["raw_llama_decode_tokens_per_s"] > 0 and record["decode_ratio_runtime_over_raw"] > 0
    assert record["peak_rss_mb"] > 0 and record["llm_mb"] > 0
    assert "fp32+f32" in (out / "bench.md").read_text()
    with (out / "bench.csv").open() as handle:
        assert next(csv.DictReader(handle))["variant"] == "fp32+f32"

    # a re-run takes the stored variant instead of measuring again (and needs no checkpoint)
    stored = out / "variants" / "fp32+f32.json"
    marked = json.loads(stored.read_text())
    marked["latency"]["total_ms"]["p50"] = -1.0
    stored.write_text(json.dumps(marked))
    again = run_bench(bundle_copy, out, repeats=1, decode_tokens=8, progress=False)
    assert again[0]["latency"]["total_ms"]["p50"] == -1.0
    # other settings measure again
    fresh = run_bench(bundle_copy, out, repeats=2, decode_tokens=8, progress=False, checkpoint=tiny_checkpoint)
    assert fresh[0]["latency"]["total_ms"]["p50"] > 0 and fresh[0]["answers"] == 2


def test_bench_takes_the_checkpoint_from_the_user_never_from_the_manifest(
        bundle_copy: Path, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", str(bundle_copy), "--out", str(tmp_path / "a")]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "pass --checkpoint DIR" in error
    assert f"(the bundle records '{tiny_checkpoint.resolve()}')" in error
    other = Path(shutil.copytree(tiny_checkpoint, tmp_path / "other"))
    (other / "config.json").write_text((other / "config.json").read_text() + "\n")
    assert main(["bench", str(bundle_copy), "--out", str(tmp_path / "b"), "--checkpoint", str(other)]) == 1
    assert "is not the checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "a" / "bench.json").exists() and not (tmp_path / "b" / "bench.json").exists()


def test_bench_rejects_unknown_variant(bundle_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", str(bundle_copy), "--out", str(tmp_path), "--variants", "fp16+q4_k_m"]) == 1
    assert "has no variant 'fp16+q4_k_m'" in capsys.readouterr().err
    assert not (tmp_path / "bench.json").exists()


def test_bench_reference_streams_the_llm_and_equals_the_whole_model(
        bundle_copy: Path, tiny_checkpoint: Path, tiny_model, face_photo: Path, tmp_path: Path) -> None:
    """bench's reference (vision half, then the decoder streamed layer by layer) against the whole model's
    `encode_image` + `generate_reference` on two images: the same visual tokens, greedy tokens and logits."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    from facellava.bundle import Bundle
    from facellava.calibration.dataset import build_calibration_set

    shutil.copy(face_photo, tmp_path / "a.jpg")
    with Image.open(face_photo) as image:
        ImageOps.mirror(image.convert("RGB")).rotate(8).save(tmp_path / "b.jpg")
    media = build_calibration_set(tmp_path, modalities=("image",), progress=False).samples()
    assert len(media) == 2
    question, steps = "Describe the face.", 8
    gguf = proposal_gguf(Bundle.open(bundle_copy))
    assert gguf is not None and gguf.name == "llm-f32.gguf"
    streamed = build_references(tiny_checkpoint, media, question, steps, proposal_gguf=gguf)
    one_token_a_pass = build_references(tiny_checkpoint, media, question, steps)
    whole = []
    with torch.inference_mode():
        for medium in media:
            tokens = tiny_model.encode_image(torch.from_numpy(medium.pixel_values),
                                             torch.from_numpy(medium.landmarks))[0]
            ids = tiny_model.prompt_ids(question, "image")
            output = tiny_model.generate_reference(ids, [tokens], max_new_tokens=steps, stop_at_eos=False)
            whole.append((tokens.numpy(), ids, output.tokens, output.logits.float().numpy()))
    for reference in (streamed, one_token_a_pass):
        assert len(reference) == 2
        for ref, (tokens, ids, greedy, logits) in zip(reference, whole, strict=True):
            assert ref.input_ids == ids and ref.tokens == greedy and len(greedy) == steps
            assert np.abs(ref.visual_tokens - tokens).max() < 1e-6
            assert ref.logits.shape == logits.shape == (steps, tiny_model.config.vocab_size)
            assert np.abs(ref.logits - logits).max() < 1e-5 * np.abs(logits).max()  # measured 7e-7
    # the two images give different visual tokens: the comparison is not of one input with itself
    assert np.abs(streamed[0].visual_tokens - streamed[1].visual_tokens).max() > 1e-2


def test_pareto_front() -> None:
    points = [(1.0, 5.0), (2.0, 1.0), (3.0, 3.0), (1.0, 6.0), (4.0, 0.5)]
    assert pareto_front(points) == [0, 1, 4]


def _manifest(path: Path, rows: list[tuple[str, str]], header: str = "path,label") -> Path:
    path.write_text(header + "\n" + "".join(f"{p},{label}\n" for p, label in rows))
    return path


def test_eval_emotion_end_to_end(bundle_copy: Path, face_photo: Path, tmp_path: Path) -> None:
    shutil.copy(face_photo, tmp_path / "face.jpg")
    write_video(tmp_path / "clip.mp4", 10)
    manifest = _manifest(tmp_path / "m.csv", [("face.jpg", "happy"), ("clip.mp4", "anger"), ("face.jpg", "Neutral")])
    results = evaluate_bundle(bundle_copy, "emotion", manifest, tmp_path / "out", max_tokens=12, progress=False)
    (result,) = results
    assert result["variant"] == "fp32+f32" and result["samples"] == 3
    assert {"uar", "war", "accuracy", "parsed"} <= result.keys()
    # the metric agrees with a hand computation on the parsed answers
    predictions = [answers.parse_emotion(row["answer"]) for row in result["answers"]]
    labels = ["happiness", "anger", "neutral"]
    assert [row["label"] for row in result["answers"]] == labels
    hits = {c: [p == y for p, y in zip(predictions, labels, strict=True) if y == c] for c in set(labels)}
    assert result["uar"] == pytest.approx(sum(sum(h) / len(h) for h in hits.values()) / len(hits))
    assert result["war"] == pytest.approx(sum(p == y for p, y in zip(predictions, labels, strict=True)) / 3)
    for suffix in ("json", "csv", "md"):
        assert (tmp_path / "out" / f"eval-emotion.{suffix}").is_file()
    assert json.loads((tmp_path / "out" / "eval-emotion.json").read_text())[0]["samples"] == 3


def test_eval_action_units_and_attributes_metrics(bundle_copy: Path, face_photo: Path, tmp_path: Path) -> None:
    shutil.copy(face_photo, tmp_path / "face.jpg")
    manifest = _manifest(tmp_path / "au.csv", [("face.jpg", "1;2;12"), ("face.jpg", "AU6;12")])
    (result,) = evaluate_bundle(bundle_copy, "action_units", manifest, max_tokens=8, progress=False)
    assert set(result["f1"]) == {"AU1", "AU2", "AU6", "AU12"}
    predicted = [set(row["prediction"]) for row in result["answers"]]
    expected = metrics.f1_per_class(predicted, [{1, 2, 12}, {6, 12}], [1, 2, 6, 12])
    assert result["mean_f1"] == pytest.approx(sum(expected.values()) / 4)

    manifest = _manifest(tmp_path / "attr.csv", [("face.jpg", "Male;Smiling"), ("face.jpg", "")])
    (result,) = evaluate_bundle(bundle_copy, "attributes", manifest, max_tokens=8, progress=False)
    assert len(result["accuracy"]) == 40 and 0 <= result["mean_accuracy"] <= 1
    parsed = [answers.parse_attributes(row["answer"]) for row in result["answers"]]
    labels = [{a: a in ("Male", "Smiling") for a in answers.ATTRIBUTE_WORDS}, dict.fromkeys(answers.ATTRIBUTE_WORDS,
                                                                                              False)]
    mean, _ = metrics.mean_attribute_accuracy(parsed, labels, list(answers.ATTRIBUTE_WORDS))
    assert result["mean_accuracy"] == pytest.approx(mean)


@pytest.mark.parametrize(("task", "content", "message"), [
    ("emotion", "file,label\nface.jpg,happy\n", "lacks the column(s) path"),
    ("emotion", "path\nface.jpg\n", "lacks the column(s) label"),
    ("emotion", "path,label\nface.jpg,bored-ish\n", "line 2: label 'bored-ish' for emotion"),
    ("action_units", "path,label\nface.jpg,1;99\n", "'99' is not a known AU number"),
    ("age", "path,label\nface.jpg,old\n", "not a number of years"),
    ("attributes", "path,label\nface.jpg,Smiling;Sparkly\n", "'Sparkly' is not a CelebA attribute"),
    ("deepfake", "path,label\nface.jpg,maybe\n", "not 'real' or 'fake'"),
    ("emotion", "path,label\nface.jpg,happy\nmissing.jpg,sad\n", "line 3: file"),
    ("age", "path,label\n", "has no rows"),
])
def test_bad_manifests(task: str, content: str, message: str, face_photo: Path, tmp_path: Path) -> None:
    shutil.copy(face_photo, tmp_path / "face.jpg")
    (tmp_path / "m.csv").write_text(content)
    with pytest.raises(FaceLlavaError) as error:
        read_manifest(tmp_path / "m.csv", task)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_eval_cli_bad_manifest_is_one_line(bundle_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", str(bundle_copy), "--task", "age", "--manifest", str(tmp_path / "none.csv"),
                 "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
