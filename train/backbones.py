"""The backbone registry: each entry carries its native input size, preprocessing and ImageNet weight file.

Nothing downstream repeats these facts (the timm `_registry` habit): the data pipeline asks the entry for
its preprocessing, the CLI for its default input size, the weight loader for its file name.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import keras

from train.keras_workarounds import grouped_to_depthwise


class WeightsError(RuntimeError):
    """ImageNet or file weights could not be had for a backbone; the message says how to get them."""


def keras_cache_dir() -> Path:
    """The folder where keras.utils.get_file keeps downloads: $KERAS_HOME/models or ~/.keras/models."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models"


@dataclass(frozen=True)
class Backbone:
    """One registry entry. `build` returns the feature extractor (no top, no pooling)."""

    name: str
    constructor: Callable[..., keras.Model] = field(repr=False)
    input_size: int = 299
    preprocessing: str = "inception"
    min_input_size: int = 75
    weights_file: str | None = None  # ImageNet no-top weights, as named in the Keras cache
    weights_url: str | None = None  # where keras.applications downloads them from (None: no public Keras file)
    weights_howto: str | None = None  # without weights_url: how to make weights_file; {path} is its cache path
    # Applied to the built model, its weights loaded: a rewrite into layers that compute the same, faster.
    rewrite: Callable[[keras.Model], keras.Model] | None = field(default=None, repr=False)

    def to_config(self) -> dict:
        """The facts a RUN_DIR records so prediction needs nothing else."""
        return {
            "name": self.name,
            "input_size": self.input_size,
            "preprocessing": self.preprocessing,
            "min_input_size": self.min_input_size,
        }

    def build(self, input_size: int | None = None, weights: str | None = "imagenet") -> keras.Model:
        """Build the backbone for square `input_size` images; weights: "imagenet", None/"none", or a file path."""
        size = input_size or self.input_size
        if size < self.min_input_size:
            raise ValueError(f"{self.name}: input size {size} is below its minimum of {self.min_input_size} px")
        # Resolve the weights file before building, so a missing file or an offline download fails at once.
        path: Path | None = None
        if weights == "imagenet":
            path = Path(self.imagenet_weights_path())
        elif weights not in (None, "none"):
            path = Path(weights)
            if not path.is_file():
                raise WeightsError(f"{self.name}: weights file {path} does not exist")
        model = self.constructor(include_top=False, weights=None, input_shape=(size, size, 3))
        if path is not None:
            # Loading after construction (keras.applications given a path makes the same load_weights call)
            # gives every weights source, cached ImageNet files included, one clean error.
            load_weights_file(model, path, self.name)
        return self.rewrite(model) if self.rewrite is not None else model

    def imagenet_weights_path(self) -> str:
        """Local path of the ImageNet no-top weights: from the Keras cache, else downloaded; fails clearly offline."""
        if self.weights_file is None:
            raise WeightsError(f"{self.name}: no ImageNet weights are registered; use --weights PATH or --weights none")
        cached = keras_cache_dir() / self.weights_file
        if cached.is_file():
            return str(cached)
        if self.weights_url is None:
            howto = self.weights_howto.format(path=cached) + " " if self.weights_howto else ""
            raise WeightsError(
                f"{self.name}: ImageNet weights {self.weights_file} are not in the Keras cache ({cached.parent}) "
                f"and have no download address. {howto}Otherwise use --weights PATH or --weights none"
            )
        try:
            # cache_dir made explicit: Keras reads KERAS_HOME once at import, we read it now, and both must agree.
            return keras.utils.get_file(
                self.weights_file, self.weights_url, cache_dir=str(cached.parent.parent), cache_subdir="models"
            )
        except Exception as err:  # network errors come as many types (URLError, OSError, HTTPError, ...)
            raise WeightsError(
                f"{self.name}: could not download ImageNet weights {self.weights_file} from {self.weights_url} "
                f"({type(err).__name__}: {err}). Put that file in {cached.parent} (the Keras cache), "
                f"or use --weights PATH (a weights file for this backbone) or --weights none"
            ) from err


def load_weights_file(model: keras.Model, path: Path, name: str) -> None:
    """Load a Keras weights file into `model`, turning a layout mismatch into a message naming file and backbone.

    Accepts Keras 3 `.weights.h5` files and the legacy `.h5` files keras.applications downloads.
    """
    with warnings.catch_warnings(record=True) as caught:
        # A mismatching file makes Keras warn once per skipped container before it raises: hundreds of lines.
        warnings.simplefilter("always")
        try:
            model.load_weights(str(path))
        except Exception as err:
            first_line = (str(err).strip().splitlines() or [""])[0]
            raise WeightsError(
                f"{name}: weights file {path} does not fit this backbone ({type(err).__name__}: {first_line}); "
                f"it must be a no-top weights file for {name} with 3 input channels "
                f"(use --weights PATH with the right file, or --weights none)"
            ) from err
    for w in caught:  # a load that worked keeps whatever Keras had to say
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _inception_v4(**kwargs) -> keras.Model:
    from train.inception_v4 import InceptionV4  # local import: keeps registry import light

    return InceptionV4(**kwargs)


_KERAS_WEIGHTS = "https://storage.googleapis.com/tensorflow/keras-applications/"

BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in [
        Backbone(
            "inception_resnet_v2",
            keras.applications.InceptionResNetV2,
            weights_file="inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
            weights_url=_KERAS_WEIGHTS
            + "inception_resnet_v2/inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
        ),
        Backbone(
            "xception",
            keras.applications.Xception,
            weights_file="xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
            weights_url=_KERAS_WEIGHTS + "xception/xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
        ),
        Backbone(
            "inception_v4",
            _inception_v4,
            weights_file="inception_v4_tf_in1k_notop.weights.h5",
            weights_url=None,  # converted from timm's checkpoint by train.weights; see README
            weights_howto=(
                "Make them from timm's inception_v4.tf_in1k checkpoint: on a machine with network, download "
                "model.safetensors from the Hugging Face Hub repository timm/inception_v4.tf_in1k, then run "
                "`python -m train.weights convert --from timm model.safetensors --to {path}`."
            ),
        ),
        Backbone(
            "inception_v3",
            keras.applications.InceptionV3,
            weights_file="inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
            weights_url=_KERAS_WEIGHTS + "inception_v3/inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
        ),
        Backbone(
            "resnet50",
            keras.applications.ResNet50,
            input_size=224,
            preprocessing="caffe",
            min_input_size=32,
            weights_file="resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
            weights_url=_KERAS_WEIGHTS + "resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        ),
        # Modern backbones (issue 14). Each carries its own input scaling as layers at its bottom (EfficientNetV2:
        # Rescaling, plus Normalization for the B variants; ConvNeXt: Normalization), so the pipeline feeds raw
        # 0..255 pixels ("raw" preprocessing) and the model applies its preprocessing once, in every path.
        # keras.applications refuses inputs under 32 px; the features are 1x1 there.
        Backbone(
            "efficientnetv2_s",
            keras.applications.EfficientNetV2S,
            input_size=384,
            preprocessing="raw",
            min_input_size=32,
            weights_file="efficientnetv2-s_notop.h5",
            weights_url=_KERAS_WEIGHTS + "efficientnet_v2/efficientnetv2-s_notop.h5",
        ),
        Backbone(
            "efficientnetv2_b0",
            keras.applications.EfficientNetV2B0,
            input_size=224,
            preprocessing="raw",
            min_input_size=32,
            weights_file="efficientnetv2-b0_notop.h5",
            weights_url=_KERAS_WEIGHTS + "efficientnet_v2/efficientnetv2-b0_notop.h5",
        ),
        Backbone(
            "convnext_tiny",
            keras.applications.ConvNeXtTiny,
            input_size=224,
            preprocessing="raw",
            min_input_size=32,
            weights_file="convnext_tiny_notop.h5",
            weights_url=_KERAS_WEIGHTS + "convnext/convnext_tiny_notop.h5",
            rewrite=grouped_to_depthwise,
        ),
        Backbone(
            "convnext_small",
            keras.applications.ConvNeXtSmall,
            input_size=224,
            preprocessing="raw",
            min_input_size=32,
            weights_file="convnext_small_notop.h5",
            weights_url=_KERAS_WEIGHTS + "convnext/convnext_small_notop.h5",
            rewrite=grouped_to_depthwise,
        ),
    ]
}


def get_backbone(name: str) -> Backbone:
    """The registry entry for `name`; a clear error lists the known names."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}") from None
