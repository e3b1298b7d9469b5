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
)


def is_startup_note(line: str) -> bool:
    """Whether a line of TensorFlow's stderr is one of its start-up notes (hidden by `quiet_tensorflow_startup`)."""
    return bool(_STARTUP_NOTES.search(line))


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
            import tensorflow  # noqa: F401  (the import is the point: its start-up lines go to `capture`)
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        capture.seek(0)
        kept = [line for line in capture.read().decode("utf-8", "replace").splitlines(True) if not is_startup_note(line)]
    sys.stderr.write("".join(kept))
    sys.stderr.flush()
