"""Tests of zfkeras.images.read_image on files generated in tmp_path."""

import os

import numpy as np
import pytest
from PIL import Image

from zfkeras.errors import Error
from zfkeras.images import read_image


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
    for height, width in ((1, 1), (3, 517)):
        array = _pattern(height, width, 3)
        np.testing.assert_array_equal(read_image(_save(tmp_path, f"s{width}.png", array)), array)


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
