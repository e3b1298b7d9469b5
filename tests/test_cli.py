"""The command lines start quietly: no TensorFlow C++ start-up notes (oneDNN, CUDA drivers, absl) on stderr in
`--help`, in an error exit or in a short real training run, unless the user set TF_CPP_MIN_LOG_LEVEL; and the
filter in common/tf_logging.py hides those notes only, never a line of the program's own or a real error.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from common.tf_logging import drop_startup_notes, is_startup_note
from tests.datagen import make_data_dir

REPO = Path(__file__).resolve().parents[1]

# Lines TensorFlow 2.21 printed at start-up on a CPU-only machine (copied from a real run).
REAL_NOTES = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
    "I0000 00:00:1796162546.348604    5342 port.cc:153] oneDNN custom operations are on. You may see slightly "
    "different numerical results due to floating-point round-off errors from different computation orders. To turn "
    "them off, set the environment variable `TF_ENABLE_ONEDNN_OPTS=0`.\n",
    "I0000 00:00:1796162546.349165    5342 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will "
    "not be used.\n",
    "I0000 00:00:1796162546.444299    5342 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use "
    "available CPU instructions in performance-critical operations.\n",
    "To enable the following instructions: AVX2 AVX512F AVX512_VNNI AVX512_BF16 FMA, in other operations, rebuild "
    "TensorFlow with the appropriate compiler flags.\n",
]
CUINIT = ("E0000 00:00:1796162577.722727    5889 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: "
          "Failed call to cuInit: UNKNOWN ERROR (303)\n")
NOT_NOTES = [
    "error: /data/missing: not a directory\n",
    "Traceback (most recent call last):\n",
    "ValueError: cannot split the CPU into 2 logical devices\n",
    "E0000 00:00:1796162577.722727    5889 op_kernel.cc:1830] OP_REQUIRES failed at conv_ops.cc:12 : OOM\n",
    "W0000 00:00:1796162577.722727    5889 loop_optimizer.cc:933] Skipping loop optimization\n",
    "epoch 1/2 (stage 1, frozen): loss 0.6931, val mAP 0.5000\n",
    "To enable the following instructions, read the README.\n",
]
# Anything shaped like a TensorFlow C++ log line, or one of the notes' texts.
TF_LOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:[\d.]+\s+\d+ \S+\.cc:\d+\]|oneDNN|cuda drivers|absl::InitializeLog"
                         r"|cuInit|rebuild TensorFlow")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return {**env, "PYTHONPATH": str(REPO), **extra}


def _run(args: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env or _env(), capture_output=True, text=True,
                          timeout=timeout)


def _tf_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if TF_LOG_LINE.search(line)]


@pytest.mark.parametrize("line", REAL_NOTES)
def test_real_startup_notes_are_recognised(line):
    assert is_startup_note(line)


@pytest.mark.parametrize("line", [*NOT_NOTES, CUINIT])
def test_other_lines_are_not_startup_notes(line):
    assert not is_startup_note(line)


def test_filter_keeps_every_other_line_in_order():
    lines = [REAL_NOTES[0], NOT_NOTES[0], *REAL_NOTES[1:3], NOT_NOTES[3], REAL_NOTES[3], REAL_NOTES[4], NOT_NOTES[1]]
    assert drop_startup_notes(lines) == [NOT_NOTES[0], NOT_NOTES[3], NOT_NOTES[1]]


def test_cuinit_failure_is_hidden_only_where_no_cuda_driver_was_found():
    assert drop_startup_notes([REAL_NOTES[2], CUINIT, NOT_NOTES[0]]) == [NOT_NOTES[0]]
    assert drop_startup_notes([CUINIT, NOT_NOTES[0]]) == [CUINIT, NOT_NOTES[0]]  # drivers present: a real error


@pytest.mark.parametrize("stage", ["crawl", "train", "predict"])
def test_help_prints_usage_and_nothing_on_stderr(stage):
    done = _run([stage, "--help"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: python -m {stage}")
    assert done.stderr == ""


def test_predict_error_exit_shows_its_message_and_no_startup_notes(tmp_path):
    run, data = tmp_path / "no-such-run", tmp_path / "no-such-data"
    done = _run(["predict", "evaluate", str(run), "--data", str(data)])
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert lines and all(str(tmp_path) in line for line in lines), done.stderr  # its own message, naming the path
    assert _tf_lines(done.stderr) == []


def test_train_error_exit_shows_its_message_and_nothing_else(tmp_path):
    missing = tmp_path / "no-such-data"
    done = _run(["train", str(missing), "--backbone", "xception", "--out", str(tmp_path / "run")])
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"error: {missing}: not a directory"]


def test_a_level_set_by_the_user_is_respected():
    done = _run(["train", "--help"], env=_env(TF_CPP_MIN_LOG_LEVEL="0"))
    assert done.returncode == 0
    notes = [line for line in done.stderr.splitlines(keepends=True) if is_startup_note(line)]
    assert any("absl::InitializeLog" in line for line in notes), done.stderr  # shown, not filtered


@pytest.mark.slow  # a real training run: TensorFlow starts, builds an Xception, trains an epoch on 2 replicas
@pytest.mark.timeout(1200)  # above the subprocess's own limit, so a hang reports the run's output
def test_short_training_run_on_two_replicas_prints_no_startup_notes(tmp_path):
    data = make_data_dir(tmp_path / "data", n=24, n_classes=3, seed=0)
    run = tmp_path / "run"
    done = _run(["train", str(data.root), "--out", str(run), "--backbone", "xception", "--image-size", "75",
                 "--batch-size", "8", "--frozen-epochs", "1", "--epochs", "1", "--weights", "none",
                 "--val-split", "0.25", "--devices", "2", "--seed", "0"], timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "2 replica(s)" in done.stdout and (run / "model.keras").is_file()
    assert _tf_lines(done.stderr) == [], done.stderr


def test_a_failing_tensorflow_import_still_shows_what_it_printed(tmp_path):
    """The capture never swallows a real error: a TensorFlow whose import prints a line and fails (a stand-in
    module here) leaves that line and the traceback on stderr, and the start-up note it printed is still dropped."""
    fake = tmp_path / "tensorflow"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "import os\n"
        "os.write(2, b'WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n')\n"
        "os.write(2, b'libcudart.so.12: cannot open shared object file\\n')\n"
        "raise ImportError('broken TensorFlow install')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(REPO)])
    code = "from common.tf_logging import quiet_tensorflow_startup; quiet_tensorflow_startup()"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1
    assert result.stderr.startswith("libcudart.so.12: cannot open shared object file\nTraceback")
    assert result.stderr.rstrip().endswith("ImportError: broken TensorFlow install")
    assert "absl::InitializeLog" not in result.stderr
