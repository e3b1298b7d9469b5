"""Submissions: each format exact to the byte for known model outputs, list order and completeness, thresholds,
--missing both ways, unreadable images, ensembles (averaging, refusals) and atomic writes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from predict.__main__ import main, parse_args
from predict.compare import CompareConfig
from predict.errors import PredictError
from predict.evaluate import EvaluateConfig
from predict.inference import predict_ensemble, predict_run
from predict.runs import load_run, load_runs
from predict.submission import SubmitConfig, format_submission, submit
from tests.predict_fixtures import CLASSES, detector_model, expected_probabilities, make_data_dir, make_run_dir, solid

REPO = Path(__file__).resolve().parents[1]

# Run A and run B: different input sizes and preprocessing, different (known) outputs.
OFF_A, ON_A = [0.1, 0.25, 0.4], [0.9, 0.8, 0.65]
OFF_B, ON_B = [0.3, 0.05, 0.2], [0.7, 0.95, 0.6]
TUNED_A, TUNED_B = [0.15, 0.1, 0.6], [0.25, 0.3, 0.8]  # averaged: 0.2, 0.2, 0.7

# List order differs from the manifest (crawl) order, and ids are not sorted: rows must follow the list.
LIST = [
    ("z9", "red"), ("a1", "white"), ("m5", "black"), ("b2", "green"), ("q7", "yellow"), ("c3", "blue"),
    ("k4", "magenta"),
]
STORED_ORDER = ["c3", "k4", "a1", "z9", "q7", "b2", "m5"]
COLOUR = dict(LIST)
IDS = [i for i, _ in LIST]


def _text(rows) -> bytes:
    return "".join(",".join(r) + "\n" for r in rows).encode()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("submit")
    full = make_data_dir(root / "full", {i: solid(COLOUR[i]) for i in STORED_ORDER}, list_ids=IDS)
    # Two ids of the list failed to crawl.
    stored = {i: solid(COLOUR[i]) for i in STORED_ORDER if i not in ("m5", "c3")}
    gaps = make_data_dir(root / "gaps", stored, list_ids=IDS)
    corrupt = make_data_dir(root / "corrupt", {i: solid(COLOUR[i]) for i in STORED_ORDER}, list_ids=IDS, corrupt=["q7"])
    run_a = make_run_dir(
        root / "run_a", detector_model(24, OFF_A, ON_A), thresholds=TUNED_A, prevalence=[0.125, 0.5, 0.25]
    )
    run_b = make_run_dir(
        root / "run_b",
        detector_model(20, OFF_B, ON_B, preprocessing="raw"),
        preprocessing="raw",
        thresholds=TUNED_B,
        prevalence=[0.375, 0.25, 0.75],
    )
    other = make_run_dir(
        root / "other_classes", detector_model(24, OFF_A, ON_A), classes=["red_ish", "green_ish", "stripes"]
    )
    reordered = make_run_dir(root / "reordered", detector_model(24, OFF_A, ON_A), classes=CLASSES[::-1])
    return dict(root=root, full=full, gaps=gaps, corrupt=corrupt, a=run_a, b=run_b, other=other, reordered=reordered)


def _submit(world, tmp_path, runs=("a",), data="full", **kw) -> bytes:
    out = tmp_path / "sub.csv"
    submit(SubmitConfig(runs=tuple(world[r] for r in runs), data=world[data], out=out, progress=False, **kw))
    return out.read_bytes()


def test_jd_format_exact_bytes_order_and_completeness(world, tmp_path):
    got = _submit(world, tmp_path)
    # Flags computed from the colours alone: on-probabilities are >= 0.5 and off-probabilities < 0.5 for run A.
    flags = {i: (expected_probabilities([COLOUR[i]], OFF_A, ON_A)[0] >= 0.5).astype(int) for i in IDS}
    expected = _text([[i, *(str(b) for b in flags[i])] for i in IDS])
    assert got == expected
    assert got.startswith(b"z9,1,0,0\na1,1,1,1\nm5,0,0,0\n")  # headerless, list order
    assert got.count(b"\n") == len(IDS) and b"\r" not in got


def test_csv_format_has_header_and_flags(world, tmp_path):
    got = _submit(world, tmp_path, format="csv")
    expected = b"id,red_ish,green_ish,blue_ish\n" + _text(
        [[i, *(str(b) for b in (expected_probabilities([COLOUR[i]], OFF_A, ON_A)[0] >= 0.5).astype(int))] for i in IDS]
    )
    assert got == expected


def test_proba_format_six_decimals(world, tmp_path):
    got = _submit(world, tmp_path, format="proba")
    lines = got.decode().splitlines()
    assert lines[0] == "id,red_ish,green_ish,blue_ish"
    assert lines[1] == "z9,0.900000,0.250000,0.400000"  # red: only the red channel is bright
    assert lines[2] == "a1,0.900000,0.800000,0.650000"
    expected = b"id,red_ish,green_ish,blue_ish\n" + _text(
        [[i, *(f"{p:.6f}" for p in expected_probabilities([COLOUR[i]], OFF_A, ON_A)[0])] for i in IDS]
    )
    assert got == expected


def test_thresholds_tuned_averaged_and_number(world, tmp_path):
    # Tuned thresholds of the ensemble are averaged over runs: (0.2, 0.2, 0.7).
    runs = load_runs([world["a"], world["b"]])
    paths = [str(world["full"] / "images" / f"{i}.jpg") for i in IDS]
    probs = predict_ensemble(runs, paths, progress=False).probabilities
    got = _submit(world, tmp_path, runs=("a", "b"), threshold="tuned")
    flags = (probs >= np.array([0.2, 0.2, 0.7])).astype(int)
    assert got == _text([[i, *map(str, f)] for i, f in zip(IDS, flags, strict=True)])
    # Single run, a number for every class: 0.85 keeps only run A's 0.9 (class red_ish).
    got = _submit(world, tmp_path, threshold="0.85")
    assert got == _text([[i, str(int(COLOUR[i] in ("red", "white", "yellow", "magenta"))), "0", "0"] for i in IDS])


def test_ensemble_averages_runs_with_their_own_size_and_preprocessing(world, tmp_path):
    paths = [str(world["full"] / "images" / f"{i}.jpg") for i in IDS]
    run_a, run_b = load_run(world["a"]), load_run(world["b"])
    assert (run_a.image_size, run_a.preprocessing) == (24, "inception")
    assert (run_b.image_size, run_b.preprocessing) == (20, "raw")
    pa = predict_run(run_a, paths, progress=False).probabilities
    pb = predict_run(run_b, paths, progress=False).probabilities
    ens = predict_ensemble([run_a, run_b], paths, progress=False).probabilities
    np.testing.assert_array_equal(ens, (pa + pb) / 2)
    colours = [COLOUR[i] for i in IDS]
    expected = (expected_probabilities(colours, OFF_A, ON_A) + expected_probabilities(colours, OFF_B, ON_B)) / 2
    np.testing.assert_allclose(ens, expected, atol=1e-6)
    got = _submit(world, tmp_path, runs=("a", "b"), format="proba")
    assert got.decode().splitlines()[1] == "z9,0.800000,0.150000,0.300000"


def test_refused_ensembles(world, tmp_path, capsys):
    difference = r"classes differ.*only in .*run_a: \['blue_ish'\].*only in .*other_classes: \['stripes'\]"
    with pytest.raises(PredictError, match=difference):
        load_runs([world["a"], world["other"]])
    with pytest.raises(PredictError, match="same classes in a different order"):
        load_runs([world["a"], world["reordered"]])
    out = tmp_path / "refused.csv"
    code = main(["submit", str(world["a"]), str(world["other"]), "--data", str(world["full"]), "--out", str(out),
                 "--no-progress"])
    assert code == 2 and not out.exists()
    assert "cannot ensemble" in capsys.readouterr().err


def test_missing_error_lists_ids_and_suggests_recrawl(world, tmp_path, capsys):
    with pytest.raises(PredictError) as err:
        _submit(world, tmp_path, data="gaps")
    message = str(err.value)
    assert "2 of 7 ids" in message and "m5 (http_404)" in message and "c3 (http_404)" in message
    assert "Re-run the crawl" in message and "--missing fill" in message
    out = tmp_path / "x.csv"
    code = main(["submit", str(world["a"]), "--data", str(world["gaps"]), "--out", str(out), "--no-progress"])
    assert code == 2 and not out.exists()
    assert "2 of 7 ids" in capsys.readouterr().err


def test_missing_fill_zeros_and_prevalence(world, tmp_path, capsys):
    got = _submit(world, tmp_path, data="gaps", missing="fill")
    full = _submit(world, tmp_path, data="full")
    rows, full_rows = got.decode().splitlines(), full.decode().splitlines()
    assert len(rows) == 7 and [r.split(",")[0] for r in rows] == IDS
    for i, (row, full_row) in enumerate(zip(rows, full_rows, strict=True)):
        assert row == (f"{IDS[i]},0,0,0" if IDS[i] in ("m5", "c3") else full_row)
    assert rows[5] == "c3,0,0,0"  # blue would have been 0,0,1: the fill wins
    # proba rows of missing ids get the training prevalence (ensemble: averaged over runs).
    got = _submit(world, tmp_path, runs=("a", "b"), data="gaps", missing="fill", format="proba").decode().splitlines()
    assert got[3] == "m5,0.250000,0.375000,0.500000" and got[6] == "c3,0.250000,0.375000,0.500000"
    # The CLI reports the count.
    out = tmp_path / "cli.csv"
    args = ["submit", str(world["a"]), "--data", str(world["gaps"]), "--out", str(out), "--missing", "fill",
            "--no-progress"]
    assert main(args) == 0
    assert "2 id(s) had no usable image and were filled: m5, c3" in capsys.readouterr().out


def test_unreadable_image_named_or_filled(world, tmp_path):
    with pytest.raises(PredictError, match=r"1 image\(s\) cannot be decoded: q7 \(.*q7\.jpg\)"):
        _submit(world, tmp_path, data="corrupt")
    got = _submit(world, tmp_path, data="corrupt", missing="fill").decode().splitlines()
    assert got[4] == "q7,0,0,0" and got[0] == "z9,1,0,0"


def test_absent_file_named_before_prediction(world, tmp_path):
    data = make_data_dir(tmp_path / "absent", {i: solid(COLOUR[i]) for i in STORED_ORDER}, list_ids=IDS)
    (data / "images" / "b2.jpg").unlink()
    with pytest.raises(PredictError, match=r"1 image file\(s\) listed in the manifest do not exist: b2 \("):
        submit(SubmitConfig(runs=(world["a"],), data=data, out=tmp_path / "s.csv", progress=False))
    assert not (tmp_path / "s.csv").exists()


def test_failed_run_leaves_earlier_submission_intact(world, tmp_path, monkeypatch):
    out = tmp_path / "keep.csv"
    out.write_bytes(b"earlier submission\n")
    run = load_run(world["a"])
    calls = []

    def failing(x):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash in the middle of prediction")
        return np.full((x.shape[0], 3), 0.9, dtype=np.float32)

    monkeypatch.setattr(run.model, "predict_on_batch", failing)
    monkeypatch.setattr("predict.submission.load_runs", lambda paths, **options: [run])
    with pytest.raises(RuntimeError, match="simulated crash"):
        submit(SubmitConfig(runs=(world["a"],), data=world["full"], out=out, batch_size=2, progress=False))
    assert out.read_bytes() == b"earlier submission\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.csv"]

    # A failure inside the write itself (the rename) also keeps the old file and leaves no temporary file.
    def broken_replace(src, dst):
        raise OSError("simulated disk failure at rename")

    monkeypatch.undo()
    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="simulated disk failure"):
        submit(SubmitConfig(runs=(world["a"],), data=world["full"], out=out, progress=False))
    assert out.read_bytes() == b"earlier submission\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.csv"]


def test_format_submission_quotes_awkward_ids_and_checks_shapes():
    probabilities = np.array([[0.5, 0.49], [0.1, 1.0]])
    text = format_submission(["a,b", "plain"], ["x", "y"], probabilities, np.array([0.5, 0.5]), "jd")
    assert text == '"a,b",1,0\nplain,0,1\n'
    with pytest.raises(ValueError, match="shape"):
        format_submission(["a"], ["x", "y"], np.zeros((2, 2)), np.array([0.5, 0.5]), "jd")


# Each bad option and the message naming it: the same text from the config's resolve() and from the command line.
BAD_OPTIONS = [
    ("--tta", "0", "--tta must be an integer from 1 to 12 (the number of defined views), got 0"),
    ("--tta", "13", "--tta must be an integer from 1 to 12 (the number of defined views), got 13"),
    ("--tta", "two", "--tta must be an integer from 1 to 12 (the number of defined views), got 'two'"),
    ("--threshold", "1.5", "--threshold must be between 0 and 1, got 1.5"),
    ("--threshold", "best", "--threshold must be 'tuned' or a number between 0 and 1, got 'best'"),
    ("--format", "xml", "--format must be one of jd, csv, proba, got 'xml'"),
    ("--missing", "skip", "--missing must be one of error, fill, got 'skip'"),
    ("--batch-size", "0", "--batch-size must be a positive integer, got 0"),
]


@pytest.mark.parametrize(("option", "value", "message"), BAD_OPTIONS, ids=[f"{o} {v}" for o, v, _ in BAD_OPTIONS])
def test_cli_option_rejected_with_status_2_and_its_message(world, tmp_path, capsys, option, value, message):
    out = tmp_path / "o.csv"
    with pytest.raises(SystemExit) as exit_info:
        main(["submit", str(world["a"]), "--data", str(world["full"]), "--out", str(out), option, value])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"python -m predict submit: error: argument {option}: {message}"
    assert not out.exists()


@pytest.mark.parametrize(("option", "value", "message"), BAD_OPTIONS, ids=[f"{o} {v}" for o, v, _ in BAD_OPTIONS])
def test_config_resolve_rejects_the_same_values_with_the_same_message(world, tmp_path, option, value, message):
    field = option[2:].replace("-", "_")
    typed = int(value) if value.isdigit() else value
    out = tmp_path / "o.csv"
    with pytest.raises(PredictError) as err:
        submit(SubmitConfig(runs=(world["a"],), data=world["full"], out=out, progress=False, **{field: typed}))
    assert str(err.value) == message
    assert not out.exists()


def test_configs_resolve_once_to_canonical_settings(world, tmp_path):
    config = SubmitConfig(runs=[str(world["a"])], data=str(world["full"]), out=str(tmp_path / "s.csv"),
                          threshold="0.50")
    resolved = config.resolve()
    assert resolved == SubmitConfig(runs=(world["a"],), data=world["full"], out=tmp_path / "s.csv", threshold="0.5")
    assert resolved.resolve() == resolved
    with pytest.raises(PredictError, match=r"is a directory; give a file name such as submissions/NAME.csv"):
        SubmitConfig(runs=(world["a"],), data=world["full"], out=tmp_path).resolve()
    with pytest.raises(PredictError, match="^no RUN_DIR given$"):
        SubmitConfig(runs=(), data=world["full"], out=tmp_path / "s.csv").resolve()
    for other in (EvaluateConfig, CompareConfig):
        with pytest.raises(PredictError, match="^--tta must be an integer from 1 to 12"):
            other(runs=(world["a"],), data=world["full"], tta=13).resolve()
        with pytest.raises(PredictError, match="^--batch-size must be a positive integer, got 0$"):
            other(runs=(world["a"],), data=world["full"], batch_size=0).resolve()
    assert EvaluateConfig(runs=(world["a"],), data=world["full"], threshold=" Tuned ").resolve().threshold == "tuned"
    with pytest.raises(TypeError):
        SubmitConfig((world["a"],), world["full"], tmp_path / "s.csv")  # built by keyword only


def test_cli_defaults_are_the_documented_ones():
    """README: --tta defaults to 1 for submit and evaluate and to 8 for compare; the other defaults as documented."""
    common = ["RUN", "--data", "DATA"]
    submit_config = parse_args(["submit", *common, "--out", "s.csv"])
    assert submit_config == SubmitConfig(runs=(Path("RUN"),), data=Path("DATA"), out=Path("s.csv"), tta=1,
                                         threshold="0.5", format="jd", batch_size=16, missing="error", progress=True)
    assert parse_args(["evaluate", *common, "--no-progress"]) == EvaluateConfig(
        runs=(Path("RUN"),), data=Path("DATA"), tta=1, threshold="0.5", out=None, batch_size=16, progress=False
    )
    assert parse_args(["compare", *common]) == CompareConfig(
        runs=(Path("RUN"),), data=Path("DATA"), tta=8, out=Path("submissions/compare"), batch_size=16, progress=True
    )
    assert parse_args(["compare", *common, "--tta", "12", "--batch-size", "4"]).tta == 12


def test_bad_run_dirs_named(world, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    with pytest.raises(PredictError, match=r"broken/config.json: not found"):
        load_run(broken)
    import shutil

    no_model = tmp_path / "no_model"
    shutil.copytree(world["a"], no_model)
    (no_model / "model.keras").unlink()
    with pytest.raises(PredictError, match=r"no_model/model.keras: not found"):
        load_run(no_model)
    wrong_width = tmp_path / "wrong_width"
    shutil.copytree(world["a"], wrong_width)
    (wrong_width / "classes.txt").write_text("a\nb\n")
    with pytest.raises(PredictError, match="classes differ from those in config.json"):
        load_run(wrong_width)
    no_metrics = tmp_path / "no_metrics"
    shutil.copytree(world["a"], no_metrics)
    (no_metrics / "metrics.json").unlink()
    with pytest.raises(PredictError, match=r"no_metrics/metrics.json: not found; --threshold tuned"):
        submit(SubmitConfig(runs=(no_metrics,), data=world["full"], out=tmp_path / "t.csv", threshold="tuned",
                            progress=False))


def test_python_m_predict_end_to_end(world, tmp_path):
    out = tmp_path / "sub.csv"
    cmd = [sys.executable, "-m", "predict", "submit", str(world["a"]), "--data", str(world["full"]), "--out", str(out),
           "--tta", "2"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}: 7 rows (jd)" in done.stdout
    assert out.read_bytes().startswith(b"z9,1,0,0\na1,1,1,1\n")
