"""The rnn head (--head rnn, train/rnn_head.py): label sequences, the score rule, greedy and beam decoding against a
plain-Python reference, both cells trained through both stages and reloaded in safe mode, the label order stored
and used, the label-leak test, predict on an rnn run, mixed-head ensembles refused, two replicas."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from crawl import manifest as mf
from predict.compare import CompareConfig, compare
from predict.errors import PredictError
from predict.evaluate import EvaluateConfig, evaluate
from predict.runs import load_run, load_runs
from predict.submission import SubmitConfig, submit
from tests.datagen import make_data_dir
from tests.predict_fixtures import conv_model, make_run_dir
from train import backbones as registry
from train import rundir
from train.__main__ import parse_args
from train.data import make_dataset
from train.fit import TrainingDiverged, load_split, train
from train.metrics import f2_samples, mean_average_precision
from train.model import build_model
from train.rnn_head import (
    BELOW_HALF,
    END,
    FIRST_CLASS,
    START,
    DecoderSpec,
    TagDecoder,
    class_order,
    label_sequences,
    with_beam,
)
from train.run_state import TrainingRun, run_dir_state

pytestmark = pytest.mark.filterwarnings("ignore:Your input ran out of data")

REPO = Path(__file__).resolve().parents[1]
TINY = "tiny_rnn_cnn"
SIZE = 32


def _tiny_cnn(include_top=False, weights=None, input_shape=None):
    """A 1x1-convolution colour detector with a BatchNormalization (so --weights none estimates statistics)."""
    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(12, 1, activation="relu", name="colours")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Conv2D(12, 3, padding="same", activation="relu", name="conv")(x)
    return keras.Model(inputs, x, name=TINY)


TINY_BACKBONE = registry.Backbone(TINY, _tiny_cnn, min_input_size=8)


def register_tiny_backbone() -> None:
    """Put the tiny backbone in the registry (also called by the subprocess of the two-replica test)."""
    registry.BACKBONES[TINY] = TINY_BACKBONE


def rnn_flags(cell: str, *extra: str) -> list[str]:
    return ["--backbone", TINY, "--image-size", str(SIZE), "--batch-size", "8", "--frozen-epochs", "1",
            "--epochs", "2", "--unfreeze", "1.0", "--weights", "none", "--val-split", "0.25", "--lr", "1e-2",
            "--finetune-lr", "3e-3", "--head", "rnn", "--rnn-cell", cell, "--rnn-units", "16",
            "--label-embedding", "8", "--augment", "flip", *extra]


@pytest.fixture(scope="module", autouse=True)
def tiny_backbone():
    register_tiny_backbone()
    yield
    registry.BACKBONES.pop(TINY, None)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """24 labelled images, 3 classes, every image with at least one label (end is then banned at step 1)."""
    return make_data_dir(tmp_path_factory.mktemp("rnn-data"), n=24, n_classes=3, seed=1, every_image_labelled=True)


@pytest.fixture(scope="module", params=["lstm", "gru"])
def rnn_run(request, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("rnn-runs") / request.param
    with contextlib.redirect_stdout(io.StringIO()):
        result = train(parse_args([str(data.root), "--out", str(out), *rnn_flags(request.param)]), verbose=0)
    return request.param, out, result


# --- a plain-Python reference of greedy decoding --------------------------------------------------------------------

def reference_greedy(tagger: keras.Model, images: np.ndarray) -> list[tuple[list[int], np.ndarray]]:
    """Eager, image by image: (emitted classes in emission order, p_max) under the rules of the issue."""
    decoder = tagger.get_layer("decoder")
    k = decoder.n_classes
    features = np.asarray(keras.Model(tagger.inputs[0], tagger.get_layer("dropout").output)(images))
    out = []
    for f in features:
        states = decoder.initial_states(f[None])
        token, sequence, p_max = START, [], np.zeros(k, np.float32)
        for step in range(k + 1):
            logits, states = decoder.step(np.array([token], "int32"), states)
            logits = np.asarray(logits)[0]
            p_max = np.maximum(p_max, np.asarray(keras.ops.softmax(logits[None]))[0, FIRST_CLASS:])
            allowed = np.ones(k + 3, bool)
            allowed[:2] = False
            allowed[[FIRST_CLASS + c for c in sequence]] = False
            allowed[END] = decoder.allow_empty or step > 0
            token = int(np.argmax(np.where(allowed, logits, -np.inf)))
            if token == END:
                break
            sequence.append(token - FIRST_CLASS)
        out.append((sequence, p_max))
    return out


def assert_scores_are_the_reference_decoding(tagger: keras.Model, images: np.ndarray) -> list[list[int]]:
    scores = np.asarray(tagger.predict(images, verbose=0))
    sequences = []
    for row, (sequence, p_max) in zip(scores, reference_greedy(tagger, images), strict=True):
        assert len(sequence) == len(set(sequence)), sequence  # no class twice
        assert set(np.flatnonzero(row >= 0.5)) == set(sequence)  # the 0.5 threshold is the decoded set
        emitted = np.isin(np.arange(len(row)), sequence)
        np.testing.assert_allclose(row, np.where(emitted, 0.5 + 0.5 * p_max, 0.5 * p_max), atol=2e-6)
        sequences.append(sequence)
    return sequences


def _tagger(k: int, cell: str, allow_empty: bool, seed: int = 0, end_bias: float | None = None) -> keras.Model:
    keras.utils.set_random_seed(seed)
    tagger, _ = build_model(TINY_BACKBONE, k, image_size=SIZE, weights="none", dropout=0.0, l2=0.0,
                            decoder=DecoderSpec(cell=cell, units=16, embedding_dim=8, allow_empty=allow_empty))
    dense = tagger.get_layer("decoder").token_logits
    kernel, bias = dense.get_weights()
    bias = np.random.default_rng(seed).normal(size=bias.shape).astype(np.float32)  # image-dependent, varied
    if end_bias is not None:
        bias[END] = end_bias
    dense.set_weights([kernel * 5.0, bias])
    return tagger


IMAGES = np.random.default_rng(0).uniform(-1, 1, (8, SIZE, SIZE, 3)).astype(np.float32)


# --- no training ----------------------------------------------------------------------------------------------------

def test_label_orders_and_sequences_ties_by_class_index():
    labels = np.array([[1, 1, 0, 0], [0, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 0]], np.float32)  # prevalence 1 3 1 2
    assert class_order(labels, "frequent").tolist() == [1, 3, 0, 2]
    assert class_order(labels, "rare").tolist() == [0, 2, 3, 1]
    assert class_order(labels, "index").tolist() == [0, 1, 2, 3]
    inputs, targets = label_sequences(labels, class_order(labels, "frequent"))
    c = FIRST_CLASS
    assert inputs.tolist() == [[START, c + 1, c + 0, 0, 0], [START, c + 1, c + 3, c + 2, 0],
                               [START, c + 1, c + 3, 0, 0], [START, 0, 0, 0, 0]]
    assert targets.tolist() == [[c + 1, c + 0, END, 0, 0], [c + 1, c + 3, c + 2, END, 0], [c + 1, c + 3, END, 0, 0],
                                [END, 0, 0, 0, 0]]


def test_scores_at_the_float32_edges_keep_the_half_threshold_exact():
    p = np.array([0.0, 1e-45, 0.3, 1 - 1e-7, np.nextafter(np.float32(1), np.float32(0)), 1.0, 1.0000001], np.float32)
    on = np.asarray(TagDecoder.scores(np.ones_like(p, bool), p))
    off = np.asarray(TagDecoder.scores(np.zeros_like(p, bool), p))
    assert on.dtype == off.dtype == np.float32
    assert (on >= 0.5).all() and (on <= 1).all() and (off < 0.5).all() and (off >= 0).all()
    assert (np.diff(on) >= 0).all() and (np.diff(off) >= 0).all()  # monotone in p_max
    assert on[0] == 0.5 and on[-1] == 1.0 and off[-1] == off[-2] == np.float32(BELOW_HALF) == np.float32(0.49999997)
    assert off[2] == np.float32(0.15) and on[2] == np.float32(0.65)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_greedy_decoding_is_the_reference_no_repeats_and_no_empty_set_when_banned(cell):
    for allow_empty in (False, True):
        sequences = assert_scores_are_the_reference_decoding(_tagger(4, cell, allow_empty), IMAGES)
        if not allow_empty:
            assert min(len(s) for s in sequences) >= 1
    # End always most likely: banned at step 1 -> exactly one class; allowed -> the empty set.
    assert ((_tagger(4, cell, False, end_bias=50.0).predict(IMAGES, verbose=0) >= 0.5).sum(1) == 1).all()
    assert (_tagger(4, cell, True, end_bias=50.0).predict(IMAGES, verbose=0) < 0.5).all()
    # End never likely: every class exactly once, then end is forced at step K+1.
    never_end = _tagger(4, cell, False, end_bias=-50.0)
    assert [len(s) for s in assert_scores_are_the_reference_decoding(never_end, IMAGES)] == [4] * len(IMAGES)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_beam_1_equals_greedy_bit_for_bit_and_wider_beams_give_valid_sets(cell):
    tagger = _tagger(4, cell, False)
    greedy = tagger.predict(IMAGES, verbose=0)
    np.testing.assert_array_equal(with_beam(tagger, 1).predict(IMAGES, verbose=0), greedy)
    for width in (2, 5):
        beam = with_beam(tagger, width).predict(IMAGES, verbose=0)
        assert ((beam >= 0.5).sum(1) >= 1).all() and (beam >= 0).all() and (beam <= 1).all()


def test_run_records_without_a_head_are_sigmoid_runs_and_rnn_records_round_trip(tmp_path):
    old = {"backbone": {"name": "x", "input_size": 75, "preprocessing": "inception", "min_input_size": 75},
           "image_size": 75, "classes": ["a", "b"], "train": {"lr": 0.001, "augment": ["flip"]},
           "versions": {}, "manifest_sha256": "0" * 64, "val_manifest_sha256": None, "class_prevalence": [0.5, 0.5],
           "n_train": 2, "n_val": 1, "runtime": {"replicas": 1, "mixed_precision": False}}
    record = rundir.record_from_json(old)
    assert record.head_name == "sigmoid" and "head" not in record.to_json()  # a sigmoid config.json is unchanged
    head = {"name": "rnn", "cell": "gru", "units": 8, "label_embedding": 4, "label_order": "rare",
            "class_order": ["b", "a"], "allow_empty": False}
    rnn = rundir.record_from_json({**old, "head": head})
    rundir.write_config(tmp_path, rnn)
    assert rundir.read_config(tmp_path) == rnn and json.loads((tmp_path / "config.json").read_text())["head"] == head
    with pytest.raises(rundir.RunDirError, match="missing key 'head.class_order'"):
        rundir.record_from_json({**old, "head": {k: v for k, v in head.items() if k != "class_order"}})
    with pytest.raises(rundir.RunDirError, match="'head.class_order' should list the classes"):
        rundir.record_from_json({**old, "head": {**head, "class_order": ["a", "a"]}})
    # A RUN_DIR written before the head settings existed resumes: an added setting at its default is no change.
    rundir.write_config(tmp_path, record)
    (tmp_path / "history.csv").write_text("epoch\n1\n")
    new_train = {**old["train"], "head": "sigmoid", "rnn_cell": "lstm", "rnn_units": 512, "label_embedding": 64,
                 "label_order": "frequent"}
    assert run_dir_state(tmp_path, dataclasses.replace(record, train=new_train)) == "resume"
    with pytest.raises(rundir.RunDirError, match="head: 'sigmoid' -> 'rnn'"):
        run_dir_state(tmp_path, dataclasses.replace(record, train={**new_train, "head": "rnn"}))


def test_train_cli_flags_and_their_checks(tmp_path):
    config = parse_args([str(tmp_path), "--backbone", "xception", "--out", str(tmp_path / "r")])
    assert (config.head, config.rnn_cell, config.rnn_units, config.label_embedding, config.label_order) == (
        "sigmoid", "lstm", 512, 64, "frequent")
    from train.config import ConfigError

    bad = parse_args([str(tmp_path), "--backbone", "xception", "--out", "r", "--head", "rnn", "--rnn-units", "0"])
    with pytest.raises(ConfigError, match="--rnn-units must be at least 1, got 0"):
        bad.resolve()


# --- trained runs ---------------------------------------------------------------------------------------------------

def _val_images(out: Path, data) -> tuple[list[str], np.ndarray]:
    ids = pd.read_csv(out / "val_predictions.csv", dtype={"id": str})["id"].tolist()
    paths = [str(data.root / "images" / f"{i}.jpg") for i in ids]
    ds = make_dataset(paths, None, image_size=SIZE, preprocessing="inception", batch_size=8, training=False)
    return ids, np.concatenate([np.asarray(b) for b in ds])


def test_both_cells_train_both_stages_save_and_load_in_safe_mode_with_equal_predictions(rnn_run, data):
    cell, out, result = rnn_run
    history = pd.read_csv(out / "history.csv")
    assert history["stage"].tolist() == [1, 2] and history["lr"].tolist() == [1e-2, 3e-3]
    assert np.isfinite(history["loss"]).all() and result.best_epoch in (1, 2)
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["head"] == "rnn" and config["head"]["cell"] == cell and config["head"]["units"] == 16
    assert config["head"]["allow_empty"] is False  # every training image has a label
    model = keras.saving.load_model(out / "model.keras")  # safe mode
    decoder = model.get_layer("decoder")
    assert isinstance(decoder, TagDecoder) and decoder.cell_type == cell and decoder.beam_width == 1
    assert [i.name for i in model.inputs] == ["image"] and model.output_shape == (None, 3)
    assert not any(isinstance(layer, keras.layers.Lambda) for layer in model.layers)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["params"] == model.count_params()
    ids, images = _val_images(out, data)
    stored = pd.read_csv(out / "val_predictions.csv", dtype={"id": str})[data.classes].to_numpy()
    scores = model.predict(images, verbose=0)
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, stored, atol=1e-6)  # what training validated is what the file predicts
    truth = data.labels[[data.ids.index(i) for i in ids]]
    assert metrics["val_map"] == pytest.approx(mean_average_precision(truth, stored), abs=1e-9)
    assert metrics["f2_at_0.5"] == pytest.approx(f2_samples(truth, stored >= 0.5))
    sequences = assert_scores_are_the_reference_decoding(model, images)  # threshold 0.5 = the decoded set
    assert min(len(s) for s in sequences) >= 1  # never empty: end is banned at step 1


def test_the_label_order_is_stored_and_used(rnn_run, data, tmp_path):
    _, out, _ = rnn_run
    config = json.loads((out / "config.json").read_text())
    split = load_split(parse_args([str(data.root), "--out", str(out), *rnn_flags("lstm")]).resolve())
    expected = [split.classes[i] for i in class_order(split.train_labels, "frequent")]
    assert config["head"]["label_order"] == "frequent" and config["head"]["class_order"] == expected
    rare = class_order(split.train_labels, "rare")
    assert rare.tolist() != class_order(split.train_labels, "frequent").tolist()
    # The training batches of a --label-order rare run: each row is a training image's classes in rare order.
    cfg = parse_args([str(data.root), "--out", str(tmp_path / "rare"), *rnn_flags("lstm", "--label-order", "rare")])
    run = TrainingRun(cfg.resolve(), split, tf.distribute.get_strategy(), verbose=0)
    assert run.class_order.tolist() == rare.tolist()
    rank = {FIRST_CLASS + int(c): r for r, c in enumerate(rare)}
    label_sets = {frozenset(np.flatnonzero(row).tolist()) for row in split.train_labels}
    rows = 0
    for inputs, targets in run.train_ds:
        assert set(inputs) == {"image", "tokens"} and inputs["image"].shape[1:] == (SIZE, SIZE, 3)
        for tokens, target in zip(inputs["tokens"].numpy(), targets.numpy(), strict=True):
            n = int((target >= FIRST_CLASS).sum())
            assert tokens[0] == START and (tokens[1:n + 1] == target[:n]).all() and target[n] == END
            assert [rank[t] for t in target[:n]] == sorted(rank[t] for t in target[:n])
            assert frozenset(int(t) - FIRST_CLASS for t in target[:n]) in label_sets
            rows += 1
    assert rows == 16  # 18 training images, all readable: two batches of 8, the remainder dropped


def _relabelled_copy(data, root: Path) -> Path:
    """The same images with the label rows shuffled: another labels file for the very same pictures."""
    shutil.copytree(data.root, root)
    stored = mf.read_data_dir(root).manifest
    labels = data.labels[np.random.default_rng(5).permutation(len(data.labels))].astype(int)
    assert not np.array_equal(labels, data.labels)
    rows = [mf.ManifestRow.of_file((root / r["path"]).read_bytes(), id=r["id"], path=r["path"], url=r["url"],
                                   width=int(r["width"]), height=int(r["height"]), labels=tuple(lab))
            for (_, r), lab in zip(stored.iterrows(), labels, strict=True)]
    mf.write_data_dir(root, classes=data.classes, entries=rows, stored=rows)
    return root


def test_the_inference_graph_never_sees_labels(rnn_run, data, tmp_path):
    _, out, _ = rnn_run
    other = _relabelled_copy(data, tmp_path / "relabelled")
    files = []
    for name, root in (("a", data.root), ("b", other)):
        files.append(submit(SubmitConfig(runs=(out,), data=root, out=tmp_path / f"{name}.csv", format="proba",
                                         progress=False)).out.read_text())
    assert files[0] == files[1]  # same images, different labels files: the same predictions
    reports = [evaluate(EvaluateConfig(runs=(out,), data=root, progress=False)) for root in (data.root, other)]
    assert reports[0]["map"] != reports[1]["map"]  # while the labels did differ


def test_predict_submit_evaluate_and_compare_on_an_rnn_run(rnn_run, data, tmp_path):
    _, out, _ = rnn_run
    paths = [str(data.root / "images" / f"{i}.jpg") for i in data.ids]
    ds = make_dataset(paths, None, image_size=SIZE, preprocessing="inception", batch_size=8, training=False)
    model = load_run(out).model
    scores = model.predict(ds, verbose=0).astype(np.float64)
    thresholds = np.array([json.loads((out / "metrics.json").read_text())["thresholds"][c] for c in data.classes])
    for threshold, cut in (("0.5", np.full(3, 0.5)), ("tuned", thresholds)):
        report = evaluate(EvaluateConfig(runs=(out,), data=data.root, threshold=threshold, progress=False))
        assert report["map"] == pytest.approx(mean_average_precision(data.labels, scores), abs=1e-6)
        assert report["f2"] == pytest.approx(f2_samples(data.labels, scores >= cut)), threshold
        assert report["beam"] == 1
    result = submit(SubmitConfig(runs=(out,), data=data.root, out=tmp_path / "s.csv", format="csv", progress=False))
    written = pd.read_csv(result.out, dtype={"id": str})
    assert written["id"].tolist() == data.ids
    np.testing.assert_array_equal(written[data.classes].to_numpy(), (scores >= 0.5).astype(int))
    assert (written[data.classes].sum(axis=1) >= 1).all()
    # --beam 1 is greedy; --beam 2 decodes and reports its width.
    beam2 = evaluate(EvaluateConfig(runs=(out,), data=data.root, beam=2, progress=False))
    assert beam2["beam"] == 2 and 0 <= beam2["map"] <= 1
    table = compare(CompareConfig(runs=(out,), data=data.root, tta=2, out=tmp_path / "cmp", progress=False)).table
    assert table["map"].iloc[0] == pytest.approx(mean_average_precision(data.labels, scores), abs=1e-6)


def test_an_ensemble_of_different_heads_is_refused_naming_the_runs_and_heads(rnn_run, data, tmp_path):
    _, out, _ = rnn_run
    sigmoid = make_run_dir(tmp_path / "sigmoid-run", conv_model(SIZE, n_classes=3), classes=data.classes)
    with pytest.raises(PredictError) as err:
        load_runs([sigmoid, out])
    assert f"{sigmoid} (sigmoid head)" in str(err.value) and f"{out} (rnn head)" in str(err.value)
    with pytest.raises(PredictError, match="--beam 2: .* is a sigmoid-head run"):
        evaluate(EvaluateConfig(runs=(sigmoid,), data=data.root, beam=2, progress=False))
    assert len(load_runs([out, out])) == 2  # two rnn runs ensemble


def _train_cli(argv: list[str]) -> subprocess.Popen:
    """`python -m train argv` in a subprocess, with the tiny backbone registered first."""
    code = ("import sys; from tests.test_rnn_head import register_tiny_backbone; register_tiny_backbone(); "
            f"from train.__main__ import main; sys.exit(main({argv!r}))")
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow  # the replica mechanism is head-independent; the sigmoid head's fast test covers it in `make test`
def test_two_replicas_train_the_rnn_head(data, tmp_path):
    out = tmp_path / "run"
    proc = _train_cli([str(data.root), "--out", str(out), *rnn_flags("gru"), "--epochs", "1", "--devices", "2"])
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "2 replica(s), global batch 8" in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["runtime"]["replicas"] == 2 and config["head"]["cell"] == "gru"
    _, images = _val_images(out, data)
    stored = pd.read_csv(out / "val_predictions.csv", dtype={"id": str})[data.classes].to_numpy()
    np.testing.assert_allclose(keras.saving.load_model(out / "model.keras").predict(images, verbose=0), stored,
                               atol=1e-6)


@pytest.mark.slow  # as for the replicas: the sigmoid head's kill -9 test is in `make test`
@pytest.mark.parametrize("rnn_run", ["lstm"], indirect=True)  # one cell: the resume mechanism is head-independent
def test_resume_after_kill_ends_like_an_uninterrupted_run(rnn_run, data, tmp_path):
    from tests.test_train import _kill_when, assert_same_numbers

    cell, reference, _ = rnn_run
    out = tmp_path / "run"
    argv = [str(data.root), "--out", str(out), *rnn_flags(cell)]
    _kill_when(_train_cli(argv), out / "backup" / "stage1" / "training_metadata.json")
    assert not (out / "metrics.json").exists()
    proc = _train_cli(argv)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "(resuming)" in stdout and "epoch 1/2" not in stdout and "epoch 2/2 stage 2" in stdout
    assert_same_numbers(out, reference)


def test_mixed_precision_keeps_logits_and_scores_float32_and_scales_the_loss(tmp_path):
    from train.rnn_head import sequence_loss, training_model

    previous = keras.mixed_precision.global_policy()
    try:
        keras.mixed_precision.set_global_policy("mixed_float16")
        tagger = _tagger(3, "lstm", False)
        trainer = training_model(tagger)
        trainer.compile(keras.optimizers.Adam(1e-3, clipnorm=1.0), sequence_loss())
        assert isinstance(trainer.optimizer, keras.optimizers.LossScaleOptimizer)
        assert tagger.get_layer("decoder").init_h.compute_dtype == "float16"
        labels = np.array([[1, 0, 1], [0, 1, 0]] * 4, np.float32)
        inputs, targets = label_sequences(labels, class_order(labels, "frequent"))
        logits = trainer({"image": IMAGES, "tokens": inputs})
        assert logits.dtype == "float32" and tuple(logits.shape) == (8, 4, 6)
        history = trainer.fit({"image": IMAGES, "tokens": inputs}, targets, epochs=1, batch_size=4, verbose=0)
        assert np.isfinite(history.history["loss"][0])
        scores = tagger.predict(IMAGES, verbose=0)
        assert scores.dtype == np.float32 and ((scores >= 0.5).sum(1) >= 1).all()
        rundir.save_model(tagger, tmp_path)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    # Reloaded in a float32 process, the tagger keeps its policy and its scores.
    np.testing.assert_array_equal(keras.saving.load_model(tmp_path / "model.keras").predict(IMAGES, verbose=0), scores)


class InjectNaN(keras.callbacks.Callback):
    """Turns the decoder's token kernel into NaN at the start of the second epoch (the fitted model is the
    teacher-forcing model, which holds the same decoder layer as the tagger)."""

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1:
            kernel = self.model.get_layer("decoder").token_logits.kernel
            kernel.assign(np.full(kernel.shape, np.nan, np.float32))


def test_a_nan_loss_stops_an_rnn_run_and_keeps_the_best_tagger(data, tmp_path):
    out = tmp_path / "run"
    printed = io.StringIO()
    stopped = r"loss became nan in epoch 2, batch 1.*best model so far \(epoch 1"
    diverged = pytest.raises(TrainingDiverged, match=stopped)
    with contextlib.redirect_stdout(printed), diverged:
        train(parse_args([str(data.root), "--out", str(out), *rnn_flags("gru")]), verbose=0, callbacks=[InjectNaN()])
    # --weights none: the tiny backbone's one BatchNormalization got the statistics of the 18 training images.
    assert "BatchNormalization statistics of 1 layers estimated on 18 training images" in printed.getvalue()
    assert pd.read_csv(out / rundir.HISTORY_FILE)["epoch"].tolist() == [1]
    metrics = rundir.read_metrics(out)
    assert metrics["best_epoch"] == 1 and "nan" in metrics["stopped_early"]
    scores = load_run(out).model.predict(IMAGES, verbose=0)
    assert np.isfinite(scores).all() and ((scores >= 0) & (scores <= 1)).all()
