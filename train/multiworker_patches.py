"""The two patches that make Keras 3.15.1's fit() run under a multi-worker MultiWorkerMirroredStrategy.

Keras 3 does not support this strategy (keras-team/keras#20585, tensorflow/tensorflow#72388); with more than one
worker its TensorFlow trainer fails in two places (keras/src/backend/tensorflow/trainer.py):

1. `TensorFlowTrainer._maybe_symbolic_build` builds the model from the first batch, which it gets by reducing the
   distributed batch with `strategy.reduce("MEAN", batch, axis=None)`: under this strategy that is a cross-worker
   all-reduce of the whole (images, labels) tuple, which fails. Only the batch's shapes and dtypes matter for the
   build, so the patch takes the batch of the first local replica instead (no collective).
2. `reduce_per_replica` reduces the step's logs (scalar metrics such as the loss) with
   `strategy.reduce("MEAN", v, axis=0)`; a scalar has no axis 0. The patch reduces scalars with axis=None (the mean
   over all replicas of all workers, which is what a single process reports for the same global batch) and leaves
   every other case to Keras.

Both replacements delegate to the originals unless the strategy is a multi-worker collective one, and they are
installed only for the duration of `keras_multiworker_patches()`, which multi-worker training enters. They are
verified against Keras `PINNED_KERAS` only: another version raises `KerasVersionError` (set
`TRAIN_UNVERIFIED_KERAS=1` to run anyway, with a warning). tests/test_multiworker_patches.py reproduces both
failures on Keras's own functions; when one of those tests fails after an upgrade, the patch may be removable.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

import keras
import tensorflow as tf
from keras.src import tree
from keras.src.backend.tensorflow import trainer as tf_trainer

PINNED_KERAS = "3.15.1"
UNVERIFIED_ENV = "TRAIN_UNVERIFIED_KERAS"

_ORIGINAL_BUILD = tf_trainer.TensorFlowTrainer._maybe_symbolic_build
_ORIGINAL_REDUCE = tf_trainer.reduce_per_replica


class KerasVersionError(RuntimeError):
    """The installed Keras is not the version the multi-worker patches were verified with."""


def check_keras_version(version: str | None = None) -> None:
    """Raise KerasVersionError unless Keras is PINNED_KERAS (or TRAIN_UNVERIFIED_KERAS=1: then only a warning)."""
    version = version or keras.__version__
    if version == PINNED_KERAS:
        return
    message = (
        f"multi-worker training patches two functions of Keras {PINNED_KERAS} (train/multiworker_patches.py); "
        f"Keras {version} is installed"
    )
    if os.environ.get(UNVERIFIED_ENV) == "1":
        warnings.warn(f"{message}; running anyway because {UNVERIFIED_ENV}=1: compare the losses with a "
                      "single-process run before trusting them", stacklevel=2)
        return
    raise KerasVersionError(
        f"{message}. Install keras=={PINNED_KERAS} (requirements.txt), or set {UNVERIFIED_ENV}=1 to try this version "
        "after checking tests/test_multiworker_patches.py"
    )


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
    """Whether `strategy` is a MultiWorkerMirroredStrategy spanning more than one worker."""
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and strategy.extended._in_multi_worker_mode()


def _first_local_value(strategy: tf.distribute.Strategy, value):
    if isinstance(value, tf.distribute.DistributedValues):
        return strategy.experimental_local_results(value)[0]
    return value


def symbolic_build_from_local_batch(self, iterator=None, data_batch=None):
    """Patch 1 (TensorFlowTrainer._maybe_symbolic_build): build from the first local replica's batch."""
    strategy = self._distribute_strategy
    if strategy is None or not is_multi_worker(strategy):
        return _ORIGINAL_BUILD(self, iterator=iterator, data_batch=data_batch)
    if iterator is not None:
        for _, _, batches in iterator:
            data_batch = tree.map_structure(lambda v: _first_local_value(strategy, v), next(batches))
            break
    with strategy.scope():
        self._symbolic_build(data_batch=data_batch)


def reduce_per_replica_scalars(values, strategy, reduction):
    """Patch 2 (trainer.reduce_per_replica): a mean of scalars over all replicas of all workers with axis=None."""
    if not is_multi_worker(strategy) or reduction not in ("auto", "mean"):
        return _ORIGINAL_REDUCE(values, strategy, reduction)

    def reduce(value):
        shape = getattr(_first_local_value(strategy, value), "shape", None)
        if shape is not None and shape.rank == 0:
            return strategy.reduce("MEAN", value, axis=None)
        return _ORIGINAL_REDUCE(value, strategy, reduction)

    return tree.map_structure(reduce, values)


@contextlib.contextmanager
def keras_multiworker_patches() -> Iterator[None]:
    """Install both patches (after checking the Keras version) for the duration of the block."""
    check_keras_version()
    tf_trainer.TensorFlowTrainer._maybe_symbolic_build = symbolic_build_from_local_batch
    tf_trainer.reduce_per_replica = reduce_per_replica_scalars
    try:
        yield
    finally:
        tf_trainer.TensorFlowTrainer._maybe_symbolic_build = _ORIGINAL_BUILD
        tf_trainer.reduce_per_replica = _ORIGINAL_REDUCE
