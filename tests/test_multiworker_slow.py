"""Two workers on loopback (`make test-slow`): the same RUN_DIR as one process, a chief that alone writes it, an
unreadable image in one shard, reproducible runs, a killed worker on either side and the resume, mismatched
arguments, a worker that starts 20 s late. The runs are shared between tests through module-scoped fixtures."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.datagen import make_data_dir
from tests.test_train import RUN_FILES, assert_same_numbers
from train import launch, rundir

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:Your input ran out of data")]

REPO = Path(__file__).resolve().parent.parent
# No augmentation and no dropout: then two workers with global batch 8 compute what one process computes.
FLAGS = ["--backbone", "xception", "--image-size", "75", "--batch-size", "8", "--weights", "none",
         "--val-split", "0.25", "--frozen-epochs", "1", "--epochs", "2", "--unfreeze", "0.1", "--augment", "none",
         "--dropout", "0", "--lr", "1e-3", "--finetune-lr", "3e-4"]
RUN_TIMEOUT = 900  # anti-hang limit for one whole run on a busy machine
DEATH_LIMIT = 60  # the contract: a worker whose peer died exits within a minute


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}


def _start(args: list[str], delays: tuple[float, float] = (0.0, 0.0)) -> list[subprocess.Popen]:
    """Two workers of `python -m train args` on free loopback ports; worker k starts after delays[k] seconds."""
    addresses = [f"127.0.0.1:{p}" for p in launch.free_ports(2)]
    procs: list[subprocess.Popen | None] = [None, None]
    waited = 0.0
    for k in sorted(range(2), key=lambda k: delays[k]):
        time.sleep(delays[k] - waited)
        waited = delays[k]
        procs[k] = subprocess.Popen([sys.executable, "-m", "train", *args], cwd=REPO,
                                    env=launch.worker_env(addresses, k, base=_env()), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
    return procs


def _finish(procs: list[subprocess.Popen], timeout: float = RUN_TIMEOUT) -> list[tuple[int, str, str]]:
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        results.append((proc.returncode, out, err))
    return results


def _run_ok(args: list[str], delays=(0.0, 0.0)) -> list[tuple[int, str, str]]:
    results = _finish(_start(args, delays))
    for rank, (code, _, err) in enumerate(results):
        assert code == 0, f"worker {rank}: {err[-3000:]}"
    return results


def _single(args: list[str]) -> tuple[int, str, str]:
    proc = subprocess.run([sys.executable, "-m", "train", *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=RUN_TIMEOUT)
    return proc.returncode, proc.stdout, proc.stderr


def _pid(stdout: str) -> int:
    return int(re.search(r"pid (\d+)", stdout).group(1))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data_dir(tmp_path_factory.mktemp("mw-slow-data"), n=32, n_classes=3, seed=3)


@pytest.fixture(scope="module")
def single(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mw-single") / "run"
    code, _, err = _single([str(data.root), "--out", str(out), *FLAGS])
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def two_workers(data, tmp_path_factory) -> tuple[Path, list[tuple[int, str, str]]]:
    out = tmp_path_factory.mktemp("mw-two") / "run"
    return out, _run_ok([str(data.root), "--out", str(out), *FLAGS])


def test_two_workers_end_with_the_run_dir_of_one_process(single, two_workers):
    out, results = two_workers
    assert {p.name for p in out.iterdir()} == {p.name for p in single.iterdir()} == RUN_FILES
    assert_same_numbers(out, single)
    ours, theirs = (json.loads((d / "config.json").read_text()) for d in (out, single))
    assert ours["runtime"] == {"replicas": 2, "mixed_precision": False} and theirs["runtime"]["replicas"] == 1
    for config in (ours, theirs):
        del config["train"]["out"], config["runtime"]
    assert ours == theirs
    chief_out, other_out = results[0][1], results[1][1]
    assert "2 replica(s), global batch 8" in chief_out and "epoch 2/2 stage 2" in chief_out
    assert "epoch " not in other_out  # the chief reports; the other worker prints only who it is


def test_only_the_chief_writes_the_run_dir(two_workers):
    out, results = two_workers
    chief, other = _pid(results[0][1]), _pid(results[1][1])
    events = [p.name for p in (out / "logs").rglob("events.out.tfevents.*")]
    assert events and all(f".{chief}." in name for name in events)  # TensorBoard: the chief's files only
    assert not any(f".{other}." in p.name for p in out.rglob("*"))  # no temporary file of the other worker either
    assert not (out / "backup").exists()


@pytest.fixture(scope="module")
def unreadable_runs(tmp_path_factory) -> list[tuple[Path, list[tuple[int, str, str]], object]]:
    """Two identical 2-worker runs with augmentation and dropout, one unreadable training image, a separate
    validation DATA_DIR; one epoch each."""
    root = tmp_path_factory.mktemp("mw-unreadable")
    train_data = make_data_dir(root / "train", n=33, n_classes=3, corrupt=1, seed=4)
    val_data = make_data_dir(root / "val", n=8, n_classes=3, seed=5, id_prefix="val")
    flags = ["--backbone", "xception", "--image-size", "75", "--batch-size", "8", "--weights", "none",
             "--frozen-epochs", "1", "--epochs", "1", "--val", str(val_data.root)]
    runs = []
    for name in ("first", "second"):
        out = root / name
        runs.append((out, _run_ok([str(train_data.root), "--out", str(out), *flags]), train_data))
    return runs


def test_an_unreadable_image_in_one_shard_gives_equal_steps_and_one_report(unreadable_runs):
    out, results, train_data = unreadable_runs[0]
    bad = train_data.corrupt_ids[0]
    chief_out = results[0][1]
    # 33 images: shards of 17 and 16 positions, 4 full batches of 4 each; the shard that lost its image read a
    # spare, so both workers ran the same 4 steps.
    assert re.search(r"^4/4 - ", chief_out, re.MULTILINE)
    everything = "".join(o + e for _, o, e in results)
    assert everything.count(f"skipped 1 unreadable training and 0 unreadable validation image(s): {bad}") == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["skipped_images"] == {"train": [bad], "val": []}


def test_two_runs_with_two_workers_are_identical(unreadable_runs):
    (first, _, _), (second, _, _) = unreadable_runs
    timing = ["seconds", "images_per_second"]
    pd.testing.assert_frame_equal(pd.read_csv(first / "history.csv").drop(columns=timing),
                                  pd.read_csv(second / "history.csv").drop(columns=timing))
    pd.testing.assert_frame_equal(pd.read_csv(first / "val_predictions.csv"),
                                  pd.read_csv(second / "val_predictions.csv"))
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (first, second))
    del m1["train_seconds"], m2["train_seconds"]
    assert m1 == m2


def _kill_after_first_epoch(procs: list[subprocess.Popen], out: Path, victim: int) -> tuple[int, str]:
    """SIGKILL worker `victim` once the chief has backed up epoch 1; returns the survivor's exit code and stderr."""
    ready = out / "backup" / "stage1" / "training_metadata.json"
    deadline = time.monotonic() + RUN_TIMEOUT
    while not ready.exists():
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        assert time.monotonic() < deadline, f"{ready} never appeared"
        time.sleep(0.2)
    procs[victim].send_signal(signal.SIGKILL)
    procs[victim].communicate()
    survivor = procs[1 - victim]
    try:
        _, err = survivor.communicate(timeout=DEATH_LIMIT)
    except subprocess.TimeoutExpired:
        survivor.kill()
        survivor.communicate()
        pytest.fail(f"worker {1 - victim} was still running {DEATH_LIMIT} s after worker {victim} died")
    return survivor.returncode, err


@pytest.mark.parametrize("victim", [1, 0], ids=["non-chief", "chief"])
def test_a_killed_worker_stops_the_other_and_a_rerun_resumes(data, two_workers, tmp_path, victim):
    reference, _ = two_workers
    out = tmp_path / "run"
    args = [str(data.root), "--out", str(out), *FLAGS]
    code, err = _kill_after_first_epoch(_start(args), out, victim)
    assert code != 0
    assert "error: " in err and "Run the same command on every worker again" in err
    assert pd.read_csv(out / "history.csv")["epoch"].tolist() == [1] and not (out / "metrics.json").exists()
    # The same command again; once with the chief starting 20 s after the other worker.
    results = _run_ok(args, delays=(20.0, 0.0) if victim == 1 else (0.0, 0.0))
    chief_out = results[0][1]
    assert "(resuming)" in chief_out and "epoch 1/2" not in chief_out and "epoch 2/2 stage 2" in chief_out
    assert {p.name for p in out.iterdir()} == RUN_FILES
    assert_same_numbers(out, reference)


def test_workers_with_different_arguments_fail_fast_naming_the_difference(data, tmp_path):
    out = tmp_path / "run"
    addresses = [f"127.0.0.1:{p}" for p in launch.free_ports(2)]
    procs = [
        subprocess.Popen([sys.executable, "-m", "train", str(data.root), "--out", str(out), *FLAGS, "--lr", lr],
                         cwd=REPO, env=launch.worker_env(addresses, k, base=_env()), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for k, lr in enumerate(("0.001", "0.01"))
    ]
    results = _finish(procs, timeout=300)
    for code, _, err in results:
        assert code == 2
        assert "the workers disagree, so none trains" in err and "--lr: worker 0 0.001, worker 1 0.01" in err
    assert not out.exists()  # nothing written


def test_the_rnn_head_trains_on_two_workers_and_its_run_dir_predicts_like_training(data, tmp_path):
    """Both heads keep working under the strategy: a 2-worker rnn run (one epoch) writes a complete RUN_DIR whose
    tagger, loaded by predict, gives the validation scores the chief recorded."""
    from crawl.manifest import read_data_dir
    from predict.inference import predict_ensemble
    from predict.runs import load_run

    flags = [*FLAGS, "--head", "rnn", "--rnn-units", "16", "--label-embedding", "8"]
    flags[flags.index("--epochs") + 1] = "1"
    out = tmp_path / "rnn"
    results = _run_ok([str(data.root), "--out", str(out), *flags])
    assert {p.name for p in out.iterdir()} == RUN_FILES
    assert json.loads((out / "config.json").read_text())["head"]["name"] == "rnn"
    assert "epoch 1/1 stage 1" in results[0][1] and "epoch " not in results[1][1]
    recorded = rundir.read_val_predictions(out)
    paths = {row.id: str(data.root / row.path) for row in read_data_dir(data.root).manifest.itertuples()}
    run = load_run(out)
    scores = predict_ensemble([run], [paths[i] for i in recorded["id"]], progress=False).probabilities
    assert abs(scores - recorded.drop(columns="id").to_numpy()).max() < 1e-5
