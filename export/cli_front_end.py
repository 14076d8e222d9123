"""`facellava export front-end`: a thin layer over `export_front_end` (imported only when the command runs)."""

from __future__ import annotations

import argparse
from pathlib import Path


def export_front_end_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", "--out", dest="bundle", type=Path, required=True,
                        help="bundle directory (created or updated)")
    parser.add_argument("--mediapipe-models", type=Path,
                        help="directory with MediaPipe's face_detection_short_range.tflite, "
                             "face_detection_full_range_sparse.tflite and face_landmark_with_attention.tflite "
                             "(as in mediapipe/modules, or all in one folder; default: the installed mediapipe wheel)")
    parser.add_argument("--allow-drift", action="store_true",
                        help="keep graphs that miss their parity limits against MediaPipe (the figures are still "
                             "recorded)")


def export_front_end(args: argparse.Namespace) -> int:
    from facellava.export.front_end import NOTICE_NAME
    from facellava.export.front_end import export_front_end as run

    result = run(args.bundle, args.mediapipe_models, allow_drift=args.allow_drift)
    for name, entry in result.files.items():
        record = result.parity[name]
        print(f"{name:32s} {entry['bytes'] / 1e6:6.1f} MB  max_abs {record['max_abs']:.2e}  "
              f"rel_err {record['rel_err']:.2e}  " + ("pass" if record["passed"] else "DRIFT"))
    print(f"wrote {len(result.files)} front-end graphs and {NOTICE_NAME} to {args.bundle}")
    return 0
