"""Reading single image files for the tools (JPEG, PNG, BMP, GIF).

`read_image` turns any such file into a uint8 (H, W, C) array with C = 1
(grayscale) or 3 (colour), or raises `zfkeras.errors.Error` with one line
naming the file and the problem. Alpha is composited over white (a
transparent background reads as the white page it is usually shown on, not
as the arbitrary colour stored under it). GIFs give their first frame.

Decoding is TensorFlow's (`tf.io.decode_image`). TensorFlow rejects the
truncated files we have tried, but libjpeg can stop early without an error
on some streams, so every file is also fully loaded by Pillow, which
reports a truncated image explicitly.
"""

import io
import os

import numpy as np
import tensorflow as tf
from PIL import Image

from zfkeras.errors import Error

FORMATS = "JPEG, PNG, BMP, GIF"
_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"BM", "BMP"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
)


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


def _check_complete(path, data, kind):
    """Raises Error if Pillow finds the image truncated."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Image.DecompressionBombError:
        return  # Huge but complete; TensorFlow decoded it.
    except (OSError, SyntaxError, ValueError) as e:
        message = str(e)
        if "truncated" in message.lower():
            raise Error(f"{path}: truncated {kind} image") from None
        raise Error(f"{path}: corrupt {kind} image ({message})") from None


def _composite_over_white(image):
    colour, alpha = image[..., :-1], image[..., -1:]
    alpha = alpha.astype(np.float32) / 255.0
    blended = colour.astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def read_image(path):
    """Reads an image file as uint8 (H, W, C), C = 1 or 3.

    Args:
        path: a JPEG, PNG, BMP or GIF file (GIF: the first frame), any size,
            grayscale, colour, palette or with alpha (composited over white).

    Returns:
        np.ndarray uint8 of shape (height, width, 1 or 3).

    Raises:
        Error: the file is missing, a directory, unreadable, empty, not an
            image, truncated or corrupt (one line naming the file).
    """
    path = os.fspath(path)
    data = _read_bytes(path)
    kind = _format(path, data)
    try:
        image = tf.io.decode_image(data, expand_animations=False, dtype=tf.uint8).numpy()
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
        first = str(e.message).strip().splitlines()[0] if e.message else type(e).__name__
        _check_complete(path, data, kind)  # Names truncation when that is the cause.
        raise Error(f"{path}: cannot decode {kind} image ({first})") from None
    _check_complete(path, data, kind)
    if image.ndim != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise Error(f"{path}: {kind} image has no pixels")
    channels = image.shape[-1]
    if channels in (2, 4):
        image = _composite_over_white(image)
    elif channels not in (1, 3):
        raise Error(f"{path}: unsupported {kind} image with {channels} channels")
    return image
