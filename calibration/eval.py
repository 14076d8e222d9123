"""`facellava eval`: task accuracy of each variant of a bundle, with the paper's metrics.

The manifest is a CSV with the columns `path` (an image or video, relative to the CSV's folder) and `label`:
an emotion name or synonym (emotion), AU numbers like "1;2;12" (action_units), an age in years (age), the
present CelebA attribute names separated by ";" (attributes), or real/fake (deepfake). Each sample is asked
the official task prompt through `runtime.pipeline.Pipeline` (greedy), the free-text answer is parsed with
`calibration.answers`, and the metrics of `calibration.metrics` are computed per variant:

| task | metrics |
|---|---|
| emotion | UAR, WAR (DFEW/Crema-D), accuracy (RAF-DB) |
| action_units | F1 per AU (the AUs in the labels) and their mean (DISFA/BP4D) |
| age | MAE and the fraction of answers with an age (MORPH II/UTKFace) |
| attributes | mean attribute accuracy over CelebA's 40 attributes, and per attribute |
| deepfake | accuracy (FaceForensics++) |

Writes `eval-<task>.json` (metrics and every answer), `.csv` and `.md`, as bench does.
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from facellava.calibration import answers, metrics
from facellava.errors import FaceLlavaError

TASKS = tuple(answers.TASK_PROMPTS)
MAX_TOKENS = 128


@dataclass
class Sample:
    path: Path
    label: Any  # the task's label form: a class name, a set of AUs, an age, {attribute: bool}, "real"/"fake"
    raw_label: str


def _emotion_label(text: str) -> str:
    label = text.strip().lower()
    if label in answers.EMOTIONS:
        return label
    parsed = answers.parse_emotion(label)
    if parsed is None:
        raise ValueError(f"not an emotion (one of {', '.join(answers.EMOTIONS)} or a synonym)")
    return parsed


def _action_unit_label(text: str) -> frozenset[int]:
    units = set()
    for piece in text.replace(",", ";").split(";"):
        piece = piece.strip().lower().removeprefix("au")
        if not piece:
            continue
        if not piece.isdigit() or int(piece) not in answers.ACTION_UNIT_NAMES:
            raise ValueError(f"{piece!r} is not a known AU number ({', '.join(map(str, answers.ACTION_UNIT_NAMES))})")
        units.add(int(piece))
    return frozenset(units)


def _age_label(text: str) -> float:
    try:
        age = float(text)
    except ValueError:
        raise ValueError("not a number of years") from None
    if not 0 <= age <= 120:
        raise ValueError("not an age between 0 and 120")
    return age


_ATTRIBUTES_LOWER = {name.lower(): name for name in answers.ATTRIBUTE_WORDS}


def _attributes_label(text: str) -> dict[str, bool]:
    present = set()
    for piece in (p.strip() for p in text.split(";")):
        if not piece:
            continue
        if piece.lower() not in _ATTRIBUTES_LOWER:
            raise ValueError(f"{piece!r} is not a CelebA attribute name (e.g. Smiling, Eyeglasses, Male)")
        present.add(_ATTRIBUTES_LOWER[piece.lower()])
    return {name: name in present for name in answers.ATTRIBUTE_WORDS}


def _deepfake_label(text: str) -> str:
    label = text.strip().lower()
    if label not in ("real", "fake"):
        raise ValueError("not 'real' or 'fake'")
    return label


LABEL_READERS: dict[str, Callable[[str], Any]] = {
    "emotion": _emotion_label, "action_units": _action_unit_label, "age": _age_label,
    "attributes": _attributes_label, "deepfake": _deepfake_label,
}
PARSERS: dict[str, Callable[[str], Any]] = {
    "emotion": answers.parse_emotion, "action_units": answers.parse_action_units, "age": answers.parse_age,
    "attributes": answers.parse_attributes, "deepfake": answers.parse_deepfake,
}


def check_task(task: str) -> str:
    if task not in TASKS:
        raise FaceLlavaError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return task


def read_manifest(path: str | Path, task: str) -> list[Sample]:
    """The samples of a manifest CSV (`path`, `label`). Raises FaceLlavaError, naming the row, for a missing file
    or column, an unknown label, a medium the task does not take, or an empty manifest."""
    from facellava.calibration.dataset import modality_of

    check_task(task)
    path = Path(path)
    try:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            columns = list(reader.fieldnames or [])
    except FileNotFoundError:
        raise FaceLlavaError(f"manifest {path} does not exist") from None
    except (UnicodeDecodeError, csv.Error) as error:
        raise FaceLlavaError(f"manifest {path} is not a readable CSV ({error})") from None
    missing = [c for c in ("path", "label") if c not in columns]
    if missing:
        raise FaceLlavaError(f"manifest {path} lacks the column(s) {', '.join(missing)}; it needs a header "
                             f"'path,label' (it has: {', '.join(c for c in columns if c) or 'none'})")
    if not rows:
        raise FaceLlavaError(f"manifest {path} has no rows")
    samples = []
    for number, row in enumerate(rows, start=2):  # line 1 is the header
        media = path.parent / (row["path"] or "").strip()
        if not row["path"] or not media.is_file():
            raise FaceLlavaError(f"manifest {path} line {number}: file {media} does not exist")
        modality = modality_of(media)
        if modality not in answers.TASK_MODALITIES[task]:
            raise FaceLlavaError(f"manifest {path} line {number}: {media.name} is not a "
                                 f"{' or '.join(answers.TASK_MODALITIES[task])} file, which {task} takes")
        try:
            label = LABEL_READERS[task](row["label"] or "")
        except ValueError as error:
            raise FaceLlavaError(f"manifest {path} line {number}: label {row['label']!r} for {task}: {error}") from None
        samples.append(Sample(media, label, row["label"]))
    return samples


def task_metrics(task: str, predictions: Sequence[Any], labels: Sequence[Any]) -> dict[str, Any]:
    """The paper's metrics of one task on parsed predictions and labels (as `read_manifest` gives them)."""
    parsed = sum(p is not None and p != set() for p in predictions) / len(labels) if task != "attributes" else 1.0
    if task == "emotion":
        return {"uar": metrics.unweighted_average_recall(predictions, labels),
                "war": metrics.weighted_average_recall(predictions, labels),
                "accuracy": metrics.accuracy(predictions, labels), "parsed": parsed}
    if task == "action_units":
        units = sorted(set().union(*labels)) or sorted(answers.ACTION_UNIT_NAMES)
        per = metrics.f1_per_class([set(p) for p in predictions], [set(y) for y in labels], units)
        return {"mean_f1": sum(per.values()) / len(per), "f1": {f"AU{u}": v for u, v in per.items()},
                "parsed": parsed}
    if task == "age":
        mae, coverage = metrics.mean_absolute_error(predictions, labels)
        return {"mae": mae, "parsed": coverage}
    if task == "attributes":
        mean, per = metrics.mean_attribute_accuracy(predictions, labels, list(answers.ATTRIBUTE_WORDS))
        return {"mean_accuracy": mean, "accuracy": per}
    return {"accuracy": metrics.accuracy(predictions, labels), "parsed": parsed}


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return value


def evaluate_bundle(bundle: str | Path, task: str, manifest: str | Path, out_dir: str | Path | None = None,
                    variants: Sequence[str] | str | None = None, max_tokens: int = MAX_TOKENS,
                    progress: bool = True) -> list[dict[str, Any]]:
    """Ask every manifest sample the task's official prompt with each variant (default: every vision precision
    x GGUF type), parse the answers and compute the task's metrics. Writes `eval-<task>.{json,csv,md}` into
    `out_dir` when given. Returns one record per variant. Raises FaceLlavaError for a bad task, manifest, bundle
    or variant (before any answer is generated) and for a sample the front end cannot read."""
    from facellava.bundle import Bundle
    from facellava.calibration.bench import bundle_variants, write_reports
    from facellava.calibration.dataset import modality_of
    from facellava.runtime.pipeline import Pipeline

    samples = read_manifest(manifest, check_task(task))
    opened = Bundle.open(bundle)
    chosen = bundle_variants(opened, variants)
    question = answers.TASK_PROMPTS[task]
    results = []
    steps = tqdm(total=len(chosen) * len(samples), desc=f"eval {task}", unit="answer", disable=not progress)
    for variant in chosen:
        pipeline = Pipeline.open(opened.path, vision="onnxruntime", llm=variant.llm_type,
                                 vision_precision=variant.vision_precision)
        rows = []
        try:
            for sample in samples:
                medium = {modality_of(sample.path): sample.path}
                answer = pipeline.ask(question, max_tokens=max_tokens, **medium)
                rows.append({"path": str(sample.path), "label": _jsonable(sample.label) if task != "attributes"
                             else sample.raw_label, "answer": answer.text,
                             "prediction": PARSERS[task](answer.text)})
                steps.update()
        finally:
            pipeline.close()
        figures = task_metrics(task, [r["prediction"] for r in rows], [s.label for s in samples])
        for row in rows:
            row["prediction"] = _jsonable(row["prediction"]) if task != "attributes" else \
                ";".join(a for a, present in row["prediction"].items() if present)
        results.append({"variant": variant.name, "task": task, "samples": len(samples), **figures,
                        "answers": rows})
    steps.close()
    if out_dir is not None:
        headline = {"emotion": ("uar", "war", "accuracy", "parsed"), "action_units": ("mean_f1", "parsed"),
                    "age": ("mae", "parsed"), "attributes": ("mean_accuracy",), "deepfake": ("accuracy", "parsed")}
        write_reports(results, Path(out_dir), columns=("variant", "samples", *headline[task]), stem=f"eval-{task}",
                      plot=False)
    return results


def evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory")
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--manifest", required=True, help="CSV with columns path,label")
    parser.add_argument("--variants", help="comma-separated, e.g. fp16+q4_k_m,fp32 (default: all)")
    parser.add_argument("--out", default="eval-results", help="output folder")
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS)


def evaluate(args: argparse.Namespace) -> int:
    evaluate_bundle(args.bundle, args.task, args.manifest, args.out, args.variants, args.max_tokens)
    print(Path(args.out, f"eval-{args.task}.md").read_text(), end="")
    print(f"wrote eval-{args.task}.json, .csv and .md into {args.out}")
    return 0
