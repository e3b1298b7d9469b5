"""Command line of the predict stage: `python -m predict submit|evaluate|compare ...` (argparse only; the work is in the modules).

Exit status: 0 on success, 2 for bad input (an unusable RUN_DIR or DATA_DIR, missing or unreadable images,
runs that cannot be ensembled, a bad option), with a message on stderr naming the file or ids.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.tf_logging import quiet_tensorflow_startup

quiet_tensorflow_startup()  # before the first TensorFlow import below

from crawl.manifest import DataDirError
from predict.errors import PredictError
from predict.tta import MAX_TTA

EXIT_BAD_INPUT = 2


def _tta(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer from 1 to {MAX_TTA}, got {text!r}") from None
    if not 1 <= n <= MAX_TTA:
        raise argparse.ArgumentTypeError(f"must be from 1 to {MAX_TTA} (the number of defined views), got {n}")
    return n


def _threshold(text: str) -> str:
    from predict.thresholds import parse_threshold

    try:
        return parse_threshold(text)
    except PredictError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m predict", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, tta_default: int) -> None:
        p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run folder(s) written by python -m train")
        p.add_argument("--data", required=True, type=Path, metavar="DATA_DIR", help="crawled DATA_DIR to predict on")
        p.add_argument("--tta", type=_tta, default=tta_default, help=f"test-time views, 1..{MAX_TTA} (default {tta_default})")
        p.add_argument("--batch-size", type=_positive, default=16, help="images per model call before TTA (default 16)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")

    s = sub.add_parser("submit", help="write a submission CSV for every id of the DATA_DIR's list")
    common(s, 1)
    s.add_argument("--out", required=True, type=Path, help="submission file, e.g. submissions/NAME.csv")
    s.add_argument("--threshold", type=_threshold, default="0.5", help="0.5 (default), tuned, or a number")
    s.add_argument("--format", choices=["jd", "csv", "proba"], default="jd", help="jd (default), csv or proba")
    s.add_argument("--missing", choices=["error", "fill"], default="error", help="ids without an image: error or fill")

    e = sub.add_parser("evaluate", help="mAP, F2 and per-class figures on a labelled DATA_DIR")
    common(e, 1)
    e.add_argument("--threshold", type=_threshold, default="0.5", help="0.5 (default), tuned, or a number")
    e.add_argument("--out", type=Path, default=None, help="write the report as JSON here")

    c = sub.add_parser("compare", help="compare runs: table (Markdown, CSV) and bar chart, sorted by mAP")
    common(c, 8)
    c.add_argument("--out", type=Path, default=Path("submissions/compare"), help="output folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress = not args.no_progress
    runs = tuple(args.runs)
    try:
        if args.command == "submit":
            from predict.submission import SubmitConfig, submit

            result = submit(
                SubmitConfig(runs, args.data, args.out, args.tta, args.threshold, args.format, args.batch_size, args.missing, progress)
            )
            print(result.summary())
        elif args.command == "evaluate":
            from predict.evaluate import EvaluateConfig, evaluate, format_report

            report = evaluate(EvaluateConfig(runs, args.data, args.tta, args.threshold, args.out, args.batch_size, progress))
            print(format_report(report))
            print(f"wrote {args.out}" if args.out else json.dumps({k: report[k] for k in ("map", "f2")}))
        else:
            from predict.compare import CompareConfig, compare

            result = compare(CompareConfig(runs, args.data, args.tta, args.out, args.batch_size, progress))
            print(result.markdown, end="")
            print(f"wrote {result.markdown_path}, {result.csv_path}, {result.chart_path}")
    except (PredictError, DataDirError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
