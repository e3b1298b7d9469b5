"""The demo: its generated data, its local server (stopped however the demo ends), its crawl step and its reuse,
and (slow) a cut-down `make demo` end to end whose figures are checked against the data and the runs.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score

from crawl.manifest import read_data_dir
from demo import __main__ as demo_main
from demo.__main__ import DemoConfig, chance_map
from demo.generate import CLASSES, DemoDataConfig, _sample_labels, generate
from demo.serve import serve_directory

REPO = Path(__file__).resolve().parents[1]


def test_generated_lists_are_jd_format_with_learnable_multilabel_rows(tmp_path):
    paths = generate(DemoDataConfig(out=tmp_path, n_train=30, n_test=10, seed=3))
    train_rows = list(csv.reader(paths["train_list"].open()))
    test_rows = list(csv.reader(paths["test_list"].open()))
    assert len(train_rows) == 30 + 3  # three broken entries: a 404, a corrupt JPEG, an HTML page
    assert all(len(r) == 2 + len(CLASSES) for r in train_rows)
    assert all(len(r) == 2 for r in test_rows) and len(test_rows) == 10
    flags = np.array([[int(v) for v in r[2:]] for r in train_rows[:30]])
    assert set(np.unique(flags)) == {0, 1}
    assert (flags.sum(axis=1) >= 2).all()  # several labels true per image: garment type and colour at least
    assert paths["classes"].read_text().split() == CLASSES
    sizes = [cv2.imread(str(p)).shape[:2] for p in (tmp_path / "images").glob("train_*.jpg")]
    assert len(sizes) == 30 and all(300 <= h <= 800 and 300 <= w <= 800 for h, w in sizes)


def test_generation_is_deterministic_and_reuses_drawn_images(tmp_path):
    a = generate(DemoDataConfig(out=tmp_path / "a", n_train=8, n_test=2, seed=1))
    b = generate(DemoDataConfig(out=tmp_path / "b", n_train=8, n_test=2, seed=1))
    assert a["train_list"].read_text() == b["train_list"].read_text()
    first = (tmp_path / "a" / "images" / "train_00003.jpg").read_bytes()
    assert first == (tmp_path / "b" / "images" / "train_00003.jpg").read_bytes()
    again = generate(DemoDataConfig(out=tmp_path / "a", n_train=8, n_test=2, seed=1))  # a second run reuses files
    assert again["train_list"].read_text() == a["train_list"].read_text()


def test_every_label_sample_has_one_garment_and_one_colour():
    rng = np.random.default_rng(0)
    for _ in range(200):
        labels = _sample_labels(rng)
        assert sum(labels[c] for c in ("top", "dress", "trousers")) == 1
        assert sum(labels[c] for c in ("red", "blue", "green", "yellow")) == 1
        assert labels["long_sleeves"] + labels["short_sleeves"] == (0 if labels["trousers"] else 1)


def _refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def _server_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "demo-image-server"]


def _port(base_url: str) -> int:
    return int(base_url.rsplit(":", 1)[1])


def test_server_serves_the_folder_and_stops_on_exit(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with serve_directory(tmp_path) as base_url:
        assert base_url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(f"{base_url}/images/a.jpg", timeout=30) as response:
            assert response.read() == b"\xff\xd8 not really a jpeg"
        assert len(_server_threads()) == 1
    assert _refuses_connections(_port(base_url))
    assert _server_threads() == []


@pytest.mark.parametrize("error", [RuntimeError("a crawl step failed"), KeyboardInterrupt()])
def test_server_stops_when_the_demo_fails_or_is_interrupted(tmp_path, error):
    ports = []

    def failing_step():
        with serve_directory(tmp_path) as base_url:
            ports.append(_port(base_url))
            assert not _refuses_connections(ports[0])  # serving until the error
            raise error

    with pytest.raises(type(error)):
        failing_step()
    assert _refuses_connections(ports[0])
    assert _server_threads() == []


@pytest.fixture(scope="module")
def crawled(tmp_path_factory):
    """The demo's generate and crawl steps on 8 training and 4 test images; returns (config, lists, dirs, output)."""
    out = tmp_path_factory.mktemp("demo-crawl")
    config = DemoConfig(out=out, n_train=8, n_test=4, progress=False)
    lists = generate(DemoDataConfig(out=out / "generated", n_train=8, n_test=4, seed=0))
    return config, lists, demo_main._crawl_all(config, lists)


def _flags(list_path: Path) -> tuple[list[str], np.ndarray]:
    rows = list(csv.reader(list_path.open()))
    return [r[0] for r in rows], np.array([[int(v) for v in r[2:]] for r in rows])


def _stats(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Every file under `folder`: (inode, mtime in ns, size), which any rewrite changes (atomic writes rename)."""
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_crawl_step_makes_the_three_data_dirs(crawled):
    config, lists, dirs = crawled
    assert dirs == {name: config.out / "data" / name for name in ("train", "test", "test_labelled")}
    train = read_data_dir(dirs["train"])
    ids, flags = _flags(lists["train_list"])
    assert list(train.manifest["id"]) == ids[:8] and train.classes == CLASSES
    np.testing.assert_array_equal(train.labels(), flags[:8])
    assert dict(zip(train.failed["id"], train.failed["reason"], strict=True)) == {
        "broken_404": "http_404", "broken_corrupt": "corrupt", "broken_html": "not_image"}
    labelled = read_data_dir(dirs["test_labelled"])
    test_ids, test_flags = _flags(lists["test_labels"])
    assert list(labelled.manifest["id"]) == test_ids and len(test_ids) == 4
    np.testing.assert_array_equal(labelled.labels(), test_flags)
    test = read_data_dir(dirs["test"])
    assert list(test.manifest["id"]) == test_ids and not test.labelled
    for data in (train, labelled, test):  # the crawled bytes are the generated files, unchanged
        for image_id, path in zip(data.manifest["id"], data.image_paths(), strict=True):
            assert Path(path).read_bytes() == (config.out / "generated" / "images" / f"{image_id}.jpg").read_bytes()


def test_finished_crawls_are_reused_without_a_server_and_an_unfinished_one_is_redone(crawled, monkeypatch, capsys):
    config, lists, dirs = crawled
    before = {name: _stats(d) for name, d in dirs.items()}

    def no_server(root):
        raise AssertionError("a server was started although every crawl was finished")

    monkeypatch.setattr(demo_main, "serve_directory", no_server)
    assert demo_main._crawl_all(config, lists) == dirs
    assert {name: _stats(d) for name, d in dirs.items()} == before  # not one file rewritten
    out = capsys.readouterr().out
    assert all(f"{dirs[name]}: already crawled, reused" in out for name in dirs)

    summary_path = dirs["test"] / "crawl.json"
    summary = json.loads(summary_path.read_text())
    summary_path.write_text(json.dumps({**summary, "status": "interrupted"}))  # as a Ctrl-C'd crawl leaves it
    monkeypatch.setattr(demo_main, "serve_directory", serve_directory)
    demo_main._crawl_all(config, lists)
    out = capsys.readouterr().out
    assert f"{dirs['test']}: unfinished crawl from an earlier run, crawling again" in out
    assert json.loads(summary_path.read_text())["status"] == "completed"
    assert {name: _stats(dirs[name]) for name in ("train", "test_labelled")} == {
        name: before[name] for name in ("train", "test_labelled")}
    assert _stats(dirs["test"])["manifest.csv"] != before["test"]["manifest.csv"]


def test_chance_level_is_the_mean_prevalence_of_the_classes_present(crawled):
    _, lists, dirs = crawled
    _, flags = _flags(lists["test_labels"])
    prevalence = flags.mean(axis=0)
    assert (prevalence == 0).any()  # 4 images leave some classes without a positive: they must not count
    assert chance_map(dirs["test_labelled"]) == pytest.approx(prevalence[prevalence > 0].mean(), rel=1e-12)


def _mean_ap(labels: np.ndarray, scores: np.ndarray) -> float:
    keep = labels.sum(axis=0) > 0
    return float(average_precision_score(labels[:, keep], scores[:, keep], average="macro"))


@pytest.mark.slow
@pytest.mark.timeout(3600)  # two demo runs, each bounded below; pytest.ini's 600 s is for single steps
def test_cut_down_demo_end_to_end(tmp_path):
    from predict.inference import predict_ensemble
    from predict.runs import load_run

    out, submission = tmp_path / "demo", tmp_path / "submissions" / "demo_jd.csv"
    cmd = [sys.executable, "-m", "demo", "--out", str(out), "--submission", str(submission), "--n-train", "48",
           "--n-test", "12", "--backbones", "xception", "--epochs", "2", "--frozen-epochs", "1", "--image-size", "75"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = done.stdout
    assert [line.split("]")[0] for line in text.splitlines() if line.startswith("[")] == [
        "[1/6", "[2/6", "[3/6", "[4/6", "[5/6", "[6/6"]
    assert "2 replica(s)" in text  # MirroredStrategy over two logical CPU devices
    assert "BatchNormalization statistics of" in text  # random weights: BN estimated on the training images
    assert "oneDNN" not in done.stderr and "absl::InitializeLog" not in done.stderr

    train = read_data_dir(out / "data" / "train")
    assert len(train.manifest) == 48
    assert sorted(train.failed["reason"]) == ["corrupt", "http_404", "not_image"]
    run = out / "runs" / "xception"
    metrics = json.loads((run / "metrics.json").read_text())
    history = pd.read_csv(run / "history.csv", float_precision="round_trip")
    assert len(history) == 2 and metrics["best_epoch"] in (1, 2)

    # No train/serve skew: predict's code on the saved model reproduces training's validation probabilities.
    val = pd.read_csv(run / "val_predictions.csv", dtype={"id": str})
    path_of = dict(zip(train.manifest["id"], train.image_paths(), strict=True))
    loaded = load_run(run)
    predicted = predict_ensemble([loaded], [path_of[i] for i in val["id"]], ids=list(val["id"]), tta=1,
                                 progress=False)
    np.testing.assert_allclose(predicted.probabilities, val[CLASSES].to_numpy(), rtol=0, atol=2e-5)

    # The comparison's mAPs are the mAPs of the run's predictions on the labelled test crawl (sklearn's AP).
    table = pd.read_csv(out / "compare" / "compare.csv", float_precision="round_trip")
    assert list(table["run"]) == ["xception"] and list(table["backbone"]) == ["xception"]
    labelled = read_data_dir(out / "data" / "test_labelled")
    for column, tta in (("map", 1), ("map_tta", 4)):
        scores = predict_ensemble([loaded], labelled.image_paths(), tta=tta, progress=False).probabilities
        assert table[column][0] == pytest.approx(_mean_ap(labelled.labels(), scores), abs=1e-6), column
    # The chance level is the mean prevalence of the present classes in the generated test labels, as printed.
    _, flags = _flags(out / "generated" / "test_labels.csv")
    prevalence = flags.mean(axis=0)
    chance = float(prevalence[prevalence > 0].mean())
    assert f"what a random scorer's mAP is about): {chance:.3f}\n" in text
    assert f"  xception: mAP {table['map'][0]:.3f} = {table['map'][0] / chance:.1f} x chance" in text
    assert "| xception | xception | 75 |" in (out / "compare" / "compare.md").read_text()
    assert (out / "compare" / "compare.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    # The submission: one headerless row per test id in list order, 13 flags of 0/1, p >= 0.5 with 4 TTA views.
    rows = list(csv.reader(submission.open()))
    test_ids = [r[0] for r in csv.reader((out / "generated" / "test.csv").open())]
    assert [r[0] for r in rows] == test_ids
    assert all(len(r) == 1 + len(CLASSES) and set(r[1:]) <= {"0", "1"} for r in rows)
    test = read_data_dir(out / "data" / "test")
    assert list(test.manifest["id"]) == test_ids
    probabilities = predict_ensemble([loaded], test.image_paths(), tta=4, progress=False).probabilities
    flags = np.array([[int(v) for v in r[1:]] for r in rows])
    clear = np.abs(probabilities - 0.5) > 1e-5
    np.testing.assert_array_equal(flags[clear], (probabilities >= 0.5).astype(int)[clear])

    # A second run reuses the drawn images, the crawls and the trained run: not one of their files is rewritten.
    def reused() -> dict:
        drawn = {k: v for k, v in _stats(out / "generated" / "images").items() if k.startswith(("train_", "test_"))}
        return {"data": _stats(out / "data"), "run": _stats(run), "drawn": drawn}

    before = reused()
    assert len(before["drawn"]) == 48 + 12
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("already crawled, reused") == 3 and "nothing to do" in again.stdout
    assert reused() == before
    assert list(csv.reader(submission.open())) == rows
    again_table = pd.read_csv(out / "compare" / "compare.csv", float_precision="round_trip")
    assert list(again_table["map"]) == list(table["map"]) and list(again_table["map_tta"]) == list(table["map_tta"])
