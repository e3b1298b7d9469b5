"""Benchmark `predict tag`'s engines end to end (Keras, OpenVINO f32 and bf16) against timm's PyTorch models, and
measure what bf16 costs in accuracy on a trained run.

`python -m bench.tag [speed]` (issue 12's benchmark): a folder of generated ~500x700 JPEGs (common.synthetic) and,
per backbone (xception, inception_v4), a RUN_DIR with random weights (299 px, sigmoid head; speed does not depend
on the weights). Each setup tags the folder's images through `predict.Tagger` (the code of `python -m predict tag`:
the crawl's conversion check, training's decode and resize, TTA views, the engine's model call), with TTA 1 and with
TTA 8 (on the first --tta-images images). The setups:

- `keras`, `openvino-f32`, `openvino-bf16` (and `onnx` on request): `predict.runs.load_runs(engine=, precision=)`;
- `timm-f32`, `timm-bf16`: timm's model of the same name (xception is timm's `legacy_xception`, the Keras
  architecture: the same 22,855,952 trainable parameters; inception_v4 is `inception_v4`) with the run's class
  count, in eval mode, float32 or under `torch.autocast("cpu", dtype=torch.bfloat16)`, run by PyTorch in a child
  process (`bench.tag_timm`, which says exactly what it does: Pillow decode and resize in a DataLoader with
  --workers processes, --threads torch threads, predict's 8 views pixel for pixel, batched the same way).

Every setup is warmed up first (export, compile, tracing: not timed). Then --rounds rounds alternate all setups and
both TTA settings (the order reversed every other round), so load from other processes falls on all of them alike;
images/s (source images per second: with TTA 8 each one is 8 model inputs) are reported as the best and the median
round, and every ratio is the quotient of those two recorded figures, rounded once when printed. The bf16 setups
run only where the CPU has bfloat16 (OpenVINO's capability probe, as `--precision bf16` checks it): elsewhere
OpenVINO refuses and PyTorch would emulate bfloat16 in software, so both are skipped with the reason (`--bf16 on`
tries them anyway). Targets (issue 12): openvino-f32 >= 1.25x keras, openvino-bf16 >= 2x keras, openvino-f32 >=
1.0x timm-f32, openvino-bf16 >= 1.3x timm-bf16; each is printed with whether it is met. This takes tens of minutes
on 2 cores: it is not one of `python -m bench`'s suites.

`python -m bench.tag accuracy --runs RUN_DIR... --data DATA_DIR`: for each finished run (one with metrics.json:
tuned thresholds), mAP and samples-F2 at 0.5 and at the tuned thresholds (train.metrics, through
`predict.evaluate.evaluation_report`) on a labelled DATA_DIR, for keras, openvino-f32, openvino-bf16 and
`keras-bf16-emulated` (the run's Keras model with every layer under Keras's `mixed_bfloat16` policy: bfloat16
activations and weights, float32 variables; an estimate of bf16's cost on CPUs where OpenVINO cannot run bf16).
Each run is copied under --work first (the export engines cache their export inside the RUN_DIR, and the runs given
are only read). After `make demo`:

    python -m bench.tag accuracy --runs demo_out/runs/xception demo_out/runs/inception_v4 \
        demo_out/runs/inception_resnet_v2 --data demo_out/data/test_labelled
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from bench.predict import PredictBenchConfig, make_run, work_folder
from common.atomic import atomic_write_text
from common.synthetic import photo, photo_sizes, write_jpeg
from crawl.manifest import JD_FASHION_CLASSES
from predict.engines import check_precision
from predict.errors import PredictError
from predict.evaluate import evaluation_report, load_labelled
from predict.inference import predict_ensemble
from predict.runs import Run, load_runs
from predict.tag_inputs import expand_inputs
from predict.tagger import Tagger
from predict.thresholds import resolve_thresholds
from predict.tta import TTA_VIEWS, ZOOM_FRACTION, check_tta, shift_pixels
from train import rundir

REPO = Path(__file__).resolve().parents[1]
OUR_SETUPS = {"keras": ("keras", "f32"), "openvino-f32": ("openvino", "f32"), "openvino-bf16": ("openvino", "bf16"),
              "onnx": ("onnx", "f32")}
TIMM_SETUPS = {"timm-f32": "f32", "timm-bf16": "bf16"}
SETUPS = (*OUR_SETUPS, *TIMM_SETUPS)
DEFAULT_SETUPS = ("keras", "openvino-f32", "openvino-bf16", "timm-f32", "timm-bf16")
BF16_SETUPS = ("openvino-bf16", "timm-bf16")
TIMM_MODELS = {"xception": "legacy_xception", "inception_v4": "inception_v4"}  # timm's model of the same name
# (numerator, denominator, target or None): the ratios printed when both setups were measured.
RATIOS = (
    ("openvino-f32", "keras", 1.25),
    ("openvino-bf16", "keras", 2.0),
    ("openvino-f32", "timm-f32", 1.0),
    ("openvino-bf16", "timm-bf16", 1.3),
    ("onnx", "keras", None),
    ("keras", "timm-f32", None),
    ("openvino-bf16", "openvino-f32", None),
    ("timm-bf16", "timm-f32", None),
)
BF16_MODES = ("auto", "on")


def _names(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


@dataclass(frozen=True, kw_only=True)
class TagBenchConfig:
    """Settings of the engine speed benchmark (`python -m bench.tag speed`)."""

    backbones: tuple[str, ...] = ("xception", "inception_v4")
    setups: tuple[str, ...] = DEFAULT_SETUPS
    images: int = 48  # tagged at TTA 1
    tta_images: int = 16  # the first ones of those, tagged at each TTA > 1 (16 x 8 = 128 model inputs)
    ttas: tuple[int, ...] = (1, 8)
    image_size: int = 299
    batch_size: int = 16
    width: int = 500
    height: int = 700
    rounds: int = 3
    bf16: str = "auto"  # auto: bf16 setups only where the CPU has bfloat16; on: try them anyway
    workers: int = 2  # timm's DataLoader processes (tf.data decodes with up to the core count in parallel)
    threads: int = 2  # torch threads
    workdir: Path | None = None  # default: a temporary folder, removed afterwards
    seed: int = 0

    def __post_init__(self):
        unknown = [s for s in self.setups if s not in SETUPS]
        if unknown or not self.setups:
            raise ValueError(f"--setups: unknown setup(s) {unknown or 'none given'}; known: {', '.join(SETUPS)}")
        unknown = [b for b in self.backbones if b not in TIMM_MODELS]
        if unknown or not self.backbones:
            raise ValueError(f"--backbones: {unknown or 'none given'}; known: {', '.join(TIMM_MODELS)}")
        for t in self.ttas:
            check_tta(t)
        if not self.ttas or len(set(self.ttas)) != len(self.ttas):
            raise ValueError(f"--tta: give distinct view counts, got {self.ttas}")
        for name in ("images", "tta_images", "batch_size", "rounds", "workers", "threads", "image_size"):
            if getattr(self, name) < (0 if name == "workers" else 1):
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.tta_images > self.images:
            raise ValueError(f"--tta-images ({self.tta_images}) cannot exceed --images ({self.images})")
        if self.bf16 not in BF16_MODES:
            raise ValueError(f"--bf16 must be one of {', '.join(BF16_MODES)}, got {self.bf16!r}")

    def images_for(self, tta: int) -> int:
        return self.images if tta == 1 else self.tta_images


# --- data --------------------------------------------------------------------------------------------------------


def make_folder(folder: Path, config: TagBenchConfig) -> list[str]:
    """Write `config.images` photo-like JPEGs of about width x height into `folder`; returns their paths in the
    order `predict tag` lists a folder."""
    for i, (h, w) in enumerate(photo_sizes(config.images, config.height, config.width, seed=config.seed)):
        write_jpeg(folder / f"{i:05d}.jpg", photo(h, w, seed=(config.seed, i)), quality=90)
    return [row.path for row in expand_inputs([str(folder)])]


def make_bench_run(root: Path, backbone: str, config: TagBenchConfig) -> Path:
    """A RUN_DIR of `backbone` with random weights at the bench's input size (bench.predict's maker)."""
    return make_run(root, PredictBenchConfig(backbone=backbone, image_size=config.image_size, seed=config.seed))


def bf16_unavailable() -> str | None:
    """None when OpenVINO can run bfloat16 on this CPU, else the reason `--precision bf16` gives."""
    try:
        check_precision("bf16", "openvino")
    except PredictError as err:
        return str(err)
    return None


# --- the two kinds of setups ----------------------------------------------------------------------------------------


class OurTagger:
    """One engine/precision of `predict tag`: `Tagger.load(run_dir, engine=..., precision=...)`."""

    def __init__(self, run_dir: Path, engine: str, precision: str, batch_size: int):
        self.tagger = Tagger.load(run_dir, batch_size=batch_size, engine=engine, precision=precision)
        self.classes = self.tagger.classes

    def tag(self, paths: Sequence[str], tta: int) -> tuple[float, np.ndarray]:
        """(seconds, probabilities) of tagging the files, as `predict tag` does (every step included)."""
        tagger = self.tagger.with_options(tta=tta)
        start = time.perf_counter()
        probabilities = tagger.predict_proba(list(paths))
        seconds = time.perf_counter() - start
        if np.isnan(probabilities).any():
            bad = [paths[i] for i in np.flatnonzero(np.isnan(probabilities).any(axis=1))]
            raise RuntimeError(f"predict tag could not read {bad}")
        return seconds, probabilities

    def close(self) -> None:
        pass


class TimmChild:
    """timm's model in a `bench.tag_timm` child process (PyTorch cannot be imported beside TensorFlow)."""

    def __init__(self, backbone: str, n_classes: int, config: TagBenchConfig):
        setup = {
            "model": TIMM_MODELS[backbone], "classes": n_classes, "image_size": config.image_size,
            "batch_size": config.batch_size, "workers": config.workers, "threads": config.threads,
            "seed": config.seed, "shift_step": shift_pixels(config.image_size), "zoom_fraction": ZOOM_FRACTION,
            "views": [{"shift": list(v.shift), "zoom": v.zoom, "flip": v.flip} for v in TTA_VIEWS],
        }
        self.model = setup["model"]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.tag_timm"], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True,
        )
        self.versions = self._ask(setup)

    def _ask(self, message: dict) -> dict:
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"bench.tag_timm ({self.model}) exited with status {self.process.wait()}")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"bench.tag_timm ({self.model}): {answer['error']}")
        return answer

    def tag(self, paths: Sequence[str], tta: int, precision: str) -> tuple[float, np.ndarray]:
        answer = self._ask({"paths": list(paths), "tta": tta, "precision": precision})
        return answer["seconds"], np.asarray(answer["probabilities"], dtype=np.float64)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=60)


# --- the figures ----------------------------------------------------------------------------------------------------


def rates(images: int, seconds: Sequence[float]) -> dict:
    """Images/s of the best (fastest) and the median round."""
    return {"best": images / min(seconds), "median": images / statistics.median(seconds)}


def ratio_rows(per_tta: dict) -> list[dict]:
    """Every ratio of RATIOS whose two setups were measured, per TTA: best over best, median over median."""
    rows = []
    for tta, figures in per_tta.items():
        ips = figures["images_per_second"]
        for num, den, target in RATIOS:
            if num in ips and den in ips:
                row = {"tta": int(tta), "numerator": num, "denominator": den, "target": target}
                for which in ("best", "median"):
                    row[which] = ips[num][which] / ips[den][which]
                    row[f"met_{which}"] = None if target is None else row[which] >= target
                rows.append(row)
    return rows


def measure_backbone(backbone: str, paths: list[str], work: Path, config: TagBenchConfig) -> dict:
    """Warm up every setup of one backbone, then time them in alternating rounds; the backbone's figures."""
    load_start = os.getloadavg()
    run_dir = make_bench_run(work / f"run-{backbone}", backbone, config)
    skipped: dict[str, str] = {}
    no_bf16 = bf16_unavailable()
    setups: dict[str, OurTagger | TimmChild] = {}
    timm_versions = None
    for name in config.setups:
        if name in BF16_SETUPS and no_bf16 and config.bf16 == "auto":
            skipped[name] = f"no bfloat16 on this CPU ({no_bf16})"
            continue
        try:
            if name in OUR_SETUPS:
                setups[name] = OurTagger(run_dir, *OUR_SETUPS[name], batch_size=config.batch_size)
            else:
                child = next((s for s in setups.values() if isinstance(s, TimmChild)), None)
                setups[name] = child or TimmChild(backbone, len(JD_FASHION_CLASSES), config)
                timm_versions = setups[name].versions
        except PredictError as err:
            skipped[name] = str(err)

    def tag(name: str, subset: Sequence[str], tta: int) -> tuple[float, np.ndarray]:
        if name in TIMM_SETUPS:
            return setups[name].tag(subset, tta, TIMM_SETUPS[name])
        return setups[name].tag(subset, tta)

    try:
        b = config.batch_size
        for tta in config.ttas:  # warm-up: a full batch and, if the count leaves one, the partial batch's shape
            n = config.images_for(tta)
            warm = paths[: b + n % b] if n > b and n % b else paths[: min(n, b)]
            for name in list(setups):
                try:
                    tag(name, warm, tta)
                except PredictError as err:  # e.g. OpenVINO refusing bf16 where `--bf16 on` forced it
                    skipped[name] = str(err)
                    del setups[name]
        seconds = {tta: {name: [] for name in setups} for tta in config.ttas}
        probabilities: dict[int, dict[str, np.ndarray]] = {tta: {} for tta in config.ttas}
        for r in range(config.rounds):
            order = list(setups) if r % 2 == 0 else list(reversed(setups))
            for tta in config.ttas:
                for name in order:
                    s, p = tag(name, paths[: config.images_for(tta)], tta)
                    seconds[tta][name].append(s)
                    print(f"  round {r + 1}/{config.rounds}, tta {tta}, {name}: {s:.1f}s", file=sys.stderr, flush=True)
                    probabilities[tta][name] = p
    finally:
        for s in {id(s): s for s in setups.values()}.values():
            s.close()
    per_tta = {}
    for tta in config.ttas:
        n = config.images_for(tta)
        keras_p = probabilities[tta].get("keras")
        per_tta[str(tta)] = {
            "images": n,
            "seconds": seconds[tta],
            "images_per_second": {name: rates(n, s) for name, s in seconds[tta].items()},
            # Same weights: how far each engine's probabilities are from Keras's (timm's model has other weights).
            "max_abs_diff_vs_keras": {
                name: float(np.abs(p - keras_p).max())
                for name, p in probabilities[tta].items() if keras_p is not None and name in OUR_SETUPS
            },
        }
    return {
        "backbone": backbone,
        "timm_model": TIMM_MODELS[backbone],
        "timm_versions": timm_versions,
        "skipped": skipped,
        "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
        "tta": per_tta,
        "ratios": ratio_rows(per_tta),
    }


def run_benchmark(config: TagBenchConfig, on_backbone: Callable[[dict], object] | None = None) -> dict:
    """Measure every backbone (see the module docstring); the figures, as printed by `report`. `on_backbone` gets
    the figures so far after each backbone (the command line writes them, so a long run killed late keeps them)."""
    with work_folder(config.workdir, "bench_tag_") as work:
        t0 = time.perf_counter()
        paths = make_folder(work / "images", config)
        print(f"generated {len(paths)} JPEGs (~{config.width}x{config.height}) in {time.perf_counter() - t0:.1f}s",
              flush=True)
        figures = {
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()
                       if k != "workdir"},
            "cpu_count": os.cpu_count(),
            "versions": {"keras": keras.__version__},
            "backbones": [],
        }
        for backbone in config.backbones:
            print(f"measuring {backbone} ...", flush=True)
            figures["backbones"].append(measure_backbone(backbone, paths, work, config))
            if on_backbone is not None:
                on_backbone(figures)
        return figures


def _verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def report(figures: dict) -> str:
    """The figures as tables: images/s per setup and TTA, the ratios, and each target's verdict."""
    c = figures["config"]
    ttas = c["ttas"]
    counts = ", ".join(f"{c['images'] if t == 1 else c['tta_images']} at tta {t}" for t in ttas)
    lines = [
        f"predict tag engines benchmark: {c['image_size']} px, batch {c['batch_size']}, JPEGs ~{c['width']}x"
        f"{c['height']} ({counts}); {c['rounds']} alternating rounds; images/s count source images "
        "(best round / median round)",
    ]
    for f in figures["backbones"]:
        load = f["load_average"]
        lines += [
            "",
            f"{f['backbone']} (timm: {f['timm_model']}); load average (1 min) {load['start'][0]:.1f} at start, "
            f"{load['end'][0]:.1f} at end",
            f"{'images/s':16}" + "".join(f"{'tta ' + str(t) + ' best':>14}{'median':>9}" for t in ttas)
            + "".join(f"{'max|p-keras| tta ' + str(t):>22}" for t in ttas),
        ]
        names = list(next(iter(f["tta"].values()))["images_per_second"])
        for name in names:
            row = f"{name:16}"
            for t in ttas:
                ips = f["tta"][str(t)]["images_per_second"][name]
                row += f"{ips['best']:14.2f}{ips['median']:9.2f}"
            for t in ttas:
                diff = f["tta"][str(t)]["max_abs_diff_vs_keras"].get(name)
                row += f"{'n/a' if diff is None else f'{diff:.1e}':>22}"
            lines.append(row)
        for name, reason in f["skipped"].items():
            lines.append(f"{name:16}skipped: {reason}")
        lines.append(f"{'ratio':30}" + "".join(f"{'tta ' + str(t) + ' best':>14}{'median':>9}" for t in ttas))
        by_pair: dict[tuple[str, str], dict[int, dict]] = {}
        for row in f["ratios"]:
            by_pair.setdefault((row["numerator"], row["denominator"]), {})[row["tta"]] = row
        for (num, den), rows in by_pair.items():
            text = f"{num + ' / ' + den:30}"
            for t in ttas:
                row = rows.get(t)
                text += f"{row['best']:14.2f}{row['median']:9.2f}" if row else f"{'':14}{'':9}"
            lines.append(text)
        for (num, den), rows in by_pair.items():
            for t, row in sorted(rows.items()):
                if row["target"] is not None:
                    lines.append(
                        f"target {num} >= {row['target']:g}x {den}, tta {t}: best {row['best']:.2f}x "
                        f"{_verdict(row['met_best'])}, median {row['median']:.2f}x {_verdict(row['met_median'])}"
                    )
        for num, den, target in RATIOS:
            if target is not None and (num, den) not in by_pair:
                missing = [name for name in (num, den) if name in f["skipped"]]
                lines.append(f"target {num} >= {target:g}x {den}: not measured"
                             + (f" ({', '.join(missing)} skipped)" if missing else ""))
    return "\n".join(lines)


# --- bf16's accuracy cost on a trained run ----------------------------------------------------------------------

ACCURACY_SETUPS = ("keras", "openvino-f32", "openvino-bf16", "keras-bf16-emulated")
EMULATED_POLICY = "mixed_bfloat16"


@dataclass(frozen=True, kw_only=True)
class AccuracyConfig:
    """Settings of `python -m bench.tag accuracy`."""

    runs: tuple[Path, ...]
    data: Path
    work: Path = Path("bench_out/tag_accuracy")
    setups: tuple[str, ...] = ACCURACY_SETUPS
    tta: int = 1
    batch_size: int = 16

    def __post_init__(self):
        if not self.runs:
            raise ValueError("--runs: give at least one RUN_DIR")
        unknown = [s for s in self.setups if s not in ACCURACY_SETUPS]
        if unknown or not self.setups:
            raise ValueError(f"--setups: unknown setup(s) {unknown or 'none given'}; known: "
                             f"{', '.join(ACCURACY_SETUPS)}")
        check_tta(self.tta)


def _with_policy(config, policy: str):
    """A model config with every layer's dtype policy replaced by `policy`."""
    if isinstance(config, dict):
        out = {}
        for key, value in config.items():
            if key == "dtype" and isinstance(value, dict) and value.get("class_name") == "DTypePolicy":
                value = {**value, "config": {**value["config"], "name": policy}}
            out[key] = _with_policy(value, policy)
        return out
    if isinstance(config, list):
        return [_with_policy(v, policy) for v in config]
    return config


def bf16_emulation(model: keras.Model) -> keras.Model:
    """The model rebuilt with every layer under `mixed_bfloat16` (bfloat16 compute, float32 variables), with the same
    weights: TensorFlow runs it on any CPU (in software where the CPU has no bfloat16)."""
    clone = model.__class__.from_config(_with_policy(model.get_config(), EMULATED_POLICY))
    clone.set_weights(model.get_weights())
    return clone


def copy_run(source: Path, target: Path) -> Path:
    """`source` copied to `target` (without logs or backups), unless `target` already holds the same model.keras."""
    model = rundir.MODEL_FILE
    if target.is_dir() and (target / model).is_file() and rundir.model_sha256(target) == rundir.model_sha256(source):
        return target
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(rundir.LOGS_DIR, rundir.BACKUP_DIR))
    return target


def _load(run_dir: Path, setup: str) -> list[Run]:
    if setup == "keras-bf16-emulated":
        [run] = load_runs([run_dir])
        return [dataclasses.replace(run, model=bf16_emulation(run.model))]
    engine, precision = OUR_SETUPS[setup]
    runs = load_runs([run_dir], engine=engine, precision=check_precision(precision, engine))
    return [run.prepare() for run in runs]  # export and compile now: a refusal names the setup


def accuracy_of_run(source: Path, config: AccuracyConfig) -> dict:
    """One run's figures: per setup mAP, F2 at 0.5 and tuned, and how far its probabilities are from the f32 ones."""
    if rundir.read_metrics(source) is None:
        return {"run": str(source), "skipped": "not finished (no metrics.json, so no tuned thresholds)"}
    run_dir = copy_run(source, Path(config.work) / source.name)
    figures: dict = {"run": str(source), "copy": str(run_dir), "tta": config.tta, "setups": {}, "skipped_setups": {}}
    probabilities: dict[str, np.ndarray] = {}
    tuned = None  # the run's tuned thresholds (the same whatever the engine)
    for setup in config.setups:
        try:
            runs = _load(run_dir, setup)
        except PredictError as err:
            figures["skipped_setups"][setup] = str(err)
            continue
        images = load_labelled(config.data, runs[0].classes)
        prediction = predict_ensemble(runs, images.paths, ids=images.ids, tta=config.tta,
                                      batch_size=config.batch_size, progress=False)
        p = probabilities[setup] = prediction.probabilities
        tuned = resolve_thresholds("tuned", runs)
        at_half = evaluation_report(images.labels, p, runs[0].classes, resolve_thresholds("0.5", runs))
        at_tuned = evaluation_report(images.labels, p, runs[0].classes, tuned)
        figures["images"] = len(images.ids)
        figures["setups"][setup] = {"map": at_half["map"], "f2_at_0.5": at_half["f2"], "f2_tuned": at_tuned["f2"]}
    reference = "openvino-f32" if "openvino-f32" in probabilities else "keras"
    figures["reference"] = reference
    for setup, p in probabilities.items():
        if reference in probabilities:
            ref = probabilities[reference]
            row = figures["setups"][setup]
            row["max_abs_diff"] = float(np.abs(p - ref).max())
            row["mean_abs_diff"] = float(np.abs(p - ref).mean())
            row["flipped_tuned"] = float(((p >= tuned) != (ref >= tuned)).mean())
            for key in ("map", "f2_at_0.5", "f2_tuned"):
                row[f"{key}_minus_reference"] = row[key] - figures["setups"][reference][key]
    return figures


def run_accuracy(config: AccuracyConfig) -> dict:
    """Every run's accuracy figures (see the module docstring)."""
    return {
        "data": str(config.data),
        "tta": config.tta,
        "bf16_unavailable": bf16_unavailable(),
        "runs": [accuracy_of_run(Path(r), config) for r in config.runs],
    }


def accuracy_report(figures: dict) -> str:
    """The accuracy figures as one table per run."""
    lines = [f"bf16 accuracy cost on {figures['data']} (tta {figures['tta']})"]
    if figures["bf16_unavailable"]:
        lines.append(f"openvino-bf16 cannot run here: {figures['bf16_unavailable']}")
    for f in figures["runs"]:
        lines.append("")
        if "skipped" in f:
            lines.append(f"{f['run']}: skipped: {f['skipped']}")
            continue
        lines.append(f"{f['run']} ({f.get('images', 0)} images; differences against {f['reference']})")
        lines.append(f"{'setup':22}{'mAP':>8}{'F2@0.5':>8}{'F2@tuned':>9}{'dmAP':>9}{'dF2@0.5':>9}{'dF2@tuned':>10}"
                     f"{'max|dp|':>9}{'mean|dp|':>9}{'flipped':>9}")
        for name, row in f["setups"].items():
            lines.append(
                f"{name:22}{row['map']:8.4f}{row['f2_at_0.5']:8.4f}{row['f2_tuned']:9.4f}"
                f"{row['map_minus_reference']:+9.4f}{row['f2_at_0.5_minus_reference']:+9.4f}"
                f"{row['f2_tuned_minus_reference']:+10.4f}{row['max_abs_diff']:9.1e}{row['mean_abs_diff']:9.1e}"
                f"{row['flipped_tuned']:9.4f}"
            )
        for name, reason in f["skipped_setups"].items():
            lines.append(f"{name:22}skipped: {reason}")
    return "\n".join(lines)


# --- command line ---------------------------------------------------------------------------------------------------


def _speed_main(argv: list[str]) -> int:
    d = TagBenchConfig()
    parser = argparse.ArgumentParser(prog="python -m bench.tag [speed]", description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default=",".join(d.backbones))
    parser.add_argument("--setups", default=",".join(d.setups), help=f"of {', '.join(SETUPS)}")
    parser.add_argument("--images", type=int, default=d.images, help="images tagged at tta 1")
    parser.add_argument("--tta-images", type=int, default=d.tta_images, help="the first ones, tagged at tta > 1")
    parser.add_argument("--tta", default=",".join(map(str, d.ttas)), help="view counts, e.g. 1,8")
    parser.add_argument("--image-size", type=int, default=d.image_size)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--rounds", type=int, default=d.rounds)
    parser.add_argument("--bf16", default=d.bf16, choices=BF16_MODES)
    parser.add_argument("--workers", type=int, default=d.workers, help="timm's DataLoader worker processes")
    parser.add_argument("--threads", type=int, default=d.threads, help="torch threads")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the images and runs here")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    try:
        config = TagBenchConfig(
            backbones=_names(args.backbones), setups=_names(args.setups), images=args.images,
            tta_images=args.tta_images, ttas=tuple(int(t) for t in _names(args.tta)), image_size=args.image_size,
            batch_size=args.batch_size, rounds=args.rounds, bf16=args.bf16, workers=args.workers,
            threads=args.threads, workdir=args.workdir,
        )
    except (ValueError, PredictError) as err:
        parser.error(str(err))

    def write(figures: dict) -> None:
        if args.json:
            atomic_write_text(args.json, json.dumps(figures, indent=2) + "\n")

    figures = run_benchmark(config, on_backbone=write)
    print(report(figures))
    write(figures)
    return 0


def _accuracy_main(argv: list[str]) -> int:
    d = AccuracyConfig(runs=(Path("."),), data=Path("."))
    parser = argparse.ArgumentParser(prog="python -m bench.tag accuracy",
                                     description="bf16's accuracy cost on trained runs and a labelled DATA_DIR")
    parser.add_argument("--runs", type=Path, nargs="+", required=True)
    parser.add_argument("--data", type=Path, required=True, help="a labelled DATA_DIR")
    parser.add_argument("--work", type=Path, default=d.work, help="where the runs are copied")
    parser.add_argument("--setups", default=",".join(d.setups), help=f"of {', '.join(ACCURACY_SETUPS)}")
    parser.add_argument("--tta", type=int, default=d.tta)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    try:
        config = AccuracyConfig(runs=tuple(args.runs), data=args.data, work=args.work, setups=_names(args.setups),
                                tta=args.tta, batch_size=args.batch_size)
    except (ValueError, PredictError) as err:
        parser.error(str(err))
    figures = run_accuracy(config)
    print(accuracy_report(figures))
    if args.json:
        atomic_write_text(args.json, json.dumps(figures, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["accuracy"]:
        return _accuracy_main(argv[1:])
    return _speed_main(argv[1:] if argv[:1] == ["speed"] else argv)


if __name__ == "__main__":
    sys.exit(main())
