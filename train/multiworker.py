"""Training across machines: a MultiWorkerMirroredStrategy from TF_CONFIG, with one RUN_DIR written by the chief.

`python -m train ...` runs here when TF_CONFIG names more than one task (chief and/or worker). Every worker runs
the same command with the same RUN_DIR on shared storage; `run_worker` then

1. checks that the workers agree (`check_agreement`: every setting, the data's fingerprints, the versions and the
   RUN_DIR's state: fresh, resume after epoch E, complete) and fails on all of them, naming what differs;
2. trains with `train.fit.train` on each worker: the chief in the RUN_DIR, every other worker in a private copy of it
   (`mirror_run_dir`, deleted at the end) so that nothing but the chief writes the RUN_DIR, while every worker
   restores the chief's backup and records the same epochs;
3. feeds each worker its own shard of every epoch's images (`MultiWorkerRun`, `train.shards`), with augmentation
   and dropout draws that depend only on (seed, epoch, worker); each worker validates on the whole validation set
   without collectives, so the mAP is exact and every worker takes the same stop and best-model decisions;
4. exits non-zero within a minute when another worker dies (`Watchdog`), instead of waiting for it forever.

The Keras patches that fit() needs under this strategy are in train/multiworker_patches.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from crawl.manifest import DataDirError
from train import fit, rundir
from train.config import ConfigError, TrainConfig
from train.data import SkipLog, load_image
from train.keras_workarounds import reseed_random_layers
from train.multiworker_patches import keras_multiworker_patches
from train.run_state import Split, TrainingRun, run_dir_state
from train.rundir import RunRecord
from train.shards import Shard, make_shard, shard_positions

TF_CONFIG = "TF_CONFIG"
JOBS = ("chief", "worker")  # the task types that train; the first chief (else worker 0) is the chief
WATCHDOG_INTERVAL = 5.0  # seconds between checks that every other worker's port still answers
WATCHDOG_MISSES = 3  # consecutive failed checks before this worker gives up (about 15-25 s)


class ClusterError(ValueError):
    """TF_CONFIG is malformed or names tasks this training cannot run as."""


class WorkersDisagree(ValueError):
    """The workers' settings, data or RUN_DIR state differ, or one of them failed its own start checks."""


@dataclass(frozen=True)
class Cluster:
    """This process's place in the cluster TF_CONFIG describes."""

    task_type: str
    task_index: int
    rank: int  # 0 for the chief, then the other training tasks in TF_CONFIG's order
    addresses: tuple[str, ...]  # host:port of every training task, by rank

    @property
    def size(self) -> int:
        return len(self.addresses)

    @property
    def is_chief(self) -> bool:
        return self.rank == 0


def read_cluster(environ: Mapping[str, str] = os.environ) -> Cluster | None:
    """The cluster TF_CONFIG describes, or None when it is unset or names a single task (single-process training).

    Raises ClusterError naming what is wrong: not JSON, no cluster/task, a task outside the cluster, or task types
    other than chief and worker (parameter servers and evaluators are not used by this strategy here).
    """
    raw = environ.get(TF_CONFIG, "").strip()
    if not raw:
        return None
    try:
        spec = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ClusterError(f"{TF_CONFIG} is not valid JSON ({err})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("cluster"), dict):
        raise ClusterError(f'{TF_CONFIG} has no "cluster" object: {raw[:200]}')
    jobs = spec["cluster"]
    other = sorted(set(jobs) - set(JOBS))
    if other:
        raise ClusterError(f"{TF_CONFIG} names {', '.join(other)} tasks; multi-worker training uses only chief and "
                           "worker tasks")
    addresses: list[str] = []
    for job in JOBS:
        hosts = jobs.get(job, [])
        if not isinstance(hosts, list) or not all(isinstance(h, str) and ":" in h for h in hosts):
            raise ClusterError(f'{TF_CONFIG}: cluster "{job}" should be a list of "host:port", got {hosts!r}')
        addresses += hosts
    if len(jobs.get("chief", [])) > 1:
        raise ClusterError(f"{TF_CONFIG} names {len(jobs['chief'])} chiefs; at most one")
    if len(addresses) <= 1:
        return None
    task = spec.get("task")
    if not isinstance(task, dict) or task.get("type") not in JOBS or not isinstance(task.get("index"), int):
        raise ClusterError(f'{TF_CONFIG} needs "task": {{"type": "chief" or "worker", "index": N}}, got {task!r}')
    task_type, index = task["type"], task["index"]
    if not 0 <= index < len(jobs.get(task_type, [])):
        raise ClusterError(f"{TF_CONFIG}: task {task_type} {index} is not in the cluster's "
                           f"{len(jobs.get(task_type, []))} {task_type} task(s)")
    rank = index if task_type == "chief" else len(jobs.get("chief", [])) + index
    return Cluster(task_type, index, rank, tuple(addresses))


# --- the strategy ----------------------------------------------------------------------------------------------


def make_multiworker_strategy(cluster: Cluster, devices: int | None) -> tf.distribute.MultiWorkerMirroredStrategy:
    """The strategy over every worker's `devices` GPUs (all visible ones by default; one CPU replica without GPUs).

    Must be called before any other TensorFlow operation. Raises DeviceError for devices the worker does not have.
    """
    from train.devices import DeviceError

    gpus = tf.config.list_physical_devices("GPU")
    if devices is not None and devices < 1:
        raise DeviceError(f"--devices must be at least 1, got {devices}")
    if gpus:
        if devices is not None and devices > len(gpus):
            raise DeviceError(f"--devices {devices} asked for, but only {len(gpus)} GPU(s) are visible")
        tf.config.set_visible_devices(gpus[: devices or len(gpus)], "GPU")
    elif devices not in (None, 1):
        raise DeviceError(f"--devices {devices}: without GPUs each worker is one replica; drop --devices or use 1")
    return tf.distribute.MultiWorkerMirroredStrategy()


def local_replicas(strategy: tf.distribute.Strategy, cluster: Cluster) -> int:
    return strategy.num_replicas_in_sync // cluster.size


# --- collectives on small host values ---------------------------------------------------------------------------


def _all_gather(strategy: tf.distribute.Strategy, cluster: Cluster, array: np.ndarray) -> np.ndarray:
    """Every worker's `array` (same shape and dtype on all), stacked by rank."""
    value = tf.constant(array[None])
    per_replica = strategy.experimental_distribute_values_from_function(lambda _: value)
    gathered = strategy.gather(per_replica, axis=0).numpy()
    return gathered[:: local_replicas(strategy, cluster)]


def all_gather_text(strategy: tf.distribute.Strategy, cluster: Cluster, text: str) -> list[str]:
    """Every worker's `text`, by rank (two collectives: the lengths, then the padded bytes)."""
    data = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
    lengths = _all_gather(strategy, cluster, np.array([len(data)], np.int32))[:, 0]
    padded = np.zeros([int(lengths.max())], np.int32)
    padded[: len(data)] = data
    rows = _all_gather(strategy, cluster, padded)
    return [bytes(row[:n].astype(np.uint8)).decode("utf-8") for row, n in zip(rows, lengths, strict=True)]


def barrier(strategy: tf.distribute.Strategy, cluster: Cluster) -> None:
    """Wait until every worker gets here."""
    _all_gather(strategy, cluster, np.zeros([1], np.int32))


# --- the agreement check ----------------------------------------------------------------------------------------


def describe_disagreement(facts_by_rank: list[dict[str, str]]) -> str | None:
    """None when every worker reported the same facts; else one message naming each fact that differs, with each
    worker's value, and every worker's failed start check."""
    failures = [f"worker {rank}: {facts['error']}" for rank, facts in enumerate(facts_by_rank) if "error" in facts]
    if failures:
        return "a worker failed its start checks, so no worker trains: " + "; ".join(failures)
    keys = sorted(set().union(*facts_by_rank))
    differing = [k for k in keys if len({facts.get(k) for facts in facts_by_rank}) > 1]
    if not differing:
        return None
    parts = []
    for key in differing:
        values = ", ".join(f"worker {rank} {facts.get(key, '(missing)')}" for rank, facts in enumerate(facts_by_rank))
        parts.append(f"{key}: {values}")
    return "the workers disagree, so none trains (give every worker the same command and RUN_DIR): " + "; ".join(parts)


def check_agreement(strategy: tf.distribute.Strategy, cluster: Cluster, facts: dict[str, str]) -> None:
    """Exchange `facts` with every worker; raise WorkersDisagree (on every worker alike) when they differ."""
    rows = [json.loads(t) for t in all_gather_text(strategy, cluster, json.dumps(facts, sort_keys=True))]
    problem = describe_disagreement(rows)
    if problem:
        raise WorkersDisagree(problem)


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    if len(text) <= 120:
        return text
    return f"{text[:100]}... (sha256 {hashlib.sha256(text.encode()).hexdigest()[:12]})"


# --- the watchdog -----------------------------------------------------------------------------------------------


class Watchdog:
    """Ends this process (exit code 3, by SIGKILL-proof os._exit) when another worker stops answering.

    TensorFlow's collectives wait for a dead peer without limit, and a process blocked in one cannot be stopped by
    SIGTERM (TensorFlow catches it), so a thread checks every WATCHDOG_INTERVAL seconds that each other worker's
    port still accepts connections; after WATCHDOG_MISSES misses in a row it says which worker is gone and exits.
    """

    def __init__(self, cluster: Cluster, interval: float = WATCHDOG_INTERVAL, misses: int = WATCHDOG_MISSES):
        self.cluster, self.interval, self.misses = cluster, interval, misses
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="multiworker-watchdog", daemon=True)

    def __enter__(self) -> Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def _answers(self, address: str) -> bool:
        host, port = address.rsplit(":", 1)
        try:
            with socket.create_connection((host, int(port)), timeout=self.interval):
                return True
        except OSError:
            return False

    def _watch(self) -> None:
        missed = {rank: 0 for rank in range(self.cluster.size) if rank != self.cluster.rank}
        while not self._stop.wait(self.interval):
            for rank in missed:
                missed[rank] = 0 if self._answers(self.cluster.addresses[rank]) else missed[rank] + 1
                if missed[rank] >= self.misses and not self._stop.is_set():
                    print(f"error: worker {rank} ({self.cluster.addresses[rank]}) stopped answering; this worker "
                          f"({self.cluster.rank}) stops too. Run the same command on every worker again to resume "
                          "from the last finished epoch", file=sys.stderr, flush=True)
                    sys.stdout.flush()
                    os._exit(3)


# --- the run on each worker -------------------------------------------------------------------------------------


class GatheredSkipLog(SkipLog):
    """A SkipLog for one worker's shard whose `take()` returns the unreadable images of every worker's shard.

    A shard's pipeline stops after a fixed number of batches, so the indices it did not deliver are its unreadable
    files plus the positions it never reached; the few undelivered indices of its own shard are read again here to
    tell them apart, and the workers' unreadable sets are summed across workers, so every worker reports the same
    union (the chief prints it, once).
    """

    def __init__(self, run: MultiWorkerRun):
        super().__init__(len(run.split.train_paths))
        self.run = run

    def take(self) -> list[int]:
        run = self.run
        shard_indices = run.shard_indices()
        delivered = set(self.delivered())
        flags = np.zeros([self.size], np.int32)
        for index in (int(i) for i in shard_indices if int(i) not in delivered):
            _, ok = load_image(run.split.train_paths[index], run.cfg.image_size)
            flags[index] = 0 if bool(ok) else 1
        total = _all_gather(run.strategy, run.cluster, flags).sum(axis=0)
        self.reset()
        return [int(i) for i in np.flatnonzero(total)]


class MultiWorkerRun(TrainingRun):
    """A TrainingRun whose training data is each worker's shard and whose validation runs locally on each worker."""

    cluster: Cluster  # set by `run_factory` before __init__ runs

    def __init__(self, cfg: TrainConfig, split: Split, strategy: tf.distribute.Strategy, verbose: int | str):
        super().__init__(cfg, split, strategy, verbose)
        self.train_skips = GatheredSkipLog(self)
        options = tf.distribute.InputOptions(experimental_fetch_to_device=True)
        self.train_ds = strategy.distribute_datasets_from_function(self._shard_dataset, options)
        self._predictors: dict[int, tf.types.experimental.GenericFunction] = {}

    def shard(self, index: int | None = None) -> Shard:
        """This worker's Shard (or pipeline `index`'s) of the training images."""
        per_replica = self.cfg.batch_size // self.strategy.num_replicas_in_sync
        return make_shard(len(self.split.train_paths), self.cluster.rank if index is None else index, self.cluster.size,
                          per_replica, local_replicas(self.strategy, self.cluster))

    def shard_indices(self) -> np.ndarray:
        """The training-image indices of this worker's shard in the current epoch."""
        positions = shard_positions(len(self.split.train_paths), self.cluster.rank, self.cluster.size)
        n = len(self.split.train_paths)
        key = tf.constant([self.cfg.seed, int(self.epoch.numpy())], tf.int64)
        return tf.random.experimental.index_shuffle(
            tf.constant(list(positions), tf.int64), seed=key, max_index=n - 1
        ).numpy()

    def _shard_dataset(self, context: tf.distribute.InputContext) -> tf.data.Dataset:
        if context.input_pipeline_id != self.cluster.rank:
            raise RuntimeError(f"input pipeline {context.input_pipeline_id} runs on worker {self.cluster.rank}")
        per_replica = context.get_per_replica_batch_size(self.cfg.batch_size)
        ds = self.train_dataset(per_replica, shard=self.shard())
        options = tf.data.Options()
        # The shard is picked on the index stream above; TensorFlow's own sharding would read every file.
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        return ds.with_options(options)

    def predict_val(self, model: keras.Model) -> tuple[np.ndarray, np.ndarray]:
        """Every readable validation image predicted here, without collectives (as TrainingRun.predict_val)."""
        predict = self._predictors.get(id(model))
        if predict is None:
            predict = self._predictors[id(model)] = tf.function(lambda images: model(images, training=False))
        self.val_skips.reset()
        batches = [np.asarray(predict(images), np.float64) for images in self.val_ds]
        delivered = np.asarray(self.val_skips.delivered(), dtype=int)
        if len(delivered) == 0:
            raise DataDirError(f"none of the {len(self.split.val_paths)} validation images could be read")
        return np.concatenate(batches)[: len(delivered)], delivered


def run_factory(cluster: Cluster) -> type[MultiWorkerRun]:
    """MultiWorkerRun bound to this worker's place in the cluster (what train.fit.train builds its run with)."""
    return type("MultiWorkerRun", (MultiWorkerRun,), {"cluster": cluster})


class WorkerSeeds(keras.callbacks.Callback):
    """Key the dropout draws on (seed, epoch, worker): after EpochMonitor keyed them on (seed, epoch)."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def on_epoch_begin(self, epoch, logs=None):
        reseed_random_layers(self.model, epoch, worker=self.rank)


# --- the RUN_DIR --------------------------------------------------------------------------------------------------


def mirror_run_dir(out: Path, scratch: Path) -> None:
    """Copy what a run reads from the chief's RUN_DIR (config.json, history, best model, backups) into `scratch`,
    with config.json's --out pointing at `scratch`, so a non-chief worker can run as if it were the RUN_DIR."""
    scratch.mkdir(parents=True, exist_ok=True)
    if not out.is_dir():
        return
    skip = {rundir.LOGS_DIR, rundir.CURVES_FILE}
    for entry in out.iterdir():
        if entry.name in skip or entry.name.startswith("."):
            continue
        if entry.is_dir():
            shutil.copytree(entry, scratch / entry.name, dirs_exist_ok=True)
        else:
            shutil.copy2(entry, scratch / entry.name)
    if (scratch / rundir.CONFIG_FILE).exists():
        record = rundir.read_config(scratch)
        rundir.write_config(scratch, dataclasses.replace(record, train={**record.train, "out": str(scratch)}))


def run_dir_facts(cfg: TrainConfig, split: Split, record: RunRecord) -> dict[str, str]:
    """What every worker must agree on: the settings, the data, the versions, the RUN_DIR state."""
    state = run_dir_state(cfg.out, record)
    if state == "resume":
        history = rundir.read_history(cfg.out)
        finished = int(history["epoch"].max()) if len(history) else 0
        state = f"resume after epoch {finished}"
    facts = {f"--{k.replace('_', '-')}": _short(v) for k, v in cfg.to_json().items()}
    facts.update({
        "training images": str(len(split.train_paths)),
        "validation images": str(len(split.val_paths)),
        "classes": _short(list(split.classes)),
        "manifest sha256": str(record.manifest_sha256),
        "validation manifest sha256": str(record.val_manifest_sha256),
        "versions": _short(record.versions),
        "RUN_DIR state": state,
    })
    return facts


# --- the worker's whole run ------------------------------------------------------------------------------------


def _prepare(config: TrainConfig, strategy: tf.distribute.Strategy) -> tuple[TrainConfig, dict[str, str]]:
    """Resolve and check everything a single process would before training; the facts to agree on."""
    cfg = config.resolve()
    if cfg.cache is not None:
        raise ConfigError("--cache is not supported with multi-worker training yet (each worker reads its shard "
                          "of every epoch from the DATA_DIR)")
    replicas = strategy.num_replicas_in_sync
    if cfg.batch_size % replicas:
        raise ConfigError(f"--batch-size {cfg.batch_size} does not divide by the {replicas} replicas of all "
                          f"workers; use a multiple of {replicas}")
    split = fit.load_split(cfg)
    fit._check_split(cfg, split)
    record = fit.run_record(cfg, split, replicas)
    return cfg, run_dir_facts(cfg, split, record)


def train_worker(config: TrainConfig, cluster: Cluster, strategy: tf.distribute.Strategy,
                 verbose: int | str = "auto") -> fit.TrainResult:
    """This worker's share of a multi-worker run (see the module docstring); the same exceptions as fit.train, plus
    WorkersDisagree, on every worker alike."""
    try:
        cfg, facts = _prepare(config, strategy)
        error = None
    except (ConfigError, DataDirError, OSError) as err:  # reported to every worker, so that all of them stop
        cfg, facts, error = None, {"error": str(err)}, err
    check_agreement(strategy, cluster, facts)
    if error is not None:  # pragma: no cover - check_agreement raised already
        raise error
    callbacks = [WorkerSeeds(cluster.rank)]
    with Watchdog(cluster), keras_multiworker_patches():
        if facts["RUN_DIR state"] == "complete":  # nothing to train; every worker just reports it
            result = fit.train(cfg, verbose=verbose, strategy=strategy)
        elif cluster.is_chief:
            barrier(strategy, cluster)  # the other workers have copied the RUN_DIR before the chief writes it
            print(f"worker 0 of {cluster.size} (chief): writes the RUN_DIR", flush=True)
            result = fit.train(cfg, verbose=verbose, strategy=strategy, callbacks=callbacks,
                               run_factory=run_factory(cluster))
        else:
            with tempfile.TemporaryDirectory(prefix=f"train-worker{cluster.rank}-") as scratch:
                mirror = Path(scratch) / "run"
                mirror_run_dir(cfg.out, mirror)
                barrier(strategy, cluster)
                print(f"worker {cluster.rank} of {cluster.size}: trains on its shard; the chief reports and writes "
                      f"the RUN_DIR", flush=True)
                with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
                    result = fit.train(dataclasses.replace(cfg, out=mirror), verbose=0, strategy=strategy,
                                       callbacks=callbacks, run_factory=run_factory(cluster))
                result = dataclasses.replace(result, run_dir=cfg.out)
        barrier(strategy, cluster)  # nobody leaves while another still finalises
    return result


def main_worker(config: TrainConfig, cluster: Cluster) -> int:
    """`python -m train` under a multi-worker TF_CONFIG: create the strategy first, train, and end the process.

    The process ends by os._exit with the exit status of `python -m train` (3 when another worker died): after
    a failed collective TensorFlow's runtime may not shut down by itself.
    """
    from train.backbones import WeightsError
    from train.devices import DeviceError

    code = 1
    try:
        strategy = make_multiworker_strategy(cluster, config.devices)
        print(f"worker {cluster.rank} of {cluster.size} ({cluster.task_type} {cluster.task_index}, pid {os.getpid()}): "
              f"{strategy.num_replicas_in_sync} replica(s) in all", flush=True)
        train_worker(config, cluster, strategy)
        code = 0
    except (ConfigError, DataDirError, WeightsError, DeviceError, WorkersDisagree) as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    except fit.TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        code = 1
    except tf.errors.OpError as err:  # a collective aborted: UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED, ...
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"error: worker {cluster.rank}: the cluster failed ({first_line}); another worker probably died. "
              "Run the same command on every worker again to resume from the last finished epoch", file=sys.stderr)
        code = 3
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 130 if sys.exc_info()[0] is KeyboardInterrupt else 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code  # pragma: no cover - os._exit above
