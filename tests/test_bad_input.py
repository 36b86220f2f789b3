"""The bad-input corpus through the image tools, the predict tool and serving_default.

The corpus is generated into a temporary folder whose name has spaces and
non-ASCII characters (nothing is committed): files that must work, each
with its documented conversion (BUILD.md, "Bad input"), and files that must
fail with one line naming the file and the problem. Every case goes
through each tool's library entry point in this process (cheap: the run is
loaded once), and through each tool as a user runs it, in a subprocess
(several corpus files per run): exit status, a single `TOOL: error: ...`
line, no traceback and no output files. The exported `serving_default`
gets the raw bytes of every case. The model and its export are the tiny
run that tests/test_export_savedmodel.py exports once per session.
"""

import functools
import http.server
import io
import json
import os
import struct
import threading
import zlib

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_export_savedmodel import CLASSES, run_tool, shared_export
from test_predict import _ServingHandler

from zfkeras import data, images, runs
from zfkeras import deconv as zdeconv
from zfkeras.analysis import correspondence, invariance, occlusion
from zfkeras.errors import Error
from zfkeras.models import ZFNet
from zfkeras_export import client, graph
from zfkeras_export import source as source_lib

FOLDER = "entrée des images ü"  # Spaces and non-ASCII on purpose.


# ---------------------------------------------------------------------------
# The corpus.


def _pattern(height, width, channels=3, seed=0):
    """A smooth image with a bright blob, so that JPEG keeps it recognisable."""
    y, x = np.mgrid[0:height, 0:width]
    base = 60 + 120 * np.exp(-((y - height / 2) ** 2 + (x - width / 3) ** 2) / (height * width))
    rng = np.random.default_rng(seed)
    image = base[..., None] + rng.normal(0, 4, (height, width, channels))
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _save(path, array, mode=None, **options):
    Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array, mode=mode).save(
        path, **options
    )


def _encoded(array, kind, **options):
    buffer = io.BytesIO()
    _save(buffer, array, format=kind, **options)
    return buffer.getvalue()


def _png_declaring(width, height):
    """A small PNG whose header declares width x height (a decompression bomb)."""

    def chunk(kind, body):
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\0" * (3 * width + 1) * 16)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )


def _make_palette_alpha(path):
    array = _pattern(20, 26)
    palette = Image.fromarray(array).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.save(path, transparency=0)


def _make_animated(path):
    frames = [Image.fromarray(_pattern(30, 24, seed=i)) for i in range(3)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=80, loop=0)


def _make_pages(path):
    pages = [Image.fromarray(_pattern(31, 29, seed=i)) for i in range(3)]
    pages[0].save(path, save_all=True, append_images=pages[1:])


def _make_rotated(path):
    image = Image.fromarray(_pattern(24, 40))
    exif = image.getexif()
    exif[0x0112] = 6  # Rotate 90 degrees clockwise to view: 40 rows, 24 columns.
    image.save(path, exif=exif.tobytes(), quality=95)


def _make_sixteen_bit(path):
    array = (_pattern(22, 30, 1)[..., 0].astype(np.uint16) * 257).astype(np.uint16)
    Image.fromarray(array).save(path)


def _make_unreadable(path):
    _save(path, _pattern(8, 8))
    os.chmod(path, 0)


def _make_truncated(kind):
    def make(path):
        content = _encoded(_pattern(96, 128, seed=3), kind)  # Cut in the pixel data.
        with open(path, "wb") as f:
            f.write(content[: len(content) // 2])

    return make


def _write(content):
    def make(path):
        with open(path, "wb") as f:
            f.write(content)

    return make


# name: (file name, maker, read_image's (height, width, channels) or the error fragment)
GOOD = {
    "1x1": ("one pixel.png", lambda p: _save(p, _pattern(1, 1)), (1, 1, 3)),
    "3x3": ("nine pixels.jpg", lambda p: _save(p, _pattern(3, 3)), (3, 3, 3)),
    "16-bit PNG": ("deep 16-bit.png", _make_sixteen_bit, (22, 30, 1)),
    "CMYK JPEG": (
        "cmyk.jpg",
        lambda p: Image.fromarray(_pattern(26, 34)).convert("CMYK").save(p, quality=95),
        (26, 34, 3),
    ),
    "palette + transparency": ("palette alpha.png", _make_palette_alpha, (20, 26, 3)),
    "RGBA": ("rgba.png", lambda p: _save(p, _pattern(25, 21, 4)), (25, 21, 3)),
    "grayscale": ("gray.jpg", lambda p: _save(p, _pattern(27, 33, 1)), (27, 33, 1)),
    "animated GIF": ("animated.gif", _make_animated, (30, 24, 3)),
    "multi-page TIFF": ("pages.tiff", _make_pages, (31, 29, 3)),
    "EXIF-rotated JPEG": ("rotated exif.jpg", _make_rotated, (40, 24, 3)),
    "non-ASCII name": ("naïve café ☕.png", lambda p: _save(p, _pattern(30, 30)), (30, 30, 3)),
}
BAD = {
    "empty": ("empty.jpg", _write(b""), "empty file"),
    "truncated JPEG": ("cut.jpg", _make_truncated("JPEG"), "truncated JPEG image"),
    "truncated PNG": ("cut.png", _make_truncated("PNG"), "truncated PNG image"),
    "text named .jpg": ("notes.jpg", _write(b"Shopping list: milk, eggs.\n"), "not an image"),
    "decompression bomb": (
        "bomb.png",
        _write(_png_declaring(50_000, 50_000)),
        "more than the limit of 67,108,864",
    ),
    "directory": ("a folder.png", os.mkdir, "is a directory, not an image file"),
    "unreadable": ("secret.png", _make_unreadable, "cannot read (Permission denied)"),
    "thin strip": ("strip.png", lambda p: _save(p, _pattern(2, 300)), "sides more than 100 to 1"),
}
ROOT = os.geteuid() == 0  # Root reads files whatever their permissions.


def _bad_cases():
    return [
        pytest.param(
            name,
            marks=pytest.mark.skipif(ROOT and name == "unreadable", reason="root reads anything"),
        )
        for name in BAD
    ]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """{case name: path} for GOOD and BAD, plus "folder"."""
    folder = tmp_path_factory.mktemp("corpus") / FOLDER
    folder.mkdir()
    paths = {"folder": str(folder)}
    for name, (file_name, make, _) in {**GOOD, **BAD}.items():
        path = str(folder / file_name)
        make(path)
        paths[name] = path
    yield paths
    os.chmod(paths["unreadable"], 0o600)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The tiny run and its export (read-only), and the loaded run."""
    out = shared_export(tmp_path_factory)
    out["run"] = runs.load_run(out["run_dir"])
    out["savedmodel"] = os.path.join(out["base_dir"], "tiny")
    out["tflite"] = os.path.join(out["base_dir"], "tiny_litert", "1", "model_float32.tflite")
    return out


def _good_paths(corpus):
    return [corpus[name] for name in GOOD]


# ---------------------------------------------------------------------------
# read_image on every case.


@pytest.mark.parametrize("name", list(GOOD))
def test_good_files_read_with_their_conversion(corpus, name):
    image = images.read_image(corpus[name])
    assert image.dtype == np.uint8 and image.shape == GOOD[name][2]


def test_conversions(corpus):
    rgba = images.read_image(corpus["RGBA"])
    expected = np.asarray(Image.open(corpus["RGBA"]))
    alpha = expected[..., 3:] / 255.0
    np.testing.assert_array_equal(
        rgba, np.round(expected[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
    )
    with Image.open(corpus["palette + transparency"]) as stored:
        transparent = np.asarray(stored) == 0
    assert transparent.any()
    np.testing.assert_array_equal(
        images.read_image(corpus["palette + transparency"])[transparent], 255
    )
    deep = np.asarray(Image.open(corpus["16-bit PNG"]))
    np.testing.assert_array_equal(images.read_image(corpus["16-bit PNG"])[..., 0], deep >> 8)
    with Image.open(corpus["multi-page TIFF"]) as pages:
        first = np.asarray(pages.convert("RGB"))
    np.testing.assert_array_equal(images.read_image(corpus["multi-page TIFF"]), first)
    with Image.open(corpus["animated GIF"]) as frames:
        first = np.asarray(frames.convert("RGB"))
    np.testing.assert_array_equal(images.read_image(corpus["animated GIF"]), first)
    stored = tf.io.decode_jpeg(open(corpus["EXIF-rotated JPEG"], "rb").read()).numpy()
    np.testing.assert_array_equal(
        images.read_image(corpus["EXIF-rotated JPEG"]), np.rot90(stored, -1)
    )


@pytest.mark.parametrize("name", _bad_cases())
def test_bad_files_fail_with_one_line(corpus, name):
    with pytest.raises(Error) as info:
        images.read_image(corpus[name])
    message = str(info.value)
    assert "\n" not in message and message.startswith(corpus[name]), message
    assert BAD[name][2] in message, message


# ---------------------------------------------------------------------------
# Every bad case through every tool's library entry point, after a good file.


@pytest.fixture(scope="module")
def cached_runs(shared):
    """runs.load_run memoised for the in-process checks (the run is read-only)."""
    original = runs.load_run
    cache = functools.lru_cache(maxsize=None)(original)
    runs.load_run = cache
    yield
    runs.load_run = original


def _parts_file(paths, name):
    """A parts file (beside the images) naming the middle of each image, upright."""
    folder = os.path.dirname(paths[0])
    parts = {}
    for path in paths:
        try:
            height, width = images.read_image(path).shape[:2]
        except Error:
            height, width = 1, 1  # A bad file: the tool must stop at it.
        x0, y0 = width // 4, height // 4
        box = [x0, y0, max(x0 + 1, 3 * width // 4), max(y0 + 1, 3 * height // 4)]
        parts[os.path.relpath(path, folder)] = {"middle": box}
    path = os.path.join(folder, f"parts {name}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(parts, f, ensure_ascii=False)
    return path


def _library_entry(tool, shared, paths, out_dir):
    run_dir = shared["run_dir"]
    if tool == "deconv":
        config = zdeconv.DeconvConfig(paths, run_dir, out_dir, layers=("conv1",), top=1)
        return zdeconv.visualize_images(config)
    if tool == "occlusion":
        return occlusion.run_occlusion(occlusion.OcclusionConfig(run_dir, out_dir, images=paths))
    if tool == "invariance":
        sweeps = invariance.Sweeps(translations=(0.0, 0.1), scales=(1.0, 1.2), rotations=(0.0,))
        config = invariance.InvarianceConfig(run_dir, out_dir, images=paths, sweeps=sweeps)
        return invariance.run_invariance(config, lambda message: None)
    if tool == "correspondence":
        parts = _parts_file(paths, os.path.basename(os.path.dirname(os.path.dirname(out_dir))))
        config = correspondence.CorrespondenceConfig(run_dir, parts, out_dir, repeats=1)
        return correspondence.run_correspondence(config, lambda message: None)
    if tool == "predict_savedmodel":
        return client.predict(client.PredictConfig(paths, model_path=shared["savedmodel"]))
    if tool == "predict_tflite":
        return client.predict(client.PredictConfig(paths, model_path=shared["tflite"]))
    raise ValueError(tool)


LIBRARY_TOOLS = (
    "deconv",
    "occlusion",
    "invariance",
    "correspondence",
    "predict_savedmodel",
    "predict_tflite",
)


@pytest.mark.parametrize("tool", LIBRARY_TOOLS)
@pytest.mark.parametrize("name", _bad_cases())
def test_every_tool_refuses_every_bad_file(corpus, shared, cached_runs, tmp_path, tool, name):
    out_dir = str(tmp_path / "out" / "results")
    paths = (corpus["1x1"], corpus[name])
    with pytest.raises(Error) as info:
        _library_entry(tool, shared, paths, out_dir)
    message = str(info.value)
    assert "\n" not in message and corpus[name] in message, message
    assert BAD[name][2] in message, message
    assert not os.path.exists(out_dir)


# ---------------------------------------------------------------------------
# The tools as a user runs them: all good files in one run, then bad ones.


def _tool_args(tool, shared, paths, out_dir):
    checkpoint = f"--checkpoint={shared['run_dir']}"
    listed = ",".join(paths)
    if tool == "deconv":
        return [
            f"--image={listed}",
            checkpoint,
            "--layers=conv1",
            "--top=1",
            f"--output_dir={out_dir}",
        ]
    if tool == "occlusion":
        return [f"--image={listed}", checkpoint, f"--output_dir={out_dir}"]
    if tool == "invariance":
        return [
            f"--images={listed}",
            checkpoint,
            "--translations=0,0.1",
            "--scales=1,1.2",
            "--rotations=0",
            f"--output_dir={out_dir}",
        ]
    if tool == "correspondence":
        parts = _parts_file(paths, os.path.basename(os.path.dirname(os.path.dirname(out_dir))))
        return [checkpoint, f"--parts_file={parts}", "--repeats=1", f"--output_dir={out_dir}"]
    if tool == "predict_savedmodel":
        return [f"--image={listed}", f"--model_path={shared['savedmodel']}", "--format=json"]
    if tool == "predict_tflite":
        return [f"--image={listed}", f"--model_path={shared['tflite']}", "--format=json"]
    raise ValueError(tool)


def _run(tool, shared, paths, out_dir):
    name = "predict" if tool.startswith("predict") else tool
    return run_tool(name, *_tool_args(tool, shared, paths, out_dir), timeout=300)


_OUTPUTS = {
    "occlusion": ("occlusion.png", "occlusion.json", "occlusion.csv"),
    "invariance": ("invariance.png", "invariance.json", "invariance.csv"),
    "correspondence": ("correspondence.png", "correspondence.json", "correspondence.csv"),
}


@pytest.fixture(scope="module")
def predictions(corpus, shared):
    """Keras' class probabilities for every good file, read by the library."""
    run = shared["run"]
    views = np.stack(
        [data.eval_view(images.read_image(p), run.preprocessing) for p in _good_paths(corpus)]
    )
    return run.model.predict(run.model_input(views), verbose=0)


@pytest.mark.parametrize("tool", LIBRARY_TOOLS)
def test_every_good_file_works_in_every_tool(corpus, shared, predictions, tmp_path, tool):
    out_dir = str(tmp_path / "out" / "results")
    paths = _good_paths(corpus)
    result = _run(tool, shared, paths, out_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    if tool == "deconv":
        for path in paths:
            stem = os.path.splitext(os.path.basename(path))[0]
            for extension in ("png", "json"):
                assert os.path.isfile(os.path.join(out_dir, f"{stem}_deconv.{extension}"))
    elif tool in _OUTPUTS:
        assert sorted(os.listdir(out_dir)) == sorted(_OUTPUTS[tool])
    else:
        records = json.loads(result.stdout)
        assert [r["image"] for r in records] == paths
        best = predictions.argmax(axis=1)
        assert [r["classes"][0] for r in records] == best.tolist()
        np.testing.assert_allclose(
            [r["probabilities"][0] for r in records], predictions.max(axis=1), atol=1e-4
        )


# Each bad case through at least one tool as a subprocess (the library
# checks above cover every pair); the bad file comes after a good one.
SUBPROCESS_BAD = [
    ("deconv", "empty"),
    ("deconv", "decompression bomb"),
    ("occlusion", "truncated JPEG"),
    ("invariance", "text named .jpg"),
    ("correspondence", "truncated PNG"),
    ("predict_savedmodel", "directory"),
    ("predict_tflite", "thin strip"),
    ("predict_savedmodel", "unreadable"),
]


@pytest.mark.parametrize(
    "tool, name",
    [
        pytest.param(
            tool,
            name,
            marks=pytest.mark.skipif(ROOT and name == "unreadable", reason="root reads anything"),
        )
        for tool, name in SUBPROCESS_BAD
    ],
)
def test_a_bad_file_stops_the_tool_with_one_line(corpus, shared, tmp_path, tool, name):
    out_dir = str(tmp_path / "out" / "results")
    result = _run(tool, shared, [corpus["3x3"], corpus[name]], out_dir)
    command = "predict" if tool.startswith("predict") else tool
    assert result.returncode == 1, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f"{command}: error: {corpus[name]}: "), lines[0]
    assert BAD[name][2] in lines[0], lines[0]
    assert result.stdout == ""
    assert not os.path.exists(out_dir)


# ---------------------------------------------------------------------------
# serving_default: the raw bytes of every case.


@pytest.fixture(scope="module")
def serving(shared):
    return tf.saved_model.load(os.path.join(shared["savedmodel"], "1")).signatures[
        "serving_default"
    ]


def _bytes(path):
    with open(path, "rb") as f:
        return f.read()


def test_serving_default_reads_the_good_files_as_the_library(corpus, shared, serving, predictions):
    names = list(GOOD)
    sent = [images.encode_for_serving(corpus[name]) for name in names]
    out = serving(images=tf.constant(sent))
    np.testing.assert_allclose(out["all_probabilities"].numpy(), predictions, atol=1e-5)
    # What needed no conversion is sent as it is.
    for name, content in zip(names, sent):
        as_is = name not in ("multi-page TIFF", "EXIF-rotated JPEG")
        assert (content == _bytes(corpus[name])) == as_is, name


def test_serving_default_decodes_jpeg_bytes_as_stored(corpus, shared, serving):
    # The graph applies no EXIF orientation (encode_for_serving does).
    run = shared["run"]
    stored = tf.io.decode_jpeg(_bytes(corpus["EXIF-rotated JPEG"])).numpy()
    view = data.eval_view(stored, run.preprocessing)
    expected = run.model.predict(run.model_input(view[None]), verbose=0)
    out = serving(images=tf.constant([_bytes(corpus["EXIF-rotated JPEG"])]))
    np.testing.assert_allclose(out["all_probabilities"].numpy(), expected, atol=1e-5)


SERVING_BAD = {
    "empty": "images[1]: not a JPEG, PNG, BMP or GIF image (0 bytes)",
    "truncated JPEG": "",
    "truncated PNG": "",
    "text named .jpg": "images[1]: not a JPEG, PNG, BMP or GIF image",
    "decompression bomb": "images[1]: declares 2500000000 pixels, more than the limit of 67108864",
    "thin strip": "images[1]: 300 x 2 pixels, sides more than 100 to 1",
    "multi-page TIFF": "images[1]: not a JPEG, PNG, BMP or GIF image",
}


@pytest.mark.parametrize("name", list(SERVING_BAD))
def test_serving_default_refuses_bad_bytes_and_keeps_serving(corpus, serving, name):
    good = _bytes(corpus["3x3"])
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        serving(images=tf.constant([good, _bytes(corpus[name])]))
    message = client.short_error(info.value.message)
    assert SERVING_BAD[name] in message, message
    assert serving(images=tf.constant([good]))["classes"].shape == (1, 2)


def test_a_serving_error_reaches_a_rest_client_as_one_line(corpus, shared, serving):
    loaded = tf.saved_model.load(os.path.join(shared["savedmodel"], "1"))
    handler = type("Handler", (_ServingHandler,), {"model_name": "tiny", "loaded": loaded})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.daemon = True
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1/models/tiny"
        body = client.predict_request(
            "serving_default", {"images": [_bytes(corpus["decompression bomb"])]}
        )
        with pytest.raises(Error) as info:
            client._post(f"{url}:predict", body, timeout=30)
        message = str(info.value)
        assert "\n" not in message and "HTTP 400" in message and "decompression bomb" in message
        # The good files, TIFF and rotated JPEG included, through the server.
        records = client.predict(client.PredictConfig(tuple(_good_paths(corpus)), server=url))
        local = client.predict(
            client.PredictConfig(tuple(_good_paths(corpus)), model_path=shared["savedmodel"])
        )
        assert [r["classes"] for r in records] == [r["classes"] for r in local]
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------------------
# Properties of the serving graph's checks and preprocessing.


_gif_largest_frame = tf.function(
    graph._gif_largest_frame, input_signature=[tf.TensorSpec([], tf.string)]
)


def _gif(frames):
    buffer = io.BytesIO()
    first, *rest = [Image.fromarray(_pattern(h, w, seed=i)) for i, (h, w) in enumerate(frames)]
    first.save(buffer, "GIF", save_all=True, append_images=rest, disposal=2, optimize=False)
    return buffer.getvalue()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    frames=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 40)), min_size=1, max_size=4),
    cut=st.floats(0.2, 1.0),
    noise=st.binary(max_size=40),
)
def test_gif_frame_walk_in_the_graph_equals_the_library(frames, cut, noise):
    content = _gif(frames)
    for sample in (content, content[: int(cut * len(content))], b"GIF89a" + noise):
        expected = images.gif_largest_frame(sample)
        assert int(_gif_largest_frame(tf.constant(sample))) == expected


@pytest.fixture(scope="module")
def small_graph():
    pre = data.Preprocessing(resize_size=61, crop_size=56, channels=3, input_scale=0.5)
    mean = np.random.default_rng(1).uniform(0, 255, (61, 61, 3)).astype(np.float32)
    model = ZFNet(3, (56, 56, 3), width=0.125, fc_units=8, seed=0)
    layers = ("conv1", "conv2", "conv3", "conv4", "conv5")
    g = graph.ServingGraph(source_lib.Source("m", model, pre, mean, CLASSES, layers, {}))
    return g, tf.function(g.preprocess_images, input_signature=[tf.TensorSpec([None], tf.string)])


_KINDS = {"PNG": ("L", "LA", "RGB", "RGBA", "P"), "JPEG": ("L", "RGB", "CMYK"), "BMP": ("L", "RGB")}


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    height=st.integers(1, 70),
    width=st.integers(1, 70),
    kind_mode=st.sampled_from(
        [(k, m) for k, modes in _KINDS.items() for m in modes] + [("GIF", "P")]
    ),
    seed=st.integers(0, 1000),
)
def test_graph_preprocessing_equals_the_library(
    small_graph, tmp_path_factory, height, width, kind_mode, seed
):
    g, preprocess = small_graph
    kind, mode = kind_mode
    rgba = Image.fromarray(_pattern(height, width, 4, seed), "RGBA")
    buffer = io.BytesIO()
    rgba.convert(mode).save(buffer, kind)
    path = tmp_path_factory.mktemp("prop") / f"image.{kind.lower()}"
    path.write_bytes(buffer.getvalue())
    pre = g.preprocessing
    expected = data.eval_view(images.read_image(path), pre)
    views, inputs = preprocess(tf.constant([buffer.getvalue()]))
    assert views.shape == (1, pre.crop_size, pre.crop_size, pre.channels)
    np.testing.assert_array_equal(views.numpy()[0], expected)
