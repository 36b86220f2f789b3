"""Datasets (Fashion-MNIST IDX builder, folders) and the paper's preprocessing."""

import gzip
import os

import numpy as np
import pytest
import tensorflow as tf

from zfkeras import data
from zfkeras.errors import Error


def write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def fake_fashion_mnist(tmp_path_factory):
    """Four IDX files with 30 train and 10 test images whose pixels encode the label."""
    folder = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 30), ("t10k", 10)):
        labels = rng.integers(0, 10, count)
        images = np.repeat(labels[:, None, None] * 20, 28 * 28).reshape(count, 28, 28)
        write_idx(str(folder / f"{prefix}-images-idx3-ubyte.gz"), images)
        write_idx(str(folder / f"{prefix}-labels-idx1-ubyte.gz"), labels)
    return str(folder)


def test_fashion_mnist_from_idx(fake_fashion_mnist, tmp_path):
    ds, info = data.load(
        "fashion_mnist", "train", data_dir=str(tmp_path), manual_dir=fake_fashion_mnist
    )
    assert info.num_classes == 10 and info.channels == 1
    assert info.class_names[9] == "ankle boot"
    examples = list(ds.as_numpy_iterator())
    assert len(examples) == 30
    for image, label in examples:
        assert image.shape == (28, 28, 1) and image.dtype == np.uint8
        assert np.all(image == label * 20)
    test, _ = data.load("fashion_mnist", "test[:4]", data_dir=str(tmp_path))
    assert len(list(test)) == 4


def test_fashion_mnist_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(Error, match="apt-get install dataset-fashion-mnist"):
        data.load("fashion_mnist", "train", data_dir=str(tmp_path / "d"), manual_dir=str(tmp_path))


def test_truncated_idx_is_refused(tmp_path):
    path = str(tmp_path / "x.gz")
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"abc")
    with pytest.raises(Error, match="truncated"):
        data._read_idx(path)


def test_unknown_dataset_and_split(tmp_path, fake_fashion_mnist):
    with pytest.raises(Error, match="unknown dataset 'no_such_set'.*folder:PATH"):
        data.load("no_such_set", "train", data_dir=str(tmp_path))
    with pytest.raises(Error, match="not prepared.*--download"):
        data.load("mnist", "train", data_dir=str(tmp_path))
    with pytest.raises(Error, match="no split 'dev'"):
        data.load("fashion_mnist", "dev", data_dir=str(tmp_path), manual_dir=fake_fashion_mnist)


def make_folder(root, classes=("cat", "dog"), per_class=12, size=(20, 30)):
    for label, name in enumerate(classes):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            image = np.full((*size, 3), 40 * label + i, np.uint8)
            png = tf.io.encode_png(image).numpy()
            with open(os.path.join(root, name, f"{i:03d}.png"), "wb") as f:
                f.write(png)


def test_folder_dataset_with_holdout(tmp_path):
    make_folder(str(tmp_path))
    train, info = data.load(f"folder:{tmp_path}", "train")
    test, _ = data.load(f"folder:{tmp_path}", "test")
    assert info.class_names == ("cat", "dog") and info.num_classes == 2
    train_items = list(train.as_numpy_iterator())
    test_items = list(test.as_numpy_iterator())
    # Every 10th file of each class (sorted) is held out: 2 of 12 per class.
    assert len(test_items) == 4 and len(train_items) == 20
    train_values = {int(x[0, 0, 0]) for x, _ in train_items}
    test_values = {int(x[0, 0, 0]) for x, _ in test_items}
    assert not train_values & test_values


def test_folder_dataset_with_split_folders(tmp_path):
    make_folder(str(tmp_path / "train"), per_class=3)
    make_folder(str(tmp_path / "test"), per_class=2)
    ds, info = data.load(f"folder:{tmp_path}", "test")
    assert len(list(ds)) == 4 and info.class_names == ("cat", "dog")
    with pytest.raises(Error, match="no split 'validation'"):
        data.load(f"folder:{tmp_path}", "validation")


def test_view_resizes_short_side_and_crops_centre():
    pre = data.Preprocessing(resize_size=8, crop_size=6, channels=3)
    image = np.zeros((16, 32, 3), np.uint8)
    image[:, 4:28] = 200  # covers the centre square with a margin for the filter
    v = data.view(tf.constant(image), pre).numpy()
    assert v.shape == (8, 8, 3) and v.dtype == np.uint8
    assert np.all(v == 200)


@pytest.mark.parametrize("shape, border, pad", [((28, 28), 1 / 14, 2), ((20, 45), 0.1, 2)])
def test_view_border_is_black_padding_before_the_resize(shape, border, pad):
    rng = np.random.default_rng(0)
    image = rng.integers(1, 256, shape + (1,)).astype(np.uint8)
    bordered = data.Preprocessing(resize_size=32, crop_size=28, channels=1, border=border)
    plain = data.Preprocessing(resize_size=32, crop_size=28, channels=1)
    padded = np.pad(image, [(pad, pad), (pad, pad), (0, 0)])
    v = data.view(tf.constant(image), bordered).numpy()
    np.testing.assert_array_equal(v, data.view(tf.constant(padded), plain).numpy())
    if shape[0] == shape[1]:
        assert v[0, 0, 0] == 0 and v[:, 0].max() == 0  # the frame is background


def test_preprocessing_refuses_a_bad_border():
    with pytest.raises(Error, match="border must be in"):
        data.Preprocessing(32, 28, 1, border=1.5)


def test_view_converts_channels():
    gray = data.Preprocessing(8, 8, 1)
    rgb = data.Preprocessing(8, 8, 3)
    assert data.view(tf.zeros((8, 8, 3), tf.uint8), gray).shape == (8, 8, 1)
    assert data.view(tf.zeros((8, 8, 1), tf.uint8), rgb).shape == (8, 8, 3)
    assert data.view(tf.zeros((8, 8, 4), tf.uint8), rgb).shape == (8, 8, 3)


def test_mean_is_the_per_pixel_mean_of_views():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (37, 8, 8, 1)).astype(np.uint8)
    ds = tf.data.Dataset.from_tensor_slices((images, np.zeros(37, np.int64)))
    pre = data.Preprocessing(8, 6, 1)
    mean = data.compute_mean(ds, pre, batch_size=10)
    np.testing.assert_allclose(mean, images.mean(axis=0), rtol=1e-6)


def test_ten_crop_corners_centre_and_flips():
    image = tf.reshape(tf.range(5 * 5, dtype=tf.float32), (5, 5, 1))
    crops = data.ten_crop(image, 3).numpy()
    assert crops.shape == (10, 3, 3, 1)
    np.testing.assert_array_equal(crops[0], image[:3, :3])
    np.testing.assert_array_equal(crops[3], image[2:, 2:])
    np.testing.assert_array_equal(crops[4], image[1:4, 1:4])
    np.testing.assert_array_equal(crops[5], crops[0][:, ::-1])


def test_augment_gives_mean_subtracted_crops_and_flips_fixed_by_the_seed():
    image = np.arange(8 * 8, dtype=np.uint8).reshape(8, 8, 1)
    pre = data.Preprocessing(8, 5, 1, input_scale=0.5)
    mean = np.full((8, 8, 1), 10.0, np.float32)
    windows = {
        tuple(w.ravel())
        for yy in range(4)
        for xx in range(4)
        for w in (
            (image[yy : yy + 5, xx : xx + 5] - 10.0) * 0.5,
            ((image[yy : yy + 5, xx : xx + 5] - 10.0) * 0.5)[:, ::-1],
        )
    }
    seen = set()
    for index in range(40):
        seed = tf.constant([7, index], tf.int64)
        x = data.augment(image, mean, pre, seed).numpy()
        assert x.shape == (5, 5, 1) and tuple(x.ravel()) in windows
        np.testing.assert_array_equal(x, data.augment(image, mean, pre, seed))
        seen.add(tuple(x.ravel()))
    assert len(seen) > 10  # different seeds give different crops and flips


def test_eval_batches_centre_and_ten_crop():
    image = np.arange(8 * 8, dtype=np.uint8).reshape(8, 8, 1)
    ds = tf.data.Dataset.from_tensor_slices((np.stack([image] * 3), np.arange(3)))
    pre = data.Preprocessing(8, 4, 1)
    mean = np.zeros((8, 8, 1), np.float32)
    x, _ = next(iter(data.eval_batches(ds, pre, mean, 3, crops=1)))
    np.testing.assert_array_equal(x[0], image[2:6, 2:6])
    x10, _ = next(iter(data.eval_batches(ds, pre, mean, 3, crops=10)))
    assert x10.shape == (3, 10, 4, 4, 1)


def test_eval_view_and_subtract_mean():
    pre = data.Preprocessing(8, 6, 1)
    image = np.full((16, 16, 1), 100, np.uint8)
    v = data.eval_view(image, pre)
    assert v.shape == (6, 6, 1)
    x = data.subtract_mean(v[None], pre, np.full((8, 8, 1), 30, np.float32))
    np.testing.assert_allclose(x, 70.0)


def _autotuned(ds):
    return ds.options().autotune.enabled is not False


def test_pipelines_run_without_tf_data_autotuning(tmp_path, fake_fashion_mnist):
    # With autotuning on, ending an iterator could wait as long as its pass.
    idx, _ = data.load(
        "fashion_mnist", "test", data_dir=str(tmp_path / "tfds"), manual_dir=fake_fashion_mnist
    )
    make_folder(str(tmp_path / "images"), per_class=2)
    folder, _ = data.load(f"folder:{tmp_path / 'images'}", "train")
    pre = data.Preprocessing(8, 4, 1)
    built_on = idx.map(lambda image, label: (image, label)).batch(2)
    own = tf.data.Dataset.from_tensor_slices((np.zeros((3, 8, 8, 1), np.uint8), np.arange(3)))
    evaluation = data.eval_batches(own, pre, np.zeros((8, 8, 1), np.float32), 2)
    assert _autotuned(own)  # TensorFlow's default, which the others must not keep
    assert not any(_autotuned(ds) for ds in (idx, folder, built_on, evaluation))
    assert len(list(evaluation)) == 2
