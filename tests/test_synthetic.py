"""common.synthetic: deterministic photo-like pictures, their JPEGs, and JPEG comments that keep the picture."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from common.synthetic import jpeg_bytes, photo, photo_sizes, with_jpeg_comment, write_jpeg

REPO = Path(__file__).resolve().parents[1]


def test_photo_is_deterministic_per_seed_and_distinct_across_seeds():
    a = photo(48, 64, seed=3)
    assert a.shape == (48, 64, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, photo(48, 64, seed=3))
    assert np.abs(a.astype(int) - photo(48, 64, seed=4).astype(int)).mean() > 20
    assert not np.array_equal(photo(48, 64, seed=(0, 1)), photo(48, 64, seed=(0, 2)))


def test_photo_has_structure_that_flips_and_shifts_change():
    a = photo(48, 64, seed=1).astype(int)
    assert a.std() > 30  # not flat colour
    assert np.abs(a - a[:, ::-1]).mean() > 10
    assert np.abs(a[:, 4:] - a[:, :-4]).mean() > 5


def test_photo_jpeg_is_photo_sized():
    # Flat colour would encode to a few KB; the benches rely on decode costs like a photo's.
    assert 40_000 < len(jpeg_bytes(photo(700, 500, seed=0))) < 200_000


def test_photo_sizes_stay_within_the_jitter():
    sizes = photo_sizes(200, 700, 500, jitter=40, seed=1)
    assert len(sizes) == 200 and sizes == photo_sizes(200, 700, 500, jitter=40, seed=1)
    heights, widths = zip(*sizes, strict=True)
    assert min(heights) >= 660 and max(heights) <= 740 and min(widths) >= 460 and max(widths) <= 540
    assert len(set(sizes)) > 150


def test_write_jpeg_stores_the_returned_bytes_which_decode_to_the_picture(tmp_path):
    rgb = photo(40, 56, seed=2)
    path = tmp_path / "sub" / "x.jpg"
    data = write_jpeg(path, rgb, quality=95)
    assert path.read_bytes() == data and data == jpeg_bytes(rgb, quality=95)
    decoded = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB).astype(int)
    error, swapped = np.abs(decoded - rgb).mean(), np.abs(decoded - rgb[..., ::-1]).mean()
    assert error < 10 < 3 * error < swapped  # lossy, but RGB in the RGB order
    assert [p.name for p in path.parent.iterdir()] == ["x.jpg"]  # no temporary file left


def test_a_comment_changes_the_bytes_not_the_picture():
    data = jpeg_bytes(photo(30, 40, seed=0))
    commented = with_jpeg_comment(data, b"image 7")
    assert commented != data and commented[2:13] == b"\xff\xfe\x00\x09image 7"
    image = Image.open(io.BytesIO(commented))
    assert image.info["comment"] == b"image 7"
    np.testing.assert_array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(data))))
    with pytest.raises(ValueError, match="not a JPEG"):
        with_jpeg_comment(b"\x89PNG", b"x")


def test_synthetic_does_not_import_tensorflow():
    code = "import sys, common.synthetic; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
