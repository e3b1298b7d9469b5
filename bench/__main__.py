"""Run every benchmark in one command (`make bench`): crawl, input pipeline, prediction.

Each benchmark measures ratios against a baseline run in the same process, and prints its own table.
`python -m bench crawl pipeline` runs a subset.
"""

from __future__ import annotations

import importlib
import sys

from common.tf_logging import quiet_tensorflow_startup

SUITES = ["crawl", "pipeline", "predict"]
NEEDS_TENSORFLOW = {"pipeline", "predict"}


def main(argv: list[str] | None = None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or SUITES
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(SUITES)}", file=sys.stderr)
        return 2
    if NEEDS_TENSORFLOW & set(names):
        quiet_tensorflow_startup()  # before bench.pipeline or bench.predict imports TensorFlow
    for name in names:
        print(f"\n=== bench.{name} ===", flush=True)
        importlib.import_module(f"bench.{name}").main([])
    return 0


if __name__ == "__main__":
    sys.exit(main())
