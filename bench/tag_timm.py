"""The PyTorch side of bench.tag: timm's model of a backbone, tagging image files in a child process on request.

Started by `bench.tag` as `python -m bench.tag_timm` (PyTorch and timm crash a process that has already loaded
TensorFlow, so they live in their own process; this module imports neither TensorFlow nor the project). The first
line on standard input is the setup (JSON): the timm model name, the class count, the input size, the batch size,
the DataLoader workers, the torch threads, the seed and the TTA views (`predict.tta.TTA_VIEWS` as plain data, so
the views are defined once). The child builds the model (random weights, eval mode), answers `{"ready": ...}`,
then serves one JSON request per line, `{"paths": [...], "tta": N, "precision": "f32"|"bf16"}`, answering
`{"seconds": ..., "probabilities": [[...]]}` (or `{"error": ...}`) on one line of standard output.

What a request does, timed from the DataLoader's creation to the last probabilities (as `predict tag` is timed from
its first file read): a `torch.utils.data.DataLoader` with `workers` processes decodes each file with Pillow,
converts it to RGB and resizes it to size x size (bilinear with Pillow's antialiasing, as training's resize);
batches of `batch_size` images become float 0..255, get the first N views stacked along the batch axis (view-major,
one model call per batch, as predict does), are normalised to -1..1 (timm's mean 0.5 / std 0.5 for these models,
the same as the Keras backbones' preprocessing), and go through the model under `torch.inference_mode()`, in float32
or under `torch.autocast("cpu", dtype=torch.bfloat16)`; the sigmoid probabilities of the views are averaged.

The views are predict.tta's, pixel for pixel: each output pixel gathers the input pixel that training's resampler
picks for it (nearest neighbour, borders reflected), computed with PyTorch's own indexing (`apply_view`).
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import timm
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset


class ImageFiles(Dataset):
    """Image files decoded by Pillow to RGB and resized to size x size: (3, size, size) uint8 tensors."""

    def __init__(self, paths: list[str], size: int):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        with Image.open(self.paths[index]) as image:
            rgb = image.convert("RGB").resize((self.size, self.size), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)


def source_pixels(coordinates: torch.Tensor, size: int) -> torch.Tensor:
    """The nearest pixel to each coordinate, reflected at the borders repeating the edge pixel: training's rule
    (`train.data._source_pixel`), so the views below are predict's views pixel for pixel."""
    v = coordinates + 0.5
    v = size - (size - v.abs()).abs()
    return v.to(torch.int64).clamp(0, size - 1)


def apply_view(x: torch.Tensor, view: dict, step: int, zoom_fraction: float) -> torch.Tensor:
    """One view of a batch (B, C, S, S): content shifted by view["shift"] * step pixels (+ is down/right), then the
    central zoom_fraction scaled to full size (if view["zoom"]), then mirrored (if view["flip"]); each output pixel
    shows the input pixel that predict.tta's affine map (`train.data.affine_maps`) picks, in float32 as there."""
    size = x.shape[-1]
    centre = (size - 1) / 2.0
    crop = zoom_fraction if view["zoom"] else 1.0
    flip = -1.0 if view["flip"] else 1.0
    r = torch.arange(size, dtype=torch.float32)
    rows = source_pixels(crop * (r - centre) - view["shift"][0] * step + centre, size)
    cols = source_pixels(flip * crop * (r - centre) - view["shift"][1] * step + centre, size)
    return x.index_select(-2, rows).index_select(-1, cols)


class TimmTagger:
    """timm's model with random weights in eval mode, scoring image files as the module docstring describes."""

    def __init__(self, setup: dict):
        torch.set_num_threads(int(setup["threads"]))
        torch.manual_seed(int(setup["seed"]))
        self.setup = setup
        self.model = timm.create_model(setup["model"], pretrained=False, num_classes=int(setup["classes"])).eval()

    def views(self, images: torch.Tensor, tta: int) -> torch.Tensor:
        if tta == 1:
            return images
        s = self.setup
        return torch.cat([apply_view(images, v, s["shift_step"], s["zoom_fraction"]) for v in s["views"][:tta]])

    def tag(self, paths: list[str], tta: int, precision: str) -> tuple[float, np.ndarray]:
        """(seconds, probabilities (N, K)) for the files, decode and resize included."""
        s = self.setup
        start = time.perf_counter()
        loader = DataLoader(ImageFiles(paths, int(s["image_size"])), batch_size=int(s["batch_size"]),
                            num_workers=int(s["workers"]), shuffle=False)
        out = []
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            for batch in loader:
                x = self.views(batch.float(), tta) / 127.5 - 1.0
                p = torch.sigmoid(self.model(x).float())
                out.append(p.reshape(tta, batch.shape[0], -1).mean(dim=0))
        probabilities = torch.cat(out).numpy().astype(np.float64)
        return time.perf_counter() - start, probabilities


def serve(stdin=sys.stdin, stdout=sys.stdout) -> None:
    """Read the setup line, then answer one request per line until standard input closes."""
    tagger = TimmTagger(json.loads(stdin.readline()))
    print(json.dumps({"ready": True, "torch": torch.__version__, "timm": timm.__version__}), file=stdout, flush=True)
    for line in stdin:
        request = json.loads(line)
        try:
            if request["precision"] not in ("f32", "bf16"):
                raise ValueError(f"precision must be f32 or bf16, got {request['precision']!r}")
            seconds, probabilities = tagger.tag(list(request["paths"]), int(request["tta"]), request["precision"])
            answer = {"seconds": seconds, "probabilities": probabilities.tolist()}
        except Exception as err:  # reported to the parent, which names the request
            answer = {"error": f"{type(err).__name__}: {err}"}
        print(json.dumps(answer), file=stdout, flush=True)


if __name__ == "__main__":
    serve()
