"""Draw a small multi-label fashion dataset with OpenCV: garments whose type, colour, pattern and sleeves are learnable.

Writes JPEGs of varied size (about 300 to 800 px a side) to `OUT/images/`, a train list and a test list in the
JD headerless format (`id,url,f1..fK` and `id,url`), the classes file, the test labels (for evaluation), and a few
broken entries (a URL that 404s, a corrupt JPEG, an HTML page served as an image) so the crawl's failure report
has something to show. URLs point at `BASE_URL`, which the demo's local server answers.

The garments are drawn here rather than by common.synthetic (the benches' and tests' photos): what is drawn is
the labels, and the demo needs them learnable; only the JPEG writing is shared.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from common.atomic import atomic_write_bytes, atomic_write_text
from common.synthetic import write_jpeg

GARMENTS = ["top", "dress", "trousers"]
COLOURS = {"red": (40, 40, 210), "blue": (200, 70, 30), "green": (50, 170, 40), "yellow": (30, 210, 230)}  # BGR
CLASSES = GARMENTS + list(COLOURS) + ["striped", "dotted", "long_sleeves", "short_sleeves", "belt"]
BASE_URL_TOKEN = "{BASE_URL}"  # the lists are written with this token; the demo substitutes the server address


@dataclass(frozen=True, kw_only=True)
class DemoDataConfig:
    out: Path
    n_train: int = 320
    n_test: int = 80
    min_side: int = 300
    max_side: int = 800
    seed: int = 0


def _sample_labels(rng: np.random.Generator) -> dict[str, int]:
    garment = GARMENTS[rng.integers(len(GARMENTS))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    pattern = ["plain", "striped", "dotted"][rng.integers(3)]
    labels = dict.fromkeys(CLASSES, 0)
    labels[garment] = labels[colour] = 1
    if pattern != "plain":
        labels[pattern] = 1
    if garment != "trousers":
        labels["long_sleeves" if rng.random() < 0.5 else "short_sleeves"] = 1
    if rng.random() < 0.35:
        labels["belt"] = 1
    return labels


def _garment_mask(labels: dict[str, int], w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """A filled silhouette (uint8 mask) of the garment, placed with some jitter."""
    mask = np.zeros((h, w), np.uint8)
    s = min(w, h) * rng.uniform(0.7, 0.9)
    cx, cy = w / 2 + rng.uniform(-0.06, 0.06) * w, h / 2 + rng.uniform(-0.06, 0.06) * h

    def pts(coords):
        return np.array([[cx + x * s, cy + y * s] for x, y in coords], np.int32)

    if labels["trousers"]:
        cv2.fillPoly(mask, [pts([(-0.3, -0.45), (0.3, -0.45), (0.35, 0.45), (0.08, 0.45), (0.0, -0.1),
                                 (-0.08, 0.45), (-0.35, 0.45)])], 255)
    else:
        body = [(-0.2, -0.4), (0.2, -0.4), (0.22, 0.05), (-0.22, 0.05)]
        if labels["dress"]:
            body = [(-0.2, -0.4), (0.2, -0.4), (0.2, -0.05), (0.38, 0.45), (-0.38, 0.45), (-0.2, -0.05)]
        cv2.fillPoly(mask, [pts(body)], 255)
        length = 0.42 if labels["long_sleeves"] else 0.16
        for side in (-1, 1):
            sleeve = [(side * 0.2, -0.4), (side * (0.2 + length * 0.8), -0.4 + length),
                      (side * (0.2 + length * 0.8 - 0.1), -0.4 + length + 0.08), (side * 0.2, -0.2)]
            cv2.fillPoly(mask, [pts(sleeve)], 255)
    return mask


def draw_garment(labels: dict[str, int], w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """One BGR image of the garment described by `labels` on a light, slightly noisy background."""
    background = rng.integers(215, 250)
    img = np.full((h, w, 3), background, np.uint8)
    img = cv2.add(img, rng.integers(0, 12, (h, w, 3), dtype=np.uint8))
    colour = np.array(next(COLOURS[c] for c in COLOURS if labels[c]), np.float64)
    colour = np.clip(colour * rng.uniform(0.85, 1.1), 0, 255)
    fabric = np.empty((h, w, 3), np.uint8)
    fabric[:] = colour.astype(np.uint8)
    step = max(8, int(min(w, h) * 0.05))
    if labels["striped"]:
        for y in range(0, h, step * 2):
            fabric[y:y + step // 2] = 255 - background // 2
    if labels["dotted"]:
        for y in range(step // 2, h, step * 2):
            for x in range(step // 2 + (y // step) % 2 * step, w, step * 2):
                cv2.circle(fabric, (x, y), max(3, step // 3), (250, 250, 250), -1)
    mask = _garment_mask(labels, w, h, rng)
    img[mask > 0] = fabric[mask > 0]
    if labels["belt"]:
        # A dark band across the garment: the waistband of trousers, the waist of a top or dress.
        rows = np.nonzero(mask.any(axis=1))[0]
        top, height = rows[0], rows[-1] - rows[0]
        y = int(top + height * (0.02 if labels["trousers"] else 0.4))
        thickness = max(6, height // 14)
        band = np.zeros_like(mask)
        band[y:y + thickness] = mask[y:y + thickness]
        img[band > 0] = (20, 20, 20)
    return img


def generate(config: DemoDataConfig) -> dict[str, Path]:
    """Write the images and the JD-format lists; returns the paths of the files it wrote."""
    rng = np.random.default_rng(config.seed)
    images = config.out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[str]] = {"train": [], "test": []}
    test_labels = []
    for split, n in (("train", config.n_train), ("test", config.n_test)):
        for i in range(n):
            image_id = f"{split}_{i:05d}"
            labels = _sample_labels(rng)
            w, h = (int(v) for v in rng.integers(config.min_side, config.max_side + 1, 2))
            path = images / f"{image_id}.jpg"
            if not path.exists():  # re-running the demo reuses what is drawn (same seed, same pictures)
                write_jpeg(path, cv2.cvtColor(draw_garment(labels, w, h, rng), cv2.COLOR_BGR2RGB), quality=90)
            else:
                draw_garment(labels, w, h, rng)  # keep the random stream identical to a fresh run
            flags = [str(labels[c]) for c in CLASSES]
            url = f"{BASE_URL_TOKEN}/images/{image_id}.jpg"
            if split == "train":
                rows[split].append(",".join([image_id, url] + flags))
            else:
                rows[split].append(f"{image_id},{url}")
                test_labels.append(",".join([image_id, url] + flags))
    # Broken entries, as real hosts serve them: a missing file, a corrupt JPEG, an HTML page.
    atomic_write_bytes(images / "corrupt.jpg", b"\xff\xd8\xff\xe0" + bytes(rng.integers(0, 256, 2000, dtype=np.uint8)))
    atomic_write_bytes(images / "page.jpg", b"<!doctype html><html><body>Not found, but 200</body></html>")
    zeros = ",".join("0" for _ in CLASSES)
    broken = (("broken_404", "missing.jpg"), ("broken_corrupt", "corrupt.jpg"), ("broken_html", "page.jpg"))
    for image_id, name in broken:
        rows["train"].append(f"{image_id},{BASE_URL_TOKEN}/images/{name},{zeros.replace('0', '1', 1)}")
    out = {
        "train_list": config.out / "train.csv",
        "test_list": config.out / "test.csv",
        "test_labels": config.out / "test_labels.csv",
        "classes": config.out / "classes.txt",
    }
    atomic_write_text(out["train_list"], "\n".join(rows["train"]) + "\n")
    atomic_write_text(out["test_list"], "\n".join(rows["test"]) + "\n")
    atomic_write_text(out["test_labels"], "\n".join(test_labels) + "\n")
    atomic_write_text(out["classes"], "\n".join(CLASSES) + "\n")
    return out


def with_base_url(list_path: Path, base_url: str, out_path: Path) -> Path:
    """Copy a generated list with the server's address in place of the URL token."""
    atomic_write_text(out_path, list_path.read_text(encoding="utf-8").replace(BASE_URL_TOKEN, base_url))
    return out_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--n-train", type=int, default=320)
    parser.add_argument("--n-test", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = generate(DemoDataConfig(out=args.out, n_train=args.n_train, n_test=args.n_test, seed=args.seed))
    for name, path in paths.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
