"""`python -m train DATA_DIR --backbone NAME --out RUN_DIR [...]`: fine-tune a backbone into a RUN_DIR.

Exit status: 0 done (or already done), 1 training diverged (NaN loss; the best model so far is kept), 2 bad
arguments, data, weights or RUN_DIR.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.tf_logging import quiet_tensorflow_startup

quiet_tensorflow_startup()  # before the first TensorFlow import below

from train.config import HEADS, LABEL_ORDERS, LOSSES, RNN_CELLS, TrainConfig

_DEFAULTS = TrainConfig(data_dir=Path("."), backbone="", out=Path("."))


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The command line as a TrainConfig (not yet resolved against the backbone)."""
    from train.backbones import BACKBONES  # light: keras.applications constructors only, no TF runtime start

    d = _DEFAULTS
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__.split("\n")[0])
    p.add_argument("data_dir", type=Path, metavar="DATA_DIR", help="labelled DATA_DIR written by `python -m crawl`")
    p.add_argument("--backbone", required=True, choices=sorted(BACKBONES), help="registry name of the backbone")
    p.add_argument("--out", required=True, type=Path, metavar="RUN_DIR", help="where the model and records go")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val", type=Path, metavar="DATA_DIR", help="validation DATA_DIR (same classes)")
    val.add_argument("--val-split", type=float, metavar="F", help="stratified validation fraction (default 0.1)")
    p.add_argument("--image-size", type=int, metavar="N", help="input size in pixels (default: the backbone's, 299)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"global batch (default {d.batch_size})")
    p.add_argument("--frozen-epochs", type=int, default=d.frozen_epochs,
                   help=f"stage 1 epochs (default {d.frozen_epochs})")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"last epoch, both stages (default {d.epochs})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"stage 1 Adam learning rate (default {d.lr})")
    p.add_argument("--finetune-lr", type=float, default=d.finetune_lr,
                   help=f"stage 2 learning rate (default {d.finetune_lr})")
    p.add_argument("--unfreeze", type=float, default=d.unfreeze,
                   help=f"top fraction of backbone layers trained in stage 2 (default {d.unfreeze})")
    p.add_argument("--dropout", type=float, default=d.dropout, help=f"head dropout (default {d.dropout})")
    p.add_argument("--l2", type=float, default=d.l2, help=f"L2 on the head's kernel (default {d.l2})")
    p.add_argument("--weights", default=d.weights, metavar="imagenet|none|PATH",
                   help="backbone weights (default imagenet)")
    p.add_argument("--augment", default=",".join(d.augment),
                   help="flip,translate,rotate,rot90 or none (default %(default)s)")
    p.add_argument("--devices", type=int, metavar="N", help="replicas: the first N GPUs, or N logical CPU devices")
    p.add_argument("--mixed-precision", action="store_true", help="mixed_float16 (pays off on GPUs)")
    p.add_argument("--cache", metavar="memory|DIR", help="keep decoded images in memory or in files under DIR")
    p.add_argument("--seed", type=int, default=d.seed,
                   help=f"split, initialisation, shuffle, augmentation (default {d.seed})")
    p.add_argument("--head", default=d.head, choices=HEADS,
                   help="sigmoid: one Dense (default); rnn: a CNN -> RNN decoder emitting the tags one by one")
    p.add_argument("--rnn-cell", default=d.rnn_cell, choices=RNN_CELLS, help=f"rnn head (default {d.rnn_cell})")
    p.add_argument("--rnn-units", type=int, default=d.rnn_units, help=f"rnn state size (default {d.rnn_units})")
    p.add_argument("--label-embedding", type=int, default=d.label_embedding,
                   help=f"rnn label embedding size (default {d.label_embedding})")
    p.add_argument("--label-order", default=d.label_order, choices=LABEL_ORDERS,
                   help="order of an image's classes in its rnn training sequence: by training prevalence "
                        "(frequent, the default; ties by class index), rare first, or class index")
    _add_loss_arguments(p)
    a = p.parse_args(argv)
    return TrainConfig(
        data_dir=a.data_dir, backbone=a.backbone, out=a.out, val=a.val, val_split=a.val_split,
        image_size=a.image_size, batch_size=a.batch_size, frozen_epochs=a.frozen_epochs, epochs=a.epochs,
        lr=a.lr, finetune_lr=a.finetune_lr, unfreeze=a.unfreeze, dropout=a.dropout, l2=a.l2, weights=a.weights,
        augment=tuple(a.augment.split(",")), devices=a.devices, mixed_precision=a.mixed_precision,
        cache=a.cache, seed=a.seed, head=a.head, rnn_cell=a.rnn_cell, rnn_units=a.rnn_units,
        label_embedding=a.label_embedding, label_order=a.label_order,
        **_loss_settings(a),
    )


def _add_loss_arguments(p: argparse.ArgumentParser) -> None:
    d = _DEFAULTS
    p.add_argument("--loss", default=d.loss, choices=LOSSES,
                   help="the sigmoid head's loss: bce (default), focal (Keras's BinaryFocalCrossentropy) or asl "
                        "(asymmetric loss, Ridnik et al. 2021); the rnn head has its own sequence loss")
    p.add_argument("--focal-gamma", type=float, default=d.focal_gamma,
                   help=f"--loss focal: focusing parameter (default {d.focal_gamma})")
    p.add_argument("--asl-gamma-pos", type=float, default=d.asl_gamma_pos,
                   help=f"--loss asl: focusing parameter of positives (default {d.asl_gamma_pos})")
    p.add_argument("--asl-gamma-neg", type=float, default=d.asl_gamma_neg,
                   help=f"--loss asl: focusing parameter of negatives (default {d.asl_gamma_neg})")
    p.add_argument("--asl-clip", type=float, default=d.asl_clip,
                   help=f"--loss asl: probability margin m; negatives with p < m cost nothing (default {d.asl_clip})")


def _loss_settings(a: argparse.Namespace) -> dict:
    return {"loss": a.loss, "focal_gamma": a.focal_gamma, "asl_gamma_pos": a.asl_gamma_pos,
            "asl_gamma_neg": a.asl_gamma_neg, "asl_clip": a.asl_clip}


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    # Logical CPU devices must exist before TensorFlow starts its runtime: set them up before anything else.
    from train.devices import DeviceError, make_strategy

    try:
        strategy = make_strategy(config.devices)
    except DeviceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from crawl.manifest import DataDirError
    from train.backbones import WeightsError
    from train.config import ConfigError
    from train.fit import TrainingDiverged, train

    try:
        train(config, strategy=strategy)
    except (ConfigError, DataDirError, WeightsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
