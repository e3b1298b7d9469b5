"""Replicas for training: MirroredStrategy over the GPUs, or over N logical devices carved out of the CPU.

`--devices N` on a machine without GPUs splits the CPU into N logical devices so that multi-replica training runs
(and is tested) anywhere. Logical devices can only be configured before TensorFlow starts its runtime, which is
why the CLI calls `make_strategy` before anything else touches TensorFlow.
"""

from __future__ import annotations

import tensorflow as tf


class DeviceError(RuntimeError):
    """The requested devices cannot be had (too few GPUs, or TensorFlow already started)."""


def _split_cpu(n: int) -> list[str]:
    cpu = tf.config.list_physical_devices("CPU")[0]
    wanted = [tf.config.LogicalDeviceConfiguration() for _ in range(n)]
    current = tf.config.get_logical_device_configuration(cpu)  # reads the setting without starting the runtime
    if current is None or len(current) != n:
        try:
            tf.config.set_logical_device_configuration(cpu, wanted)
        except RuntimeError as err:
            raise DeviceError(
                f"cannot split the CPU into {n} logical devices: TensorFlow has already started ({err}); "
                f"configure devices first, as `python -m train --devices {n}` does"
            ) from err
    return [f"/cpu:{i}" for i in range(n)]


def make_strategy(devices: int | None = None) -> tf.distribute.Strategy:
    """The distribution strategy for `devices` replicas (None: every visible GPU, or the default CPU strategy).

    With GPUs: MirroredStrategy over all of them, or the first `devices`. Without: for devices > 1, the CPU is
    split into that many logical devices and mirrored over; otherwise TensorFlow's default (one replica).
    """
    if devices is not None and devices < 1:
        raise DeviceError(f"--devices must be at least 1, got {devices}")
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        if devices is not None and devices > len(gpus):
            raise DeviceError(f"--devices {devices} asked for, but only {len(gpus)} GPU(s) are visible")
        names = [f"/gpu:{i}" for i in range(devices or len(gpus))]
        return tf.distribute.MirroredStrategy(names)
    if devices is None or devices == 1:
        return tf.distribute.get_strategy()
    # NCCL all-reduce needs GPUs; on CPU replicas, reduce through one device.
    return tf.distribute.MirroredStrategy(_split_cpu(devices), cross_device_ops=tf.distribute.ReductionToOneDevice())


def has_gpu() -> bool:
    return bool(tf.config.list_physical_devices("GPU"))
