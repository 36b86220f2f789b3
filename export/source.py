"""The model to export: a zfkeras training run (or .keras file), checked.

Serving needs the evaluation preprocessing (resize, centre crop, per-pixel
mean, input scale) and the class names; a training work dir has them
(`zfkeras.runs`). A bare `.keras` file is accepted with a zero mean and the
preprocessing inferred from its input size (`runs.load_run`), and says so in
`Source.notes`. Only our own ZFNet / AlexNet can be exported: the deconv
signatures walk their paper-named layers.
"""

import dataclasses
import os

import keras

from zfkeras import data, runs
from zfkeras import layers as zlayers
from zfkeras.errors import Error

CONV_NAMES = ("conv1", "conv2", "conv3", "conv4", "conv5")
# Layers a conv layer's feature map may depend on (our ZFNet and AlexNet).
_CONV_CHAIN = (
    keras.layers.InputLayer,
    keras.layers.ZeroPadding2D,
    keras.layers.Conv2D,
    keras.layers.ReLU,
    keras.layers.MaxPooling2D,
    zlayers.ContrastNorm,
)


@dataclasses.dataclass(frozen=True)
class Source:
    """A model with everything serving needs.

    Attributes:
        path: the run folder or .keras file given.
        model: the Keras model (images -> class probabilities).
        preprocessing: a `zfkeras.data.Preprocessing`.
        mean: float32 (resize, resize, C) per-pixel mean view.
        class_names: tuple of names, one per class.
        conv_layers: the conv layers present ('conv1'... in order).
        meta: the run's run.json ({} for a bare .keras).
        notes: human remarks (e.g. a bare .keras has no mean).
    """

    path: str
    model: keras.Model
    preprocessing: data.Preprocessing
    mean: object
    class_names: tuple
    conv_layers: tuple
    meta: dict
    notes: tuple = ()

    @property
    def num_classes(self):
        return int(self.model.output_shape[-1])

    @property
    def input_shape(self):
        """(crop, crop, channels) of the model input."""
        return tuple(int(d) for d in self.model.input_shape[1:])


def check_model(model, where):
    """Raises Error unless `model` is a zfkeras ZFNet/AlexNet; returns its conv layers.

    Args:
        model: a Keras model.
        where: the path named in the message.
    """
    names = {layer.name: layer for layer in getattr(model, "layers", ())}
    expected = "expected a zfkeras ZFNet or AlexNet with layers conv1..conv5 and predictions"
    missing = [n for n in ("conv1", "conv2", "predictions") if n not in names]
    if missing:
        raise Error(f"{where}: not a zfkeras model (no layer {missing[0]!r}; {expected})")
    predictions = names["predictions"]
    activation = getattr(getattr(predictions, "activation", None), "__name__", "")
    if not isinstance(predictions, keras.layers.Dense) or activation != "softmax":
        raise Error(f"{where}: layer 'predictions' is not a softmax Dense ({expected})")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise Error(f"{where}: the model must have one input and one output ({expected})")
    shape = tuple(model.input_shape[1:])
    if len(shape) != 3 or None in shape or shape[-1] not in (1, 3):
        raise Error(f"{where}: model input must be (size, size, 1 or 3), not {shape}")
    conv_layers = tuple(n for n in CONV_NAMES if n in names)
    for name in conv_layers:
        if type(names[name]) not in zlayers.CONV_TYPES:
            raise Error(f"{where}: layer {name!r} is not a Conv2D ({expected})")
    last = model.layers.index(names[conv_layers[-1]])
    for layer in model.layers[: last + 2]:
        if not isinstance(layer, _CONV_CHAIN):
            raise Error(
                f"{where}: layer {layer.name!r} ({type(layer).__name__}) is not part of a "
                f"zfkeras ZFNet/AlexNet ({expected})"
            )
    return conv_layers


def load_source(path, snapshot=None):
    """Loads a run folder or .keras file for export.

    Args:
        path: a training work dir (model.keras, run.json, mean.npy) or a
            .keras file.
        snapshot: optional epoch: export snapshots/epoch_NNN.keras of the run.

    Returns:
        A `Source`.

    Raises:
        Error: a missing path, a run without mean.npy, or a model that is not
            a zfkeras ZFNet/AlexNet (one line).
    """
    if os.path.isdir(path):
        if runs.read_meta(path) is None:
            raise Error(f"{path}: not a zfkeras run folder (no {runs.RUN_FILE})")
        if not os.path.isfile(os.path.join(path, runs.MEAN_FILE)):
            raise Error(
                f"{path}: run has no mean image ({runs.MEAN_FILE}); serving needs the "
                "training split's per-pixel mean"
            )
        notes = ()
    elif os.path.isfile(path):
        if snapshot is not None:
            raise Error(f"{path}: a snapshot needs a run folder, not a .keras file")
        notes = (
            "bare .keras file: no mean image (zero mean), preprocessing inferred from "
            "the input size, class names are numbers",
        )
    else:
        raise Error(f"{path}: no such run folder or .keras file")
    run = runs.load_run(path, snapshot=snapshot)
    conv_layers = check_model(run.model, path)
    names = tuple(str(n) for n in run.class_names)
    classes = int(run.model.output_shape[-1])
    if len(names) != classes:
        raise Error(f"{path}: {len(names)} class names for a model of {classes} classes")
    return Source(
        path=path,
        model=run.model,
        preprocessing=run.preprocessing,
        mean=run.mean,
        class_names=names,
        conv_layers=conv_layers,
        meta=dict(run.meta),
        notes=notes,
    )
