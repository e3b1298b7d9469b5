"""Command line of the crawl stage, `python -m crawl LIST OUT_DIR [options]`: argparse, then crawl.crawler.crawl."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from crawl.crawler import FAILURE_REASONS, ConfigError, CrawlBusy, CrawlConfig, CrawlInterrupted, crawl
from crawl.listfile import ListError

EXIT_OK, EXIT_USAGE, EXIT_INTERRUPTED = 0, 2, 130


def build_parser() -> argparse.ArgumentParser:
    reasons = "\n".join(f"  {name:16} {meaning}" for name, meaning in FAILURE_REASONS.items())
    parser = argparse.ArgumentParser(
        prog="python -m crawl",
        description="Download the images of a URL list into OUT_DIR (a DATA_DIR: list.csv, classes.txt, "
        "manifest.csv, failed.csv, crawl.json, images/). Running the same command again resumes.",
        epilog=f"failed.csv reasons:\n{reasons}\n\nExit status: 0 done (per-URL failures are in failed.csv), "
        "2 bad input or usage, 130 interrupted.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("list", type=Path, help="JD headerless CSV (id,url[,flags]) or a CSV/TSV with a url column")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="the DATA_DIR to write (created if needed)")
    parser.add_argument("--classes", type=Path, help="class names, one per line, in flag order")
    parser.add_argument("--workers", type=int, default=32, help="concurrent downloads (default 32)")
    parser.add_argument("--timeout", type=float, default=10.0, help="connect and read timeout in seconds (10)")
    parser.add_argument("--deadline", type=float, help="wall-clock limit of one attempt in seconds (3 x --timeout)")
    parser.add_argument("--retries", type=int, default=3, help="retries after the first attempt (3)")
    parser.add_argument("--max-bytes", type=int, default=20_000_000, help="largest accepted body (20000000)")
    parser.add_argument("--max-pixels", type=int, default=50_000_000, help="largest accepted width x height")
    parser.add_argument("--max-side", type=int, default=0, help="downsize images whose longer side is larger (0: keep)")
    parser.add_argument(
        "--checkpoint-every", type=float, default=5.0, help="seconds between manifest rewrites during the crawl (5)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = CrawlConfig(
        list_path=args.list,
        out_dir=args.out_dir,
        classes_path=args.classes,
        workers=args.workers,
        timeout=args.timeout,
        deadline=args.deadline,
        retries=args.retries,
        max_bytes=args.max_bytes,
        max_pixels=args.max_pixels,
        max_side=args.max_side,
        checkpoint_every=args.checkpoint_every,
    )
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
