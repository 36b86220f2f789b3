"""Pieces shared by the ZFNet and AlexNet builders."""

import keras

from zfkeras import layers as zlayers

PAPER_WEIGHT_STD = 1e-2
CONV_NAMES = ("conv1", "conv2", "conv3", "conv4", "conv5")
REMOVABLE = ("conv3", "conv4", "conv5", "fc6", "fc7")


def kernel_initializer(init, seed=None):
    """Returns the weight initializer named by `init`.

    Args:
        init: 'paper' for N(0, 1e-2) (Zeiler & Fergus Section 3), 'he' for
            He-normal, or any Keras initializer object.
        seed: optional int seed.
    """
    if init == "paper":
        return keras.initializers.RandomNormal(0.0, PAPER_WEIGHT_STD, seed=seed)
    if init == "he":
        return keras.initializers.HeNormal(seed=seed)
    if isinstance(init, keras.initializers.Initializer):
        return init
    raise ValueError(f"`init` must be 'paper', 'he' or an initializer. Received: init={init!r}")


def scaled(filters, width, multiple=1):
    """Scales a filter count by the width multiplier (at least `multiple`)."""
    n = max(1, int(round(filters * width / multiple))) * multiple
    return n


def pool_padding(size, pool_size=3, strides=2):
    """Padding that gives Caffe's ceil-mode output size for a pooling layer.

    Ceil mode (out = ceil((size - k) / s) + 1) is what gives the paper's maps
    (110 -> 55, 26 -> 13, 13 -> 6). For k=3, s=2 it equals 'valid' on odd sizes
    and 'same' (one row/column of padding at the end) on even ones.
    """
    if size < pool_size:
        return "same"
    ceil_size = -(-(size - pool_size) // strides) + 1
    valid_size = (size - pool_size) // strides + 1
    return "valid" if ceil_size == valid_size else "same"


def check_args(num_classes, input_shape, width, fc_units, dropout, remove, conv_widths):
    if int(num_classes) < 1:
        raise ValueError(f"`num_classes` must be >= 1. Received: num_classes={num_classes}")
    if len(input_shape) != 3 or input_shape[2] not in (1, 3):
        raise ValueError(
            "`input_shape` must be (height, width, 1 or 3). "
            f"Received: input_shape={tuple(input_shape)}"
        )
    if not width > 0:
        raise ValueError(f"`width` must be > 0. Received: width={width}")
    if int(fc_units) < 1:
        raise ValueError(f"`fc_units` must be >= 1. Received: fc_units={fc_units}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={dropout}")
    unknown = sorted(set(remove) - set(REMOVABLE))
    if unknown:
        raise ValueError(
            f"`remove` may name only {', '.join(REMOVABLE)}. Received: remove={tuple(remove)}"
        )
    if len(conv_widths) != 3 or min(conv_widths) < 1:
        raise ValueError(
            "`conv_widths` must be three positive ints (conv3, conv4, conv5). "
            f"Received: conv_widths={tuple(conv_widths)}"
        )


class Builder:
    """Adds paper-named layers to a functional graph, checking map sizes."""

    def __init__(self, inputs, init, seed, filter_rms, model_name):
        self.x = inputs
        self.init = init
        self.seed = seed
        self.filter_rms = filter_rms
        self.model_name = model_name
        self._count = 0

    def _initializer(self):
        self._count += 1
        seed = None if self.seed is None else self.seed + self._count
        return kernel_initializer(self.init, seed)

    def _check(self, name):
        height, width = self.x.shape[1:3]
        if height < 1 or width < 1:
            raise ValueError(
                f"{self.model_name}: the input is too small, {name} has no output "
                f"({height}x{width})."
            )

    def pad(self, name, amount):
        if amount:
            self.x = keras.layers.ZeroPadding2D(amount, name=name)(self.x)

    def conv(self, index, filters, kernel_size, strides, padding, groups=1):
        constraint = None
        if self.filter_rms:
            constraint = zlayers.FilterRMSConstraint(self.filter_rms)
        if self.x.shape[1] < kernel_size and padding == "valid":
            raise ValueError(
                f"{self.model_name}: the input is too small for conv{index} "
                f"({self.x.shape[1]}x{self.x.shape[2]} < {kernel_size}x{kernel_size})."
            )
        # Grouped (two-tower) layers split by group: TensorFlow's grouped kernel
        # trains several times slower on CPU (zfkeras.layers.GroupedConv2D).
        # 3x3 stride-1 layers run by Winograd (zfkeras.layers.WinogradConv2D).
        if groups > 1:
            layer = zlayers.GroupedConv2D
        elif kernel_size == 3 and strides == 1 and padding == "same":
            layer = zlayers.WinogradConv2D
        else:
            layer = keras.layers.Conv2D
        self.x = layer(
            filters,
            kernel_size,
            strides=strides,
            padding=padding,
            groups=groups,
            kernel_initializer=self._initializer(),
            bias_initializer="zeros",
            kernel_constraint=constraint,
            name=f"conv{index}",
        )(self.x)
        self._check(f"conv{index}")
        self.x = keras.layers.ReLU(name=f"relu{index}")(self.x)

    def pool(self, index):
        size = self.x.shape[1]
        if size < 2:
            raise ValueError(
                f"{self.model_name}: the input is too small, pool{index} gets a "
                f"{size}x{self.x.shape[2]} map (needs at least 2x2)."
            )
        padding = pool_padding(size)
        self.x = keras.layers.MaxPooling2D(3, 2, padding=padding, name=f"pool{index}")(self.x)

    def norm(self, index):
        self.x = zlayers.ContrastNorm(name=f"norm{index}")(self.x)

    def head(self, fc_units, dropout, remove, num_classes):
        self.x = keras.layers.Flatten(name="flatten")(self.x)
        for index in (6, 7):
            if f"fc{index}" in remove:
                continue
            self.x = keras.layers.Dense(
                fc_units,
                kernel_initializer=self._initializer(),
                bias_initializer="zeros",
                name=f"fc{index}",
            )(self.x)
            self.x = keras.layers.ReLU(name=f"relu{index}")(self.x)
            self.x = keras.layers.Dropout(dropout, name=f"drop{index}")(self.x)
        self.x = keras.layers.Dense(
            num_classes,
            activation="softmax",
            kernel_initializer=self._initializer(),
            bias_initializer="zeros",
            name="predictions",
        )(self.x)
        return self.x
