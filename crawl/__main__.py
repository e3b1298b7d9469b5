"""Command line of the crawl stage, `python -m crawl LIST|FOLDER OUT_DIR [options]`: argparse, then crawl.crawl."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from crawl.crawler import FAILURE_REASONS, ConfigError, CrawlBusy, CrawlConfig, CrawlInterrupted, crawl
from crawl.listfile import ListError

EXIT_OK, EXIT_USAGE, EXIT_INTERRUPTED = 0, 2, 130


_DEFAULTS = CrawlConfig(list_path=Path("."), out_dir=Path("."))


def build_parser() -> argparse.ArgumentParser:
    """The flags of `python -m crawl`, with CrawlConfig's defaults."""
    d = _DEFAULTS
    reasons = "\n".join(f"  {name:16} {meaning}" for name, meaning in FAILURE_REASONS.items())
    parser = argparse.ArgumentParser(
        prog="python -m crawl",
        description="Download the images of a URL list into OUT_DIR (a DATA_DIR: list.csv, classes.txt, "
        "manifest.csv, failed.csv, crawl.json, images/). Running the same command again resumes. With --root, "
        "list rows that are not http(s) URLs are file paths under that folder; a FOLDER of class sub-folders "
        "instead of a list reads its images (classes: the sub-folder names, sorted; ids: relative paths).",
        epilog=f"failed.csv reasons:\n{reasons}\n\nExit status: 0 done (per-URL failures are in failed.csv), "
        "2 bad input or usage, 130 interrupted.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add(
        "list",
        type=Path,
        help="JD headerless CSV (id,url[,flags]), a CSV/TSV with a url column, or a folder of class sub-folders",
    )
    add("out_dir", type=Path, metavar="OUT_DIR", help="the DATA_DIR to write (created if needed)")
    add("--classes", type=Path, help="class names, one per line, in flag order")
    add("--root", type=Path, help="read list rows that are not http(s) URLs as file paths under this folder")
    add("--workers", type=int, default=d.workers, help=f"concurrent downloads (default {d.workers})")
    add("--timeout", type=float, default=d.timeout, help=f"connect and read timeout in seconds ({d.timeout:g})")
    add("--deadline", type=float, default=d.deadline, help="wall-clock limit of one attempt in seconds (3 x --timeout)")
    add("--retries", type=int, default=d.retries, help=f"retries after the first attempt ({d.retries})")
    add("--max-bytes", type=int, default=d.max_bytes, help=f"largest accepted body ({d.max_bytes})")
    add("--max-pixels", type=int, default=d.max_pixels, help=f"largest accepted width x height ({d.max_pixels})")
    add(
        "--max-side",
        type=int,
        default=d.max_side,
        help=f"downsize images whose longer side is larger ({d.max_side}: keep)",
    )
    add(
        "--checkpoint-every",
        type=float,
        default=d.checkpoint_every,
        help=f"seconds between manifest rewrites during the crawl ({d.checkpoint_every:g})",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> CrawlConfig:
    """The command line as a CrawlConfig (validated by `crawl`, where it is used)."""
    args = build_parser().parse_args(argv)
    return CrawlConfig(
        list_path=args.list,
        out_dir=args.out_dir,
        classes_path=args.classes,
        root=args.root,
        workers=args.workers,
        timeout=args.timeout,
        deadline=args.deadline,
        retries=args.retries,
        max_bytes=args.max_bytes,
        max_pixels=args.max_pixels,
        max_side=args.max_side,
        checkpoint_every=args.checkpoint_every,
    )


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        crawl(config)
    except ListError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    except (ConfigError, CrawlBusy) as exc:
        print(f"python -m crawl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (CrawlInterrupted, KeyboardInterrupt):
        print("crawl: interrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
