"""The one exception type for bad input to the predict stage; the CLI turns it into exit status 2."""

from __future__ import annotations


class PredictError(ValueError):
    """A RUN_DIR, DATA_DIR or option that prediction cannot use; the message names the file, run or ids."""
