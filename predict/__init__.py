"""The predict stage: submissions, test-time augmentation, evaluation and backbone comparison from RUN_DIRs on a
DATA_DIR.

Modules: runs (load a RUN_DIR), tta (the view list), inference (tf.data + one model call per batch, ensembles),
options (the checks of the options), thresholds, submission, evaluate, compare, export (Keras `Model.export` plus
tagger.json), engines (keras / openvino / onnx); `python -m predict` is the command line.
"""
