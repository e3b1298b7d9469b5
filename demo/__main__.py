"""`make demo`: the pipeline end to end on generated data: generate, serve, crawl, train 3 backbones, compare, submit.

Everything goes under OUT (default `demo_out/`, ignored by git); the submission goes to `submissions/`.
The same code paths as the CLIs are used: each step calls the stage's typed function.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common.tf_logging import quiet_tensorflow_startup
from demo.generate import DemoDataConfig, generate, with_base_url
from demo.serve import serve_directory

DEMO_BACKBONES = ("inception_resnet_v2", "xception", "inception_v4")


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """The demo's settings; the defaults are what `make demo` runs."""

    out: Path = Path("demo_out")
    submission: Path = Path("submissions/demo_jd.csv")
    n_train: int = 320
    n_test: int = 80
    backbones: tuple[str, ...] = DEMO_BACKBONES
    image_size: int = 96
    batch_size: int = 16
    frozen_epochs: int = 3
    epochs: int = 8
    unfreeze: float = 1.0  # weights are random (no ImageNet here): the whole backbone has to learn
    lr: float = 1e-3
    finetune_lr: float = 1e-4
    devices: int = 2
    tta: int = 4
    seed: int = 0
    progress: bool = True


def _step(n: int, text: str) -> float:
    print(f"\n[{n}/6] {text}", flush=True)
    return time.monotonic()


def _crawl_all(config: DemoConfig, lists: dict[str, Path]) -> dict[str, Path]:
    """Crawl the train list, the test list and the labelled test list from a local server; reuse finished crawls."""
    from crawl.crawler import CrawlConfig, crawl

    data = config.out / "data"
    jobs = {"train": lists["train_list"], "test": lists["test_list"], "test_labelled": lists["test_labels"]}
    dirs = {name: data / name for name in jobs}
    todo = {name: path for name, path in jobs.items() if not _crawl_completed(dirs[name])}
    for name in sorted(set(jobs) - set(todo)):
        print(f"  {dirs[name]}: already crawled, reused", flush=True)
    for name in todo:
        if dirs[name].exists():
            # An interrupted crawl of an earlier demo run: its URLs named another port, so start it afresh.
            print(f"  {dirs[name]}: unfinished crawl from an earlier run, crawling again", flush=True)
            shutil.rmtree(dirs[name])
    if not todo:
        return dirs
    with serve_directory(config.out / "generated") as base_url:
        print(f"  serving {config.out / 'generated'} at {base_url}", flush=True)
        for name, list_path in todo.items():
            resolved = with_base_url(list_path, base_url, config.out / "lists" / list_path.name)
            crawl(
                CrawlConfig(
                    list_path=resolved,
                    out_dir=dirs[name],
                    classes_path=lists["classes"] if name != "test" else None,
                    workers=8,
                    timeout=5.0,
                    retries=1,
                    progress="auto" if config.progress else "off",
                )
            )
    return dirs


def _crawl_completed(data_dir: Path) -> bool:
    from crawl.manifest import read_summary

    summary = read_summary(data_dir)
    return summary is not None and summary.get("status") == "completed"


def chance_map(data_dir: Path) -> float:
    """The mAP a random scorer gets on average: about the mean class prevalence of the labelled DATA_DIR."""
    from crawl.manifest import read_data_dir

    labels = read_data_dir(data_dir).labels()
    prevalence = labels.mean(axis=0, dtype="float64")  # the labels are float32: average them exactly
    return float(prevalence[prevalence > 0].mean())


def run_demo(config: DemoConfig) -> dict:
    """Run every step; returns where everything went and the comparison table."""
    started = time.monotonic()
    _step(1, f"generating {config.n_train} training and {config.n_test} test images under {config.out / 'generated'}")
    lists = generate(
        DemoDataConfig(out=config.out / "generated", n_train=config.n_train, n_test=config.n_test, seed=config.seed)
    )

    _step(2, "serving them on 127.0.0.1 and crawling the train list, the test list and the labelled test list")
    dirs = _crawl_all(config, lists)
    from crawl.manifest import read_summary

    summary = read_summary(dirs["train"]) or {}
    print(f"  train crawl: {summary.get('stored')} stored, failed by reason: {summary.get('failed_by_reason')}")

    # TensorFlow is imported only now: the crawl stage never needs it.
    quiet_tensorflow_startup()  # before the first TensorFlow import, as `python -m train` does
    from train.config import TrainConfig
    from train.devices import make_strategy
    from train.fit import train

    strategy = make_strategy(config.devices)  # before any other TF op: splits the CPU into logical devices
    runs = []
    for i, name in enumerate(config.backbones):
        _step(3, f"training {name} ({i + 1}/{len(config.backbones)}) at {config.image_size} px, weights none, "
                 f"{strategy.num_replicas_in_sync} replicas, {config.frozen_epochs} frozen + "
                 f"{config.epochs - config.frozen_epochs} fine-tuning epochs")
        result = train(
            TrainConfig(
                data_dir=dirs["train"],
                backbone=name,
                out=config.out / "runs" / name,
                val_split=0.2,
                image_size=config.image_size,
                batch_size=config.batch_size,
                frozen_epochs=config.frozen_epochs,
                epochs=config.epochs,
                lr=config.lr,
                finetune_lr=config.finetune_lr,
                unfreeze=config.unfreeze,
                weights="none",
                devices=config.devices,
                seed=config.seed,
            ),
            strategy=strategy,
            verbose=2,
        )
        runs.append(result.run_dir)

    from predict.compare import CompareConfig, compare
    from predict.submission import SubmitConfig, submit

    _step(4, f"comparing the runs on the labelled test crawl, without and with {config.tta} TTA views")
    comparison = compare(
        CompareConfig(runs=tuple(runs), data=dirs["test_labelled"], tta=config.tta, out=config.out / "compare",
                      progress=config.progress)
    )
    chance = chance_map(dirs["test_labelled"])
    print(comparison.markdown)
    print(f"chance level (mean class prevalence, what a random scorer's mAP is about): {chance:.3f}")
    for _, row in comparison.table.iterrows():
        verdict = "clearly above chance" if row["map"] >= chance + 0.1 else "NOT clearly above chance"
        print(f"  {row['backbone']}: mAP {row['map']:.3f} = {row['map'] / chance:.1f} x chance, {verdict}")

    best_name = comparison.table.iloc[0]["run"]  # the table is sorted by mAP, best first
    best = next(Path(r) for r in runs if best_name in (Path(r).name, str(r)))
    _step(5, f"writing the JD-format submission from the best run ({best.name})")
    submission = submit(
        SubmitConfig(runs=(best,), data=dirs["test"], out=config.submission, tta=config.tta, missing="fill",
                     progress=config.progress)
    )
    print(f"  {submission.summary()}")

    _step(6, "done")
    print(
        f"  generated data: {config.out / 'generated'}\n  crawls (DATA_DIRs): {config.out / 'data'}\n"
        f"  runs (RUN_DIRs): {config.out / 'runs'}\n  comparison: {comparison.markdown_path}, {comparison.chart_path}\n"
        f"  submission: {config.submission}\n  total {time.monotonic() - started:.0f} s"
    )
    return {"runs": runs, "table": comparison.table, "chance": chance, "submission": config.submission}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DemoConfig.out)
    parser.add_argument("--submission", type=Path, default=DemoConfig.submission)
    parser.add_argument("--n-train", type=int, default=DemoConfig.n_train)
    parser.add_argument("--n-test", type=int, default=DemoConfig.n_test)
    parser.add_argument("--backbones", default=",".join(DEMO_BACKBONES))
    parser.add_argument("--epochs", type=int, default=DemoConfig.epochs)
    parser.add_argument("--frozen-epochs", type=int, default=DemoConfig.frozen_epochs)
    parser.add_argument("--image-size", type=int, default=DemoConfig.image_size)
    parser.add_argument("--unfreeze", type=float, default=DemoConfig.unfreeze)
    args = parser.parse_args(argv)
    run_demo(
        DemoConfig(
            out=args.out, submission=args.submission, n_train=args.n_train, n_test=args.n_test,
            backbones=tuple(b for b in args.backbones.split(",") if b), epochs=args.epochs,
            frozen_epochs=args.frozen_epochs, image_size=args.image_size, unfreeze=args.unfreeze,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
