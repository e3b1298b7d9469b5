"""Multi-worker training: images per second of one process vs two workers on loopback, and all-reduce volumes.

`python -m bench.multiworker` trains the same tiny run (--weights none, no augmentation) once as one process and
once as two workers started by `python -m train.launch`, both with the same global batch, and compares the images
per second of their last epoch (history.csv, first batch left out). On one machine the two workers share its cores
and add a loopback all-reduce per step, so no gain is expected: the figure shows the mechanism's overhead, not a
speed-up. `--volumes` also builds every registry backbone at its native size and prints the gradient bytes each step
all-reduces in each stage (trainable parameters x 4 bytes, float32 gradients), the input of the scaling estimate in
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common.synthetic import photo, write_jpeg
from crawl import manifest as mf

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, kw_only=True)
class MultiworkerBenchConfig:
    images: int = 96
    image_size: int = 96
    batch_size: int = 16
    epochs: int = 2
    volumes: bool = False


def make_data_dir(root: Path, n: int, seed: int = 0) -> Path:
    """A labelled DATA_DIR of n synthetic photos with 3 random classes (labels need not be learnable here)."""
    rng = np.random.default_rng(seed)
    classes = ["a", "b", "c"]
    labels = (rng.random((n, 3)) < 0.4).astype(int)
    labels[:4] = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]]  # every class has positives
    rows = []
    for i in range(n):
        rel = mf.image_path(f"img{i:05d}", ".jpg")
        data = write_jpeg(root / rel, photo(128, 128, seed=i), quality=90)
        rows.append(mf.ManifestRow.of_file(data, id=f"img{i:05d}", path=rel, url=f"http://127.0.0.1:9/{i}.jpg",
                                           width=128, height=128, labels=labels[i]))
    mf.write_data_dir(root, classes=classes, entries=rows, stored=rows)
    return root


def _train_args(data: Path, out: Path, config: MultiworkerBenchConfig) -> list[str]:
    return [str(data), "--out", str(out), "--backbone", "xception", "--image-size", str(config.image_size),
            "--batch-size", str(config.batch_size), "--weights", "none", "--augment", "none",
            "--frozen-epochs", str(config.epochs), "--epochs", str(config.epochs), "--val-split", "0.25"]


def _run(command: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2", "no_proxy": "localhost,127.0.0.1"}
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - started


def bench_throughput(config: MultiworkerBenchConfig) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-multiworker-") as tmp:
        data = make_data_dir(Path(tmp) / "data", config.images)
        rows = {}
        for name, prefix in (("1 process", [sys.executable, "-m", "train"]),
                             ("2 workers", [sys.executable, "-m", "train.launch", "--workers", "2", "--"])):
            out = Path(tmp) / name.replace(" ", "_")
            wall = _run([*prefix, *_train_args(data, out, config)])
            history = pd.read_csv(out / "history.csv")
            rows[name] = {"images_per_second": float(history["images_per_second"].iloc[-1]), "wall_seconds": wall}
    rows["ratio"] = rows["2 workers"]["images_per_second"] / rows["1 process"]["images_per_second"]
    return rows


def allreduce_volumes(n_classes: int = 20, unfreeze: float = 0.3) -> pd.DataFrame:
    """Trainable parameters and float32 gradient megabytes per step of each backbone, stage 1 and stage 2."""
    from train.backbones import BACKBONES
    from train.model import build_model, freeze_backbone, unfreeze_top

    rows = []
    for name, backbone in sorted(BACKBONES.items()):
        model, features = build_model(backbone, n_classes, image_size=backbone.input_size, weights=None,
                                      dropout=0.5, l2=0.0)
        freeze_backbone(features)
        stage1 = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
        unfreeze_top(features, unfreeze)
        stage2 = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
        rows.append({"backbone": name, "params": model.count_params(), "stage1_trainable": stage1,
                     "stage2_trainable": stage2, "stage1_MB": stage1 * 4 / 1e6, "stage2_MB": stage2 * 4 / 1e6})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> dict:
    d = MultiworkerBenchConfig()
    p = argparse.ArgumentParser(prog="python -m bench.multiworker", description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=d.images)
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--volumes", action="store_true", help="also print every backbone's all-reduce bytes per step")
    a = p.parse_args(argv)
    config = MultiworkerBenchConfig(images=a.images, image_size=a.image_size, batch_size=a.batch_size,
                                    epochs=a.epochs, volumes=a.volumes)
    result = bench_throughput(config)
    print(f"{config.images} images at {config.image_size} px, global batch {config.batch_size}, xception, "
          f"last of {config.epochs} epochs")
    for name in ("1 process", "2 workers"):
        row = result[name]
        print(f"  {name:10s} {row['images_per_second']:7.1f} images/s   (whole command {row['wall_seconds']:.0f} s)")
    print(f"  2 workers / 1 process: {result['ratio']:.2f}x (same cores shared: no gain expected)")
    if config.volumes:
        volumes = allreduce_volumes()
        print(volumes.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
        result["volumes"] = volumes.to_dict("records")
    return result


if __name__ == "__main__":
    main()
