"""Shard arithmetic for multi-worker training: which positions of an epoch's order each input pipeline reads.

Pure integers, no TensorFlow. Input pipeline `index` of `count` reads the positions index, index + count, ... of the
epoch's permutation of the n training images: the shards are disjoint and cover every position. All pipelines stop
after the same number of batches (`Shard.batches`), computed from the smallest shard, so every worker runs the same
number of steps even when some of its files turn out unreadable (a pipeline that lost images reads on into its own
shard again from its start). With one pipeline and a per-pipeline batch equal to the global batch, the shard is the
whole epoch and the batches are those of single-process training.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shard:
    """Input pipeline `index` of `count`: its share of the positions and how many batches it yields per epoch."""

    index: int
    count: int
    batches: int

    def __post_init__(self):
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard index {self.index} is not in 0..{self.count - 1}")
        if self.batches < 0:
            raise ValueError(f"a shard cannot yield {self.batches} batches")


def shard_positions(n: int, index: int, count: int) -> range:
    """The positions of an epoch's order (0..n-1) that input pipeline `index` of `count` reads."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard index {index} is not in 0..{count - 1}")
    return range(index, n, count)


def batches_per_epoch(n: int, count: int, per_replica_batch: int, local_replicas: int = 1) -> int:
    """Batches each of `count` pipelines yields per epoch: the full batches of the smallest shard (n // count
    positions), rounded down to a multiple of the pipeline's `local_replicas` so that every step feeds them all."""
    if per_replica_batch < 1 or local_replicas < 1 or count < 1:
        raise ValueError("batch size, replicas and pipelines must be at least 1")
    full = (n // count) // per_replica_batch
    return full // local_replicas * local_replicas


def make_shard(n: int, index: int, count: int, per_replica_batch: int, local_replicas: int = 1) -> Shard:
    """The Shard of pipeline `index` of `count` for n images and a per-replica batch."""
    shard_positions(n, index, count)  # checks index and count
    return Shard(index, count, batches_per_epoch(n, count, per_replica_batch, local_replicas))
