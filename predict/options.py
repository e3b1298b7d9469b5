"""The checks of predict's options, one copy each: the configs' `resolve()` and the command line's argparse types
both call them, so a bad value gets the same message whichever way it comes in.

`--tta` is checked by `predict.tta.check_tta` (it knows the views) and `--threshold` by
`predict.thresholds.parse_threshold`; the generic checks are here. Each raises PredictError naming the option.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from predict.errors import PredictError


def _positive_integer(option: str, n: int) -> int:
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise PredictError(f"{option} must be a positive integer, got {n!r}")
    return int(n)


def check_batch_size(n: int) -> int:
    """Validate `--batch-size` (images per model call before TTA): a positive integer; returns it."""
    return _positive_integer("--batch-size", n)


def check_beam(n: int) -> int:
    """Validate `--beam` (rnn runs' beam width; 1 is greedy decoding): a positive integer; returns it."""
    return _positive_integer("--beam", n)


def check_top_k(n: int) -> int:
    """Validate `--top-k` (at most this many tags per image, the most probable): a positive integer; returns it."""
    return _positive_integer("--top-k", n)


def check_choice(option: str, value: str, choices: Sequence[str]) -> str:
    """Validate an option with a fixed set of values (`--format`, `--missing`); returns the value."""
    if value not in choices:
        raise PredictError(f"{option} must be one of {', '.join(choices)}, got {value!r}")
    return value


def check_runs(runs: Sequence[str | Path]) -> tuple[Path, ...]:
    """Validate the RUN_DIR arguments: at least one; returns them as a tuple of paths."""
    if isinstance(runs, (str, Path)) or not runs:
        raise PredictError("no RUN_DIR given" if not runs else f"RUN_DIRs must be given as a list, got {runs!r}")
    return tuple(Path(r) for r in runs)
