"""The predict stage: submissions, test-time augmentation, evaluation and backbone comparison from RUN_DIRs on a
DATA_DIR, and tagging anyone's images (`predict tag`, `from predict import Tagger`).

Modules: runs (load a RUN_DIR), tta (the view list), inference (tf.data + one model call per batch, ensembles),
options (the checks of the options), thresholds, submission, evaluate, compare, export (Keras `Model.export` plus
tagger.json), engines (keras / openvino / onnx), tagger (Tagger, tag), tag_inputs (RUN_DIRs vs inputs, folders, the
crawl's conversion), tag_output (TagResult and the tag output formats); `python -m predict` is the command line.
"""

_LAZY = {"Tagger": "predict.tagger", "TagResult": "predict.tag_output"}


def __getattr__(name: str):
    # Imported on first use, so `python -m predict` can quiet TensorFlow's start-up before anything imports it.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'predict' has no attribute {name!r}")


__all__ = ["Tagger", "TagResult"]
