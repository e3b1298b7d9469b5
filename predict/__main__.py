"""Command line of the predict stage: `python -m predict submit|evaluate|compare|export ...` (argparse only; the work
is in the modules).

Exit status: 0 on success, 2 for bad input (an unusable RUN_DIR or DATA_DIR, missing or unreadable images,
runs that cannot be ensembled, a bad option), with a message on stderr naming the file or ids.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from common.tf_logging import quiet_tensorflow_startup

quiet_tensorflow_startup()  # before the first TensorFlow import below

from crawl.manifest import DataDirError
from predict.compare import CompareConfig, compare
from predict.engines import ENGINES, PRECISIONS, check_engine
from predict.errors import PredictError
from predict.evaluate import EvaluateConfig, evaluate, format_report
from predict.export import EXPORT_FORMATS, ExportConfig, export
from predict.options import check_batch_size, check_beam, check_choice
from predict.submission import FORMATS, MISSING_MODES, SubmitConfig, submit
from predict.thresholds import parse_threshold
from predict.tta import MAX_TTA, check_tta

EXIT_BAD_INPUT = 2
Config = SubmitConfig | EvaluateConfig | CompareConfig | ExportConfig

# The defaults of the command line are the configs' own.
_SUBMIT = SubmitConfig(runs=(), data=Path("."), out=Path("."))
_EVALUATE = EvaluateConfig(runs=(), data=Path("."))
_COMPARE = CompareConfig(runs=(), data=Path("."))


def _integer(text: str) -> int | str:
    try:
        return int(text)
    except ValueError:
        return text  # the check names the bad text


def _checked(check: Callable, convert: Callable = str) -> Callable[[str], object]:
    """An argparse type that runs one of the configs' checks, so argparse reports a bad value as a usage error."""

    def parse(text: str):
        try:
            return check(convert(text))
        except PredictError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m predict", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, defaults: Config) -> None:
        p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run folder(s) written by python -m train")
        p.add_argument("--data", required=True, type=Path, metavar="DATA_DIR", help="crawled DATA_DIR to predict on")
        p.add_argument("--tta", type=_checked(check_tta, _integer), default=defaults.tta,
                       help=f"test-time views, 1..{MAX_TTA} (default {defaults.tta})")
        p.add_argument("--batch-size", type=_checked(check_batch_size, _integer), default=defaults.batch_size,
                       help=f"images per model call before TTA (default {defaults.batch_size})")
        p.add_argument("--beam", type=_checked(check_beam, _integer), default=defaults.beam,
                       help=f"rnn runs: decode with a beam of N (default {defaults.beam}: greedy)")
        p.add_argument("--engine", type=_checked(check_engine), default=defaults.engine,
                       metavar="{" + ",".join(ENGINES) + "}",
                       help=f"what runs the model: {', '.join(ENGINES)} (default {defaults.engine}); openvino and onnx "
                       "export the run once into RUN_DIR/engines/")
        p.add_argument("--precision", type=_checked(lambda v: check_choice("--precision", v, PRECISIONS)),
                       default=defaults.precision, metavar="{" + ",".join(PRECISIONS) + "}",
                       help="f32 (default) or bf16 (--engine openvino on a CPU with bfloat16)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")

    def threshold(p: argparse.ArgumentParser, defaults: SubmitConfig | EvaluateConfig) -> None:
        p.add_argument("--threshold", type=_checked(parse_threshold), default=defaults.threshold,
                       help=f"{defaults.threshold} (default), tuned, or a number")

    s = sub.add_parser("submit", help="write a submission CSV for every id of the DATA_DIR's list")
    common(s, _SUBMIT)
    s.add_argument("--out", required=True, type=Path, help="submission file, e.g. submissions/NAME.csv")
    threshold(s, _SUBMIT)
    s.add_argument("--format", type=_checked(lambda v: check_choice("--format", v, FORMATS)), default=_SUBMIT.format,
                   metavar="{" + ",".join(FORMATS) + "}", help=f"{', '.join(FORMATS)} (default {_SUBMIT.format})")
    s.add_argument("--missing", type=_checked(lambda v: check_choice("--missing", v, MISSING_MODES)),
                   default=_SUBMIT.missing, metavar="{" + ",".join(MISSING_MODES) + "}",
                   help=f"ids without an image: {' or '.join(MISSING_MODES)} (default {_SUBMIT.missing})")

    e = sub.add_parser("evaluate", help="mAP, F2 and per-class figures on a labelled DATA_DIR")
    common(e, _EVALUATE)
    threshold(e, _EVALUATE)
    e.add_argument("--out", type=Path, default=_EVALUATE.out, help="write the report as JSON here")

    c = sub.add_parser("compare", help="compare runs: table (Markdown, CSV) and bar chart, sorted by mAP")
    common(c, _COMPARE)
    c.add_argument("--out", type=Path, default=_COMPARE.out, help=f"output folder (default {_COMPARE.out})")

    x = sub.add_parser("export", help="export a run (preprocessing included) for a runtime without this code")
    x.add_argument("run", type=Path, metavar="RUN_DIR", help="run folder written by python -m train")
    x.add_argument("--format", required=True, type=_checked(lambda v: check_choice("--format", v, EXPORT_FORMATS)),
                   metavar="{" + ",".join(EXPORT_FORMATS) + "}", help=f"{', '.join(EXPORT_FORMATS)}")
    x.add_argument("--out", required=True, type=Path, metavar="DIR",
                   help="folder for the model and tagger.json (replaced atomically if it holds an earlier export)")
    return parser


def parse_args(argv: list[str] | None = None) -> Config:
    """The command line as the config of its command (checked again by the command's `resolve()`)."""
    a = build_parser().parse_args(argv)
    if a.command == "export":
        return ExportConfig(run=a.run, format=a.format, out=a.out)
    shared = dict(runs=tuple(a.runs), data=a.data, tta=a.tta, batch_size=a.batch_size, progress=not a.no_progress,
                  beam=a.beam, engine=a.engine, precision=a.precision)
    if a.command == "submit":
        return SubmitConfig(**shared, out=a.out, threshold=a.threshold, format=a.format, missing=a.missing)
    if a.command == "evaluate":
        return EvaluateConfig(**shared, threshold=a.threshold, out=a.out)
    return CompareConfig(**shared, out=a.out)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        if isinstance(config, SubmitConfig):
            print(submit(config).summary())
        elif isinstance(config, EvaluateConfig):
            report = evaluate(config)
            print(format_report(report))
            print(f"wrote {config.out}" if config.out else json.dumps({k: report[k] for k in ("map", "f2")}))
        elif isinstance(config, ExportConfig):
            print(export(config).summary())
        else:
            result = compare(config)
            print(result.markdown, end="")
            print(f"wrote {result.markdown_path}, {result.csv_path}, {result.chart_path}")
    except (PredictError, DataDirError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
