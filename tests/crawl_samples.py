"""Small images in every format the crawler must handle, and broken ones, built in memory for the crawl tests.

Not common.synthetic's photos: these tests need a known picture (a gradient with a red top-left corner, so a
rotation or a lost alpha channel shows) in formats and modes only Pillow writes (progressive, EXIF, CMYK, GIF...).
"""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
from PIL import Image

from common.synthetic import with_jpeg_comment


def pattern(width: int = 75, height: int = 50, seed: int = 0) -> np.ndarray:
    """A smooth RGB test picture (JPEG-friendly) with a distinct top-left corner, so rotations are visible."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    image = image.astype(np.uint8)
    image[: height // 4, : width // 4] = (255, 0, 0)
    image[-2:, -2:] = rng.integers(0, 255, (2, 2, 3), dtype=np.uint8)
    return image


def _save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def jpeg(width: int = 75, height: int = 50, seed: int = 0, **kwargs) -> bytes:
    return _save(Image.fromarray(pattern(width, height, seed)), "JPEG", quality=90, **kwargs)


def progressive_jpeg(width: int = 75, height: int = 50) -> bytes:
    return jpeg(width, height, progressive=True)


def exif_rotated_jpeg(width: int = 80, height: int = 40, orientation: int = 6) -> bytes:
    """A JPEG whose pixels are stored width x height, with an EXIF tag saying 'rotate for display'."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _save(Image.fromarray(pattern(width, height)), "JPEG", quality=90, exif=exif)


def cmyk_jpeg(width: int = 75, height: int = 50) -> bytes:
    return _save(Image.fromarray(pattern(width, height)).convert("CMYK"), "JPEG", quality=90)


def gray_jpeg(width: int = 75, height: int = 50) -> bytes:
    return _save(Image.fromarray(pattern(width, height)).convert("L"), "JPEG", quality=90)


def rgba_png(width: int = 75, height: int = 50) -> bytes:
    """RGBA with the left half fully transparent (must become white) and the right half opaque."""
    rgba = np.dstack([pattern(width, height), np.full((height, width), 255, np.uint8)])
    rgba[:, : width // 2, 3] = 0
    return _save(Image.fromarray(rgba, "RGBA"), "PNG")


def gray_png(width: int = 75, height: int = 50) -> bytes:
    return _save(Image.fromarray(pattern(width, height)).convert("L"), "PNG")


def gray16_png(width: int = 75, height: int = 50) -> bytes:
    """16-bit grayscale: value 257 * v, so the 8-bit result must be v (scaled, not clipped)."""
    values = (np.arange(width * height) % 256).reshape(height, width).astype(np.uint16) * 257
    ok, encoded = cv2.imencode(".png", values)
    assert ok
    return encoded.tobytes()


def rgb16_png(width: int = 75, height: int = 50) -> bytes:
    bgr16 = pattern(width, height)[:, :, ::-1].astype(np.uint16) * 257
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(bgr16))
    assert ok
    return encoded.tobytes()


def webp(width: int = 75, height: int = 50) -> bytes:
    return _save(Image.fromarray(pattern(width, height)), "WEBP", quality=90)


def gif(width: int = 75, height: int = 50) -> bytes:
    """A palette GIF whose colour index 0 is transparent (the top-left quarter)."""
    image = Image.fromarray(pattern(width, height)).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    pixels = np.array(image)
    pixels[: height // 4, : width // 4] = 0
    out = Image.fromarray(pixels, "P")
    out.putpalette(image.getpalette())
    return _save(out, "GIF", transparency=0)


def bmp(width: int = 75, height: int = 50) -> bytes:
    return _save(Image.fromarray(pattern(width, height)), "BMP")


def truncated_jpeg() -> bytes:
    """A JPEG cut before its end, with a comment segment holding an end marker (as EXIF thumbnails do)."""
    with_comment = with_jpeg_comment(jpeg(120, 80), b"\xff\xd8\xff\xd9ok")
    return with_comment[: len(with_comment) * 2 // 3]


def corrupt_jpeg() -> bytes:
    """Starts like a JPEG, then garbage instead of the markers."""
    return b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8


def corrupt_png() -> bytes:
    """A PNG whose compressed pixel data is garbage (the chunk CRCs are right)."""
    data = bytearray(gray_png())
    start = data.index(b"IDAT") + 4
    length = struct.unpack(">I", data[start - 8 : start - 4])[0]
    garbage = bytes((i * 37 + 11) % 256 for i in range(length))
    data[start : start + length] = garbage
    crc = zlib.crc32(b"IDAT" + garbage) & 0xFFFFFFFF
    data[start + length : start + length + 4] = struct.pack(">I", crc)
    return bytes(data)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def bomb_png(side: int = 30000, bit_depth: int = 2) -> bytes:
    """A valid side x side grayscale PNG of zeros: ~220 KB that PIL would decode into side*side bytes (900 MB)."""
    row = b"\0" * (1 + (side * bit_depth + 7) // 8)  # filter byte + packed pixels
    compressor = zlib.compressobj(9)
    block = row * 500
    parts = [compressor.compress(block) for _ in range(side // 500)]
    parts.append(compressor.compress(row * (side % 500)))
    parts.append(compressor.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, bit_depth, 0, 0, 0, 0)
    chunks = _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"".join(parts)) + _png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


HTML = b"<!DOCTYPE html><html><head><title>Not found</title></head><body>Sorry</body></html>"

# name -> (bytes factory, content type, expected stored size (w, h), stored byte for byte?)
FORMATS = {
    "baseline_jpeg": (jpeg, "image/jpeg", (75, 50), True),
    "progressive_jpeg": (progressive_jpeg, "image/jpeg", (75, 50), True),
    "exif_rotated_jpeg": (exif_rotated_jpeg, "image/jpeg", (40, 80), False),
    "cmyk_jpeg": (cmyk_jpeg, "image/jpeg", (75, 50), False),
    "gray_jpeg": (gray_jpeg, "image/jpeg", (75, 50), False),
    "rgba_png": (rgba_png, "image/png", (75, 50), False),
    "gray_png": (gray_png, "image/png", (75, 50), False),
    "gray16_png": (gray16_png, "image/png", (75, 50), False),
    "rgb16_png": (rgb16_png, "image/png", (75, 50), False),
    "webp": (webp, "image/webp", (75, 50), False),
    "gif": (gif, "image/gif", (75, 50), False),
    "bmp": (bmp, "image/bmp", (75, 50), False),
}
