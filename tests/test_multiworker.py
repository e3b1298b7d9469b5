"""Multi-worker training's cheap parts: TF_CONFIG, shard arithmetic and pipelines, the agreement message, the
launcher's environment, the Keras patches and their version guard (the 2-worker runs are in
tests/test_multiworker_slow.py)."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras.src.backend.tensorflow import trainer as tf_trainer
from tensorflow.python.distribute import values as tf_values

from tests.datagen import make_data_dir
from train import launch, multiworker_patches
from train.data import make_dataset
from train.keras_workarounds import SEED_STATE_SUFFIX, reseed_random_layers
from train.multiworker import Cluster, ClusterError, describe_disagreement, read_cluster
from train.shards import Shard, batches_per_epoch, make_shard, shard_positions

pytestmark = pytest.mark.filterwarnings("ignore:Your input ran out of data")


def _env(spec) -> dict[str, str]:
    return {"TF_CONFIG": json.dumps(spec)}


# --- TF_CONFIG ------------------------------------------------------------------------------------------------


def test_tf_config_absent_or_naming_one_task_means_single_process():
    assert read_cluster({}) is None
    assert read_cluster({"TF_CONFIG": " "}) is None
    assert read_cluster(_env({"cluster": {"worker": ["h:1"]}, "task": {"type": "worker", "index": 0}})) is None


def test_tf_config_ranks_the_chief_first_then_the_workers():
    cluster = {"chief": ["c:1"], "worker": ["a:2", "b:3"]}
    chief = read_cluster(_env({"cluster": cluster, "task": {"type": "chief", "index": 0}}))
    second = read_cluster(_env({"cluster": cluster, "task": {"type": "worker", "index": 1}}))
    assert chief == Cluster("chief", 0, 0, ("c:1", "a:2", "b:3")) and chief.is_chief and chief.size == 3
    assert second.rank == 2 and not second.is_chief
    workers = read_cluster(_env({"cluster": {"worker": ["a:2", "b:3"]}, "task": {"type": "worker", "index": 0}}))
    assert workers.rank == 0 and workers.is_chief  # without a chief task, worker 0 is the chief


@pytest.mark.parametrize(("raw", "message"), [
    ("{not json", "TF_CONFIG is not valid JSON"),
    (json.dumps({"task": {"type": "worker", "index": 0}}), 'TF_CONFIG has no "cluster" object'),
    (json.dumps({"cluster": {"worker": ["a:1", "b:2"], "ps": ["p:3"]}, "task": {"type": "worker", "index": 0}}),
     "TF_CONFIG names ps tasks; multi-worker training uses only chief and worker tasks"),
    (json.dumps({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 2}}),
     "TF_CONFIG: task worker 2 is not in the cluster's 2 worker task(s)"),
    (json.dumps({"cluster": {"worker": ["a:1", "b:2"]}}), 'TF_CONFIG needs "task"'),
    (json.dumps({"cluster": {"worker": ["a", "b:2"]}, "task": {"type": "worker", "index": 0}}),
     'cluster "worker" should be a list of "host:port"'),
])
def test_malformed_tf_config_is_named(raw, message):
    with pytest.raises(ClusterError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_cluster({"TF_CONFIG": raw})


# --- shards ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "count"), [(30, 2), (31, 2), (40, 3), (7, 7)])
def test_shards_are_disjoint_and_cover_every_position(n, count):
    shards = [set(shard_positions(n, k, count)) for k in range(count)]
    assert sum(len(s) for s in shards) == n and set().union(*shards) == set(range(n))


def test_every_pipeline_yields_the_full_batches_of_the_smallest_shard():
    assert batches_per_epoch(31, 2, 4) == 3  # shards of 16 and 15 positions: 3 full batches of 4 each
    assert batches_per_epoch(30, 2, 4, local_replicas=2) == 2  # 3 batches, rounded down to feed both replicas
    assert batches_per_epoch(40, 1, 8) == 5  # one pipeline: single-process training's 40 // 8
    assert make_shard(31, 1, 2, 4) == Shard(1, 2, 3)
    with pytest.raises(ValueError, match="shard index 2 is not in 0..1"):
        make_shard(31, 2, 2, 4)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """13 small JPEGs; the last is corrupt."""
    return make_data_dir(tmp_path_factory.mktemp("mw-data"), n=13, n_classes=2, size=(24, 24), corrupt=1, seed=1)


def _indices(ds) -> list[list[int]]:
    return [[int(v) for v in labels[:, 0]] for _, labels in ds]


def test_shard_pipelines_read_disjoint_images_in_equal_steps_despite_an_unreadable_one(small_data):
    from crawl.manifest import read_data_dir

    paths = read_data_dir(small_data.root).image_paths()
    rows = np.arange(len(paths), dtype=np.float32)[:, None]
    epoch = tf.Variable(2, dtype=tf.int64)
    common = dict(image_size=16, preprocessing="raw", training=True, epoch=epoch, seed=5)
    steps = batches_per_epoch(len(paths), 2, 2)
    per_worker = [_indices(make_dataset(paths, rows, batch_size=2, shard=make_shard(len(paths), k, 2, 2), **common))
                  for k in range(2)]
    assert steps == 3 and [len(b) for b in per_worker] == [3, 3]  # equal step counts on both workers
    seen = [{i for batch in batches for i in batch} for batches in per_worker]
    assert not seen[0] & seen[1]  # disjoint shares
    bad = len(paths) - 1  # the corrupt image, never delivered
    assert bad not in seen[0] | seen[1]
    for k in range(2):
        # Worker k reads its positions of the epoch's permutation in order, then its own share again as spares.
        own = list(_permuted_shard(len(paths), k, 2, seed=5, epoch=2))
        assert [i for batch in per_worker[k] for i in batch] == [i for i in own + own if i != bad][:6]
    assert set(_permuted_shard(len(paths), 0, 2, 5, 2)) | set(_permuted_shard(len(paths), 1, 2, 5, 2)) == set(
        range(len(paths)))  # together the shards are the whole epoch


def _permuted_shard(n: int, index: int, count: int, seed: int, epoch: int) -> np.ndarray:
    key = tf.constant([seed, epoch], tf.int64)
    positions = tf.constant(list(shard_positions(n, index, count)), tf.int64)
    return tf.random.experimental.index_shuffle(positions, seed=key, max_index=n - 1).numpy()


def test_shards_draw_different_augmentations_keyed_on_seed_epoch_and_worker(tmp_path):
    from common.synthetic import write_jpeg

    paths = []
    for i in range(8):  # eight copies of one picture: only the augmentation draws can tell the batches apart
        path = tmp_path / f"{i}.jpg"
        write_jpeg(path, np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8), quality=95)
        paths.append(str(path))
    rows = np.zeros([8, 1], np.float32)
    epoch = tf.Variable(0, dtype=tf.int64)

    def images(k: int) -> np.ndarray:
        ds = make_dataset(paths, rows, image_size=16, preprocessing="raw", batch_size=2, training=True, epoch=epoch,
                          augment=("flip", "rotate", "translate"), seed=3, shard=make_shard(8, k, 2, 2))
        return np.concatenate([x.numpy() for x, _ in ds])

    first, second = images(0), images(1)
    assert not np.array_equal(first, second)  # worker 1's batches are not copies of worker 0's
    np.testing.assert_array_equal(images(0), first)  # the same (seed, epoch, worker): the same draws
    epoch.assign(1)
    assert not np.array_equal(images(0), first)


def test_dropout_seeds_differ_between_workers_and_depend_only_on_seed_epoch_and_worker():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dropout(0.5, seed=7)(inputs))
    state = next(v for v in model.variables if v.path.endswith(SEED_STATE_SUFFIX))
    reseed_random_layers(model, 2, worker=1)
    assert state.numpy().tolist() == [7, (1 << 40) + (2 << 20)]
    reseed_random_layers(model, 2)
    assert state.numpy().tolist() == [7, 2 << 20]  # worker 0 and single-process training: unchanged


# --- the agreement message ------------------------------------------------------------------------------------


def test_agreement_names_each_differing_fact_with_every_workers_value():
    same = {"--lr": "0.001", "RUN_DIR state": "fresh"}
    assert describe_disagreement([same, dict(same)]) is None
    message = describe_disagreement([same, {"--lr": "0.01", "RUN_DIR state": "resume after epoch 2"}])
    assert message == (
        "the workers disagree, so none trains (give every worker the same command and RUN_DIR): "
        "--lr: worker 0 0.001, worker 1 0.01; RUN_DIR state: worker 0 fresh, worker 1 resume after epoch 2"
    )
    failed = describe_disagreement([same, {"error": "/data: manifest.csv lists no images"}])
    assert failed == ("a worker failed its start checks, so no worker trains: "
                      "worker 1: /data: manifest.csv lists no images")


# --- the launcher ---------------------------------------------------------------------------------------------


def test_launcher_gives_each_worker_its_tf_config_and_no_proxy_for_loopback():
    ports = launch.free_ports(3)
    assert len(set(ports)) == 3
    addresses = [f"127.0.0.1:{p}" for p in ports]
    env = launch.worker_env(addresses, 2, base={"no_proxy": "example.org", "PATH": "/bin"})
    assert json.loads(env["TF_CONFIG"]) == {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": 2}}
    assert env["no_proxy"] == "example.org,localhost,127.0.0.1" and env["NO_PROXY"] == "localhost,127.0.0.1"
    assert read_cluster(env).rank == 2


def test_launcher_refuses_one_worker_and_missing_training_arguments(capsys):
    with pytest.raises(SystemExit):
        launch.main(["--workers", "1", "--", "data"])
    assert "--workers must be at least 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        launch.main(["--workers", "2"])
    assert "give the training arguments after --" in capsys.readouterr().err


def test_launcher_ends_every_worker_when_one_fails(tmp_path):
    # A stand-in for the Python interpreter: worker 1 fails at once, worker 0 would run for ten minutes.
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\ncase "$TF_CONFIG" in *\'"index": 1\'*) echo "bad arguments" >&2; exit 2;; esac\n'
                    'echo "training"; exec sleep 600\n')
    fake.chmod(0o755)
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        status = launch.launch(launch.LaunchConfig(workers=2, train_args=("DATA",)), python=str(fake), stdout=out,
                               stderr=err, grace_seconds=0.5)
    assert status == 2  # worker 1's status; worker 0 was killed rather than left running
    assert (tmp_path / "err").read_text() == "[worker 1] bad arguments\n"


# --- the Keras patches ----------------------------------------------------------------------------------------


def test_patches_refuse_an_unverified_keras_version(monkeypatch):
    multiworker_patches.check_keras_version(multiworker_patches.PINNED_KERAS)
    assert keras.__version__ == multiworker_patches.PINNED_KERAS, (
        f"Keras {keras.__version__} is installed: re-run the multi-worker tests and update PINNED_KERAS")
    monkeypatch.delenv(multiworker_patches.UNVERIFIED_ENV, raising=False)
    with pytest.raises(multiworker_patches.KerasVersionError, match="Keras 3.16.0 is installed. Install keras==3.15.1"):
        multiworker_patches.check_keras_version("3.16.0")
    monkeypatch.setenv(multiworker_patches.UNVERIFIED_ENV, "1")
    with pytest.warns(UserWarning, match="running anyway because TRAIN_UNVERIFIED_KERAS=1"):
        multiworker_patches.check_keras_version("3.16.0")


class _RecordingStrategy:
    """Stands in for a multi-worker strategy: records reduce() calls (the collectives Keras would start)."""

    def __init__(self):
        self.reductions = []

    def reduce(self, op, value, axis):
        self.reductions.append((op, axis, value))
        return value

    def experimental_local_results(self, value):
        return value.values

    def scope(self):
        import contextlib

        return contextlib.nullcontext()


def _per_replica(array) -> tf_values.PerReplica:
    return tf_values.PerReplica([tf.constant(array)])


def _built_model() -> keras.Model:
    inputs = keras.Input((3,))
    return keras.Model(inputs, keras.layers.Dense(1)(inputs))


def test_keras_symbolic_build_reduces_the_batch_across_workers_and_the_patch_does_not(monkeypatch):
    batch = (_per_replica(np.ones([2, 3], np.float32)), _per_replica(np.zeros([2, 1], np.float32)))
    iterator = [(0, 0, iter([batch]))]
    model = _built_model()
    strategy = _RecordingStrategy()
    model._distribute_strategy = strategy
    monkeypatch.setattr(model, "_symbolic_build", lambda data_batch: None)
    multiworker_patches._ORIGINAL_BUILD(model, iterator=iter(iterator))
    assert [(op, axis) for op, axis, _ in strategy.reductions] == [("MEAN", None)], (
        "Keras's _maybe_symbolic_build no longer reduces the first batch across replicas: "
        "patch 1 in train/multiworker_patches.py may be removable")
    assert isinstance(strategy.reductions[0][2], tuple)  # the whole (x, y) tuple: a cross-worker all-reduce
    monkeypatch.setattr(multiworker_patches, "is_multi_worker", lambda s: True)
    built = []
    monkeypatch.setattr(model, "_symbolic_build", lambda data_batch: built.append(data_batch))
    patched = _RecordingStrategy()
    model._distribute_strategy = patched
    multiworker_patches.symbolic_build_from_local_batch(model, iterator=iter([(0, 0, iter([batch]))]))
    assert patched.reductions == [] and built[0][0].shape == (2, 3) and built[0][1].shape == (2, 1)


def test_keras_reduces_scalar_logs_with_axis_0_across_workers_and_the_patch_uses_none(monkeypatch):
    monkeypatch.setattr(tf_trainer, "_collective_all_reduce_multi_worker", lambda strategy: True)
    strategy = _RecordingStrategy()
    logs = {"loss": tf.constant(0.5)}
    multiworker_patches._ORIGINAL_REDUCE(logs, strategy, "auto")
    assert [(op, axis) for op, axis, _ in strategy.reductions] == [("MEAN", 0)], (
        "Keras's reduce_per_replica no longer reduces scalar logs with axis=0 under multi-worker: "
        "patch 2 in train/multiworker_patches.py may be removable")
    with pytest.raises(ValueError):  # what axis=0 does to a scalar in a real strategy
        tf.distribute.get_strategy().reduce("MEAN", tf.constant(0.5), axis=0)
    monkeypatch.setattr(multiworker_patches, "is_multi_worker", lambda s: True)
    patched = _RecordingStrategy()
    multiworker_patches.reduce_per_replica_scalars(logs, patched, "auto")
    assert [(op, axis) for op, axis, _ in patched.reductions] == [("MEAN", None)]


def test_patches_are_installed_only_inside_their_block_and_delegate_elsewhere():
    assert tf_trainer.reduce_per_replica is multiworker_patches._ORIGINAL_REDUCE
    with multiworker_patches.keras_multiworker_patches():
        assert tf_trainer.reduce_per_replica is multiworker_patches.reduce_per_replica_scalars
        # Not multi-worker: Keras's own reduction.
        out = tf_trainer.reduce_per_replica({"loss": tf.constant(0.25)}, tf.distribute.get_strategy(), "auto")
        assert float(out["loss"]) == 0.25
    assert tf_trainer.reduce_per_replica is multiworker_patches._ORIGINAL_REDUCE
    assert tf_trainer.TensorFlowTrainer._maybe_symbolic_build is multiworker_patches._ORIGINAL_BUILD
