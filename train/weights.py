"""ImageNet weight files: convert timm's InceptionV4 checkpoint to Keras, and list what the Keras cache holds.

    python -m train.weights convert --from timm CHECKPOINT --to FILE.weights.h5 [--include-top]
    python -m train.weights list

`convert` reads timm's `inception_v4.tf_in1k` checkpoint (its `model.safetensors`, read with the
`safetensors` package alone, or a `.pth` state dict, read with torch) and writes a Keras weights file for
our `train.inception_v4.InceptionV4`: without the classifier by default (the file `--weights imagenet` looks
for, `inception_v4_tf_in1k_notop.weights.h5` in the Keras cache), with the classifier (`last_linear`, 1000
ImageNet classes, or as many as the checkpoint has) with `--include-top`. Run it twice to get both.

Layouts are mapped explicitly (timm's state-dict keys name the Keras layers, see `timm_name_to_layer`):

- convolution `*.conv.weight` (out, in, kh, kw) -> Conv2D kernel (kh, kw, in, out); no conv has a bias;
- batch norm `*.bn.weight/bias/running_mean/running_var` -> gamma/beta/moving_mean/moving_variance; the
  epsilon is not in a checkpoint: timm's inception_v4 uses 0.001 (the TF-slim value), as does our model;
  PyTorch's `num_batches_tracked` counters are ignored;
- classifier `last_linear.weight` (classes, 1536) -> Dense kernel (1536, classes), `last_linear.bias` -> bias.

A checkpoint that does not match the architecture is refused, naming the first mismatching tensor: the
expected tensors are checked in timm's state-dict order (missing, wrong shape, not floating point), then
the checkpoint is searched, in its own order, for a tensor the architecture does not have. Nothing is
written then. A file is written to a temporary name beside FILE and renamed, so FILE is either the complete
old file or the new one.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from train.backbones import BACKBONES, WeightsError, keras_cache_dir

TIMM_BN_EPSILON = 1e-3  # timm inception_v4's norm_eps default: the TF-slim release's batch-norm epsilon
_IGNORED_SUFFIX = ".num_batches_tracked"  # PyTorch BatchNorm's step counter: not a weight
_TIMM_INCEPTION_C = {19, 20, 21}  # features.i that are Inception-C blocks: attributes like `branch1_1a`
_FEATURES = 1536


class CheckpointError(WeightsError):
    """A checkpoint that cannot be read, or does not fit the architecture; the message names file and tensor."""


@dataclass(frozen=True, kw_only=True)
class ConvertConfig:
    """What `python -m train.weights convert` was asked to do."""

    source: str  # checkpoint family; only "timm" (its inception_v4) is known
    checkpoint: Path  # model.safetensors, or a .pth/.pt/.bin state dict
    out: Path  # the Keras weights file to write; must end in .weights.h5
    include_top: bool = False  # also write the classifier (Dense "predictions")


@dataclass(frozen=True)
class ConvertResult:
    """What `convert` wrote."""

    path: Path
    include_top: bool
    classes: int | None  # the classifier's width, None without the top
    tensors: int  # checkpoint tensors written (num_batches_tracked and, without the top, last_linear excluded)
    bytes: int


@dataclass(frozen=True)
class _Expected:
    """One checkpoint tensor the architecture needs, and the Keras variable it becomes."""

    key: str  # timm state-dict key
    shape: tuple[int, ...]  # in timm's (PyTorch) layout
    layer: str  # Keras layer name
    attr: str  # Keras variable attribute: kernel, bias, gamma, beta, moving_mean, moving_variance


# --- reading checkpoints ---------------------------------------------------------------------------------


def read_state_dict(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a `.safetensors` file (safetensors package, no torch) or a `.pth`/`.pt`/`.bin` state dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _read_safetensors(path)
    if suffix in (".pth", ".pt", ".bin"):
        return _read_torch(path)
    raise CheckpointError(
        f"checkpoint {path}: unknown format {suffix or '(no suffix)'!r}; expected model.safetensors "
        f"(timm's Hugging Face Hub file) or a PyTorch state dict (.pth, .pt, .bin)"
    )


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        from safetensors.numpy import load_file
    except ImportError:
        raise CheckpointError(f"reading {path} needs the safetensors package: pip install safetensors") from None
    try:
        return dict(load_file(str(path)))
    except Exception as err:  # safetensors raises its own error types, OSError, or TypeError for bf16
        raise CheckpointError(
            f"checkpoint {path} is not a readable safetensors file ({type(err).__name__}: {err})"
        ) from err


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"reading {path} (a PyTorch state dict) needs torch, which is not installed; convert timm's "
            f"model.safetensors instead, which needs only the safetensors package (pip install safetensors)"
        ) from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)  # weights_only: no code runs
    except Exception as err:
        raise CheckpointError(
            f"checkpoint {path} is not a readable PyTorch file ({type(err).__name__}: {err})"
        ) from err
    for wrapper in ("state_dict", "model"):  # training checkpoints wrap the state dict
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    tensors = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"checkpoint {path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        value = value.detach().cpu()
        tensors[str(key)] = (value.float() if value.is_floating_point() else value).numpy()
    return tensors


# --- the architecture's tensors ---------------------------------------------------------------------------


def timm_module_path(layer_name: str) -> str:
    """timm module path of one of our InceptionV4 layers with weights: the inverse of `timm_name_to_layer`.

    "mixed_5b_branch1_1_conv" -> "features.6.branch1.1.conv", "mixed_7b_branch1_1a_bn" ->
    "features.19.branch1_1a.bn", "stem1_conv" -> "features.0.conv", "predictions" -> "last_linear".
    Underscores are ambiguous (timm's Inception-C names attributes `branch1_1a`, the other blocks index
    nn.Sequential children `branch1.1`), so the inverse knows timm's structure and checks itself.
    """
    from train.inception_v4 import TIMM_FEATURE_BLOCKS, timm_name_to_layer

    if layer_name == "predictions":
        return "last_linear"
    for index, block in enumerate(TIMM_FEATURE_BLOCKS):
        if not layer_name.startswith(block + "_"):
            continue
        # "stem1_conv" -> unit "", "mixed_3a_conv_bn" -> unit "conv", "mixed_5b_branch1_1_conv" -> "branch1_1"
        unit, _, child = layer_name[len(block) + 1 :].rpartition("_")
        if child not in ("conv", "bn"):
            break
        if index in _TIMM_INCEPTION_C and unit.startswith(("branch1_", "branch2_")):
            parts = [unit]  # an attribute of InceptionC, e.g. branch2_3a
        else:
            parts = unit.split("_") if unit else []
        path = ".".join(["features", str(index), *parts, child])
        if timm_name_to_layer(path) != layer_name:  # the rule and train.inception_v4 disagree: a bug here
            raise RuntimeError(f"timm_module_path({layer_name!r}) = {path!r} does not map back to the layer")
        return path
    raise ValueError(f"{layer_name!r} is not a convolution, batch norm or classifier layer of our InceptionV4")


def _layer_tensors(layer) -> list[_Expected]:
    """The timm tensors one Keras layer with weights takes, in the order timm's state dict lists them."""
    import keras

    path = timm_module_path(layer.name)
    if isinstance(layer, keras.layers.Conv2D):
        if layer.use_bias:
            raise RuntimeError(f"layer {layer.name} has a bias; timm's inception_v4 convolutions have none")
        kh, kw, cin, cout = layer.kernel.shape
        return [_Expected(f"{path}.weight", (cout, cin, kh, kw), layer.name, "kernel")]
    if isinstance(layer, keras.layers.BatchNormalization):
        if layer.epsilon != TIMM_BN_EPSILON or not (layer.scale and layer.center):
            raise RuntimeError(
                f"layer {layer.name}: epsilon {layer.epsilon}, timm's inception_v4 uses {TIMM_BN_EPSILON}"
            )
        (channels,) = layer.gamma.shape
        names = (
            ("weight", "gamma"),
            ("bias", "beta"),
            ("running_mean", "moving_mean"),
            ("running_var", "moving_variance"),
        )
        return [_Expected(f"{path}.{t}", (channels,), layer.name, k) for t, k in names]
    raise RuntimeError(f"layer {layer.name} ({type(layer).__name__}) has weights the converter does not know")


@functools.lru_cache(maxsize=1)
def _feature_tensors() -> tuple[_Expected, ...]:
    """Every tensor of timm's `features`, in timm's order, read off a freshly built InceptionV4."""
    from train.inception_v4 import InceptionV4

    model = InceptionV4(include_top=False, weights=None, input_shape=(None, None, 3))
    expected = [t for layer in model.layers if layer.weights for t in _layer_tensors(layer)]
    if len(expected) != len(model.weights):  # one tensor per Keras variable, no variable left out
        raise RuntimeError(f"{len(expected)} timm tensors for {len(model.weights)} Keras variables")
    return tuple(sorted(expected, key=lambda e: _timm_order(e.key)))


_CHILD_ORDER = {"conv": 0, "bn": 1}
_PARAM_ORDER = {"weight": 0, "bias": 1, "running_mean": 2, "running_var": 3}


def _timm_order(key: str) -> tuple:
    """Sort key putting state-dict keys in timm's order (definition order: branch0 before branch1, conv before bn).

    Keras lists layers by graph depth, not as timm defines them; a refusal names the first mismatching tensor
    in the order a timm checkpoint lists them.
    """
    *module, child, param = key.split(".")
    parts = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in module)
    return parts, _CHILD_ORDER.get(child, 2), child, _PARAM_ORDER.get(param, 4), param


def _top_tensors(classes: int) -> list[_Expected]:
    return [
        _Expected("last_linear.weight", (classes, _FEATURES), "predictions", "kernel"),
        _Expected("last_linear.bias", (classes,), "predictions", "bias"),
    ]


def timm_state_dict_spec(include_top: bool = True, classes: int = 1000) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) of every tensor a timm inception_v4 state dict holds for our model, in timm's order.

    PyTorch's `num_batches_tracked` counters aside; shapes in timm's layout.
    """
    expected = list(_feature_tensors()) + (_top_tensors(classes) if include_top else [])
    return [(e.key, e.shape) for e in expected]


def match_timm_inception_v4(
    state: dict[str, np.ndarray], include_top: bool, source: str | Path
) -> tuple[list[tuple[_Expected, np.ndarray]], int | None]:
    """Check a timm state dict against our InceptionV4 and return (expected tensor, Keras-layout array) pairs.

    Refuses, with CheckpointError naming `source` and the first mismatching tensor, a missing tensor, a wrong
    shape, a non-float tensor, or (after all expected ones are found) a tensor the architecture lacks.
    Returns the classifier width too (None without the top).
    """
    expected = list(_feature_tensors())
    classes = None
    if include_top:
        head = state.get("last_linear.weight")
        # The classifier's width is the checkpoint's (1000 for ImageNet); its input width must be ours.
        classes = int(head.shape[0]) if head is not None and head.ndim >= 1 else 1000
        expected += _top_tensors(classes)
    pairs = []
    for e in expected:
        array = state.get(e.key)
        where = f"checkpoint {source} does not fit timm's inception_v4"
        if array is None:
            hint = "; convert without --include-top" if e.layer == "predictions" else ""
            raise CheckpointError(
                f"{where}: tensor {e.key!r} is missing (expected shape {e.shape}, Keras layer {e.layer}){hint}"
            )
        if tuple(array.shape) != e.shape:
            hint = ""
            if e.key == "features.0.conv.weight" and array.ndim == 4 and array.shape[1] != e.shape[1]:
                hint = f"; it is for {array.shape[1]} input channels, our InceptionV4 takes {e.shape[1]}"
            raise CheckpointError(
                f"{where}: tensor {e.key!r} has shape {tuple(array.shape)}, expected {e.shape} "
                f"(Keras layer {e.layer}){hint}"
            )
        if not np.issubdtype(array.dtype, np.floating):
            raise CheckpointError(f"{where}: tensor {e.key!r} has dtype {array.dtype}, expected floating point")
        pairs.append((e, _to_keras_layout(e, array)))
    known = {e.key for e in expected} | ({"last_linear.weight", "last_linear.bias"} if not include_top else set())
    for key, array in state.items():
        if key not in known and not key.endswith(_IGNORED_SUFFIX):
            raise CheckpointError(
                f"checkpoint {source} does not fit timm's inception_v4: unexpected tensor {key!r} "
                f"(shape {tuple(array.shape)}), which the architecture does not have"
            )
    return pairs, classes


def _to_keras_layout(e: _Expected, array: np.ndarray) -> np.ndarray:
    array = np.asarray(array, dtype=np.float32)
    if e.attr == "kernel" and array.ndim == 4:
        return np.ascontiguousarray(array.transpose(2, 3, 1, 0))  # OIHW -> HWIO
    if e.attr == "kernel":
        return np.ascontiguousarray(array.T)  # (out, in) -> (in, out)
    return array


# --- converting --------------------------------------------------------------------------------------------


def convert(config: ConvertConfig) -> ConvertResult:
    """Convert a checkpoint into a Keras weights file for our InceptionV4 (see the module docstring)."""
    if config.source != "timm":
        raise CheckpointError(f"unknown checkpoint source {config.source!r}; known: timm (its inception_v4)")
    out = Path(config.out)
    if not out.name.endswith(".weights.h5"):
        raise CheckpointError(f"output file {out} must end in .weights.h5 (the Keras weights format)")
    state = read_state_dict(Path(config.checkpoint))
    pairs, classes = match_timm_inception_v4(state, config.include_top, config.checkpoint)

    from train.inception_v4 import InceptionV4

    model = InceptionV4(
        include_top=config.include_top,
        weights=None,
        input_shape=(None, None, 3),
        classes=classes or 1000,
        classifier_activation="softmax",
    )
    for e, array in pairs:
        getattr(model.get_layer(e.layer), e.attr).assign(array)
    if len(pairs) != len(model.weights):
        raise RuntimeError(f"{len(pairs)} tensors assigned to a model of {len(model.weights)} variables")
    _save_weights_atomically(model, out)
    return ConvertResult(out, config.include_top, classes, len(pairs), out.stat().st_size)


def _save_weights_atomically(model, out: Path) -> None:
    """model.save_weights to a temporary name beside `out` (Keras wants the .weights.h5 suffix), then rename."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name[: -len('.weights.h5')]}.{os.getpid()}.tmp.weights.h5")
    try:
        model.save_weights(str(tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


# --- the Keras cache ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CachedWeights:
    """One backbone's ImageNet weights file in the Keras cache."""

    backbone: str
    file: str | None  # None: the backbone has no ImageNet weights registered
    path: Path | None
    status: str  # "present", "missing", "not HDF5" (e.g. an interrupted download), or "none registered"
    size: int | None  # bytes, when the file exists
    source: str  # where to get it: a download address, or how to make it


def cached_weights(cache_dir: Path | None = None) -> list[CachedWeights]:
    """The registry's ImageNet weights files and whether the Keras cache ($KERAS_HOME/models) holds them."""
    import h5py

    cache = Path(cache_dir) if cache_dir is not None else keras_cache_dir()
    rows = []
    for name, backbone in BACKBONES.items():
        if backbone.weights_file is None:
            rows.append(CachedWeights(name, None, None, "none registered", None, ""))
            continue
        path = cache / backbone.weights_file
        if backbone.weights_url:
            source = f"download {backbone.weights_url}"
        else:
            source = backbone.weights_howto.format(path=path) if backbone.weights_howto else "no download address"
        if path.is_file():
            status = "present" if h5py.is_hdf5(path) else "not HDF5"
            rows.append(CachedWeights(name, backbone.weights_file, path, status, path.stat().st_size, source))
        else:
            rows.append(CachedWeights(name, backbone.weights_file, path, "missing", None, source))
    return rows


def format_cached_weights(rows: Sequence[CachedWeights], cache_dir: Path) -> str:
    """The `list` table: one line per backbone, then how to get each file that is not usable."""
    lines = [f"Keras cache: {cache_dir}"]
    width = max(len(r.file or "-") for r in rows)
    lines.append(f"{'backbone':<20} {'file':<{width}} {'status':<9} size")
    for r in rows:
        size = f"{r.size / 1e6:.1f} MB" if r.size is not None else "-"
        lines.append(f"{r.backbone:<20} {r.file or '-':<{width}} {r.status:<9} {size}")
    todo = [r for r in rows if r.file and r.status != "present"]
    if todo:
        lines.append("")
        lines.append("To get the files that are not present:")
        for r in todo:
            lines.append(f"  {r.backbone}: {r.source}")
    return "\n".join(lines)


# --- command line -------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """`python -m train.weights convert|list`; exit status 0 done, 2 refused (the message says why)."""
    p = argparse.ArgumentParser(prog="python -m train.weights", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="convert timm's inception_v4 checkpoint to a Keras weights file")
    c.add_argument("--from", dest="source", required=True, choices=["timm"], help="checkpoint family")
    c.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="model.safetensors or a .pth state dict")
    c.add_argument("--to", dest="out", required=True, type=Path, metavar="FILE.weights.h5", help="file to write")
    c.add_argument("--include-top", action="store_true", help="keep the classifier (default: features only, no top)")
    sub.add_parser("list", help="each backbone's ImageNet weights file and whether the Keras cache has it")
    args = p.parse_args(argv)

    if args.command == "list":
        cache = keras_cache_dir()
        print(format_cached_weights(cached_weights(cache), cache))
        return 0
    config = ConvertConfig(source=args.source, checkpoint=args.checkpoint, out=args.out, include_top=args.include_top)
    try:
        result = convert(config)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    top = f"with the top ({result.classes} classes)" if result.include_top else "without the top"
    print(f"wrote {result.path} ({result.bytes / 1e6:.1f} MB, {result.tensors} tensors, {top})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
