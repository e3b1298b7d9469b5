"""Command line of the predict stage: `python -m predict submit|evaluate|compare|tag|export ...` (argparse only; the
work is in the modules).

Exit status: 0 on success, 2 for bad input (an unusable RUN_DIR or DATA_DIR, missing or unreadable images,
runs that cannot be ensembled, a bad option), with a message on stderr naming the file or ids. `tag` exits 0 when
at least one image was tagged (the others are rows with an error, each also named on stderr), 2 when none was.
"""

from __future__ import annotations

import argparse
import json
import os
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
from predict.options import check_batch_size, check_beam, check_choice, check_top_k
from predict.submission import FORMATS, MISSING_MODES, SubmitConfig, submit
from predict.tag_inputs import TagUsageError, split_runs_and_inputs
from predict.tagger import TagConfig, tag
from predict.thresholds import parse_threshold
from predict.tta import MAX_TTA, check_tta

EXIT_BAD_INPUT = 2
Config = SubmitConfig | EvaluateConfig | CompareConfig | TagConfig | ExportConfig

# The defaults of the command line are the configs' own.
_SUBMIT = SubmitConfig(runs=(), data=Path("."), out=Path("."))
_EVALUATE = EvaluateConfig(runs=(), data=Path("."))
_COMPARE = CompareConfig(runs=(), data=Path("."))
_TAG = TagConfig(runs=(), inputs=())
_TAG_USAGE = ("python -m predict tag RUN_DIR [RUN_DIR ...] INPUT [INPUT ...] [--out FILE.csv|FILE.jsonl]\n"
              "       [--threshold 0.5|tuned|X] [--top-k N] [--tta N] [--batch-size N] [--engine keras|openvino|onnx]\n"
              "       [--precision f32|bf16] [--no-progress]")
_TAG_EPILOG = """\
RUN_DIRs come first: the leading arguments that are folders holding a config.json (what python -m train writes)
are the runs, averaged as an ensemble; every argument from the first one that is not is an INPUT. An INPUT is an
image file (any name), a folder (searched recursively for .jpg .jpeg .png .gif .bmp .webp .tif .tiff .avif ...,
the formats the crawl accepts, in sorted order; symlinks leading outside it are reported, not read), or - for one
path per line on standard input. Tags are the classes whose probability reaches the threshold, most probable first;
--top-k N keeps at most the N most probable of them (--threshold 0 --top-k N: exactly the N most probable). An image
that cannot be read is a row with an error (not_image, corrupt, truncated, not_found, ...) and no tags; the exit
status is 0 when at least one image was tagged, 2 when none was."""


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

    def engine(p: argparse.ArgumentParser, defaults: Config) -> None:
        """--engine and --precision (submit, evaluate, compare, tag)."""
        p.add_argument("--engine", type=_checked(check_engine), default=defaults.engine,
                       metavar="{" + ",".join(ENGINES) + "}",
                       help=f"what runs the model: {', '.join(ENGINES)} (default {defaults.engine}); openvino and onnx "
                       "export the run once into RUN_DIR/engines/")
        p.add_argument("--precision", type=_checked(lambda v: check_choice("--precision", v, PRECISIONS)),
                       default=defaults.precision, metavar="{" + ",".join(PRECISIONS) + "}",
                       help="f32 (default) or bf16 (--engine openvino on a CPU with bfloat16)")

    def common(p: argparse.ArgumentParser, defaults: Config) -> None:
        p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run folder(s) written by python -m train")
        p.add_argument("--data", required=True, type=Path, metavar="DATA_DIR", help="crawled DATA_DIR to predict on")
        p.add_argument("--tta", type=_checked(check_tta, _integer), default=defaults.tta,
                       help=f"test-time views, 1..{MAX_TTA} (default {defaults.tta})")
        p.add_argument("--batch-size", type=_checked(check_batch_size, _integer), default=defaults.batch_size,
                       help=f"images per model call before TTA (default {defaults.batch_size})")
        p.add_argument("--beam", type=_checked(check_beam, _integer), default=defaults.beam,
                       help=f"rnn runs: decode with a beam of N (default {defaults.beam}: greedy)")
        engine(p, defaults)
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

    t = sub.add_parser("tag", help="tag image files and folders with one run or an ensemble", epilog=_TAG_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter, usage=_TAG_USAGE)
    t.add_argument("arguments", nargs="+", metavar="RUN_DIR|INPUT",
                   help="run folder(s), then image files, folders, or - (paths on standard input)")
    t.add_argument("--out", type=Path, default=_TAG.out, metavar="FILE",
                   help="write FILE.csv or FILE.jsonl (default: one readable line per image on standard output)")
    t.add_argument("--threshold", type=_checked(parse_threshold), default=_TAG.threshold, metavar="0.5|tuned|X",
                   help=f"{_TAG.threshold} (default), tuned, or a number")
    t.add_argument("--top-k", type=_checked(check_top_k, _integer), default=_TAG.top_k, metavar="N",
                   help="at most N tags per image, the most probable of those reaching the threshold")
    t.add_argument("--tta", type=_checked(check_tta, _integer), default=_TAG.tta, metavar="N",
                   help=f"test-time views, 1..{MAX_TTA} (default {_TAG.tta})")
    t.add_argument("--batch-size", type=_checked(check_batch_size, _integer), default=_TAG.batch_size, metavar="N",
                   help=f"images per model call before TTA (default {_TAG.batch_size})")
    engine(t, _TAG)
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(tag_parser=t)  # parse_args reports a missing run or input with this parser's usage

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
    if a.command == "tag":
        try:
            runs, inputs = split_runs_and_inputs(a.arguments)
        except TagUsageError as err:
            a.tag_parser.error(str(err))  # the tag usage line, the message, exit status 2
        return TagConfig(runs=tuple(Path(r) for r in runs), inputs=tuple(inputs), out=a.out, threshold=a.threshold,
                         top_k=a.top_k, tta=a.tta, batch_size=a.batch_size, progress=not a.no_progress,
                         engine=a.engine, precision=a.precision)
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
        elif isinstance(config, TagConfig):
            summary = tag(config, stdin=sys.stdin)
            for r in summary.failed:
                print(f"error: {r.name}: {r.error}" + (f" ({r.detail})" if r.detail else ""), file=sys.stderr)
            print(summary.summary(), file=sys.stdout if summary.out is not None else sys.stderr)
            if not summary.tagged:
                print(f"error: none of the {len(summary.results)} images could be tagged", file=sys.stderr)
                return EXIT_BAD_INPUT
        elif isinstance(config, ExportConfig):
            print(export(config).summary())
        else:
            result = compare(config)
            print(result.markdown, end="")
            print(f"wrote {result.markdown_path}, {result.csv_path}, {result.chart_path}")
    except (PredictError, DataDirError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:  # `predict tag ... | head`: the reader left; stop quietly, as other command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush does not fail again
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
