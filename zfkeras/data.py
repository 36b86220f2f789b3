"""Datasets and the paper's preprocessing as tf.data pipelines.

A dataset is named one way everywhere:
- `fashion_mnist`: Fashion-MNIST read from local IDX files (Debian's
  `dataset-fashion-mnist` package, /usr/share/datasets/fashion-mnist) through
  the small TFDS builder `FashionMnistIdx`; with `download=True`, TFDS's own
  `fashion_mnist` is downloaded instead.
- `folder:PATH`: class subfolders of images (sorted folder names give the
  class ids). If PATH holds split folders (`train/`, `test/`, ...), a split
  names one; otherwise every 10th file (sorted) is the `test` split and the
  rest `train`.
- any other name: a TFDS image-classification dataset (`cifar10`,
  `imagenette`, `imagenet2012` with `manual_dir`, ...). TFDS slicing works in
  split names (`train[:90%]`).

Preprocessing (Zeiler & Fergus Section 3): resize the short side to
`resize_size`, crop the centre `resize_size` square (the "view"), subtract the
per-pixel mean view of the training split, then take a random `crop_size`
crop and flip for training, the centre crop or 10 crops for evaluation. The
paper uses 256/224; small datasets use the same steps at their own scale.
"""

import dataclasses
import gzip
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from zfkeras.errors import Error

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_CLASSES = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
_HOLDOUT_EVERY = 10
# With autotuning off (`untuned`): calls at once in a parallel map (the CPUs
# this process may use), and batches prefetched.
PARALLEL_CALLS = (
    len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
)
PREFETCH_BATCHES = 2


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """The paper's preprocessing, at any scale.

    Attributes:
        resize_size: the short side is resized to this, then the centre square
            of this size is kept (256 in the paper).
        crop_size: the model's input size (224 in the paper).
        channels: 1 or 3; images are converted to this.
        input_scale: the mean-subtracted pixels are multiplied by this. The
            paper feeds raw 0-255 pixels minus the mean (1.0, roughly
            [-128, 128]); small-data configs that use He initialisation scale
            them to about unit variance.
        border: black background added on every side of the image before
            the resize, as a fraction of its short side (rounded to whole
            pixels). 0 in the paper. Fashion-MNIST's garments fill their
            28x28 frame, so the crops cut them; 1/14 (2 pixels) makes the
            centre crop show the whole garment and random crops shift it
            instead of cutting it, like the usual pad-and-crop of small data.
    """

    resize_size: int = 256
    crop_size: int = 224
    channels: int = 3
    input_scale: float = 1.0
    border: float = 0.0

    def __post_init__(self):
        if self.channels not in (1, 3):
            raise Error(f"preprocessing: channels must be 1 or 3, not {self.channels}")
        if not self.input_scale > 0:
            raise Error(f"preprocessing: input_scale must be > 0, not {self.input_scale}")
        if not 0.0 <= self.border <= 1.0:
            raise Error(f"preprocessing: border must be in [0, 1], not {self.border}")
        if not 1 <= self.crop_size <= self.resize_size:
            raise Error(
                f"preprocessing: crop_size {self.crop_size} must be in [1, resize_size "
                f"{self.resize_size}]"
            )


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the rest of zfkeras needs to know of a dataset."""

    name: str
    num_classes: int
    class_names: tuple
    channels: int


# ---------------------------------------------------------------------------
# Fashion-MNIST from local IDX files.


def class_index(value, class_names, source, allow_unknown=False):
    """The index of a class given by name or by number.

    Args:
        value: a class name, or its index as text or int.
        class_names: the run's class names.
        source: what the value came from (a file, a flag), for the error.
        allow_unknown: '' and '?' give -1 (an image of unknown class).

    Raises:
        Error: the value is neither a class name nor a valid index.
    """
    text = str(value).strip()
    if allow_unknown and text in ("", "?"):
        return -1
    if text in class_names:
        return list(class_names).index(text)
    if text.isdigit() and int(text) < len(class_names):
        return int(text)
    names = ", ".join(class_names[:10]) + (", ..." if len(class_names) > 10 else "")
    raise Error(
        f"{source}: unknown class {text!r}; give an index 0-{len(class_names) - 1} "
        f"or one of: {names}"
    )


def _read_idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise Error(f"{path}: not an IDX file of unsigned bytes")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    count = int(np.prod(dims))
    if len(data) - offset != count:
        raise Error(f"{path}: IDX file is truncated ({len(data) - offset} of {count} bytes)")
    return np.frombuffer(data, np.uint8, count, offset).reshape(dims)


def find_fashion_mnist(manual_dir=None):
    """The folder holding the four Fashion-MNIST IDX files, or raises Error."""
    candidates = [manual_dir] if manual_dir else [os.environ.get("FASHION_MNIST_DIR")]
    candidates += [] if manual_dir else list(FASHION_MNIST_DIRS)
    for folder in candidates:
        if folder and all(
            os.path.isfile(os.path.join(folder, name))
            for files in _FASHION_MNIST_FILES.values()
            for name in files
        ):
            return folder
    where = ", ".join(c for c in candidates if c)
    raise Error(
        f"Fashion-MNIST IDX files not found in {where}; install them with "
        "`apt-get install dataset-fashion-mnist` (Debian), point --manual_dir at a folder "
        "holding train-/t10k-images/labels-idx*-ubyte.gz, or pass --download"
    )


class FashionMnistIdx(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST prepared from local IDX files (TFDS rejects Debian's checksums)."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Place train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz in manual_dir "
        "(Debian: apt-get install dataset-fashion-mnist)."
    )

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description="Fashion-MNIST (Xiao et al. 2017) from local IDX files.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(28, 28, 1)),
                    "label": tfds.features.ClassLabel(names=FASHION_MNIST_CLASSES),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        folder = find_fashion_mnist(str(dl_manager.manual_dir))
        return {
            split: self._generate_examples(
                os.path.join(folder, images), os.path.join(folder, labels)
            )
            for split, (images, labels) in _FASHION_MNIST_FILES.items()
        }

    def _generate_examples(self, images_path, labels_path):
        images = _read_idx(images_path)
        labels = _read_idx(labels_path)
        if len(images) != len(labels):
            raise Error(f"{images_path}: {len(images)} images but {len(labels)} labels")
        for index, (image, label) in enumerate(zip(images, labels)):
            yield index, {"image": image[:, :, None], "label": int(label)}


# ---------------------------------------------------------------------------
# Loading.


def untuned(dataset):
    """`dataset` with tf.data's autotuning off, and every dataset built on it.

    Not a dataset made inside a function (`flat_map`'s, `interleave`'s): the
    outer dataset needs it too (`train.train_stream`).

    With autotuning on, destroying an iterator after a long pass could wait
    almost as long again: 8 of 17 passes of about 21 s ended 20 s late, and
    none of 19 did with autotuning off (BENCHMARKS.md, section 8). The
    stages use `PARALLEL_CALLS` and `PREFETCH_BATCHES` instead.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


def default_data_dir():
    """TFDS's data folder: $TFDS_DATA_DIR or ~/tensorflow_datasets."""
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def _tfds_builder(name, data_dir, manual_dir, download):
    if name == "fashion_mnist" and not download:
        builder = FashionMnistIdx(data_dir=data_dir)
        if not _is_prepared(builder):
            find_fashion_mnist(manual_dir)
            folder = manual_dir or find_fashion_mnist()
            config = tfds.download.DownloadConfig(manual_dir=folder)
            builder.download_and_prepare(download_config=config)
        return builder
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise Error(
            f"unknown dataset {name!r}; use fashion_mnist, folder:PATH or a TFDS name "
            "such as cifar10, imagenette, caltech101, imagenet2012"
        ) from None
    if not _is_prepared(builder):
        if manual_dir or download:
            config = tfds.download.DownloadConfig(manual_dir=manual_dir)
            try:
                builder.download_and_prepare(download_config=config)
            except Exception as e:  # TFDS raises many types; report one line.
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise Error(f"dataset {name!r} could not be prepared: {first}") from None
        else:
            raise Error(
                f"dataset {name!r} is not prepared in {data_dir}; pass --download to let "
                "TFDS fetch it, or --manual_dir for datasets TFDS cannot download "
                "(imagenet2012)"
            )
    return builder


def _is_prepared(builder):
    return tf.io.gfile.exists(os.path.join(builder.data_dir, "dataset_info.json"))


def _tfds_split(builder, split):
    try:
        tfds.core.ReadInstruction.from_spec(split)
        builder.info.splits[split]
    except (ValueError, KeyError, AssertionError) as e:
        raise Error(
            f"dataset {builder.name!r} has no split {split!r} "
            f"(splits: {', '.join(sorted(builder.info.splits))}): {e}"
        ) from None


def _image_key(builder):
    keys = builder.info.supervised_keys
    if keys and len(keys) == 2:
        return keys
    features = builder.info.features
    if "image" in features and "label" in features:
        return ("image", "label")
    raise Error(f"dataset {builder.name!r} is not an image-classification dataset")


def _folder_files(root, split):
    splits = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    split_names = {"train", "test", "validation", "val"}
    if split_names & set(splits):
        folder = os.path.join(root, split)
        if not os.path.isdir(folder):
            raise Error(
                f"folder {root} has no split {split!r} (splits: "
                f"{', '.join(s for s in splits if s in split_names)})"
            )
        holdout = None
    else:
        if split not in ("train", "test"):
            raise Error(f"folder {root} has no split folders; use split train or test")
        folder = root
        holdout = split == "test"
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    if not classes:
        raise Error(f"folder {folder} has no class subfolders")
    paths, labels = [], []
    for label, name in enumerate(classes):
        class_dir = os.path.join(folder, name)
        files = sorted(f for f in os.listdir(class_dir) if f.lower().endswith(_IMAGE_EXTENSIONS))
        for index, filename in enumerate(files):
            if holdout is not None and (index % _HOLDOUT_EVERY == 0) != holdout:
                continue
            paths.append(os.path.join(class_dir, filename))
            labels.append(label)
    if not paths:
        raise Error(f"folder {folder} has no images ({', '.join(_IMAGE_EXTENSIONS)})")
    return paths, labels, classes


def _decode_file(path, label, channels):
    image = tf.io.decode_image(tf.io.read_file(path), channels=channels, expand_animations=False)
    return image, label


def load(
    dataset,
    split,
    data_dir=None,
    manual_dir=None,
    download=False,
    shuffle_files=False,
    channels=None,
    seed=None,
):
    """Loads one split as a tf.data.Dataset of (uint8 image HxWxC, int64 label).

    The dataset and every dataset built on it run with tf.data's autotuning
    off (`untuned`).

    Args:
        dataset: 'fashion_mnist', 'folder:PATH' or a TFDS name (module doc).
        split: a split name; TFDS slicing allowed for TFDS datasets.
        data_dir: TFDS data folder (default `default_data_dir()`).
        manual_dir: folder of manually obtained files (imagenet2012, or the
            Fashion-MNIST IDX files when not in the Debian location).
        download: allow TFDS to download (nothing is downloaded otherwise).
        shuffle_files: shuffle the TFDS shards (training).
        channels: decode folder images to this many channels.
        seed: file-order seed, the same on every worker of a multi-worker run.

    Returns:
        (dataset, DatasetInfo). The dataset streams; nothing is held in RAM.

    Raises:
        Error: unknown dataset or split, or data that is missing.
    """
    data_dir = data_dir or default_data_dir()
    if dataset.startswith("folder:"):
        root = dataset[len("folder:") :]
        if not os.path.isdir(root):
            raise Error(f"{root}: no such folder (dataset {dataset!r})")
        paths, labels, classes = _folder_files(root, split)
        channels = channels or 3
        ds = tf.data.Dataset.from_tensor_slices((paths, np.asarray(labels, np.int64)))
        if shuffle_files:
            ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
        ds = ds.map(lambda p, y: _decode_file(p, y, channels), num_parallel_calls=PARALLEL_CALLS)
        info = DatasetInfo(dataset, len(classes), tuple(classes), channels)
        return untuned(ds), info

    builder = _tfds_builder(dataset, data_dir, manual_dir, download)
    _tfds_split(builder, split)
    image_key, label_key = _image_key(builder)
    label_feature = builder.info.features[label_key]
    num_classes = int(label_feature.num_classes)
    names = tuple(label_feature.names) if label_feature.names else ()
    image_shape = builder.info.features[image_key].shape
    info = DatasetInfo(
        dataset,
        num_classes,
        names or tuple(str(i) for i in range(num_classes)),
        int(image_shape[-1]) if image_shape and image_shape[-1] else 3,
    )
    read_config = tfds.ReadConfig(try_autocache=False, shuffle_seed=seed)
    ds = builder.as_dataset(split=split, shuffle_files=shuffle_files, read_config=read_config)
    ds = ds.map(
        lambda ex: (ex[image_key], tf.cast(ex[label_key], tf.int64)),
        num_parallel_calls=PARALLEL_CALLS,
    )
    return untuned(ds), info


def num_examples(dataset, split, data_dir=None):
    """Number of examples of a prepared split, or None if unknown."""
    data_dir = data_dir or default_data_dir()
    if dataset.startswith("folder:"):
        return len(_folder_files(dataset[len("folder:") :], split)[0])
    builder = (
        FashionMnistIdx(data_dir=data_dir)
        if dataset == "fashion_mnist"
        else tfds.builder(dataset, data_dir=data_dir)
    )
    if not _is_prepared(builder):
        return None
    return int(builder.info.splits[split].num_examples)


# ---------------------------------------------------------------------------
# Preprocessing.


def _convert_channels(image, channels):
    have = image.shape[-1]
    if have == 4:
        image = image[..., :3]
        have = 3
    if have == channels:
        return image
    if channels == 1:
        return tf.image.rgb_to_grayscale(image)
    return tf.image.grayscale_to_rgb(image)


def view(image, preprocessing):
    """The centre square view of one image: uint8 (resize, resize, channels).

    The `border` added, short side resized to `resize_size` (bilinear,
    antialiased), centre crop.
    """
    size = preprocessing.resize_size
    image = _convert_channels(image, preprocessing.channels)
    if preprocessing.border:
        shape = tf.shape(image)
        short = tf.cast(tf.minimum(shape[0], shape[1]), tf.float32)
        pad = tf.cast(tf.round(short * preprocessing.border), tf.int32)
        image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
    shape = tf.shape(image)
    height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    scale = size / tf.minimum(height, width)
    new_h = tf.maximum(size, tf.cast(tf.round(height * scale), tf.int32))
    new_w = tf.maximum(size, tf.cast(tf.round(width * scale), tf.int32))
    resized = tf.image.resize(image, tf.stack([new_h, new_w]), antialias=True)
    top = (new_h - size) // 2
    left = (new_w - size) // 2
    cropped = resized[top : top + size, left : left + size, :]
    cropped = tf.ensure_shape(cropped, [size, size, preprocessing.channels])
    return tf.cast(tf.clip_by_value(tf.round(cropped), 0, 255), tf.uint8)


def eval_view(image, preprocessing):
    """NumPy: the uint8 (crop, crop, C) centre of the view the model sees."""
    full = view(tf.convert_to_tensor(image), preprocessing)
    return center_crop(full, preprocessing.crop_size).numpy()


def center_crop(images, size):
    """Centre `size` square of (..., H, W, C) images."""
    height, width = images.shape[-3], images.shape[-2]
    top, left = (height - size) // 2, (width - size) // 2
    return images[..., top : top + size, left : left + size, :]


def subtract_mean(views, preprocessing, mean):
    """Model input from uint8 centre views: float32 (N, crop, crop, C) minus the mean."""
    crop = preprocessing.crop_size
    mean = center_crop(np.asarray(mean, np.float32), crop)
    return (np.asarray(views, np.float32) - mean) * np.float32(preprocessing.input_scale)


def ten_crop(image, size):
    """The paper's 10 crops of one (H, W, C) image: 4 corners, centre, and flips."""
    height, width = image.shape[0], image.shape[1]
    starts = [
        (0, 0),
        (0, width - size),
        (height - size, 0),
        (height - size, width - size),
        ((height - size) // 2, (width - size) // 2),
    ]
    crops = [image[y : y + size, x : x + size, :] for y, x in starts]
    crops += [tf.image.flip_left_right(c) for c in crops]
    return tf.stack(crops)


def compute_mean(dataset, preprocessing, batch_size=256):
    """The per-pixel mean view over a dataset of (image, label), streamed.

    Returns:
        float32 (resize_size, resize_size, channels).
    """
    size, channels = preprocessing.resize_size, preprocessing.channels
    views = dataset.map(
        lambda image, label: tf.cast(view(image, preprocessing), tf.float64),
        num_parallel_calls=PARALLEL_CALLS,
    ).batch(batch_size)
    initial = (tf.zeros([size, size, channels], tf.float64), tf.constant(0, tf.int64))
    total, count = views.reduce(
        initial,
        lambda state, batch: (
            state[0] + tf.reduce_sum(batch, axis=0),
            state[1] + tf.shape(batch, out_type=tf.int64)[0],
        ),
    )
    if int(count) == 0:
        raise Error("cannot compute the mean image of an empty split")
    return (total / tf.cast(count, tf.float64)).numpy().astype(np.float32)


def augment(image, mean, preprocessing, seed):
    """One training input from a view: minus the mean, scaled, random crop and flip.

    Args:
        image: a uint8 (resize, resize, C) view.
        mean: float32 (resize, resize, C) mean view.
        preprocessing: a `Preprocessing`.
        seed: a shape [2] int64 stateless seed; a seed always gives the same
            crop and flip (what makes resumed training exact).

    Returns:
        float32 (crop, crop, C).
    """
    crop_seed, flip_seed = tf.unstack(tf.random.split(seed, 2))
    image = (tf.cast(image, tf.float32) - mean) * float(preprocessing.input_scale)
    size = [preprocessing.crop_size, preprocessing.crop_size, preprocessing.channels]
    image = tf.image.stateless_random_crop(image, size, seed=crop_seed)
    return tf.image.stateless_random_flip_left_right(image, seed=flip_seed)


def eval_batches(dataset, preprocessing, mean, batch_size, crops=1, cache=False):
    """Evaluation batches: the centre crop, or the paper's 10 crops.

    Returns:
        A dataset of (images, labels): images (B, crop, crop, C) for crops=1,
        (B, 10, crop, crop, C) for crops=10.
    """
    if crops not in (1, 10):
        raise Error(f"crops must be 1 or 10, not {crops}")
    crop = preprocessing.crop_size
    mean = tf.constant(mean, tf.float32)
    ds = dataset.map(
        lambda image, label: (view(image, preprocessing), label), num_parallel_calls=PARALLEL_CALLS
    )
    if cache:
        ds = ds.cache()

    scale = float(preprocessing.input_scale)

    def finish(image, label):
        image = (tf.cast(image, tf.float32) - mean) * scale
        image = center_crop(image, crop) if crops == 1 else ten_crop(image, crop)
        return image, label

    ds = ds.map(finish, num_parallel_calls=PARALLEL_CALLS)
    return untuned(ds.batch(batch_size).prefetch(PREFETCH_BATCHES))


def write_examples(dataset, split, count, output_dir, data_dir=None, manual_dir=None):
    """Writes the first `count` examples of a split as PNGs; returns their paths."""
    from zfkeras import fileio

    ds, info = load(dataset, split, data_dir=data_dir, manual_dir=manual_dir)
    fileio.ensure_dir(output_dir)
    safe_split = "".join(c if c.isalnum() else "_" for c in split).strip("_")
    paths = []
    for index, (image, label) in enumerate(ds.take(count).as_numpy_iterator()):
        name = "".join(c if c.isalnum() else "_" for c in info.class_names[int(label)])
        path = os.path.join(output_dir, f"{safe_split}_{index:05d}_{name}.png")
        fileio.write_bytes(path, tf.io.encode_png(image).numpy())
        paths.append(path)
    if not paths:
        raise Error(f"dataset {dataset!r} split {split!r} is empty")
    return paths
