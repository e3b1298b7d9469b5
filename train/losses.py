"""The sigmoid head's training losses (`--loss bce|focal|asl`): one place that builds them and scores validation.

- bce: Keras's BinaryCrossentropy, the reference entry's loss (the default).
- focal: Keras's BinaryFocalCrossentropy with `--focal-gamma` (no class balancing, as Keras's default).
- asl: the asymmetric loss of Ridnik et al., "Asymmetric Loss For Multi-Label Classification" (ICCV 2021),
  `AsymmetricLoss` below. For a label y and probability p = sigmoid(z), with the shifted probability
  p_m = max(p - m, 0) (the probability margin m, `--asl-clip`):

      L+ = (1 - p)^gamma_pos * log(p)           L- = p_m^gamma_neg * log(1 - p_m)
      loss = -y * L+ - (1 - y) * L-

  so an easy negative (p < m) costs exactly nothing, and the others are down-weighted by p_m^gamma_neg. The
  paper sums over the labels; here, as Keras's BCE and focal loss do, the labels are averaged, so the three losses
  are on one scale per label and need no other learning rate (gamma_pos = gamma_neg = m = 0 is exactly BCE).
  Probabilities are clipped to [eps, 1 - eps] with Keras's epsilon (1e-7), as its BCE does, and the loss is
  computed in float32 also under mixed precision (powers of small float16 numbers underflow).

The rnn head trains on its own sequence loss (train.rnn_head.sequence_loss); `--loss` applies to the sigmoid head.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
from keras import ops

from train.metrics import binary_crossentropy

LOSSES = ("bce", "focal", "asl")
FOCAL_GAMMA = 2.0
ASL_GAMMA_POS, ASL_GAMMA_NEG, ASL_CLIP = 0.0, 4.0, 0.05  # the paper's defaults


@keras.saving.register_keras_serializable(package="fashion_tagger")
class AsymmetricLoss(keras.losses.Loss):
    """Ridnik et al.'s asymmetric loss on sigmoid probabilities (see the module docstring), mean over the labels."""

    def __init__(self, gamma_pos: float = ASL_GAMMA_POS, gamma_neg: float = ASL_GAMMA_NEG, clip: float = ASL_CLIP,
                 reduction: str = "sum_over_batch_size", name: str = "asymmetric_loss", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        if gamma_pos < 0 or gamma_neg < 0:
            raise ValueError(f"focusing parameters must be non-negative, got {gamma_pos} and {gamma_neg}")
        if not 0.0 <= clip < 1.0:
            raise ValueError(f"the probability margin must be in [0, 1), got {clip}")
        self.gamma_pos, self.gamma_neg, self.clip = float(gamma_pos), float(gamma_neg), float(clip)

    def call(self, y_true, y_pred):
        eps = keras.config.epsilon()
        p = ops.clip(ops.cast(y_pred, "float32"), eps, 1.0 - eps)
        y = ops.cast(y_true, "float32")
        positive = _focus(1.0 - p, self.gamma_pos) * ops.log(p)  # 1 - p >= eps > 0: no zero base
        shifted = p - self.clip
        hard = shifted > 0.0  # p_m = 0 elsewhere: that negative's term and its gradient are exactly 0
        p_m = ops.where(hard, shifted, 0.5)  # a harmless stand-in where masked, so no 0^gamma enters the gradient
        negative = ops.where(hard, _focus(p_m, self.gamma_neg) * ops.log(1.0 - p_m), 0.0)
        return -ops.mean(y * positive + (1.0 - y) * negative, axis=-1)

    def get_config(self) -> dict:
        return {**super().get_config(), "gamma_pos": self.gamma_pos, "gamma_neg": self.gamma_neg, "clip": self.clip}


def _focus(base, gamma: float):
    # gamma 0 means weight 1 exactly (and no pow, whose gradient at base 0 would be 0 * inf).
    return ops.ones_like(base) if gamma == 0 else ops.power(base, gamma)


def training_loss(loss: str, *, focal_gamma: float = FOCAL_GAMMA, asl_gamma_pos: float = ASL_GAMMA_POS,
                  asl_gamma_neg: float = ASL_GAMMA_NEG, asl_clip: float = ASL_CLIP) -> keras.losses.Loss:
    """The Keras loss the sigmoid head is compiled with for `loss` (one of LOSSES)."""
    if loss == "bce":
        return keras.losses.BinaryCrossentropy()
    if loss == "focal":
        return keras.losses.BinaryFocalCrossentropy(gamma=focal_gamma)
    if loss == "asl":
        return AsymmetricLoss(gamma_pos=asl_gamma_pos, gamma_neg=asl_gamma_neg, clip=asl_clip)
    raise ValueError(f"unknown loss {loss!r}; known: {', '.join(LOSSES)}")


def validation_loss(loss: str, **settings: float) -> Callable[[np.ndarray, np.ndarray], float]:
    """val_loss for `loss`: the loss trained on, over all validation labels, as a float.

    bce keeps train.metrics.binary_crossentropy (NumPy, float64: the numbers history.csv always had); focal and asl
    evaluate their Keras loss on the probabilities.
    """
    if loss == "bce":
        return binary_crossentropy
    fn = training_loss(loss, **settings)

    def score(y_true: np.ndarray, y_prob: np.ndarray) -> float:
        return float(ops.convert_to_numpy(fn(np.asarray(y_true, np.float32), np.asarray(y_prob, np.float32))))

    return score
