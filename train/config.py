"""The training settings: one frozen dataclass, its defaults, its checks, and its resolution against the backbone."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from train.backbones import get_backbone
from train.data import DEFAULT_AUGMENT, parse_augment
from train.losses import ASL_CLIP, ASL_GAMMA_NEG, ASL_GAMMA_POS, FOCAL_GAMMA, LOSSES
from train.rnn_head import CELLS as RNN_CELLS
from train.rnn_head import LABEL_ORDERS

HEADS = ("sigmoid", "rnn")

# Settings that may differ when a killed run is resumed: they change how it runs, not what it learns.
RUNTIME_SETTINGS = ("devices", "cache")


class ConfigError(ValueError):
    """A setting is out of range, or the settings contradict each other or an existing RUN_DIR."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything `python -m train` accepts. `resolve()` fills the backbone-dependent defaults and checks ranges."""

    data_dir: Path
    backbone: str
    out: Path
    val: Path | None = None  # a second, labelled DATA_DIR for validation; else val_split of data_dir
    val_split: float | None = None  # defaults to 0.1 when `val` is not given
    image_size: int | None = None  # defaults to the backbone's native size
    batch_size: int = 96  # global batch, over all replicas
    frozen_epochs: int = 10
    epochs: int = 20
    lr: float = 1e-4
    finetune_lr: float = 1e-5
    unfreeze: float = 0.3
    dropout: float = 0.5
    l2: float = 0.0
    weights: str = "imagenet"  # "imagenet", "none" or a path to a weights file for the backbone
    augment: tuple[str, ...] = field(default=DEFAULT_AUGMENT)
    devices: int | None = None
    mixed_precision: bool = False
    cache: str | None = None  # "memory" or a folder
    seed: int = 0
    head: str = "sigmoid"  # "sigmoid" (one Dense) or "rnn" (the CNN -> RNN tag decoder, train.rnn_head)
    rnn_cell: str = "lstm"  # rnn head only, as the three below
    rnn_units: int = 512
    label_embedding: int = 64
    label_order: str = "frequent"  # the order of an image's classes in its training sequence
    loss: str = "bce"  # the sigmoid head's loss: bce, focal or asl (train.losses); the rnn head has its own
    focal_gamma: float = FOCAL_GAMMA  # --loss focal only, as the asl settings below are --loss asl only
    asl_gamma_pos: float = ASL_GAMMA_POS
    asl_gamma_neg: float = ASL_GAMMA_NEG
    asl_clip: float = ASL_CLIP

    def resolve(self) -> TrainConfig:
        """A copy with defaults filled from the backbone and every setting checked; raises ConfigError."""
        try:
            backbone = get_backbone(self.backbone)
            augment = parse_augment(self.augment)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if self.val is not None and self.val_split is not None:
            raise ConfigError("give either --val DATA_DIR or --val-split, not both")
        val_split = None if self.val is not None else (0.1 if self.val_split is None else float(self.val_split))
        if val_split is not None and not 0.0 < val_split < 1.0:
            raise ConfigError(f"--val-split must be between 0 and 1 (exclusive), got {val_split}")
        size = self.image_size or backbone.input_size
        if size < backbone.min_input_size:
            raise ConfigError(f"--image-size {size} is below {backbone.name}'s minimum of {backbone.min_input_size} px")
        checks = [
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (
                0 <= self.frozen_epochs <= self.epochs,
                f"--frozen-epochs must be between 0 and --epochs ({self.epochs}), got {self.frozen_epochs}",
            ),
            (
                self.lr > 0 and self.finetune_lr > 0,
                f"learning rates must be positive, got --lr {self.lr} --finetune-lr {self.finetune_lr}",
            ),
            (0.0 <= self.unfreeze <= 1.0, f"--unfreeze must be between 0 and 1, got {self.unfreeze}"),
            (0.0 <= self.dropout < 1.0, f"--dropout must be in [0, 1), got {self.dropout}"),
            (self.l2 >= 0.0, f"--l2 must be non-negative, got {self.l2}"),
            (self.devices is None or self.devices >= 1, f"--devices must be at least 1, got {self.devices}"),
            (self.head in HEADS, f"--head must be one of {', '.join(HEADS)}, got {self.head!r}"),
            (self.rnn_cell in RNN_CELLS, f"--rnn-cell must be one of {', '.join(RNN_CELLS)}, got {self.rnn_cell!r}"),
            (self.rnn_units >= 1, f"--rnn-units must be at least 1, got {self.rnn_units}"),
            (self.label_embedding >= 1, f"--label-embedding must be at least 1, got {self.label_embedding}"),
            (
                self.label_order in LABEL_ORDERS,
                f"--label-order must be one of {', '.join(LABEL_ORDERS)}, got {self.label_order!r}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        self._check_loss()
        weights = self.weights
        if weights not in ("imagenet", "none"):
            path = Path(weights).expanduser()
            if not path.is_file():
                raise ConfigError(f"--weights {weights}: no such file (use imagenet, none, or a .weights.h5 path)")
            weights = str(path.resolve())
        cache = self.cache
        if cache is not None and cache != "memory":
            cache = str(Path(cache).expanduser().resolve())
        return dataclasses.replace(
            self,
            data_dir=Path(self.data_dir).expanduser().resolve(),
            out=Path(self.out).expanduser().resolve(),
            val=None if self.val is None else Path(self.val).expanduser().resolve(),
            val_split=val_split,
            image_size=size,
            augment=augment,
            weights=weights,
            cache=cache,
        )

    def _check_loss(self) -> None:
        """--loss and its settings: ranges, and each setting only with its own loss (so config.json's other values
        stay at their defaults and mean nothing), and no focal/asl for the rnn head, which has its sequence loss."""
        if self.loss not in LOSSES:
            raise ConfigError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.head == "rnn" and self.loss != "bce":
            raise ConfigError(
                f"--loss {self.loss} applies to the sigmoid head; the rnn head trains on its own sequence loss "
                "(cross-entropy of the next tag), so leave --loss at bce with --head rnn"
            )
        own = {"focal_gamma": "focal", "asl_gamma_pos": "asl", "asl_gamma_neg": "asl", "asl_clip": "asl"}
        defaults = {"focal_gamma": FOCAL_GAMMA, "asl_gamma_pos": ASL_GAMMA_POS, "asl_gamma_neg": ASL_GAMMA_NEG,
                    "asl_clip": ASL_CLIP}
        for key, loss in own.items():
            value = getattr(self, key)
            flag = "--" + key.replace("_", "-")
            if value != defaults[key] and self.loss != loss:
                raise ConfigError(f"{flag} applies to --loss {loss} only (this run has --loss {self.loss})")
            low_ok = value >= 0.0 and (key != "asl_clip" or value < 1.0)
            if not low_ok:
                bound = "in [0, 1)" if key == "asl_clip" else "non-negative"
                raise ConfigError(f"{flag} must be {bound}, got {value}")

    def loss_settings(self) -> dict:
        """The settings of this run's loss, as train.losses.training_loss/validation_loss take them."""
        return {"focal_gamma": self.focal_gamma, "asl_gamma_pos": self.asl_gamma_pos,
                "asl_gamma_neg": self.asl_gamma_neg, "asl_clip": self.asl_clip}

    def to_json(self) -> dict:
        """The settings as JSON values (paths as strings, augment as a list)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
        return out

    @property
    def stage2_epochs(self) -> int:
        return self.epochs - self.frozen_epochs
