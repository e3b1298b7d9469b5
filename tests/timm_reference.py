"""Make the timm reference for tests/test_weights.py: `python -m tests.timm_reference OUT_DIR`.

Builds timm's `inception_v4` with random weights and random batch-norm statistics and writes to OUT_DIR its
state dict (`model.safetensors`, `inception_v4.pth`) and `reference.npz`: the test images (NCHW), timm's
logits for them, the 299 px `forward_features`, the BN epsilons and the state-dict keys in timm's order.
It runs in its own process, without TensorFlow: torch's CUDA wheel imports triton, which crashes (segfault)
a process that has already loaded TensorFlow, as pytest has.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import safetensors.torch
import timm
import torch

SIZES = {"299": (299, 299), "107x91": (107, 91)}  # a rectangle too: padding must agree on both axes


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Random BN affine parameters, then running statistics measured on noise and randomly perturbed.

    Plain random running statistics (unrelated to the activations) make a 149-layer network's activations
    collapse: its logits then no longer depend on the image, and could not tell a wrong layer apart. Measured
    statistics, perturbed by random amounts, keep every layer informative and are still unlike trained ones.
    """
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5, generator=g)
            bn.bias.uniform_(-0.2, 0.2, generator=g)
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the calibration batch
        model.last_linear.bias.uniform_(-1.0, 1.0, generator=g)
        model.train()
        model(torch.randn(4, 3, 160, 160, generator=g))
        model.eval()
        for bn in bns:
            std = bn.running_var.sqrt()
            bn.running_mean.add_(0.1 * std * torch.randn(std.shape, generator=g))
            bn.running_var.mul_(torch.empty(std.shape).uniform_(0.8, 1.25, generator=g))


def make_reference(out: Path, seed: int = 0) -> None:
    """Write model.safetensors, inception_v4.pth and reference.npz to `out` (see the module docstring)."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = timm.create_model("inception_v4", pretrained=False)
    randomise(model, seed + 1)
    rng = np.random.default_rng(seed)
    arrays = {"bn_epsilons": np.array(sorted({m.eps for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}))}
    with torch.no_grad():
        for key, (h, w) in SIZES.items():
            images = rng.standard_normal((2, 3, h, w)).astype(np.float32)
            features = model.forward_features(torch.from_numpy(images))
            arrays[f"images_{key}"] = images
            arrays[f"logits_{key}"] = model.forward_head(features).numpy()
            if key == "299":
                arrays["features_299"] = features.numpy()
    state = model.state_dict()
    arrays["state_keys"] = np.array(list(state))  # timm's order (a safetensors file keeps its own)
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    torch.save(state, out / "inception_v4.pth")
    np.savez(out / "reference.npz", **arrays)


if __name__ == "__main__":
    make_reference(Path(sys.argv[1]))
