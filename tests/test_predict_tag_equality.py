"""`predict tag` against the rest of the pipeline: the same probabilities as `submit --format proba` on a DATA_DIR's
images (one run and a TTA ensemble, tuned tags equal to submit's flags), raw files of every format the crawl converts
equal to their crawled copies, and the rnn head."""

from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import Path

import keras
import numpy as np
import pytest

from crawl.crawler import CrawlConfig, crawl
from crawl.manifest import read_data_dir
from predict import Tagger
from predict.__main__ import main
from predict.submission import SubmitConfig, submit
from tests import crawl_samples as samples
from tests.http_server import static
from tests.predict_fixtures import conv_model, make_data_dir, make_run_dir, solid, textured, write_jpeg
from train import backbones as registry
from train import rundir
from train.data import load_image
from train.model import build_model
from train.preprocess import preprocess
from train.rnn_head import DecoderSpec

CLASSES = ["red_ish", "green_ish", "blue_ish"]


def _read_proba(path: Path) -> dict[str, np.ndarray]:
    """id (or path) -> probabilities, from a submit --format proba file or a tag CSV."""
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    key = "id" if "id" in rows[0] else "path"
    return {r[key]: np.array([float(r[c]) for c in CLASSES]) for r in rows if r.get("error", "") == ""}


def _tag_csv(argv: list, out: Path) -> dict[str, np.ndarray]:
    assert main(["tag", *(str(a) for a in argv), "--out", str(out), "--no-progress"]) == 0
    return _read_proba(out)


@pytest.mark.slow
def test_tag_equals_submit_proba_for_one_run_and_a_tta_ensemble(tmp_path, capsys):
    ids = [f"item{i}" for i in range(7)]
    data = make_data_dir(tmp_path / "data", {i: textured(seed=k, height=40 + 3 * k, width=70 - 2 * k)
                                            for k, i in enumerate(ids)})
    run_a = make_run_dir(tmp_path / "run_a", conv_model(32, seed=1), thresholds=[0.4, 0.5, 0.6])
    run_b = make_run_dir(tmp_path / "run_b", conv_model(28, seed=2), preprocessing="raw", thresholds=[0.6, 0.3, 0.5])
    paths = dict(zip(read_data_dir(data).manifest["id"], read_data_dir(data).image_paths(), strict=True))
    for runs, tta in (((run_a,), 1), ((run_a, run_b), 4)):
        sub = submit(SubmitConfig(runs=runs, data=data, out=tmp_path / "proba.csv", format="proba", tta=tta,
                                  progress=False))
        submitted = _read_proba(sub.out)
        tagged = _tag_csv([*runs, data / "images", "--tta", tta, "--batch-size", 3], tmp_path / "tags.csv")
        assert sorted(tagged) == sorted(str(p) for p in paths.values())
        for id_ in ids:
            np.testing.assert_allclose(tagged[str(paths[id_])], submitted[id_], rtol=0, atol=1.5e-6)
    # Tuned thresholds (averaged over the ensemble) give submit's flags.
    flags = submit(SubmitConfig(runs=(run_a, run_b), data=data, out=tmp_path / "flags.csv", format="csv", tta=4,
                                threshold="tuned", progress=False)).out
    by_id = {r["id"]: {c for c in CLASSES if r[c] == "1"} for r in csv.DictReader(io.StringIO(flags.read_text()))}
    results = Tagger.load([run_a, run_b], tta=4, threshold="tuned").tag([paths[i] for i in ids])
    assert [set(r.tags) for r in results] == [by_id[i] for i in ids]
    capsys.readouterr()


RAW_FILES = {  # file name -> bytes, formats the crawl converts (and one it stores as is)
    "alpha.png": samples.rgba_png,
    "photo.webp": samples.webp,
    "rotated.jpg": samples.exif_rotated_jpeg,
    "cmyk.jpg": samples.cmyk_jpeg,
    "gray.png": samples.gray_png,
    "gray16.png": samples.gray16_png,
    "plain.jpg": samples.jpeg,
}


def test_raw_files_tag_exactly_like_their_crawled_copies(tmp_path, http_server, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    lines = []
    for name, make in RAW_FILES.items():
        body = make()
        (raw / name).write_bytes(body)
        lines.append(f"{name.replace('.', '_')},{http_server.route('/' + name, static(body))}")
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n")
    crawl(CrawlConfig(list_path=tmp_path / "list.csv", out_dir=tmp_path / "data", workers=2, retries=0,
                      progress="off"))
    data = read_data_dir(tmp_path / "data")
    assert len(data.manifest) == len(RAW_FILES)
    run = make_run_dir(tmp_path / "run", conv_model(32, seed=4))
    submitted = _read_proba(submit(SubmitConfig(runs=(run,), data=tmp_path / "data", out=tmp_path / "p.csv",
                                                format="proba", progress=False)).out)
    tagged = _tag_csv([run, raw], tmp_path / "tags.csv")
    tagger = Tagger.load(run)
    crawled = tagger.predict_proba(data.image_paths())
    direct = tagger.predict_proba([raw / name for name in RAW_FILES])
    stored_ids = data.manifest["id"].tolist()
    for k, name in enumerate(RAW_FILES):
        id_ = name.replace(".", "_")
        np.testing.assert_allclose(tagged[str(raw / name)], submitted[id_], rtol=0, atol=1.5e-6, err_msg=name)
        np.testing.assert_array_equal(direct[k], crawled[stored_ids.index(id_)], err_msg=name)
    capsys.readouterr()


TINY = "tiny_tag_cnn"


def _tiny_cnn(include_top=False, weights=None, input_shape=None):
    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(6, 3, strides=2, activation="relu", name="conv")(inputs)
    return keras.Model(inputs, x, name=TINY)


@pytest.mark.slow
def test_the_rnn_head_tags_its_decoded_set_and_refuses_a_mixed_ensemble(tmp_path, capsys):
    keras.utils.set_random_seed(1)
    backbone = registry.Backbone(TINY, _tiny_cnn, min_input_size=8)
    model, _ = build_model(backbone, 3, image_size=32, weights="none", dropout=0.0, l2=0.0,
                           decoder=DecoderSpec(cell="gru", units=8, embedding_dim=4, allow_empty=True))
    dense = model.get_layer("decoder").token_logits
    kernel, bias = dense.get_weights()
    dense.set_weights([kernel * 8.0, np.random.default_rng(1).normal(size=bias.shape).astype(np.float32)])
    run = make_run_dir(tmp_path / "rnn", model)
    record = rundir.read_config(run)
    head = {"name": "rnn", "cell": "gru", "units": 8, "label_embedding": 4, "label_order": "frequent",
            "class_order": CLASSES, "allow_empty": True}
    rundir.write_config(run, dataclasses.replace(record, head=head))
    files = []
    for colour in ("red", "green", "blue", "white", "black", "yellow"):  # decoded sets that differ (seed 1)
        files.append(tmp_path / "photos" / f"{colour}.jpg")
        write_jpeg(files[-1], solid(colour))
    tagger = Tagger.load(run)
    results = tagger.tag(files)
    images = np.stack([preprocess(load_image(str(f), 32)[0][None], "inception")[0] for f in files])
    scores = np.asarray(model.predict(images, verbose=0), dtype=np.float64)
    np.testing.assert_allclose(tagger.predict_proba(files), scores, rtol=0, atol=1e-6)
    assert [set(r.tags) for r in results] == [{CLASSES[c] for c in np.flatnonzero(s >= 0.5)} for s in scores]
    assert len({r.tags for r in results}) > 1  # the decoder's sets vary with the image
    sigmoid = make_run_dir(tmp_path / "sigmoid", conv_model(32))
    assert main(["tag", str(sigmoid), str(run), str(files[0]), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"error: cannot ensemble runs of different heads: {sigmoid} (sigmoid head), {run} (rnn head)." in err
