"""Image handling: each format becomes a decodable RGB file of the recorded size; broken bytes get the right reason."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from crawl.images import ImageRejected, configure_pil, process_image
from tests import crawl_samples as samples

REPO = Path(__file__).resolve().parents[1]
MAX_PIXELS = 50_000_000


@pytest.fixture(scope="module", autouse=True)
def _pil_limits():
    configure_pil(MAX_PIXELS)


def decode_cv2(tmp_path: Path, data: bytes, extension: str) -> np.ndarray:
    """cv2.imread of the bytes written to a file, as RGB."""
    path = tmp_path / f"img{extension}"
    path.write_bytes(data)
    bgr = cv2.imread(str(path))
    assert bgr is not None, f"cv2 cannot read {path}"
    return bgr[:, :, ::-1]


@pytest.mark.parametrize("name", sorted(samples.FORMATS))
def test_each_format_is_stored_as_rgb_of_the_recorded_size(name, tmp_path):
    factory, _, (width, height), unchanged = samples.FORMATS[name]
    data = factory()
    stored = process_image(data, max_pixels=MAX_PIXELS)
    assert (stored.width, stored.height) == (width, height)
    assert stored.unchanged is unchanged
    if unchanged:
        assert stored.data == data  # byte for byte
    with Image.open(io.BytesIO(stored.data)) as im:
        assert im.format in ("JPEG", "PNG") and im.mode == "RGB" and im.size == (width, height)
        assert im.getexif().get(0x0112, 1) == 1  # no rotation left for cv2 to apply
    rgb = decode_cv2(tmp_path, stored.data, stored.extension)
    assert rgb.shape == (height, width, 3)
    # The content survives: compare with PIL's own view of the source (orientation applied, alpha over white).
    reference = Image.open(io.BytesIO(data))
    reference = ImageOps.exif_transpose(reference)
    if reference.mode.startswith("I;16"):
        expected = (np.asarray(reference).astype(np.uint32) >> 8).astype(np.uint8)[..., None].repeat(3, axis=2)
    elif reference.mode in ("RGBA", "P", "LA") and (reference.mode != "P" or "transparency" in reference.info):
        rgba = np.asarray(reference.convert("RGBA")).astype(np.float32)
        alpha = rgba[..., 3:] / 255.0
        expected = (rgba[..., :3] * alpha + 255.0 * (1 - alpha)).round().astype(np.uint8)
    else:
        expected = np.asarray(reference.convert("RGB"))
    assert np.abs(rgb.astype(int) - expected.astype(int)).mean() < 4.0


def test_alpha_is_composited_over_white():
    stored = process_image(samples.rgba_png(), max_pixels=MAX_PIXELS)
    pixels = np.asarray(Image.open(io.BytesIO(stored.data)))
    assert (pixels[:, :37] == 255).all()  # the transparent left half
    assert pixels[:, 40:].mean() < 250  # the opaque right half keeps its colours


def test_16_bit_png_is_scaled_not_clipped():
    stored = process_image(samples.gray16_png(), max_pixels=MAX_PIXELS)
    pixels = np.asarray(Image.open(io.BytesIO(stored.data)))[..., 0]
    assert (pixels.reshape(-1) == np.arange(75 * 50) % 256).all()


def test_exif_rotation_is_applied_and_the_tag_dropped():
    stored = process_image(samples.exif_rotated_jpeg(80, 40, orientation=6), max_pixels=MAX_PIXELS)
    assert (stored.width, stored.height) == (40, 80) and not stored.unchanged
    pixels = np.asarray(Image.open(io.BytesIO(stored.data)))
    # Orientation 6 means "rotate 90 degrees clockwise to display": the red top-left corner goes to the top right.
    assert pixels[:5, -5:, 0].mean() > 200 and pixels[:5, -5:, 1:].mean() < 60
    assert pixels[:5, :5, 0].mean() < 200


def test_max_side_downsizes_larger_images_only():
    big = process_image(samples.jpeg(400, 200), max_pixels=MAX_PIXELS, max_side=100)
    assert (big.width, big.height) == (100, 50) and not big.unchanged
    small = process_image(samples.jpeg(80, 40), max_pixels=MAX_PIXELS, max_side=100)
    assert small.unchanged and (small.width, small.height) == (80, 40)
    png = process_image(samples.rgba_png(300, 60), max_pixels=MAX_PIXELS, max_side=150)
    assert (png.width, png.height) == (150, 30)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (samples.HTML, "not_image"),
        (b"GIF89a" + b"\x00" * 3, "corrupt"),
        (samples.truncated_jpeg(), "truncated"),
        (samples.corrupt_jpeg(), "corrupt"),
        (samples.corrupt_png(), "corrupt"),
        (samples.gray_png()[:200], "truncated"),
        (bytes(range(256)) * 4, "not_image"),
    ],
    ids=["empty", "html", "gif-header-only", "truncated-jpeg", "corrupt-jpeg", "corrupt-png", "cut-png", "noise"],
)
def test_broken_bytes_are_rejected_with_a_reason(data, reason):
    with pytest.raises(ImageRejected) as info:
        process_image(data, max_pixels=MAX_PIXELS)
    assert info.value.reason == reason, info.value.detail


def test_truncated_jpeg_is_caught_even_with_an_end_marker_in_its_headers():
    data = samples.truncated_jpeg()
    assert b"\xff\xd9" in data  # the comment segment holds one; it must not count as the end of the image
    with pytest.raises(ImageRejected, match="end marker"):
        process_image(data, max_pixels=MAX_PIXELS)


def test_pixel_limit_is_checked_from_the_header(tmp_path):
    with pytest.raises(ImageRejected) as info:
        process_image(samples.jpeg(200, 100), max_pixels=19_999)
    assert info.value.reason == "too_many_pixels"
    assert process_image(samples.jpeg(200, 100), max_pixels=20_000).width == 200


def test_decompression_bomb_is_rejected_without_allocating_the_image(tmp_path):
    """A 30000x30000 PNG of ~200 KB would decode into 900 MB: it must be rejected from its header alone."""
    bomb = samples.bomb_png()
    assert len(bomb) < 500_000
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb)
    # In a fresh process, so its peak memory is its own.
    script = (
        "import json, resource, sys\n"
        "from crawl.images import configure_pil, process_image, ImageRejected\n"
        "configure_pil(50_000_000)\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        "    process_image(data, max_pixels=50_000_000)\n"
        "    reason = None\n"
        "except ImageRejected as e:\n"
        "    reason = e.reason\n"
        "grew_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before\n"
        "print(json.dumps({'reason': reason, 'grew_kb': grew_kb}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(path)], cwd=REPO, capture_output=True, text=True, timeout=60, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["reason"] == "too_many_pixels"
    assert result["grew_kb"] < 50_000  # under 50 MB, against 900 MB for the decoded image


def _damaged_jpegs() -> dict[str, bytes]:
    """JPEGs whose headers open but whose data libjpeg refuses, found by the structural check instead of a decode."""
    base = samples.jpeg(120, 80, seed=2)
    middle = (base.index(b"\xff\xda") + len(base)) // 2
    dht, sof = bytearray(base), bytearray(base)
    dht[dht.index(b"\xff\xc4") + 5] = 200  # a code-length count larger than the table
    sof[sof.index(b"\xff\xc0") + 11] = 0x55  # sampling factors 5x5 (at most 4x4)
    return {
        "stray SOI": base[:middle] + b"\xff\xd8" + base[middle:],
        "stray SOF": base[:middle] + b"\xff\xc0\x00\x04\x00\x00" + base[middle:],
        "bogus DHT": bytes(dht),
        "bad sampling": bytes(sof),
    }


@pytest.mark.parametrize(
    ("name", "detail"),
    [
        ("stray SOI", "JPEG marker 0xD8 inside the image data"),
        ("stray SOF", "JPEG marker 0xC0 inside the image data"),
        ("bogus DHT", "bogus JPEG Huffman table"),
        ("bad sampling", "sampling factors 5x5"),
    ],
)
def test_a_kept_jpeg_is_checked_to_its_end_marker_as_strictly_as_a_decode(name, detail):
    data = _damaged_jpegs()[name]
    with pytest.raises(ImageRejected) as info:
        process_image(data, max_pixels=MAX_PIXELS)
    assert (info.value.reason, detail in info.value.detail) == ("corrupt", True), info.value.detail
    with pytest.raises(OSError, match="broken data stream"):
        Image.open(io.BytesIO(data)).load()  # a full decode refuses it too


def test_restart_markers_and_bytes_after_the_end_marker_keep_a_jpeg_unchanged():
    buffer = io.BytesIO()
    Image.fromarray(samples.pattern(120, 80)).save(buffer, "JPEG", quality=90, restart_marker_blocks=2)
    with_restarts = buffer.getvalue()
    assert b"\xff\xd0" in with_restarts
    for data in (with_restarts, samples.jpeg(120, 80) + b"trailing\xff\x00bytes"):
        stored = process_image(data, max_pixels=MAX_PIXELS)
        assert stored.unchanged and stored.data == data and (stored.width, stored.height) == (120, 80)
