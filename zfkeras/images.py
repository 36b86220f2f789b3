"""Reading single image files for the tools (JPEG, PNG, BMP, GIF, TIFF).

`read_image` turns such a file into a uint8 (H, W, C) array with C = 1
(grayscale) or 3 (colour), or raises `zfkeras.errors.Error` with one line
naming the file and the problem. What it does with unusual files (BUILD.md,
"Bad input", lists every case):

- alpha (RGBA, gray + alpha, palette with transparency) is composited over
  white: a transparent background reads as the white page it is usually
  shown on, not as the arbitrary colour stored under it;
- 16-bit samples keep their high byte (TensorFlow's uint16 -> uint8);
- CMYK JPEGs are converted to RGB by the JPEG decoder;
- GIFs give their first frame, TIFFs their first page;
- an EXIF Orientation tag (phones write one instead of rotating the pixels)
  is applied, so the image is upright as a viewer shows it;
- the size is read from the header and checked *before* decoding: more than
  `MAX_PIXELS` pixels (a decompression bomb: a small file declaring a huge
  image) or sides more than `MAX_ASPECT` to 1 are refused.

Decoding is TensorFlow's (`tf.io.decode_image`, the decoder of the exported
`serving_default` signature) for JPEG, PNG, BMP and GIF, and Pillow's for
TIFF, which TensorFlow does not read. TensorFlow rejects the truncated files
we have tried, but libjpeg can stop early without an error on some streams,
so every file is also fully loaded by Pillow, which reports a truncated image
explicitly.
"""

import io
import os
import re
import struct
import warnings

import numpy as np
import tensorflow as tf
from PIL import Image

from zfkeras import quiet
from zfkeras.errors import Error

FORMATS = "JPEG, PNG, BMP, GIF or TIFF"
# Formats TensorFlow decodes, the same in the exported serving_default.
TF_FORMATS = ("JPEG", "PNG", "BMP", "GIF")
# 2**26 = 8192 x 8192: above a 61-megapixel camera, 192 MB as uint8 RGB.
MAX_PIXELS = 1 << 26
# The model sees the centre square of the short side resized, so a longer
# strip is mostly cut away, and resizing it would allocate MAX_ASPECT times
# the view's memory.
MAX_ASPECT = 100

_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"BM", "BMP"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
_EXIF_ORIENTATION = 0x0112
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


def _read_bytes(path):
    if not os.path.exists(path):
        raise Error(f"{path}: no such file")
    if os.path.isdir(path):
        raise Error(f"{path}: is a directory, not an image file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise Error(f"{path}: cannot read ({e.strerror or e})") from None
    if not data:
        raise Error(f"{path}: empty file")
    return data


def _format(path, data):
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    raise Error(f"{path}: not an image ({FORMATS} expected)")


def gif_largest_frame(data):
    """Pixels of the largest frame a GIF declares (each is decoded in full).

    Walks the blocks (image descriptors, extensions and their sub-blocks)
    without decompressing anything; stops at the trailer, at an unknown
    block or at the end of the data. `zfkeras_export.graph` does the same
    walk in TensorFlow ops.
    """
    largest, length = 0, len(data)
    flags = data[10] if length > 10 else 0
    pos = 13 + (3 * (2 << (flags & 7)) if flags & 0x80 else 0)
    while pos < length:
        block = data[pos]
        if block == 0x2C:  # Image descriptor: left, top, width, height, flags.
            width, height = struct.unpack("<HH", data[pos + 5 : pos + 9].ljust(4, b"\0"))
            largest = max(largest, width * height)
            local = data[pos + 9] if pos + 9 < length else 0
            pos += 10 + (3 * (2 << (local & 7)) if local & 0x80 else 0) + 1
        elif block == 0x21:  # Extension: introducer, label.
            pos += 2
        else:  # Trailer (0x3B) or garbage.
            break
        while pos < length and data[pos]:  # Data sub-blocks up to a zero length.
            pos += data[pos] + 1
        pos += 1
    return largest


def _open_header(path, data, kind):
    """Pillow's lazy view of the file (header parsed, pixels not decoded)."""
    try:
        # Pillow's DecompressionBombWarning is silenced by the caller: the
        # limit is checked here, and only above twice Pillow's own does
        # Pillow raise.
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        found = _BOMB_PIXELS.search(str(e))
        pixels = f"{int(found.group(1)):,} pixels" if found else "a huge size"
        raise Error(_too_large(path, kind, pixels)) from None
    except (OSError, SyntaxError, ValueError, struct.error):
        raise Error(f"{path}: truncated or corrupt {kind} image (unreadable header)") from None


def _too_large(path, kind, size):
    return (
        f"{path}: {kind} image declares {size}, more than the limit of {MAX_PIXELS:,} "
        "(a decompression bomb?); refused before decoding"
    )


def _check_declared_size(path, data, kind, header):
    width, height = header.size
    if width * height > MAX_PIXELS:
        raise Error(_too_large(path, kind, f"{width} x {height} pixels"))
    if kind == "GIF":
        largest = gif_largest_frame(data)
        if largest > MAX_PIXELS:
            raise Error(_too_large(path, kind, f"a frame of {largest:,} pixels"))


def _load_fully(path, header, kind):
    """Decodes with Pillow; raises Error naming truncation when that is the cause."""
    try:
        header.load()
    except (OSError, SyntaxError, ValueError, struct.error, Image.DecompressionBombError) as e:
        message = " ".join(str(e).split())
        if "truncated" in message.lower():
            raise Error(f"{path}: truncated {kind} image") from None
        raise Error(f"{path}: corrupt {kind} image ({message})") from None


def _tiff_pixels(path, header):
    """The first page of a TIFF (already loaded) as uint8 (H, W, 1-4)."""
    mode = header.mode
    if mode.startswith("I;16"):
        # The high byte, as TensorFlow converts 16-bit PNGs.
        return (np.asarray(header).astype(np.uint16) >> 8).astype(np.uint8)[..., None]
    if mode in ("1", "L"):
        return np.asarray(header.convert("L"))[..., None]
    if mode in ("LA", "RGB", "RGBA"):
        array = np.asarray(header)
        return array[..., None] if array.ndim == 2 else array
    if mode in ("P", "PA"):
        transparent = mode == "PA" or "transparency" in header.info
        return np.asarray(header.convert("RGBA" if transparent else "RGB"))
    if mode in ("CMYK", "YCbCr", "LAB"):
        return np.asarray(header.convert("RGB"))
    raise Error(f"{path}: unsupported TIFF pixel mode {mode} (8- or 16-bit samples expected)")


def _orientation(header):
    try:
        value = int(header.getexif().get(_EXIF_ORIENTATION, 1))
    except (OSError, SyntaxError, ValueError, TypeError, struct.error):
        return 1  # An unreadable EXIF block leaves the pixels as stored.
    return value if 1 <= value <= 8 else 1


def apply_orientation(image, orientation):
    """(H, W, C) pixels as stored -> upright, per the EXIF Orientation tag 1-8.

    The same as Pillow's `ImageOps.exif_transpose`: 2 mirror, 3 rotate 180,
    4 flip, 5 transpose, 6 rotate 90 clockwise, 7 transverse, 8 rotate 90
    counterclockwise.
    """
    if orientation == 2:
        return image[:, ::-1]
    if orientation == 3:
        return image[::-1, ::-1]
    if orientation == 4:
        return image[::-1]
    if orientation == 5:
        return image.transpose(1, 0, 2)
    if orientation == 6:
        return np.rot90(image, -1)
    if orientation == 7:
        return image.transpose(1, 0, 2)[::-1, ::-1]
    if orientation == 8:
        return np.rot90(image, 1)
    return image


def _composite_over_white(image):
    colour, alpha = image[..., :-1], image[..., -1:]
    alpha = alpha.astype(np.float32) / 255.0
    blended = colour.astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def _decode(path):
    """(pixels uint8 (H, W, 1 or 3), file bytes, whether TensorFlow alone reads it so)."""
    with warnings.catch_warnings(), quiet.stderr_silenced():
        # Pillow warns about odd metadata; what matters is raised.
        warnings.simplefilter("ignore")
        return _decode_quietly(path)


def _decode_quietly(path):
    data = _read_bytes(path)
    kind = _format(path, data)
    header = _open_header(path, data, kind)
    with header:
        _check_declared_size(path, data, kind, header)
        if kind in TF_FORMATS:
            try:
                image = tf.io.decode_image(data, expand_animations=False, dtype=tf.uint8).numpy()
            except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
                first = str(e.message).strip().splitlines()[0] if e.message else type(e).__name__
                _load_fully(path, header, kind)  # Names truncation when that is the cause.
                raise Error(f"{path}: cannot decode {kind} image ({first})") from None
            _load_fully(path, header, kind)
        else:
            _load_fully(path, header, kind)
            image = _tiff_pixels(path, header)
        orientation = _orientation(header)
    if image.ndim != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise Error(f"{path}: {kind} image has no pixels")
    height, width, channels = image.shape
    if max(height, width) > MAX_ASPECT * min(height, width):
        raise Error(
            f"{path}: {width} x {height} pixels, sides more than {MAX_ASPECT} to 1 (the model "
            "sees only the centre square)"
        )
    if channels in (2, 4):
        image = _composite_over_white(image)
    elif channels not in (1, 3):
        raise Error(f"{path}: unsupported {kind} image with {channels} channels")
    image = np.ascontiguousarray(apply_orientation(image, orientation))
    return image, data, kind in TF_FORMATS and orientation == 1


def read_image(path):
    """Reads an image file as uint8 (H, W, C), C = 1 or 3.

    Args:
        path: a JPEG, PNG, BMP, GIF or TIFF file (GIF: the first frame, TIFF:
            the first page) of any size up to `MAX_PIXELS` pixels and sides
            up to `MAX_ASPECT` to 1: grayscale, colour, palette, CMYK, 16-bit
            or with alpha (composited over white); an EXIF orientation is
            applied.

    Returns:
        np.ndarray uint8 of shape (height, width, 1 or 3).

    Raises:
        Error: the file is missing, a directory, unreadable, empty, not an
            image, too large (checked before decoding), truncated or corrupt
            (one line naming the file).
    """
    return _decode(os.fspath(path))[0]


def encode_for_serving(path):
    """Bytes that the exported `serving_default` decodes to `read_image(path)`.

    The file's own bytes when TensorFlow's decoder alone gives the same
    pixels; otherwise (a TIFF, or an EXIF orientation to apply) a lossless
    PNG of `read_image`'s result.

    Raises:
        Error: as `read_image`.
    """
    image, data, as_is = _decode(os.fspath(path))
    if as_is:
        return data
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, "PNG")
    return buffer.getvalue()
