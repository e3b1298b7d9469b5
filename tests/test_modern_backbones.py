"""The modern backbones of issue 14 (EfficientNetV2-S/B0, ConvNeXt-Tiny/Small from keras.applications): registry
facts, preprocessing applied exactly once (by the model's own layers, the pipeline passing raw pixels), which
layers the stage-2 fraction opens, and both stages and both heads trained at the 32 px minimum with predict's path
giving val_predictions.csv again.

Only the registry and preprocessing facts are in the fast suite: building these models costs seconds each on a CPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from dataclasses import dataclass

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from predict.inference import predict_run
from predict.runs import load_run
from tests.datagen import make_data_dir
from train.__main__ import parse_args
from train.backbones import get_backbone
from train.data import load_image, make_dataset
from train.fit import train
from train.model import _walk, backbone_layers, unfreeze_top
from train.preprocess import preprocess

pytestmark = pytest.mark.filterwarnings("ignore:Your input ran out of data")

KERAS_WEIGHTS = "https://storage.googleapis.com/tensorflow/keras-applications/"
# name -> (constructor, native input size, Keras's no-top weights file, its folder under KERAS_WEIGHTS)
MODERN = {
    "efficientnetv2_s": (keras.applications.EfficientNetV2S, 384, "efficientnetv2-s_notop.h5", "efficientnet_v2"),
    "efficientnetv2_b0": (keras.applications.EfficientNetV2B0, 224, "efficientnetv2-b0_notop.h5", "efficientnet_v2"),
    "convnext_tiny": (keras.applications.ConvNeXtTiny, 224, "convnext_tiny_notop.h5", "convnext"),
    "convnext_small": (keras.applications.ConvNeXtSmall, 224, "convnext_small_notop.h5", "convnext"),
}
MIN_SIZE = 32  # keras.applications refuses less ("Input size must be at least 32x32")

# ImageNet statistics the models' own layers apply (keras.applications' documented preprocessing).
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
REFERENCE_PREPROCESSING = {
    "efficientnetv2_s": lambda x: x / 128.0 - 1.0,  # the non-B variants: Rescaling(1/128, offset -1)
    "efficientnetv2_b0": lambda x: (x / 255.0 - MEAN) / STD,  # the B variants: Rescaling(1/255), Normalization
    "convnext_tiny": lambda x: (x - 255 * MEAN) / (255 * STD),  # PreStem's Normalization
    "convnext_small": lambda x: (x - 255 * MEAN) / (255 * STD),
}
# The top 30% (--unfreeze default) of each backbone's top-level layers at stage 2: (layers, opened, first opened).
TOP_30 = {
    "efficientnetv2_s": (512, 154, "block6e_add"),
    "efficientnetv2_b0": (269, 81, "block6c_project_bn"),
    "convnext_tiny": (132, 40, "convnext_tiny_stage_2_block_6_pointwise_conv_2"),
    "convnext_small": (258, 77, "convnext_small_stage_2_block_19_pointwise_conv_1"),
}


# --- fast: registry and pipeline facts -------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODERN))
def test_registry_entry_carries_size_preprocessing_minimum_and_keras_weights(name):
    constructor, size, weights_file, folder = MODERN[name]
    entry = get_backbone(name)
    assert entry.constructor is constructor
    assert (entry.input_size, entry.preprocessing, entry.min_input_size) == (size, "raw", MIN_SIZE)
    assert (entry.weights_file, entry.weights_url) == (weights_file, f"{KERAS_WEIGHTS}{folder}/{weights_file}")
    # The same names keras.applications itself downloads (its module's address + model name + "_notop.h5").
    module = __import__(f"keras.src.applications.{folder}", fromlist=["BASE_WEIGHTS_PATH"])
    assert entry.weights_url == module.BASE_WEIGHTS_PATH + weights_file


def test_raw_preprocessing_passes_the_decoded_pixels_unchanged(tmp_path):
    data = make_data_dir(tmp_path, n=4, n_classes=2, seed=5)
    paths = [str(data.root / "images" / f"{i}.jpg") for i in data.ids]
    batch = np.asarray(next(iter(make_dataset(paths, None, image_size=40, preprocessing="raw", batch_size=4,
                                              training=False))))
    decoded = np.stack([np.asarray(load_image(p, 40)[0]) for p in paths])
    np.testing.assert_array_equal(batch, decoded)  # 0..255, as the models' own preprocessing layers expect
    assert batch.dtype == np.float32 and batch.max() > 200
    np.testing.assert_array_equal(np.asarray(preprocess(tf.constant(decoded), "raw")), decoded)


# --- slow: models ------------------------------------------------------------------------------------------------


def _reference_without_preprocessing(name: str, model: keras.Model) -> keras.Model:
    """The same architecture without its preprocessing layers, carrying `model`'s weights (layer for layer, in order:
    an auto-named layer such as ConvNeXt's last LayerNormalization gets another name in a second model)."""
    constructor = MODERN[name][0]
    bare = constructor(include_top=False, weights=None, input_shape=model.input_shape[1:],
                       include_preprocessing=False)
    rewrite = get_backbone(name).rewrite  # ConvNeXt: its depthwise Conv2Ds as DepthwiseConv2D, as the registry builds
    bare = rewrite(bare) if rewrite is not None else bare
    preprocessing = (keras.layers.Rescaling, keras.layers.Normalization)
    source = [layer for layer in model.layers if layer.weights and not isinstance(layer, preprocessing)]
    target = [layer for layer in bare.layers if layer.weights]
    for src, dst in zip(source, target, strict=True):
        assert type(src) is type(dst)
        dst.set_weights(src.get_weights())
    return bare


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODERN))
def test_builds_at_its_minimum_applies_its_preprocessing_once_and_opens_the_top_30_percent(name):
    entry = get_backbone(name)
    with pytest.raises(ValueError, match=f"{name}: input size 31 is below its minimum of 32 px"):
        entry.build(MIN_SIZE - 1, weights=None)
    keras.utils.set_random_seed(0)
    model = entry.build(MIN_SIZE, weights=None)
    assert model.output_shape[1:3] == (1, 1)

    # Raw 0..255 pixels through the pipeline's preprocessing (identity) and the model's own layers give what the
    # same weights give on the documented preprocessing applied by hand to a model without those layers: once.
    pixels = np.random.default_rng(1).uniform(0, 255, (2, MIN_SIZE, MIN_SIZE, 3)).astype(np.float32)
    ours = np.asarray(model(preprocess(tf.constant(pixels), entry.preprocessing), training=False))
    bare = _reference_without_preprocessing(name, model)
    by_hand = REFERENCE_PREPROCESSING[name](pixels.astype(np.float64)).astype(np.float32)
    reference = np.asarray(bare(by_hand, training=False))
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())
    twice = np.asarray(bare(REFERENCE_PREPROCESSING[name](by_hand), training=False))
    assert not np.allclose(twice, reference, rtol=1e-2, atol=1e-2 * np.abs(reference).max())  # the test can fail
    grouped = [layer.name for layer in _walk(model) if isinstance(layer, keras.layers.Conv2D) and layer.groups > 1]
    assert grouped == []  # none left for Keras to run through XLA on a CPU (train.keras_workarounds)
    depthwise = [layer for layer in _walk(model) if isinstance(layer, keras.layers.DepthwiseConv2D)]
    assert len(depthwise) == {"convnext_tiny": 18, "convnext_small": 36}.get(name, len(depthwise))
    kinds = [type(layer).__name__ for layer in _walk(model) if isinstance(layer, (keras.layers.Rescaling,
                                                                                  keras.layers.Normalization))]
    assert kinds == {"efficientnetv2_s": ["Rescaling"], "efficientnetv2_b0": ["Rescaling", "Normalization"]}.get(
        name, ["Normalization"])

    # Stage 2's --unfreeze 0.3: which top-level layers open (the figures README reports), and inside them every
    # weight trains except BatchNormalization (LayerNormalization has no moving statistics: it trains).
    n_layers, n_open, first = TOP_30[name]
    opened = unfreeze_top(model, 0.3)
    assert (len(backbone_layers(model)), len(opened), opened[0].name) == (n_layers, n_open, first)
    assert opened[-1] is backbone_layers(model)[-1]
    inside = [sub for layer in opened for sub in _walk(layer)]
    assert all(not sub.trainable for sub in inside if isinstance(sub, keras.layers.BatchNormalization))
    norms = [sub for sub in inside if isinstance(sub, keras.layers.LayerNormalization)]
    assert all(sub.trainable for sub in norms) and (len(norms) > 0) == name.startswith("convnext")
    preprocessing_layers = [layer for layer in backbone_layers(model)[:2]
                            if isinstance(layer, (keras.layers.Rescaling, keras.layers.Normalization))]
    assert preprocessing_layers and not any(layer.trainable_weights for layer in preprocessing_layers)
    assert all(layer not in opened for layer in preprocessing_layers)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data_dir(tmp_path_factory.mktemp("modern-data"), n=16, n_classes=3, seed=4, every_image_labelled=True)


@dataclass(frozen=True)
class Leaf:
    digest: bytes  # of every weight, moving statistics included
    trains: bool  # trainable now, with trainable variables
    has_parameters: bool  # has variables that train when the layer is trainable
    batchnorm: bool


class WeightDigests(keras.callbacks.Callback):
    """Per backbone leaf layer at each fit()'s start and end: a digest of its weights and whether it is trainable;
    and the top-level layers the backbone has."""

    def __init__(self):
        super().__init__()
        self.snapshots, self.top_level = [], []

    def _take(self) -> dict:
        backbone = next(layer for layer in self.model.layers if isinstance(layer, keras.Model))  # the nested one
        self.top_level = [[leaf.name for leaf in _leaves(layer)] for layer in backbone_layers(backbone)]
        return {leaf.name: Leaf(hashlib.sha1(b"".join(np.asarray(w.numpy()).tobytes() for w in leaf.weights)).digest(),
                                leaf.trainable and bool(leaf.trainable_weights),
                                any(w.trainable for w in leaf.weights),
                                isinstance(leaf, keras.layers.BatchNormalization))
                for leaf in _leaves(backbone)}

    def on_train_begin(self, logs=None):
        self.snapshots.append(self._take())

    def on_train_end(self, logs=None):
        self.snapshots.append(self._take())


def _leaves(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    """The layers without sub-layers at or under `layer`."""
    return [sub for sub in _walk(layer) if not getattr(sub, "layers", None)]


def _flags(name: str, head: str) -> list[str]:
    return ["--backbone", name, "--image-size", str(MIN_SIZE), "--batch-size", "4", "--frozen-epochs", "1",
            "--epochs", "2", "--weights", "none", "--val-split", "0.25", "--lr", "1e-3", "--finetune-lr", "1e-3",
            "--augment", "flip", "--head", head, *(["--rnn-units", "8", "--label-embedding", "4"] * (head == "rnn"))]


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """train(name, head) -> (RUN_DIR, WeightDigests): each run trained once per module (the compare test reuses)."""
    runs: dict[tuple[str, str], tuple] = {}

    def run(name: str, head: str = "sigmoid"):
        if (name, head) not in runs:
            out = tmp_path_factory.mktemp("modern-runs") / f"{name}-{head}"
            flags = _flags(name, head)
            if get_backbone(name).min_input_size > MIN_SIZE:
                flags[flags.index("--image-size") + 1] = str(get_backbone(name).min_input_size)
            digests = WeightDigests()
            with contextlib.redirect_stdout(io.StringIO()):
                result = train(parse_args([str(data.root), "--out", str(out), *flags]), verbose=0,
                               callbacks=[digests])
            assert result.epochs_trained == 2
            runs[name, head] = (out, digests)
        return runs[name, head]

    return run


# Both heads on the lightest model of each family; the sigmoid head on all four. (The rnn head sits on the pooled
# features like the sigmoid one, so the other two models add nothing for it but minutes.)
TRAINED = [(name, "sigmoid") for name in MODERN] + [("efficientnetv2_b0", "rnn"), ("convnext_tiny", "rnn")]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "head"), TRAINED)
def test_trains_both_stages_and_predict_gives_the_validation_predictions(name, head, trained, data):
    out, digests = trained(name, head)
    history = pd.read_csv(out / "history.csv")
    assert history["stage"].tolist() == [1, 2] and np.isfinite(history[["loss", "val_loss"]].to_numpy()).all()
    config = json.loads((out / "config.json").read_text())
    assert config["backbone"] == {"name": name, "input_size": MODERN[name][1], "preprocessing": "raw",
                                  "min_input_size": MIN_SIZE}
    assert config.get("head", {"name": "sigmoid"})["name"] == head

    # Stage 1 trained and moved no backbone weight. Stage 2 trains exactly the weighted leaves of the top 30% of the
    # top-level layers except BatchNormalization (LayerNormalization included) and moves nothing else.
    s1_begin, s1_end, s2_begin, s2_end = digests.snapshots
    digest = lambda snapshot: {n: leaf.digest for n, leaf in snapshot.items()}  # noqa: E731
    assert digest(s1_begin) == digest(s1_end) == digest(s2_begin)
    assert not any(leaf.trains for leaf in s1_begin.values())
    n_layers, n_open, _ = TOP_30[name]
    assert len(digests.top_level) == n_layers
    top = {n for names in digests.top_level[-n_open:] for n in names}
    trains = {n for n, leaf in s2_begin.items() if leaf.trains}
    assert trains == {n for n in top if s2_begin[n].has_parameters and not s2_begin[n].batchnorm}
    changed = {n for n in s2_end if s2_end[n].digest != s2_begin[n].digest}
    assert changed and changed <= trains  # BatchNormalization's moving statistics included: none moved
    if name.startswith("convnext"):
        assert any("layernorm" in n or n.startswith("layer_normalization") for n in trains & changed)

    # predict's path (predict.runs + predict.inference) gives val_predictions.csv again from the images.
    predictions = pd.read_csv(out / "val_predictions.csv", dtype={"id": str})
    run = load_run(out)
    paths = [str(data.root / "images" / f"{i}.jpg") for i in predictions["id"]]
    again = predict_run(run, paths, progress=False)
    assert again.readable.all()
    np.testing.assert_allclose(again.probabilities, predictions[data.classes].to_numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_modern_and_a_reference_backbone_side_by_side_in_predict_compare(trained, data, tmp_path):
    from predict.compare import CompareConfig, compare

    runs = (trained("efficientnetv2_b0")[0], trained("convnext_tiny")[0], trained("xception")[0])
    result = compare(CompareConfig(runs=runs, data=data.root, tta=2, out=tmp_path / "compare", progress=False))
    assert sorted(result.table["backbone"]) == ["convnext_tiny", "efficientnetv2_b0", "xception"]
    assert "| efficientnetv2_b0 |" in result.markdown and "| convnext_tiny |" in result.markdown
    for out in runs:
        row = result.table[result.table["run"] == out.name].iloc[0]
        assert row["params"] == json.loads((out / "metrics.json").read_text())["params"]
        assert row["input_size"] == json.loads((out / "config.json").read_text())["image_size"]
