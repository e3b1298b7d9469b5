"""TensorFlow's C++ start-up lines (oneDNN notes, CUDA driver probes, absl) kept off the terminal.

TensorFlow 2.21 logs them through absl before absl is initialised, and TF_CPP_MIN_LOG_LEVEL no longer hides them
(tensorflow/tensorflow#100442, open). So `python -m train|predict` call `quiet_tensorflow_startup()` before
anything else imports TensorFlow: it imports TensorFlow with the process's stderr (file descriptor 2) sent to a
temporary file, then writes back every captured line that is not one of the known start-up notes, so a real
error during the import still shows. A level the user set in TF_CPP_MIN_LOG_LEVEL is respected: nothing is
filtered then.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

QUIET_LEVEL = "2"  # 0 all, 1 no INFO, 2 no INFO or WARNING (errors still show), 3 no errors either
# Lines TensorFlow prints on every start on a machine like this one; nothing the user can act on.
_STARTUP_NOTES = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called"
    r"|^[IW]\d{4} [\d:.]+\s+\d+ (port|cudart_stub|cpu_feature_guard|cuda_executor|gpu_device)\.cc:\d+\]"
    r"|Unable to register cu(DNN|FFT|BLAS) factory"
    r"|^To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags\.$"
)
# On a machine without CUDA drivers ("Could not find cuda drivers"), the GPU probe then fails with this line: noise
# there, so hidden only then; where drivers exist it is a real error and shows.
_NO_DRIVER_FOLLOW_UP = re.compile(r"^E\d{4} [\d:.]+\s+\d+ cuda_platform\.cc:\d+\] failed call to cuInit")


def is_startup_note(line: str) -> bool:
    """Whether a line of TensorFlow's stderr is one of its start-up notes (hidden by `quiet_tensorflow_startup`)."""
    return bool(_STARTUP_NOTES.search(line))


def drop_startup_notes(lines: list[str]) -> list[str]:
    """The lines of captured stderr that are not start-up notes, in order (what `quiet_tensorflow_startup` keeps)."""
    no_driver = any("Could not find cuda drivers" in line for line in lines)
    return [line for line in lines
            if not is_startup_note(line) and not (no_driver and _NO_DRIVER_FOLLOW_UP.search(line))]


def quiet_tensorflow_startup() -> None:
    """Import TensorFlow without its start-up notes on stderr, unless TF_CPP_MIN_LOG_LEVEL is set by the user."""
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ or "tensorflow" in sys.modules:
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = QUIET_LEVEL  # what later C++ logging still honours
    sys.stderr.flush()
    with tempfile.TemporaryFile() as capture:
        saved = os.dup(2)
        os.dup2(capture.fileno(), 2)
        try:
            import tensorflow  # its start-up lines go to `capture`

            tensorflow.config.list_physical_devices("GPU")  # the CUDA probe (needed anyway) logs now, not later
        finally:  # also when the import fails: what it printed besides the notes is the user's clue
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            captured = capture.read().decode("utf-8", "replace").splitlines(keepends=True)
            sys.stderr.write("".join(drop_startup_notes(captured)))
            sys.stderr.flush()
