"""Turn downloaded bytes into a stored image: size check from the header, validation, RGB conversion, downsizing.

Baseline and progressive RGB JPEGs without an EXIF rotation are kept byte for byte, after a structural check of the
whole file (frame, tables, every marker in the entropy-coded data, the end marker) that costs a regex scan instead of
a decode: it finds what makes libjpeg give up (truncation, bogus tables or sampling factors, a stray marker), and a
decode would add only the Huffman decoding, which libjpeg does not fail on. Everything else is decoded and
re-encoded as an 8-bit RGB file (alpha composited over white, EXIF orientation applied, no orientation tag left) so
that every stored file decodes to the same RGB image, of the recorded size, with `tf.io.decode_image(channels=3)`
(which ignores EXIF orientation) and with `cv2.imread` (which applies it). Lossy sources (JPEG, WebP, AVIF) become
JPEG (quality 95); lossless ones (PNG, GIF, BMP, TIFF) become PNG.
"""

from __future__ import annotations

import functools
import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Formats we let PIL open; others (EPS would run Ghostscript, for instance) are `not_image`. PIL's JPEG opener
# also returns MPO (multi-picture JPEG) files.
ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF", "AVIF")
LOSSY_FORMATS = ("JPEG", "MPO", "WEBP", "AVIF")
JPEG_QUALITY = 95
PNG_COMPRESS_LEVEL = 6

# Magic numbers of the accepted formats: bytes that start like one of them but fail to open are `corrupt`, not
# `not_image`.
_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
_SOF_MARKERS = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame codes (C4/C8/CC are not SOFs)
_PLAIN_JPEG_SOFS = {0xC0, 0xC1, 0xC2}  # baseline, extended sequential, progressive (Huffman, 8-bit)
_ORIENTATION_TAG = 0x0112
# A marker in the entropy-coded data: 0xFF followed by neither a stuffed 0x00, a restart code (D0-D7) nor a fill 0xFF.
_MARKER_IN_SCAN = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
# What may follow a scan before the end marker: DHT, DQT, DRI, SOS, DNL, COM, APPn (progressive and multi-scan files).
_BETWEEN_SCANS = {0xC4, 0xDB, 0xDD, 0xDA, 0xDC, 0xFE, *range(0xE0, 0xF0)}


class ImageRejected(Exception):
    """The bytes are not a storable image; `reason` is one of crawl.crawler.FAILURE_REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class StoredImage:
    """What to write: the file bytes, its extension, the decoded size, and whether the source bytes were kept."""

    data: bytes
    extension: str  # ".jpg" or ".png"
    width: int
    height: int
    unchanged: bool  # True when `data` is the downloaded file byte for byte
    source_format: str


def configure_pil(max_pixels: int) -> None:
    """Align PIL's own decompression-bomb guard with --max-pixels (PIL raises above twice its limit)."""
    Image.MAX_IMAGE_PIXELS = max(int(max_pixels), 1)
    # Images between the limit and twice it raise a warning in PIL; we reject them ourselves right after opening.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _sniff(data: bytes) -> str | None:
    """The accepted format that `data` starts like, or None."""
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[4:8] == b"ftyp" and data[8:12] in (b"avif", b"avis"):
        return "AVIF"
    return None


def _describe_non_image(data: bytes, content_type: str | None) -> str:
    head = data[:512].lstrip().lower()
    if head.startswith(b"<!doctype html") or b"<html" in head:
        kind = "an HTML page"
    elif head.startswith(b"<"):
        kind = "markup (XML/SVG)"
    elif head[:1] in (b"{", b"["):
        kind = "JSON"
    else:
        kind = f"unrecognised bytes {data[:8]!r}"
    return f"{kind}, not an image (content-type {content_type or 'missing'})"


@dataclass(frozen=True)
class _JpegInfo:
    sof: int  # the start-of-frame marker code, e.g. 0xC0 baseline, 0xC2 progressive
    components: int
    scan_start: int  # offset of the first entropy-coded byte


def _jpeg_info(data: bytes) -> _JpegInfo:
    """Walk the JPEG markers up to the first scan (a few header bytes, not the image data)."""
    pos, n = 2, len(data)
    sof = components = None
    while pos < n:
        if data[pos] != 0xFF:
            raise ImageRejected("corrupt", f"JPEG marker expected at byte {pos}")
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            break
        marker = data[pos]
        pos += 1
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            continue
        if marker == 0xD9:
            raise ImageRejected("corrupt", "JPEG ends before any image data")
        if pos + 2 > n:
            break
        length = int.from_bytes(data[pos : pos + 2], "big")
        if length < 2:
            raise ImageRejected("corrupt", f"bad JPEG segment length at byte {pos}")
        if pos + length > n:
            raise ImageRejected("truncated", "JPEG ends inside its headers")
        if marker in _SOF_MARKERS and pos + 8 <= n:
            sof, components = marker, data[pos + 7]
            _check_frame(data[pos + 2 : pos + length], marker)
        if marker == 0xC4:
            _check_huffman_tables(data[pos + 2 : pos + length], pos)
        if marker == 0xDA:
            if sof is None:
                raise ImageRejected("corrupt", "JPEG scan before its frame header")
            return _JpegInfo(sof=sof, components=components, scan_start=pos + length)
        pos += length
    raise ImageRejected("truncated", "JPEG ends inside its headers")


def _check_frame(segment: bytes, marker: int) -> None:
    """A start-of-frame segment: precision, size, then (id, sampling factors, table) for each component."""
    if len(segment) < 6 or len(segment) != 6 + 3 * segment[5]:
        raise ImageRejected("corrupt", f"JPEG frame header 0x{marker:02X} of {len(segment)} bytes does not add up")
    for k in range(segment[5]):
        factors = segment[6 + 3 * k + 1]
        if not (1 <= factors >> 4 <= 4 and 1 <= factors & 15 <= 4):
            raise ImageRejected("corrupt", f"JPEG component {k} has sampling factors {factors >> 4}x{factors & 15}")


def _check_huffman_tables(segment: bytes, offset: int) -> None:
    """A DHT segment: tables of (class and id, 16 code-length counts, that many symbols) that fill it exactly."""
    pos = 0
    while pos < len(segment):
        if pos + 17 > len(segment):
            raise ImageRejected("corrupt", f"bogus JPEG Huffman table at byte {offset}")
        table = segment[pos]
        count = sum(segment[pos + 1 : pos + 17])
        if table >> 4 > 1 or table & 15 > 3 or count > 256 or pos + 17 + count > len(segment):
            raise ImageRejected("corrupt", f"bogus JPEG Huffman table at byte {offset}")
        pos += 17 + count


def _check_scans(data: bytes, scan_start: int) -> None:
    """From the first scan to the end marker, every marker must be one that may come between scans."""
    pos = scan_start
    while True:
        found = _MARKER_IN_SCAN.search(data, pos)
        if found is None:
            raise ImageRejected("truncated", f"JPEG without its end marker ({len(data)} bytes)")
        at = found.start()
        marker = data[at + 1]
        if marker == 0xD9:
            return
        if marker not in _BETWEEN_SCANS:
            raise ImageRejected("corrupt", f"JPEG marker 0x{marker:02X} inside the image data at byte {at}")
        if at + 4 > len(data):
            raise ImageRejected("truncated", f"JPEG ends inside a segment at byte {at}")
        length = int.from_bytes(data[at + 2 : at + 4], "big")
        if length < 2 or at + 2 + length > len(data):
            raise ImageRejected("corrupt", f"bad JPEG segment length at byte {at + 2}")
        if marker == 0xC4:
            _check_huffman_tables(data[at + 4 : at + 2 + length], at)
        pos = at + 2 + length


@functools.cache
def _openable_formats() -> tuple[str, ...]:
    """ACCEPTED_FORMATS that this PIL build can open (AVIF support is optional)."""
    Image.init()
    return tuple(f for f in ACCEPTED_FORMATS if f in Image.OPEN)


def _open(data: bytes, content_type: str | None) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data), formats=_openable_formats())
    except Image.DecompressionBombError as exc:  # PIL's own guard fires first above twice its limit
        found = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = found.group(1) if found else "too many"
        raise ImageRejected("too_many_pixels", f"{pixels} pixels in the header") from None
    except UnidentifiedImageError:
        fmt = _sniff(data)
        if fmt is not None:
            raise ImageRejected("corrupt", f"starts like a {fmt} file but cannot be read") from None
        raise ImageRejected("not_image", _describe_non_image(data, content_type)) from None
    except Exception as exc:  # PIL's header parsers raise assorted exceptions on hostile bytes
        raise ImageRejected("corrupt", f"unreadable header: {exc}") from None


def _load(im: Image.Image) -> None:
    """Decode the pixel data, mapping PIL's errors to our reasons."""
    try:
        im.load()
    except Image.DecompressionBombError as exc:
        raise ImageRejected("too_many_pixels", str(exc)) from None
    except Exception as exc:
        message = str(exc)
        if "truncated" in message or "incomplete" in message.lower():
            raise ImageRejected("truncated", message) from None
        raise ImageRejected("corrupt", f"cannot decode: {message}") from None


def _to_8bit(im: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer and float grayscale to 8 bits (PIL's convert('L') would clip, not scale)."""
    arr = np.asarray(im)
    if im.mode.startswith("I;16") or (im.mode == "I" and arr.size and int(arr.max()) > 255):
        arr = (arr.astype(np.uint32) >> 8).clip(0, 255)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")


def _to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB, with any transparency composited over white."""
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        im = _to_8bit(im)
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return im if im.mode == "RGB" else im.convert("RGB")


def process_image(
    data: bytes, *, max_pixels: int, max_side: int = 0, content_type: str | None = None
) -> StoredImage:
    """Validate downloaded bytes and return what to store; raise ImageRejected with a reason otherwise."""
    if not data:
        raise ImageRejected("empty", "the response body is empty")
    im = _open(data, content_type)
    fmt = im.format or "?"
    width, height = im.size
    if width <= 0 or height <= 0:
        raise ImageRejected("corrupt", f"{fmt} header gives size {width}x{height}")
    if width * height > max_pixels:
        raise ImageRejected("too_many_pixels", f"{fmt} {width}x{height} = {width * height} pixels > {max_pixels}")

    jpeg = None
    if fmt in ("JPEG", "MPO"):
        jpeg = _jpeg_info(data)
        # FF D9 cannot occur inside entropy-coded data (0xFF is stuffed), so an EOI after the first scan's start
        # means the file was not cut; an EXIF thumbnail's EOI sits before the scan and does not count.
        if data.rfind(b"\xff\xd9") < jpeg.scan_start:
            raise ImageRejected("truncated", f"JPEG without its end marker ({len(data)} bytes)")
    too_big = bool(max_side) and max(width, height) > max_side

    if jpeg is not None:
        try:
            # For a JPEG this reads the APP1 segment only (for PNG, getexif would decode the whole image).
            orientation = im.getexif().get(_ORIENTATION_TAG, 1)
        except Exception:  # a broken EXIF block should not reject an otherwise fine image
            orientation = 1
        plain = jpeg.sof in _PLAIN_JPEG_SOFS and jpeg.components == 3 and im.mode == "RGB" and orientation == 1
        if plain and not too_big:
            # Keep the bytes, checked from the first scan to the end marker (see the module docstring).
            _check_scans(data, jpeg.scan_start)
            return StoredImage(data, ".jpg", width, height, unchanged=True, source_format=fmt)
        if too_big:
            # Let libjpeg decode at the smallest power-of-two scale that is still at least max_side.
            im.draft(None, (max_side, max_side))
    _load(im)
    try:
        im = ImageOps.exif_transpose(im) or im
        rgb = _to_rgb(im)
        if max_side and max(rgb.size) > max_side:
            rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        if fmt in LOSSY_FORMATS:
            rgb.save(out, format="JPEG", quality=JPEG_QUALITY)
            extension = ".jpg"
        else:
            rgb.save(out, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
            extension = ".png"
    except ImageRejected:
        raise
    except Exception as exc:
        raise ImageRejected("corrupt", f"cannot convert {fmt} ({im.mode}) to RGB: {exc}") from None
    return StoredImage(
        data=out.getvalue(),
        extension=extension,
        width=rgb.size[0],
        height=rgb.size[1],
        unchanged=False,
        source_format=fmt,
    )


def verify_stored(data: bytes) -> tuple[int, int]:
    """Width and height of a file this module stored, after checking that it decodes; raise ImageRejected if not.

    Used on resume for files on disk that the manifest does not list (a crash between rename and manifest write).
    """
    if not data:
        raise ImageRejected("empty", "empty file")
    im = _open(data, None)
    if im.format not in ("JPEG", "PNG"):
        raise ImageRejected("corrupt", f"stored file is {im.format}, expected JPEG or PNG")
    width, height = im.size
    if im.format == "JPEG":
        if data.rfind(b"\xff\xd9") < _jpeg_info(data).scan_start:
            raise ImageRejected("truncated", "JPEG without its end marker")
        im.draft("RGB", (max(1, width // 8), max(1, height // 8)))
    _load(im)
    return width, height
