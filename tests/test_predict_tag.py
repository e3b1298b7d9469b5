"""`python -m predict tag` and `predict.Tagger`: RUN_DIRs told from inputs, folder recursion and order, symlinks that
leave the folder, stdin, each output format to the byte, unreadable files, thresholds and top-k, ensembles, exit
codes and messages, the API on paths and arrays, and the README's Tagger example run as written."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from predict import Tagger, TagResult
from predict.__main__ import main, parse_args
from predict.errors import PredictError
from predict.tag_inputs import (
    ImageInput,
    TagUsageError,
    expand_inputs,
    find_images,
    image_extensions,
    split_runs_and_inputs,
)
from predict.tag_output import choose_tags
from predict.tagger import TagConfig, tag
from tests.crawl_samples import truncated_jpeg
from tests.predict_fixtures import CLASSES, conv_model, detector_model, expected_probabilities, make_run_dir, solid
from tests.predict_fixtures import write_jpeg as jpeg

REPO = Path(__file__).resolve().parents[1]

# Run A and run B: different input sizes and preprocessing, known outputs (see tests/predict_fixtures.py).
OFF_A, ON_A = [0.1, 0.25, 0.4], [0.9, 0.8, 0.65]
OFF_B, ON_B = [0.3, 0.05, 0.2], [0.7, 0.95, 0.6]
TUNED_A, TUNED_B = [0.15, 0.1, 0.7], [0.35, 0.3, 0.8]  # averaged: 0.25, 0.2, 0.75 (no probability on a cut)

# The folder `photos`: relative path -> colour (None: not an image, under an image name).
PHOTOS = {
    "b.jpg": "red",
    "a/z.png": "green",
    "a/B.JPG": "blue",
    "a/deeper/c.webp": "yellow",
    "a b/x.jpeg": "magenta",
    "a/notes.txt": None,  # not an image extension: not an input
    "a/page.jpg": None,  # an HTML page named .jpg: a not_image row
}
# Sorted by path inside the folder, component by component.
ORDER = ["a/B.JPG", "a/deeper/c.webp", "a/page.jpg", "a/z.png", "a b/x.jpeg", "b.jpg"]


def _write_image(path: Path, colour: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        jpeg(path, solid(colour))
    else:
        Image.fromarray(solid(colour)).save(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("tag")
    photos = root / "photos"
    for rel, colour in PHOTOS.items():
        if colour is None:
            (photos / rel).parent.mkdir(parents=True, exist_ok=True)
            (photos / rel).write_text("<html>not an image</html>")
        else:
            _write_image(photos / rel, colour)
    run_a = make_run_dir(root / "run_a", detector_model(24, OFF_A, ON_A), thresholds=TUNED_A)
    run_b = make_run_dir(root / "run_b", detector_model(20, OFF_B, ON_B, preprocessing="raw"), preprocessing="raw",
                         thresholds=TUNED_B)
    return dict(root=root, photos=photos, a=run_a, b=run_b)


@pytest.fixture(scope="module")
def tagger_a(world):
    """Run A loaded once; tests change options with `with_options` (no reload)."""
    return Tagger.load(world["a"])


def _expected(rels, off=OFF_A, on=ON_A) -> dict[str, np.ndarray]:
    """Probabilities per image path, from the colours alone."""
    return {r: expected_probabilities([PHOTOS[r]], off, on)[0] for r in rels}


def _tags(p: np.ndarray, cut) -> list[str]:
    """Names of classes with p >= cut, most probable first (computed here, not by the code under test)."""
    chosen = [(-p[k], k) for k in range(len(CLASSES)) if p[k] >= np.broadcast_to(cut, p.shape)[k]]
    return [CLASSES[k] for _, k in sorted(chosen)]


def _run(argv, capsys, stdin: str | None = None, monkeypatch=None) -> tuple[int, str, str]:
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- inputs: no model needed ------------------------------------------------------------------------------------------

def test_runs_are_the_leading_folders_with_a_config_and_usage_errors_name_the_problem(world, capsys):
    a, b, photos = str(world["a"]), str(world["b"]), str(world["photos"])
    assert split_runs_and_inputs([a, b, photos, "x.jpg", "-"]) == ([a, b], [photos, "x.jpg", "-"])
    for args, message in (
        ([photos, a], f"no RUN_DIR given: the first arguments must be run folders written by python -m train "
                      f"({photos} has no config.json)"),
        ([a], "no INPUT given: name image files, folders, or - to read paths from standard input"),
        ([a, photos, b], f"{b} is a RUN_DIR after the first INPUT ({photos}); give every RUN_DIR first"),
        ([a, "-", "-"], "- (standard input) can be given once"),
    ):
        with pytest.raises(TagUsageError) as err:
            split_runs_and_inputs(args)
        assert str(err.value) == message
        with pytest.raises(SystemExit) as exit_:
            parse_args(["tag", *args])
        assert exit_.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1] == f"python -m predict tag: error: {message}"


def test_folders_are_searched_recursively_in_sorted_order_for_the_crawls_formats(world):
    photos = world["photos"]
    rows = find_images(photos)
    assert [r.path for r in rows] == [str(photos / r) for r in ORDER]
    assert all(r.error is None for r in rows)
    assert {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"} <= image_extensions()
    assert ".txt" not in image_extensions()
    # Named files are inputs whatever their name; folders expand in place; order is the arguments' order.
    named = expand_inputs([str(photos / "a/notes.txt"), str(photos / "a/deeper")])
    assert [r.path for r in named] == [str(photos / "a/notes.txt"), str(photos / "a/deeper/c.webp")]


def test_symlinks_never_lead_out_of_the_named_folder(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    jpeg(outside / "secret.jpg", solid("red"))
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    jpeg(folder / "sub" / "inside.jpg", solid("blue"))
    os.symlink(outside / "secret.jpg", folder / "link.jpg")  # a file outside
    os.symlink(outside, folder / "escape")  # a folder outside
    os.symlink(folder / "sub" / "inside.jpg", folder / "alias.jpg")  # inside: followed
    os.symlink(folder, folder / "sub" / "loop")  # a loop back to the top: searched once
    rows = find_images(folder)
    assert [(r.path, r.error) for r in rows] == [
        (str(folder / "alias.jpg"), None),
        (str(folder / "escape"), "outside_folder"),
        (str(folder / "link.jpg"), "outside_folder"),
        (str(folder / "sub" / "inside.jpg"), None),
    ]
    assert rows[2].detail == f"a symlink to {outside / 'secret.jpg'}"


def test_choose_tags_threshold_then_top_k_most_probable_first_ties_in_class_order():
    p = np.array([0.5, 0.9, 0.2, 0.9])
    assert choose_tags(p, np.full(4, 0.5), None) == [1, 3, 0]
    assert choose_tags(p, np.full(4, 0.5), 2) == [1, 3]
    assert choose_tags(p, np.full(4, 0.95), 2) == []
    assert choose_tags(p, np.zeros(4), 4) == [1, 3, 0, 2]
    assert choose_tags(p, np.array([0.6, 0.95, 0.1, 0.5]), None) == [3, 2]


# --- the command line -------------------------------------------------------------------------------------------------

def test_csv_output_exact_bytes_with_an_error_row_and_a_missing_file(world, capsys, tmp_path):
    photos, out = world["photos"], tmp_path / "tags.csv"
    missing = str(tmp_path / "nowhere.jpg")
    code, stdout, stderr = _run(["tag", world["a"], photos, missing, "--out", out, "--no-progress"], capsys)
    assert code == 0
    expected = _expected([r for r in ORDER if PHOTOS[r]])
    lines = ["path,tags,error," + ",".join(CLASSES)]
    for rel in ORDER:
        path = str(photos / rel)
        if PHOTOS[rel] is None:
            lines.append(f"{path},,not_image,,,")
        else:
            p = expected[rel]
            lines.append(f"{path},{'|'.join(_tags(p, 0.5))},," + ",".join(f"{v:.6f}" for v in p))
    lines.append(f"{missing},,not_found,,,")
    assert out.read_bytes() == ("\n".join(lines) + "\n").encode()
    assert stdout == f"wrote {out}: tagged 5 of 7 images; not tagged: not_found 1, not_image 1\n"
    page = photos / "a/page.jpg"
    assert stderr.splitlines() == [
        f"error: {page}: not_image (an HTML page, not an image (content-type missing))",
        f"error: {missing}: not_found (no such file)",
    ]


def test_jsonl_output_exact_bytes_for_an_ensemble_with_tuned_thresholds(world, capsys, tmp_path):
    photos, out = world["photos"], tmp_path / "tags.jsonl"
    rels = ["b.jpg", "a/z.png", "a/page.jpg"]
    code, _, _ = _run(["tag", world["a"], world["b"], *(photos / r for r in rels), "--out", out, "--threshold",
                       "tuned", "--no-progress"], capsys)
    assert code == 0
    a, b = _expected(rels[:2]), _expected(rels[:2], OFF_B, ON_B)
    tuned = (np.array(TUNED_A) + np.array(TUNED_B)) / 2
    lines = []
    for rel in rels:
        if PHOTOS[rel] is None:
            lines.append(f'{{"path": "{photos / rel}", "tags": [], "error": "not_image", "probabilities": {{}}}}')
            continue
        p = (a[rel] + b[rel]) / 2
        tags = ", ".join(f'"{t}"' for t in _tags(p, tuned))
        probabilities = ", ".join(f'"{c}": {float(f"{v:.6f}")!r}' for c, v in zip(CLASSES, p, strict=True))
        lines.append(f'{{"path": "{photos / rel}", "tags": [{tags}], "error": null, '
                     f'"probabilities": {{{probabilities}}}}}')
    assert out.read_bytes() == ("\n".join(lines) + "\n").encode()


def test_stdout_lines_exact_with_paths_from_stdin_and_top_k(world, capsys, monkeypatch):
    photos = world["photos"]
    rels = ["a/deeper/c.webp", "a b/x.jpeg", "b.jpg"]
    stdin = "".join(f"{photos / r}\n" for r in rels[:2]) + "\n" + f"{photos / 'a/page.jpg'}\r\n"
    argv = ["tag", world["a"], "-", photos / rels[2], "--threshold", "0", "--top-k", "2", "--no-progress"]
    code, stdout, stderr = _run(argv, capsys, stdin=stdin, monkeypatch=monkeypatch)
    assert code == 0
    expected = _expected(rels)
    lines = []
    for rel in rels[:2]:
        p = expected[rel]
        lines.append(f"{photos / rel}\t" + " ".join(f"{t}:{p[CLASSES.index(t)]:.3f}" for t in _tags(p, 0)[:2]))
    lines.append(f"{photos / 'a/page.jpg'}\terror: not_image (an HTML page, not an image (content-type missing))")
    p = expected[rels[2]]
    lines.append(f"{photos / rels[2]}\t" + " ".join(f"{t}:{p[CLASSES.index(t)]:.3f}" for t in _tags(p, 0)[:2]))
    assert stdout == "\n".join(lines) + "\n"
    assert stderr.splitlines()[-1] == "tagged 3 of 4 images; not tagged: not_image 1"
    # yellow under run A: red_ish 0.9, green_ish 0.8, blue_ish 0.4 -> the two most probable
    assert lines[0].endswith("\tred_ish:0.900 green_ish:0.800")


def test_thresholds_number_and_tuned_and_no_tags(world, tagger_a):
    photos = world["photos"]
    rels = ["b.jpg", "a/B.JPG", "a/deeper/c.webp"]
    paths = [photos / r for r in rels]
    expected = _expected(rels)
    for spec, cut in (("0.5", 0.5), ("0.85", 0.85), ("tuned", np.array(TUNED_A)), ("1", 1.0)):
        results = tagger_a.with_options(threshold=spec).tag(paths)
        assert [list(r.tags) for r in results] == [_tags(expected[r], cut) for r in rels], spec
    assert tagger_a.with_options(threshold=1).tag(paths[:1])[0].tags == ()
    top = tagger_a.with_options(threshold=0, top_k=2).tag(paths)
    assert [list(r.tags) for r in top] == [_tags(expected[r], 0)[:2] for r in rels]
    with pytest.raises(PredictError, match="--top-k must be a positive integer, got 0"):
        tagger_a.with_options(top_k=0)
    with pytest.raises(PredictError, match="--threshold must be between 0 and 1, got 2.0"):
        Tagger.load(world["a"], threshold=2)


def test_unreadable_files_are_error_rows_with_the_crawls_reasons(tagger_a, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "cut.jpg").write_bytes(truncated_jpeg())
    (bad / "empty.png").write_bytes(b"")
    (bad / "page.jpg").write_text("<!doctype html><html></html>")
    (bad / "fake.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    jpeg(bad / "ok.jpg", solid("green"))
    results = tagger_a.tag(sorted(str(p) for p in bad.iterdir()) + [str(bad)])
    assert [(Path(r.path).name, r.error) for r in results] == [
        ("cut.jpg", "truncated"), ("empty.png", "empty"), ("fake.png", "corrupt"), ("ok.jpg", None),
        ("page.jpg", "not_image"), ("bad", "not_a_file"),
    ]
    assert results[3].tags == ("green_ish",)
    assert all(r.tags == () and r.probabilities == {} for r in results if r.error)


def test_exit_2_and_no_file_when_nothing_could_be_tagged(world, capsys, tmp_path):
    out = tmp_path / "tags.csv"
    out.write_text("an earlier result\n")
    page = world["photos"] / "a/page.jpg"
    code, stdout, stderr = _run(["tag", world["a"], page, tmp_path / "gone.png", "--out", out, "--no-progress"],
                                  capsys)
    assert code == 2
    assert out.read_text() == "an earlier result\n"  # left intact
    assert stderr.splitlines() == [
        f"error: {page}: not_image (an HTML page, not an image (content-type missing))",
        f"error: {tmp_path / 'gone.png'}: not_found (no such file)",
        "tagged 0 of 2 images; not tagged: not_found 1, not_image 1",
        "error: none of the 2 images could be tagged",
    ]
    # A folder without images, a bad --out name, --threshold tuned without thresholds: exit 2, the reason named.
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, stderr = _run(["tag", world["a"], empty], capsys)
    assert code == 2 and stderr.startswith(f"error: no image files in {empty} (searched for .apng, .avif")
    code, _, stderr = _run(["tag", world["a"], page, "--out", tmp_path / "x.txt"], capsys)
    assert (code, stderr) == (2, f"error: --out {tmp_path / 'x.txt'}: the file name must end in .csv or .jsonl "
                                 "(the output format)\n")


# --- the Python API -------------------------------------------------------------------------------------------------

def test_tagger_on_paths_and_arrays_arrays_bit_exact_with_png_files(world, tmp_path):
    run = make_run_dir(tmp_path / "conv", conv_model(32, seed=3))
    tagger = Tagger.load(run, batch_size=2)
    assert tagger.classes == CLASSES
    images = [np.asarray(Image.fromarray(solid("red")).resize((71, 45))), solid("blue", 30, 90)]
    rng = np.random.default_rng(0)
    images.append(rng.integers(0, 256, (50, 37, 3), dtype=np.uint8))
    files = []
    for i, image in enumerate(images):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(image).save(files[-1])
    from_arrays, from_files = tagger.predict_proba(images), tagger.predict_proba(files)
    assert from_arrays.shape == (3, 3) and from_arrays.dtype == np.float64
    np.testing.assert_array_equal(from_arrays, from_files)
    results = tagger.tag([images[0], str(files[1]), tmp_path / "none.jpg"])
    assert [(r.index, r.path, r.error) for r in results] == [
        (0, None, None), (1, str(files[1]), None), (2, str(tmp_path / "none.jpg"), "not_found")]
    assert isinstance(results[0], TagResult) and results[0].name == "#0"
    assert results[0].probabilities == dict(zip(CLASSES, from_arrays[0].tolist(), strict=True))
    proba = tagger.predict_proba([files[0], tmp_path / "none.jpg"])
    # Another batch composition: equal within float32 rounding (oneDNN's sums depend on the batch), as in submit.
    assert np.isnan(proba[1]).all() and np.allclose(proba[0], from_files[0], rtol=0, atol=1e-6)
    single = tagger.predict_proba(images[2])  # one array (or one path) is one input
    np.testing.assert_array_equal(single, from_arrays[2:])
    with pytest.raises(PredictError, match=r"input #1: expected an HxWx3 uint8 RGB array, got shape \(4, 4\) uint8"):
        tagger.tag([images[0], np.zeros((4, 4), np.uint8)])
    with pytest.raises(PredictError, match="input #0: expected a path or an HxWx3 uint8 RGB array, got int"):
        tagger.tag([3])


def _readme_example() -> str:
    readme = (REPO / "README.md").read_text()
    found = re.search(r"<!-- tagger example -->\n```python\n(.*?)```", readme, re.S)
    assert found, "README.md lost its Tagger example"
    return found.group(1)


def test_the_readme_tagger_example_runs_as_written(world, tmp_path, monkeypatch, capsys):
    code = _readme_example()
    assert len(code.strip().splitlines()) == 5
    make_run_dir(tmp_path / "runs" / "iv4", detector_model(24, OFF_A, ON_A))
    jpeg(tmp_path / "photos" / "red.jpg", solid("red"))
    jpeg(tmp_path / "photos" / "sub" / "white.jpg", solid("white"))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert out == (
        "photos/red.jpg ('red_ish',) None\n"
        "photos/sub/white.jpg ('red_ish', 'green_ish', 'blue_ish') None\n"
        "['red_ish', 'green_ish', 'blue_ish'] (1, 3)\n"
    )


def test_tag_config_checks_its_settings_once():
    config = TagConfig(runs=("r",), inputs=("x",), threshold="TUNED", top_k=3)
    resolved = config.resolve()
    assert (resolved.runs, resolved.threshold, resolved.top_k) == ((Path("r"),), "tuned", 3)
    with pytest.raises(PredictError, match="--tta must be"):
        TagConfig(runs=("r",), inputs=("x",), tta=0).resolve()
    with pytest.raises(PredictError, match="no INPUT given"):
        tag(TagConfig(runs=("r",), inputs=()))
    assert expand_inputs(["-"], stdin=io.StringIO("a.jpg\n\n b c.png \n")) == [ImageInput("a.jpg"),
                                                                              ImageInput(" b c.png ")]


# --- engines: --engine/--precision reach the runs tag loads -----------------------------------------------------------

def test_tag_with_the_onnx_engine_gives_the_keras_rows_within_1e4_and_caches_the_export(world, capsys, tmp_path):
    rels = [r for r in ORDER if PHOTOS[r]]
    run = world["a"]
    keras_out, onnx_out = tmp_path / "keras.csv", tmp_path / "onnx.csv"
    assert _run(["tag", run, world["photos"], "--out", keras_out, "--no-progress"], capsys)[0] == 0
    assert _run(["tag", run, world["photos"], "--out", onnx_out, "--no-progress", "--engine", "onnx"], capsys)[0] == 0
    keras_rows = [line.split(",") for line in keras_out.read_text().splitlines()]
    onnx_rows = [line.split(",") for line in onnx_out.read_text().splitlines()]
    assert [r[:3] for r in onnx_rows] == [r[:3] for r in keras_rows]  # paths, tags and errors identical
    expected = _expected(rels)
    by_path = {row[0]: row for row in onnx_rows[1:]}
    for rel in rels:
        got = np.array([float(v) for v in by_path[str(world["photos"] / rel)][3:]])
        np.testing.assert_allclose(got, expected[rel], atol=1e-4 + 5e-7)
    assert [p.name.split("-")[0] for p in (Path(run) / "engines").iterdir()] == ["onnx"]  # exported once, cached


def test_tagger_load_takes_the_engine_and_refuses_bf16_outside_openvino(world):
    tagger = Tagger.load(world["a"], engine="openvino")
    assert [run.engine for run in tagger.runs] == ["openvino"]
    rels = [r for r in ORDER if PHOTOS[r]]
    got = tagger.predict_proba([world["photos"] / r for r in rels])
    np.testing.assert_allclose(got, np.stack([_expected(rels)[r] for r in rels]), atol=1e-4)
    with pytest.raises(PredictError, match="--precision bf16 needs --engine openvino"):
        Tagger.load(world["a"], precision="bf16")
    with pytest.raises(PredictError, match="--engine must be one of"):
        TagConfig(runs=("r",), inputs=("x",), engine="tensorrt").resolve()
