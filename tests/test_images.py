"""Tests of zfkeras.images.read_image on files generated in tmp_path.

The whole bad-input corpus through the tools and the export is in
tests/test_bad_input.py.
"""

import io
import os
import struct
import zlib

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from zfkeras import images
from zfkeras.errors import Error
from zfkeras.images import (
    MAX_ASPECT,
    MAX_PIXELS,
    apply_orientation,
    encode_for_serving,
    gif_largest_frame,
    read_image,
)


def _pattern(height, width, channels, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (height, width, channels), dtype=np.uint8)


def _save(tmp_path, name, array, mode=None, **kwargs):
    path = tmp_path / name
    image = Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array, mode=mode)
    image.save(path, **kwargs)
    return str(path)


@pytest.mark.parametrize("extension", ["png", "bmp"])
@pytest.mark.parametrize("channels", [1, 3])
def test_lossless_formats_read_exactly(tmp_path, extension, channels):
    array = _pattern(7, 13, channels)
    path = _save(tmp_path, f"image.{extension}", array)
    image = read_image(path)
    assert image.dtype == np.uint8
    np.testing.assert_array_equal(image, array)


@pytest.mark.parametrize("channels", [1, 3])
def test_jpeg(tmp_path, channels):
    # A smooth image survives JPEG almost unchanged.
    y, x = np.mgrid[0:40, 0:61]
    array = np.repeat(((y * 3 + x * 2) % 256).astype(np.uint8)[..., None], channels, axis=-1)
    path = _save(tmp_path, "image.jpg", array, quality=95)
    image = read_image(path)
    assert image.shape == (40, 61, channels)
    assert np.abs(image.astype(int) - array).mean() < 3


def test_progressive_jpeg(tmp_path):
    array = _pattern(33, 47, 3)
    path = _save(tmp_path, "progressive.jpg", array, progressive=True)
    assert read_image(path).shape == (33, 47, 3)


def test_rgba_is_composited_over_white(tmp_path):
    array = np.zeros((2, 3, 4), np.uint8)
    array[..., :3] = (200, 100, 0)
    array[0, 0, 3] = 255  # opaque: the colour
    array[0, 1, 3] = 0  # transparent: white
    array[0, 2, 3] = 128  # half: halfway to white
    path = _save(tmp_path, "alpha.png", array)
    image = read_image(path)
    assert image.shape == (2, 3, 3)
    np.testing.assert_array_equal(image[0, 0], [200, 100, 0])
    np.testing.assert_array_equal(image[0, 1], [255, 255, 255])
    # 200 * 128/255 + 255 * 127/255 = 227.4, and so on.
    np.testing.assert_array_equal(image[0, 2], [227, 177, 127])


def test_gray_alpha_gives_one_channel(tmp_path):
    array = np.array([[[10, 255], [10, 0]]], np.uint8)
    path = str(tmp_path / "la.png")
    Image.fromarray(array, mode="LA").save(path)
    np.testing.assert_array_equal(read_image(path)[..., 0], [[10, 255]])


def test_palette_png_gives_colour(tmp_path):
    array = _pattern(5, 6, 3)
    path = str(tmp_path / "palette.png")
    Image.fromarray(array).convert("P", palette=Image.Palette.ADAPTIVE, colors=8).save(path)
    expected = np.asarray(Image.open(path).convert("RGB"))
    np.testing.assert_array_equal(read_image(path), expected)


def test_sixteen_bit_png_is_scaled_to_eight_bits(tmp_path):
    array = np.array([[0, 65535], [257 * 100, 257 * 7]], np.uint16)
    path = str(tmp_path / "deep.png")
    Image.fromarray(array).save(path)
    np.testing.assert_array_equal(read_image(path)[..., 0], [[0, 255], [100, 7]])


def test_animated_gif_gives_the_first_frame(tmp_path):
    red = Image.new("RGB", (9, 4), (255, 0, 0))
    blue = Image.new("RGB", (9, 4), (0, 0, 255))
    path = str(tmp_path / "anim.gif")
    red.save(path, save_all=True, append_images=[blue], duration=100, loop=0)
    image = read_image(path)
    assert image.shape == (4, 9, 3)
    np.testing.assert_array_equal(image[2, 3], [255, 0, 0])


def test_any_size(tmp_path):
    for height, width in ((1, 1), (3, 3), (3, 300), (517, 6)):
        array = _pattern(height, width, 3)
        np.testing.assert_array_equal(read_image(_save(tmp_path, f"s{width}.png", array)), array)


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path):
    y, x = np.mgrid[0:24, 0:32]
    rgb = np.stack([y * 10, x * 8, 255 - x * 8], axis=-1).astype(np.uint8)
    path = str(tmp_path / "cmyk.jpg")
    Image.fromarray(rgb).convert("CMYK").save(path, quality=95)
    assert Image.open(path).mode == "CMYK"
    image = read_image(path)
    assert image.shape == (24, 32, 3)
    assert np.abs(image.astype(int) - np.asarray(Image.open(path).convert("RGB"))).max() <= 8
    assert np.abs(image.astype(int) - rgb).mean() < 4


def test_palette_png_with_transparency_is_composited_over_white(tmp_path):
    array = np.zeros((2, 2, 3), np.uint8)
    array[0, 0] = (255, 0, 0)
    path = str(tmp_path / "palette_alpha.png")
    palette = Image.fromarray(array).convert("P", palette=Image.Palette.ADAPTIVE, colors=2)
    transparent = palette.getpixel((1, 1))  # The black entry.
    palette.save(path, transparency=transparent)
    image = read_image(path)
    np.testing.assert_array_equal(image[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(image[1, 1], [255, 255, 255])


def test_tiff_gives_its_first_page(tmp_path):
    first = _pattern(5, 7, 3, seed=1)
    path = str(tmp_path / "pages.tiff")
    Image.fromarray(first).save(
        path, save_all=True, append_images=[Image.fromarray(_pattern(9, 9, 3, seed=2))]
    )
    assert Image.open(path).n_frames == 2
    np.testing.assert_array_equal(read_image(path), first)


@pytest.mark.parametrize(
    "mode, channels", [("L", 1), ("RGB", 3), ("RGBA", 3), ("CMYK", 3), ("1", 1), ("LA", 1)]
)
def test_tiff_modes(tmp_path, mode, channels):
    base = _pattern(6, 4, 4)
    path = str(tmp_path / f"{mode}.tif")
    Image.fromarray(base, mode="RGBA").convert(mode).save(path)
    image = read_image(path)
    assert image.shape == (6, 4, channels) and image.dtype == np.uint8


def test_sixteen_bit_tiff_keeps_the_high_byte(tmp_path):
    array = np.array([[0, 65535], [257 * 100, 257 * 7]], np.uint16)
    path = str(tmp_path / "deep.tif")
    Image.fromarray(array).save(path)
    np.testing.assert_array_equal(read_image(path)[..., 0], [[0, 255], [100, 7]])


def test_float_tiff_is_refused(tmp_path):
    path = str(tmp_path / "float.tif")
    Image.fromarray(np.zeros((3, 3), np.float32)).save(path)
    assert "unsupported TIFF pixel mode F" in _error(path)


def _with_orientation(tmp_path, array, orientation, extension="jpg"):
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = orientation
    path = str(tmp_path / f"o{orientation}.{extension}")
    options = {"quality": 100, "subsampling": 0} if extension == "jpg" else {}
    image.save(path, exif=exif.tobytes(), **options)
    return path


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(tmp_path, orientation):
    # Blocks of flat colour survive JPEG: compare block means.
    array = np.kron(_pattern(2, 3, 3, seed=orientation), np.ones((8, 8, 1), np.uint8))
    path = _with_orientation(tmp_path, array, orientation)
    with Image.open(path) as stored:
        expected = np.asarray(ImageOps.exif_transpose(stored).convert("RGB")).astype(int)
    image = read_image(path)
    assert image.shape == expected.shape
    assert np.abs(image.astype(int) - expected).mean() < 3
    turned = orientation in (5, 6, 7, 8)
    assert image.shape[:2] == ((24, 16) if turned else (16, 24))


def test_exif_orientation_of_a_tiff(tmp_path):
    array = _pattern(2, 5, 3)
    path = _with_orientation(tmp_path, array, 8, extension="tif")
    np.testing.assert_array_equal(read_image(path), np.rot90(array, 1))


@settings(max_examples=40, deadline=None)
@given(
    orientation=st.integers(1, 8),
    height=st.integers(1, 6),
    width=st.integers(1, 6),
    channels=st.sampled_from([1, 3]),
)
def test_apply_orientation_equals_pillow(orientation, height, width, channels):
    array = _pattern(height, width, channels, seed=height * 7 + width)
    image = Image.fromarray(array[..., 0] if channels == 1 else array)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.info["exif"] = exif.tobytes()
    expected = np.asarray(ImageOps.exif_transpose(image))
    got = apply_orientation(array, orientation)
    np.testing.assert_array_equal(got[..., 0] if channels == 1 else got, expected)


def test_encode_for_serving(tmp_path):
    plain = _save(tmp_path, "plain.png", _pattern(4, 5, 3))
    assert encode_for_serving(plain) == open(plain, "rb").read()  # As it is.
    rotated = _with_orientation(tmp_path, _pattern(4, 5, 3), 6, extension="png")
    tiff = _save(tmp_path, "page.tif", _pattern(4, 5, 1))
    for path in (rotated, tiff):
        encoded = encode_for_serving(path)
        assert encoded.startswith(b"\x89PNG")
        decoded = tf.io.decode_image(encoded, expand_animations=False).numpy()
        np.testing.assert_array_equal(decoded, read_image(path))


# ---------------------------------------------------------------------------
# Sizes: checked from the header, before decoding.


def _png_declaring(width, height):
    def chunk(kind, body):
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * (width + 1) * 4)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )


@pytest.fixture
def no_decoding(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("decoded a file that should have been refused first")

    monkeypatch.setattr(images.tf.io, "decode_image", refuse)


@pytest.mark.parametrize("width, height", [(9000, 9000), (100000, 100000), (MAX_PIXELS + 1, 1)])
def test_decompression_bomb_is_refused_before_decoding(tmp_path, no_decoding, width, height):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_declaring(width, height))
    message = _error(str(path))
    assert "decompression bomb" in message and "before decoding" in message, message


def test_gif_frame_larger_than_its_screen_is_refused(tmp_path, no_decoding):
    buffer = io.BytesIO()
    Image.new("P", (16, 16)).save(buffer, "GIF")
    data = bytearray(buffer.getvalue())
    descriptor = data.index(b"\x2c")
    data[descriptor + 5 : descriptor + 9] = struct.pack("<HH", 30000, 30000)
    path = tmp_path / "frame_bomb.gif"
    path.write_bytes(bytes(data))
    assert "decompression bomb" in _error(str(path))


def test_gif_largest_frame_walks_every_frame():
    buffer = io.BytesIO()
    frames = [Image.new("RGB", (20, 10), (i * 40, 0, 0)) for i in range(4)]
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], disposal=2)
    assert gif_largest_frame(buffer.getvalue()) == 200
    assert gif_largest_frame(b"GIF89a") == 0


def test_elongated_images_are_refused(tmp_path):
    path = _save(tmp_path, "strip.png", _pattern(2, 201, 1))
    assert f"sides more than {MAX_ASPECT} to 1" in _error(path)


# ---------------------------------------------------------------------------
# Bad files: one line naming the file and the problem.


def _error(path):
    with pytest.raises(Error) as info:
        read_image(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_missing_file_and_directory(tmp_path):
    assert "no such file" in _error(str(tmp_path / "nope.png"))
    assert "is a directory" in _error(str(tmp_path))


def test_empty_and_not_an_image(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    assert "empty file" in _error(str(empty))
    text = tmp_path / "notes.png"
    text.write_text("just some text, not pixels\n")
    assert "not an image" in _error(str(text))


@pytest.mark.parametrize(
    "name, options",
    [
        ("cut.jpg", {}),
        ("cut_progressive.jpg", {"progressive": True}),
        ("cut.png", {}),
        ("cut.bmp", {}),
        ("cut.gif", {}),
    ],
)
def test_truncated_images(tmp_path, name, options):
    full = _save(tmp_path, "full_" + name, _pattern(48, 64, 3), **options)
    data = open(full, "rb").read()
    for cut in (len(data) // 2, len(data) - 3):
        path = tmp_path / f"{cut}_{name}"
        path.write_bytes(data[:cut])
        message = _error(str(path))
        assert "truncated" in message, message


def test_corrupt_image(tmp_path):
    full = _save(tmp_path, "full.png", _pattern(16, 16, 3))
    data = bytearray(open(full, "rb").read())
    data[40:80] = b"\x00" * 40  # inside the first chunk's compressed data
    path = tmp_path / "corrupt.png"
    path.write_bytes(bytes(data))
    message = _error(str(path))
    assert "PNG" in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of permissions")
def test_unreadable_file(tmp_path):
    path = _save(tmp_path, "secret.png", _pattern(4, 4, 3))
    os.chmod(path, 0)
    assert "cannot read" in _error(path)


def test_unreadable_file_as_any_user(tmp_path, monkeypatch):
    path = _save(tmp_path, "secret.png", _pattern(4, 4, 3))

    def denied(name, *args, **kwargs):
        raise PermissionError(13, "Permission denied", name)

    monkeypatch.setattr(images, "open", denied, raising=False)
    assert "cannot read (Permission denied)" in _error(path)


# ---------------------------------------------------------------------------
# Properties: any file either reads as uint8 (H, W, 1 or 3) or fails with one
# line naming it; lossless files read exactly.


def _check_read_or_error(path):
    try:
        image = read_image(path)
    except Error as e:
        message = str(e)
        assert "\n" not in message and message.startswith(str(path)), message
        return None
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] in (1, 3)
    assert image.shape[0] >= 1 and image.shape[1] >= 1
    return image


_MODES = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}


@settings(max_examples=60, deadline=None)
@given(
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    mode=st.sampled_from(sorted(_MODES)),
    kind=st.sampled_from(["PNG", "BMP", "TIFF"]),
    seed=st.integers(0, 2**16),
)
def test_lossless_files_read_exactly(tmp_path_factory, height, width, mode, kind, seed):
    if kind == "BMP" and mode in ("LA", "RGBA"):
        mode = "RGB"  # Pillow writes BMP without alpha.
    array = _pattern(height, width, _MODES[mode], seed)
    path = tmp_path_factory.mktemp("lossless") / f"image.{kind.lower()}"
    Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array, mode=mode).save(
        path, kind
    )
    expected = array if _MODES[mode] in (1, 3) else images._composite_over_white(array)
    np.testing.assert_array_equal(read_image(path), expected)


def _sample_file(kind, seed):
    array = _pattern(12, 17, 3, seed)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, kind)
    return buffer.getvalue()


@settings(max_examples=150, deadline=None)
@given(
    kind=st.sampled_from(["JPEG", "PNG", "BMP", "GIF", "TIFF"]),
    cut=st.floats(0.0, 1.0),
    flips=st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(0, 255)), max_size=4),
)
def test_damaged_files_read_or_fail_with_one_line(tmp_path_factory, kind, cut, flips):
    data = bytearray(_sample_file(kind, 0))
    for where, value in flips:
        data[int(where * (len(data) - 1))] = value
    data = bytes(data[: max(1, int(cut * len(data)))]) if cut < 1 else bytes(data)
    path = tmp_path_factory.mktemp("damaged") / f"damaged {kind}.bin"
    path.write_bytes(data)
    _check_read_or_error(str(path))


@settings(max_examples=60, deadline=None)
@given(
    magic=st.sampled_from([b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"GIF89a", b"II*\x00"]),
    tail=st.binary(max_size=200),
)
def test_random_bytes_behind_a_magic_number_fail_with_one_line(tmp_path_factory, magic, tail):
    path = tmp_path_factory.mktemp("random") / "random.img"
    path.write_bytes(magic + tail)
    _check_read_or_error(str(path))
