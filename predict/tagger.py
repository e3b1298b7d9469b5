"""Apply trained runs to anyone's images: `predict.Tagger` (the Python API) and `tag()` (`python -m predict tag`).

A Tagger holds one run or an ensemble (loaded by `predict.runs.load_runs`, so `submit`'s rules hold: the same
classes, the same head) and scores through `predict.inference.predict_ensemble`, the code `submit` uses: the
training decoder and resize (`train.data.load_image`), the run's preprocessing, TTA views, ensemble averaging. Files
first go through the crawl's conversion (`predict.tag_inputs.prepare`) and arrays are written as PNG, so both reach
the decoder as files: an array tags bit for bit like a PNG file of the same pixels, a raw WebP like its crawled copy.

Tags: the classes whose probability reaches the threshold (`0.5`, `tuned`: each run's tuned thresholds averaged over
the ensemble, or a number), most probable first; `top_k` keeps at most that many of them (with threshold 0: exactly
the k most probable classes). Images are scored in chunks, so results stream and memory stays flat on large folders.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.atomic import atomic_write_text
from predict.engines import DEFAULT_ENGINE, DEFAULT_PRECISION, check_engine, check_precision
from predict.errors import PredictError
from predict.inference import DEFAULT_BATCH_SIZE, predict_ensemble
from predict.options import check_batch_size, check_runs, check_top_k
from predict.runs import Run, load_runs
from predict.tag_inputs import ImageInput, Prepared, expand_inputs, image_extensions, prepare, write_array
from predict.tag_output import TagResult, choose_tags, file_format, format_line, format_results
from predict.thresholds import DEFAULT_THRESHOLD, parse_threshold, resolve_thresholds
from predict.tta import check_tta

CHUNK_BATCHES = 16  # batches per chunk: one tf.data pipeline per chunk, results streamed chunk by chunk
UNDECODABLE = "corrupt"  # the crawl's reason for bytes that do not decode: here, what TensorFlow cannot decode
_READERS = min(8, os.cpu_count() or 1)  # threads reading and converting files (Pillow releases the GIL)

Input = str | os.PathLike | np.ndarray


def check_options(*, tta: int, threshold: str, top_k: int | None, batch_size: int) -> dict:
    """The tagging options checked (PredictError naming the option), the threshold in canonical form."""
    return dict(
        tta=check_tta(tta),
        threshold=parse_threshold(threshold),
        top_k=None if top_k is None else check_top_k(top_k),
        batch_size=check_batch_size(batch_size),
    )


class Tagger:
    """Tags images with one run or an ensemble of runs; build it with `Tagger.load`."""

    def __init__(self, runs: Sequence[Run], *, tta: int, threshold: str, top_k: int | None, batch_size: int,
                 progress: bool = False):
        self.runs = list(runs)
        self.tta, self.threshold, self.top_k, self.batch_size = tta, threshold, top_k, batch_size
        self.progress = progress
        self.thresholds = resolve_thresholds(threshold, self.runs)  # one per class; fails at once if not tuned

    @classmethod
    def load(
        cls,
        run_dirs: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        tta: int = 1,
        threshold: str | float = DEFAULT_THRESHOLD,
        top_k: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        progress: bool = False,
        engine: str = DEFAULT_ENGINE,
        precision: str = DEFAULT_PRECISION,
    ) -> Tagger:
        """Load one RUN_DIR or several (an ensemble); raises PredictError naming the run or option at fault.

        engine/precision choose what runs the model (`predict.engines`: keras, or an onnx/openvino export cached in
        each RUN_DIR), as `--engine`/`--precision` do for submit."""
        if isinstance(run_dirs, (str, os.PathLike)):
            run_dirs = [run_dirs]
        options = check_options(tta=tta, threshold=str(threshold), top_k=top_k, batch_size=batch_size)
        engine = check_engine(engine)
        runs = load_runs(check_runs(list(run_dirs)), engine=engine, precision=check_precision(precision, engine))
        return cls(runs, **options, progress=progress)

    def with_options(self, **options) -> Tagger:
        """This tagger with other tta/threshold/top_k/batch_size/progress, sharing the loaded runs (no reload)."""
        current = dict(tta=self.tta, threshold=self.threshold, top_k=self.top_k, batch_size=self.batch_size)
        unknown = set(options) - {*current, "progress"}
        if unknown:
            raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
        progress = options.pop("progress", self.progress)
        current.update(options)
        current["threshold"] = str(current["threshold"])
        return Tagger(self.runs, **check_options(**current), progress=progress)

    @property
    def classes(self) -> list[str]:
        """Class names, in the order of the probability columns."""
        return list(self.runs[0].classes)

    def tag(self, inputs: Input | Iterable[Input]) -> list[TagResult]:
        """One result per input, in order: a path (any image file; converted as the crawl converts it) or an HxWx3
        uint8 RGB array. An input that cannot be read gets a result with `error` set and no tags."""
        return list(self.iter_results(_items(inputs)))

    def predict_proba(self, inputs: Input | Iterable[Input]) -> np.ndarray:
        """(N, K) probabilities in class order (float64); NaN rows for inputs that could not be read."""
        results = self.tag(inputs)
        out = np.full((len(results), len(self.classes)), np.nan, dtype=np.float64)
        for i, r in enumerate(results):
            if r.error is None:
                out[i] = [r.probabilities[c] for c in self.classes]
        return out

    def iter_results(
        self, items: Sequence[ImageInput | np.ndarray], on_chunk: Callable[[int], object] | None = None
    ) -> Iterator[TagResult]:
        """Results of `items` (rows to read, or checked arrays) in order, chunk by chunk; `on_chunk(n)` after each."""
        chunk = self.batch_size * CHUNK_BATCHES
        with tempfile.TemporaryDirectory(prefix="tag-") as scratch, ThreadPoolExecutor(_READERS) as pool:
            for start in range(0, len(items), chunk):
                part = items[start : start + chunk]
                folder = Path(scratch) / str(start)
                folder.mkdir()
                prepared = list(pool.map(_prepare, range(start, start + len(part)), part, [folder] * len(part)))
                yield from self._score(part, prepared, start)
                for f in folder.iterdir():  # converted copies are not needed once scored
                    f.unlink()
                if on_chunk is not None:
                    on_chunk(len(part))

    def _score(self, part: Sequence, prepared: Sequence[Prepared], start: int) -> Iterator[TagResult]:
        usable = [i for i, p in enumerate(prepared) if p.source is not None]
        prediction = predict_ensemble(
            self.runs, [prepared[i].source for i in usable], tta=self.tta, batch_size=self.batch_size,
            progress=self.progress, unreadable="keep",
        )
        scores = dict(zip(usable, zip(prediction.probabilities, prediction.readable, strict=True), strict=True))
        classes = self.classes
        for i, (item, p) in enumerate(zip(part, prepared, strict=True)):
            path = item.path if isinstance(item, ImageInput) else None
            error, detail = p.error, p.detail
            if error is None and not scores[i][1]:
                error, detail = UNDECODABLE, "TensorFlow cannot decode it"
            if error is not None:
                yield TagResult(index=start + i, path=path, tags=(), probabilities={}, error=error, detail=detail)
                continue
            row = scores[i][0]
            tags = tuple(classes[c] for c in choose_tags(row, self.thresholds, self.top_k))
            yield TagResult(index=start + i, path=path, tags=tags,
                            probabilities={c: float(v) for c, v in zip(classes, row, strict=True)})


def _prepare(index: int, item: ImageInput | np.ndarray, scratch: Path) -> Prepared:
    if isinstance(item, ImageInput):
        return prepare(item, scratch, index)
    return write_array(item, scratch, index)


def _items(inputs: Input | Iterable[Input]) -> list[ImageInput | np.ndarray]:
    """The API's inputs as rows: paths become ImageInput, arrays are checked (PredictError naming the index)."""
    if isinstance(inputs, (str, os.PathLike)) or (isinstance(inputs, np.ndarray) and inputs.ndim == 3):
        inputs = [inputs]
    items: list[ImageInput | np.ndarray] = []
    for i, x in enumerate(inputs):
        if isinstance(x, (str, os.PathLike)):
            items.append(ImageInput(os.fspath(x)))
        elif isinstance(x, np.ndarray):
            if x.ndim != 3 or x.shape[2] != 3 or x.dtype != np.uint8 or 0 in x.shape:
                raise PredictError(f"input #{i}: expected an HxWx3 uint8 RGB array, got shape {x.shape} {x.dtype}")
            items.append(x)
        else:
            raise PredictError(f"input #{i}: expected a path or an HxWx3 uint8 RGB array, got {type(x).__name__}")
    return items


@dataclass(frozen=True, kw_only=True)
class TagConfig:
    """Settings of `python -m predict tag`; `resolve()` checks them (`tag` calls it)."""

    runs: tuple[Path, ...]
    inputs: tuple[str, ...]  # image files, folders, or "-" (paths on standard input)
    out: Path | None = None  # .csv or .jsonl; None: readable lines on standard output
    threshold: str = DEFAULT_THRESHOLD
    top_k: int | None = None
    tta: int = 1
    batch_size: int = DEFAULT_BATCH_SIZE
    progress: bool = True
    engine: str = DEFAULT_ENGINE  # keras, openvino or onnx (predict.engines)
    precision: str = DEFAULT_PRECISION

    def resolve(self) -> TagConfig:
        """A copy with every option checked and the threshold in canonical form; raises PredictError."""
        if not self.inputs:
            raise PredictError("no INPUT given: name image files, folders, or - to read paths from standard input")
        out = None if self.out is None else Path(self.out)
        if out is not None:
            if out.is_dir():
                raise PredictError(f"--out {out} is a directory; give a file name ending in .csv or .jsonl")
            file_format(out)
        options = check_options(tta=self.tta, threshold=self.threshold, top_k=self.top_k, batch_size=self.batch_size)
        engine = check_engine(self.engine)
        return dataclasses.replace(self, runs=check_runs(self.runs), inputs=tuple(self.inputs), out=out, **options,
                                   engine=engine, precision=check_precision(self.precision, engine))


@dataclass(frozen=True)
class TagSummary:
    """What `tag` did: every result in input order, and the file written (None: lines went to standard output)."""

    results: list[TagResult]
    out: Path | None

    @property
    def failed(self) -> list[TagResult]:
        return [r for r in self.results if r.error is not None]

    @property
    def tagged(self) -> int:
        return len(self.results) - len(self.failed)

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for r in self.failed:
            counts[r.error] = counts.get(r.error, 0) + 1
        errors = ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items()))
        text = f"tagged {self.tagged} of {len(self.results)} images" + (f"; not tagged: {errors}" if errors else "")
        return (f"wrote {self.out}: " if self.out is not None else "") + text


def tag(config: TagConfig, *, stdin: Iterable[str] | None = None, stdout=None) -> TagSummary:
    """Tag every image the inputs name with the runs; write --out atomically (only when at least one image was
    tagged: a run that tags nothing leaves an earlier file intact), or print one line per image to `stdout`."""
    config = config.resolve()
    fmt = file_format(config.out) if config.out is not None else "text"
    rows = expand_inputs(config.inputs, stdin)  # before loading models: a bad input list fails at once
    if not rows:
        raise PredictError(
            f"no image files in {', '.join(config.inputs)} (searched for {', '.join(sorted(image_extensions()))})"
        )
    tagger = Tagger.load(config.runs, tta=config.tta, threshold=config.threshold, top_k=config.top_k,
                         batch_size=config.batch_size, engine=config.engine, precision=config.precision)
    results = []
    stdout = stdout or sys.stdout
    with tqdm(total=len(rows), desc="tag", unit="img", disable=not config.progress, leave=False) as bar:
        # On a terminal the lines go through tqdm, which clears the bar and redraws it below them.
        show = bar.write if stdout.isatty() and not bar.disable else lambda line, file: print(line, file=file)
        for result in tagger.iter_results(rows, on_chunk=bar.update):
            results.append(result)
            if fmt == "text":
                show(format_line(result), file=stdout)
    summary = TagSummary(results, config.out)
    if config.out is not None and summary.tagged:
        atomic_write_text(config.out, format_results(results, tagger.classes, fmt))
    elif config.out is not None:
        summary = TagSummary(results, None)
    return summary
