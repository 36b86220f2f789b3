"""The deconvnet of Zeiler & Fergus (2013), Section 2.1, for linear-chain Keras CNNs.

To see what drives one activation, every other activation of its layer is set
to zero and the maps are sent down a "deconvnet" attached to the convnet, one
step per forward op, to pixel space. Each step is the transpose (the gradient)
of its forward op, except that rectification is applied to the signal itself:

| forward op            | deconvnet step              | in gradient terms                  |
|-----------------------|-----------------------------|------------------------------------|
| Conv2D                | TiedConv2DTranspose         | input gradient (bias ignored)      |
| ReLU (layer or fused) | ReLU of the signal          | ReLU of the incoming gradient, NOT |
|                       |                             | masked by the forward ReLU (mask   |
|                       |                             | and ReLU = guided backprop)        |
| MaxPooling2D          | MaxUnpool at the switches   | max-pool gradient; overlapping     |
|                       |                             | windows sharing a switch are summed|
| ContrastNorm          | passed through unchanged    | identity (the paper's choice)      |
| BatchNormalization    | x gamma / sqrt(var + eps)   | input gradient at inference        |
| ZeroPadding2D         | crop                        | input gradient                     |
| Flatten               | reshape                     | input gradient                     |
| Dense                 | TiedDenseTranspose (y W^T)  | input gradient (bias ignored)      |
| Dropout               | identity                    | input gradient at inference        |

`Deconvnet.project` runs these steps on each unit's receptive-field
window only, with plain max pooling forward and the max-pool gradient op
(which finds the switches itself) for unpooling; see "Projection on
receptive-field windows" below. `Deconvnet.deconv_model` builds the same
steps as a Keras model on whole maps with explicit switches.

No step uses a bias (Section 2.1). So a projection equals the gradient of
`sum(seed * feature_map)` w.r.t. the input image with each ReLU's backward
replaced by ReLU of the incoming gradient and ContrastNorm's backward by the
identity; `seed` is the chosen activation(s) of the map, zero elsewhere.

Supported models: any linear chain of InputLayer, ZeroPadding2D, Conv2D
(activation linear or relu), ReLU / Activation('relu'), MaxPooling2D,
ContrastNorm, BatchNormalization, Dropout, Flatten and Dense (activation
linear, relu, or softmax on the last layer), with a fixed input size: our
ZFNet and AlexNet (one or two towers), `keras.applications.VGG16(weights=None)`.

A visualizable layer is named by its Conv2D or Dense layer ('conv1'..'conv5',
'fc6', 'fc7', 'predictions'). Its feature map is its rectified output: the
output of the fused ReLU, or of the ReLU layer that follows it (through any
BatchNormalization). A layer with no ReLU after it is used as is; a softmax
Dense gives its pre-softmax class scores.

The seed of a single unit is its activation, as in the paper. A unit of a
map that is not rectified (a class score, which can be negative) is seeded
with 1 instead, so its projection is the deconvnet gradient of that unit. In
"map" mode the seed is the whole map.

Usage:

    dn = Deconvnet(model)
    result = dn.project(images, image_index=[0, 0, 1], layer="conv5", channel=[3, 7, 3])
    result.projections  # (3, H, W, C) in input space
"""

import dataclasses
import os
import shutil

import keras
import numpy as np
import tensorflow as tf

from zfkeras import fileio
from zfkeras import layers as zlayers
from zfkeras.errors import Error

_PACKAGE = "zfkeras"
MODES = ("max", "map")

# The kinds of forward steps; everything else is rejected by name.
_PAD, _CONV, _RELU, _POOL, _NORM, _BN, _DROP, _FLATTEN, _DENSE, _IDENTITY = (
    "pad",
    "conv",
    "relu",
    "pool",
    "norm",
    "bn",
    "dropout",
    "flatten",
    "dense",
    "identity",
)


# ---------------------------------------------------------------------------
# The deconvnet's own Keras layers (tied to forward layers, no variables).


def _resolve_forward(forward_layer, expected, name):
    if isinstance(forward_layer, dict):
        forward_layer = keras.saving.deserialize_keras_object(forward_layer)
    if not isinstance(forward_layer, expected):
        raise ValueError(
            f"`forward_layer` must be a keras.layers.{expected.__name__}. "
            f"Received: forward_layer={forward_layer!r}"
        )
    if not forward_layer.built:
        raise ValueError(f"`forward_layer` {forward_layer.name!r} of {name} must be built first.")
    return forward_layer


@keras.saving.register_keras_serializable(package=_PACKAGE)
class TiedDenseTranspose(keras.layers.Layer):
    """The transpose of a forward `Dense`: `y @ kernel^T`, sharing its kernel.

    The deconvnet step of a fully connected layer (no bias). The kernel is the
    forward layer's own variable, so training the forward net changes it.

    Args:
        forward_layer: a built `keras.layers.Dense` on 2-D inputs.
    """

    def __init__(self, forward_layer, **kwargs):
        super().__init__(**kwargs)
        self.forward_layer = _resolve_forward(forward_layer, keras.layers.Dense, self.name)

    def build(self, input_shape):
        self.built = True

    @property
    def kernel(self):
        return self.forward_layer.kernel

    def call(self, inputs):
        return keras.ops.matmul(inputs, keras.ops.transpose(self.kernel))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.kernel.shape[0])

    def get_config(self):
        config = super().get_config()
        config.update(forward_layer=keras.saving.serialize_keras_object(self.forward_layer))
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DenseLogits(keras.layers.Layer):
    """The pre-activation `x @ kernel + bias` of a forward `Dense` (class scores).

    Lets the deconvnet read a softmax layer's class scores with the layer's own
    variables.

    Args:
        forward_layer: a built `keras.layers.Dense`.
    """

    def __init__(self, forward_layer, **kwargs):
        super().__init__(**kwargs)
        self.forward_layer = _resolve_forward(forward_layer, keras.layers.Dense, self.name)

    def build(self, input_shape):
        self.built = True

    def call(self, inputs):
        outputs = keras.ops.matmul(inputs, self.forward_layer.kernel)
        if self.forward_layer.use_bias:
            outputs = outputs + self.forward_layer.bias
        return outputs

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.forward_layer.units)

    def get_config(self):
        config = super().get_config()
        config.update(forward_layer=keras.saving.serialize_keras_object(self.forward_layer))
        return config


def _batch_norm_scale(bn):
    scale = keras.ops.rsqrt(bn.moving_variance + bn.epsilon)
    return scale * bn.gamma if bn.scale else scale


@keras.saving.register_keras_serializable(package=_PACKAGE)
class BatchNormScale(keras.layers.Layer):
    """The deconvnet step of a `BatchNormalization`: its per-channel scale.

    At inference BatchNormalization is `gamma * (x - mean) / sqrt(var + eps) +
    beta`, an affine map per channel; its transpose without the bias is the
    multiplication by `gamma / sqrt(var + eps)`, read from the forward layer's
    variables.

    Args:
        forward_layer: a built channels-last `keras.layers.BatchNormalization`.
    """

    def __init__(self, forward_layer, **kwargs):
        super().__init__(**kwargs)
        self.forward_layer = _resolve_forward(
            forward_layer, keras.layers.BatchNormalization, self.name
        )

    def build(self, input_shape):
        self.built = True

    def call(self, inputs):
        return inputs * keras.ops.cast(_batch_norm_scale(self.forward_layer), inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(forward_layer=keras.saving.serialize_keras_object(self.forward_layer))
        return config


# ---------------------------------------------------------------------------
# Reading the forward model as a chain of steps.


@dataclasses.dataclass(frozen=True)
class _Step:
    layer: object
    kind: str
    input_shape: tuple
    output_shape: tuple
    relu: bool = False  # fused ReLU (Conv2D / Dense activation)
    logits: bool = False  # softmax Dense read as class scores


def _describe(layer):
    return f"{layer.name} ({type(layer).__name__})"


def _activation_name(layer):
    activation = getattr(layer, "activation", None)
    return getattr(activation, "__name__", str(activation))


def _kind(layer, is_last):
    """The step kind of one forward layer, or raises Error naming it."""
    what = _describe(layer)
    if isinstance(layer, keras.layers.InputLayer):
        return None, False, False
    if isinstance(layer, keras.layers.ZeroPadding2D):
        if layer.data_format != "channels_last":
            raise Error(f"layer {what}: only channels_last is supported")
        return _PAD, False, False
    if type(layer) in zlayers.CONV_TYPES:
        activation = _activation_name(layer)
        if activation not in ("linear", "relu"):
            raise Error(f"layer {what}: activation {activation!r} is not supported (linear, relu)")
        if layer.data_format != "channels_last":
            raise Error(f"layer {what}: only channels_last is supported")
        if tuple(layer.dilation_rate) != (1, 1):
            raise Error(f"layer {what}: dilated convolutions are not supported")
        return _CONV, activation == "relu", False
    if isinstance(layer, keras.layers.ReLU):
        plain = (
            layer.max_value is None
            and float(layer.negative_slope) == 0.0
            and float(layer.threshold) == 0.0
        )
        if not plain:
            raise Error(f"layer {what}: only a plain ReLU is supported (no max/slope/threshold)")
        return _RELU, False, False
    if isinstance(layer, keras.layers.Activation):
        activation = _activation_name(layer)
        if activation == "relu":
            return _RELU, False, False
        if activation == "linear":
            return _IDENTITY, False, False
        if activation == "softmax" and is_last:
            return _IDENTITY, False, False
        raise Error(f"layer {what}: activation {activation!r} is not supported")
    if isinstance(layer, keras.layers.MaxPooling2D):
        if layer.data_format != "channels_last":
            raise Error(f"layer {what}: only channels_last is supported")
        return _POOL, False, False
    if isinstance(layer, zlayers.ContrastNorm):
        return _NORM, False, False
    if isinstance(layer, keras.layers.BatchNormalization):
        rank = len(layer.input.shape)
        if layer.axis not in (-1, rank - 1):
            raise Error(f"layer {what}: only channels-last normalisation is supported")
        return _BN, False, False
    if isinstance(layer, keras.layers.Dropout):
        return _DROP, False, False
    if isinstance(layer, keras.layers.Flatten):
        return _FLATTEN, False, False
    if isinstance(layer, keras.layers.Dense) and type(layer) is keras.layers.Dense:
        activation = _activation_name(layer)
        if activation == "softmax" and not is_last:
            raise Error(f"layer {what}: a softmax Dense must be the last layer")
        if activation not in ("linear", "relu", "softmax"):
            raise Error(
                f"layer {what}: activation {activation!r} is not supported (linear, relu, softmax)"
            )
        return _DENSE, activation == "relu", activation == "softmax"
    raise Error(
        f"layer {what} is not supported by the deconvnet (supported: InputLayer, "
        "ZeroPadding2D, Conv2D, ReLU, MaxPooling2D, ContrastNorm, BatchNormalization, "
        "Dropout, Flatten, Dense)"
    )


def _functional(model):
    if not isinstance(model, keras.Model):
        raise Error(f"the deconvnet needs a keras.Model, got {type(model).__name__}")
    functional = getattr(model, "_functional", None) or model  # Sequential wraps one.
    if not hasattr(functional, "_nodes_by_depth"):
        raise Error(f"model {model.name!r}: only functional or Sequential models are supported")
    return functional


def _chain(model):
    """The model as a list of `_Step`s from input to output, or raises Error."""
    functional = _functional(model)
    if len(functional.inputs) != 1 or len(functional.outputs) != 1:
        raise Error(f"model {model.name!r}: the deconvnet needs one input and one output")
    by_depth = functional._nodes_by_depth  # Keras' own topological order of the graph.
    nodes = []
    for depth in sorted(by_depth, reverse=True):
        if len(by_depth[depth]) != 1:
            names = ", ".join(sorted(_describe(n.operation) for n in by_depth[depth]))
            raise Error(f"model {model.name!r} is not a linear chain (parallel layers: {names})")
        nodes.append(by_depth[depth][0])
    input_shape = tuple(functional.inputs[0].shape[1:])
    if len(input_shape) != 3 or None in input_shape:
        raise Error(
            f"model {model.name!r}: the deconvnet needs a fixed (height, width, channels) "
            f"input, not {input_shape}"
        )
    steps = []
    previous = None
    for index, node in enumerate(nodes):
        layer = node.operation
        if previous is not None:
            if len(node.input_tensors) != 1 or node.input_tensors[0] is not previous:
                raise Error(
                    f"model {model.name!r} is not a linear chain: layer {_describe(layer)} "
                    f"takes {len(node.input_tensors)} inputs"
                )
        if len(node.output_tensors) != 1:
            raise Error(f"layer {_describe(layer)}: multiple outputs are not supported")
        previous = node.output_tensors[0]
        kind, relu, logits = _kind(layer, is_last=index == len(nodes) - 1)
        if kind is None:
            continue
        shape_in = tuple(node.input_tensors[0].shape[1:])
        shape_out = tuple(previous.shape[1:])
        if kind == _DENSE and len(shape_in) != 1:
            raise Error(f"layer {_describe(layer)}: Dense must follow Flatten (got {shape_in})")
        steps.append(_Step(layer, kind, shape_in, shape_out, relu, logits))
    if previous is not functional.outputs[0]:
        raise Error(f"model {model.name!r} is not a linear chain")
    return steps


def _feature_points(steps):
    """{layer name: (index of the step giving its feature map, rectified?)}."""
    points = {}
    for index, step in enumerate(steps):
        if step.kind not in (_CONV, _DENSE):
            continue
        point, rectified = index, step.relu
        if not step.relu and not step.logits:
            ahead = index + 1
            while ahead < len(steps) and steps[ahead].kind == _BN:
                ahead += 1
            if ahead < len(steps) and steps[ahead].kind == _RELU:
                point, rectified = ahead, True
        points[step.layer.name] = (point, rectified)
    return points


def _geometry(steps):
    """Per step, per axis (a, lo, hi): output unit o covers input [a*o+lo, a*o+hi]."""
    axes = [(1, 0, 0), (1, 0, 0)]
    result = []
    for step in steps:
        layer = step.layer
        if step.kind == _PAD:
            axes = [
                (a, lo - a * p[0], hi - a * p[0])
                for (a, lo, hi), p in zip(axes, layer.padding, strict=True)
            ]
        elif step.kind in (_CONV, _POOL):
            if step.kind == _CONV:
                kernels, strides = layer.kernel_size, layer.strides
            else:
                kernels, strides = layer.pool_size, layer.strides
            new = []
            for axis, (a, lo, hi) in enumerate(axes):
                k, s = kernels[axis], strides[axis]
                pad = zlayers.padding_before(
                    step.input_shape[axis], step.output_shape[axis], k, s, layer.padding
                )
                new.append((a * s, lo - a * pad, a * (k - 1 - pad) + hi))
            axes = new
        elif step.kind in (_FLATTEN, _DENSE):
            axes = None
        result.append(axes)
        if axes is None:
            result.extend([None] * (len(steps) - len(result)))
            break
    return result


# ---------------------------------------------------------------------------
# Projection on receptive-field windows (what `Deconvnet.project` runs).
#
# A single unit's signal is zero outside its receptive field at every layer
# below it, so each request travels down as a window: at each step its start
# (per request, dynamic) and size (per layer, static) are those of the unit's
# receptive field in that step's output, and only the window is computed. A
# transposed convolution of a window is the full ('VALID') transposed
# convolution, placed at start * stride - padding; what falls outside the map
# (on the forward padding) is zeroed. Unpooling is the max-pool gradient op
# (MaxPoolGrad) on the window of the pool's input: it finds the switches in
# the window itself, ties to the first maximum like the forward pool, so no
# switches are computed in the forward pass (max_pool_with_argmax costs ~20x
# a max pool on CPU). Where a window would be larger than its map (a whole
# map, fc layers, or the deep layers of a small model) the step runs on the
# whole map instead.


def _positions(start, size, limit):
    """(R, size) positions start + i and whether they are inside [0, limit)."""
    positions = start[:, None] + tf.range(size, dtype=start.dtype)[None, :]
    return positions, (positions >= 0) & (positions < limit)


def _windows(maps, rows, start, size, fill):
    """Windows of `maps`: (R, h, w, C), maps[rows[r], start[r] + (i, j)], `fill` outside."""
    height, width = int(maps.shape[1]), int(maps.shape[2])
    ys, inside_y = _positions(start[:, 0], size[0], height)
    xs, inside_x = _positions(start[:, 1], size[1], width)
    shape = tf.stack([tf.shape(rows)[0], size[0], size[1]])
    index = tf.stack(
        [
            tf.broadcast_to(rows[:, None, None], shape),
            tf.broadcast_to(tf.clip_by_value(ys, 0, height - 1)[:, :, None], shape),
            tf.broadcast_to(tf.clip_by_value(xs, 0, width - 1)[:, None, :], shape),
        ],
        axis=-1,
    )
    inside = inside_y[:, :, None, None] & inside_x[:, None, :, None]
    return tf.where(inside, tf.gather_nd(maps, index), tf.constant(fill, maps.dtype))


def _zero_outside(signal, start, limits):
    _, inside_y = _positions(start[:, 0], int(signal.shape[1]), limits[0])
    _, inside_x = _positions(start[:, 1], int(signal.shape[2]), limits[1])
    inside = inside_y[:, :, None, None] & inside_x[:, None, :, None]
    return tf.where(inside, signal, tf.zeros_like(signal))


def _whole(signal, start, size):
    """A window placed in its whole map of `size` (zeros elsewhere)."""
    rows = tf.range(tf.shape(signal)[0])
    return _windows(signal, rows, -start, size, 0.0)


def _fits(signal, kernel, strides, size):
    """Whether the window below `signal` (through kernel, strides) fits in `size`."""
    return all((int(signal.shape[1 + a]) - 1) * strides[a] + kernel[a] <= size[a] for a in range(2))


def _starts_below(start, step, kernel, strides):
    pads = [
        zlayers.padding_before(
            step.input_shape[a], step.output_shape[a], kernel[a], strides[a], step.layer.padding
        )
        for a in range(2)
    ]
    return start * tf.constant(strides, start.dtype) - tf.constant(pads, start.dtype)


def _conv_down(step, signal, start):
    layer = step.layer
    kernel, strides = layer.kernel_size, layer.strides
    size_in, size_out = step.input_shape[:2], step.output_shape[:2]
    if start is not None and not _fits(signal, kernel, strides, size_in):
        signal, start = _whole(signal, start, size_out), None
    full = zlayers.transpose_convolution(signal, layer.kernel, strides, layer.groups)
    if start is None:
        return zlayers.crop_transposed(
            full, size_in, size_out, kernel, strides, layer.padding
        ), None
    start = _starts_below(start, step, kernel, strides)
    return _zero_outside(full, start, size_in), start


def _unpool_down(step, signal, start, pool_input, rows):
    layer = step.layer
    kernel, strides = layer.pool_size, layer.strides
    size_in, size_out = step.input_shape[:2], step.output_shape[:2]
    if start is not None and not _fits(signal, kernel, strides, size_in):
        signal, start = _whole(signal, start, size_out), None
    if start is None:
        inputs, padding = tf.gather(pool_input, rows), layer.padding.upper()
    else:
        start = _starts_below(start, step, kernel, strides)
        size = [(int(signal.shape[1 + a]) - 1) * strides[a] + kernel[a] for a in range(2)]
        # Cells outside the map never win, as in a 'same' pool's padding.
        inputs = _windows(pool_input, rows, start, size, pool_input.dtype.min)
        padding = "VALID"
    pooled = tf.nn.max_pool2d(inputs, kernel, strides, padding)
    unpooled = tf.raw_ops.MaxPoolGrad(
        orig_input=inputs,
        orig_output=pooled,
        grad=signal,
        ksize=[1, *kernel, 1],
        strides=[1, *strides, 1],
        padding=padding,
    )
    return unpooled, start


def _step_down(step, signal, start, pool_input, rows):
    """One deconvnet step: the signal in `step`'s output -> in its input."""
    kind, layer = step.kind, step.layer
    if kind == _RELU or (kind in (_CONV, _DENSE) and step.relu):
        signal = tf.nn.relu(signal)
    if kind == _CONV:
        return _conv_down(step, signal, start)
    if kind == _POOL:
        return _unpool_down(step, signal, start, pool_input, rows)
    if kind == _DENSE:
        return tf.matmul(signal, tf.convert_to_tensor(layer.kernel), transpose_b=True), None
    if kind == _FLATTEN:
        return tf.reshape(signal, [-1, *step.input_shape]), None
    if kind == _BN:
        return signal * tf.cast(_batch_norm_scale(layer), signal.dtype), start
    if kind == _PAD:
        (top, bottom), (left, right) = layer.padding
        if start is None:
            height, width = step.output_shape[:2]
            return signal[:, top : height - bottom, left : width - right, :], None
        start = start - tf.constant([top, left], start.dtype)
        return _zero_outside(signal, start, step.input_shape[:2]), start
    # ContrastNorm, Dropout, linear/softmax Activation, ReLU: passed through.
    return signal, start


# ---------------------------------------------------------------------------
# The deconvnet.


@dataclasses.dataclass(frozen=True)
class Projections:
    """The result of `Deconvnet.project`, one row per request.

    Attributes:
        projections: float32 (R, H, W, C), each request projected to input
            space (same layout as the model input).
        values: float32 (R,), the activation projected: the unit's value
            ("max" or explicit positions), the map's maximum ("map"), the
            class score for 'predictions'.
        positions: int (R, 2), (y, x) of the unit in its feature map (the
            map's argmax in "map" mode; (0, 0) for fc layers).
        boxes: int (R, 4), (y0, x0, y1, x1): the receptive field of the unit in
            input pixels, half-open and clipped to the image, so
            `image[y0:y1, x0:x1]` is its patch. In "map" mode, the bounding
            box of the receptive fields of the map's positive units. The whole
            image for fc layers.
        image_index: int (R,), the requests' images.
        layers: tuple of R layer names.
        channels: int (R,), the feature maps (or units / classes).
    """

    projections: np.ndarray
    values: np.ndarray
    positions: np.ndarray
    boxes: np.ndarray
    image_index: np.ndarray
    layers: tuple
    channels: np.ndarray


def _broadcast(name, value, count, dtype):
    array = np.asarray(value)
    if array.ndim == 0:
        return np.full(count, array.item(), dtype=dtype)
    if array.ndim != 1 or len(array) not in (1, count):
        raise Error(f"{name} must be a scalar or have {count} entries, not shape {array.shape}")
    return np.broadcast_to(array, (count,)).astype(dtype)


class Deconvnet:
    """A deconvnet attached to a trained Keras CNN (Zeiler & Fergus Section 2.1).

    The forward layers are shared, not copied: training the model, or
    assigning its weights, changes the deconvnet at once.

    `project` runs the model's own layers forward (plain max pooling), keeping
    the feature maps asked for and the inputs of the pools, then sends each
    request down on its receptive-field windows (see "Projection on
    receptive-field windows" above). The same deconvnet is also available as
    Keras models: `probe_model` (the forward model with `MaxPoolWithArgmax`
    switches) and `deconv_model(layer)` (feature map and switches -> pixels).

    Args:
        model: a linear-chain Keras CNN (see the module docstring).

    Raises:
        Error: for an unsupported layer or topology, naming it.
    """

    def __init__(self, model):
        self.model = model
        self._steps = _chain(model)
        points = _feature_points(self._steps)
        self._points = {name: point for name, (point, _) in points.items()}
        self._rectified = {name: rectified for name, (_, rectified) in points.items()}
        if not self._points:
            raise Error(f"model {model.name!r} has no Conv2D or Dense layer to visualize")
        self._geometry = _geometry(self._steps)
        self._input_shape = tuple(int(d) for d in model.inputs[0].shape[1:])
        self._pool_steps = [i for i, s in enumerate(self._steps) if s.kind == _POOL]
        self.layer_names = tuple(sorted(self._points, key=self._points.get))
        self._probes, self._forward_fns = {}, {}
        self.probe = self.probe_model()
        self._deconv_models = {}
        self._projectors = {}

    # -- structure ---------------------------------------------------------

    @property
    def conv_layer_names(self):
        """The visualizable Conv2D layers, input to output."""
        return tuple(n for n in self.layer_names if self._is_conv(n))

    def _is_conv(self, layer):
        return len(self.map_shape(layer)) == 3

    def map_shape(self, layer):
        """Shape of one example's feature map: (h, w, channels) or (units,)."""
        self._check_layer(layer)
        return self._steps[self._points[layer]].output_shape

    def num_channels(self, layer):
        """Number of feature maps (or units, or classes) of `layer`."""
        return int(self.map_shape(layer)[-1])

    def _check_layer(self, layer):
        if layer not in self._points:
            raise Error(f"unknown layer {layer!r}; valid: {', '.join(self.layer_names)}")

    def _pools_below(self, layer):
        point = self._points[layer]
        return [k for k, i in enumerate(self._pool_steps) if i < point]

    def probe_model(self, layer=None):
        """The probe: the forward model up to `layer`'s feature map.

        It replays the model's own layers (shared weights) with
        `MaxPoolWithArgmax` in place of each `MaxPooling2D`, and outputs
        {"activations": {name: feature map} for every visualizable layer up to
        `layer`, "switches": [int64 switches of every pool below it]}.

        Args:
            layer: the deepest layer needed (default: the last one).
        """
        layer = layer or self.layer_names[-1]
        self._check_layer(layer)
        if layer in self._probes:
            return self._probes[layer]
        last = self._points[layer]
        inputs = keras.Input(shape=self._input_shape, name="images")
        x = inputs
        wanted = {point: name for name, point in self._points.items() if point <= last}
        activations, switches = {}, []
        for index, step in enumerate(self._steps[: last + 1]):
            source = step.layer
            if step.kind == _POOL:
                pool = zlayers.MaxPoolWithArgmax(
                    source.pool_size, source.strides, source.padding, name=f"probe_{source.name}"
                )
                x, switch = pool(x)
                switches.append(switch)
            elif step.logits:
                x = DenseLogits(source, name=f"probe_{source.name}_logits")(x)
            else:
                x = source(x)
            if index in wanted:
                activations[wanted[index]] = x
        outputs = {"activations": activations, "switches": switches}
        probe = keras.Model(inputs, outputs, name=f"{self.model.name}_probe_{layer}")
        self._probes[layer] = probe
        return probe

    def deconv_model(self, layer):
        """The Keras deconv model of `layer`: [signal, *switches] -> pixels.

        Inputs: the signal, shaped like the layer's feature map, and the int64
        switches of every pool below the layer (input to output). Output: the
        projection, shaped like the model input. Its transposed convolutions
        hold the forward `Conv2D` layers themselves (tied kernels).
        """
        self._check_layer(layer)
        if layer in self._deconv_models:
            return self._deconv_models[layer]
        point = self._points[layer]
        signal = keras.Input(shape=self._steps[point].output_shape, name=f"{layer}_signal")
        switch_inputs = {}
        for k in self._pools_below(layer):
            step = self._steps[self._pool_steps[k]]
            switch_inputs[self._pool_steps[k]] = keras.Input(
                shape=step.output_shape, dtype="int64", name=f"{step.layer.name}_switches"
            )
        x = signal
        for index in range(point, -1, -1):
            step = self._steps[index]
            name = step.layer.name
            if step.kind == _RELU:
                x = keras.layers.ReLU(name=f"rectify_{name}")(x)
            elif step.kind == _CONV:
                if step.relu:
                    x = keras.layers.ReLU(name=f"rectify_{name}")(x)
                x = zlayers.TiedConv2DTranspose(
                    step.layer, step.input_shape[:2], name=f"deconv_{name}"
                )(x)
            elif step.kind == _DENSE:
                if step.relu:
                    x = keras.layers.ReLU(name=f"rectify_{name}")(x)
                x = TiedDenseTranspose(step.layer, name=f"deconv_{name}")(x)
            elif step.kind == _POOL:
                unpool = zlayers.MaxUnpool(step.input_shape[:2], name=f"unpool_{name}")
                x = unpool([x, switch_inputs[index]])
            elif step.kind == _PAD:
                x = keras.layers.Cropping2D(step.layer.padding, name=f"crop_{name}")(x)
            elif step.kind == _FLATTEN:
                x = keras.layers.Reshape(step.input_shape, name=f"unflatten_{name}")(x)
            elif step.kind == _BN:
                x = BatchNormScale(step.layer, name=f"scale_{name}")(x)
            # ContrastNorm, Dropout, linear/softmax Activation: passed through.
        inputs = [signal, *switch_inputs.values()]
        model = keras.Model(inputs, x, name=f"deconv_{layer}")
        self._deconv_models[layer] = model
        return model

    # -- geometry ----------------------------------------------------------

    def receptive_field(self, layer, y, x):
        """The receptive field of unit (y, x) of `layer` in input pixels.

        Args:
            layer: a visualizable layer name.
            y, x: the unit's position in the feature map (ints or arrays).

        Returns:
            (y0, x0, y1, x1), half-open and clipped to the image, so that
            `image[y0:y1, x0:x1]` is the patch the unit sees; arrays if y, x
            are. The whole image for fc layers.
        """
        self._check_layer(layer)
        boxes = self._boxes(layer, np.atleast_1d(y), np.atleast_1d(x))
        if np.ndim(y) == 0 and np.ndim(x) == 0:
            return tuple(int(v) for v in boxes[0])
        return tuple(boxes[:, i] for i in range(4))

    def _boxes(self, layer, ys, xs):
        height, width = self._input_shape[:2]
        geometry = self._geometry[self._points[layer]]
        ys = np.asarray(ys, np.int64)
        xs = np.asarray(xs, np.int64)
        if geometry is None:
            full = np.array([0, 0, height, width], np.int64)
            return np.tile(full, (len(ys), 1))
        (ay, ylo, yhi), (ax, xlo, xhi) = geometry
        boxes = np.stack(
            [ay * ys + ylo, ax * xs + xlo, ay * ys + yhi + 1, ax * xs + xhi + 1], axis=1
        )
        return np.clip(boxes, 0, [height, width, height, width])

    # -- forward -----------------------------------------------------------

    def _check_images(self, images):
        images = np.asarray(images, np.float32)
        if images.ndim != 4 or tuple(images.shape[1:]) != self._input_shape:
            raise Error(
                f"images must be (N, {', '.join(map(str, self._input_shape))}), "
                f"not {tuple(images.shape)}"
            )
        return images

    def _forward_fn(self, layers, pool_inputs):
        """A compiled forward pass: {"activations": {layer: map}, "pool_inputs": [...]}.

        The model's own layers (plain pooling) up to the deepest of `layers`;
        with `pool_inputs`, also the input of every pool below it (what
        unpooling needs).
        """
        key = (tuple(layers), pool_inputs)
        if key in self._forward_fns:
            return self._forward_fns[key]
        wanted = {self._points[name]: name for name in layers}
        inputs = keras.Input(shape=self._input_shape, name="images")
        x = inputs
        activations, pools = {}, []
        for index, step in enumerate(self._steps[: max(wanted) + 1]):
            if step.kind == _POOL and pool_inputs:
                pools.append(x)
            if step.logits:
                x = DenseLogits(step.layer, name=f"forward_{step.layer.name}_logits")(x)
            else:
                x = step.layer(x)
            if index in wanted:
                activations[wanted[index]] = x
        model = keras.Model(inputs, {"activations": activations, "pool_inputs": pools})
        function = tf.function(lambda images: model(images, training=False), reduce_retracing=True)
        self._forward_fns[key] = function
        return function

    def _forward(self, images, layers, batch_size, pool_inputs=False):
        layers = sorted(set(layers), key=self._points.get)
        forward = self._forward_fn(layers, pool_inputs)
        activations, pools = {}, []
        for start in range(0, len(images), batch_size):
            outputs = forward(tf.constant(images[start : start + batch_size]))
            for name, value in outputs["activations"].items():
                activations.setdefault(name, []).append(value)
            pools.append(outputs["pool_inputs"])
        activations = {name: _concat(parts) for name, parts in activations.items()}
        pools = [_concat(parts) for parts in zip(*pools, strict=True)]
        return activations, pools

    def activations(self, images, layers=None, batch_size=32):
        """Feature maps of `layers` for a batch of model inputs.

        Args:
            images: float32 (N, H, W, C) model inputs (already preprocessed).
            layers: layer names (default: all visualizable layers).
            batch_size: images per forward pass.

        Returns:
            {layer: float32 array (N, h, w, channels) or (N, units)}; class
            scores (pre-softmax) for a softmax layer.
        """
        images = self._check_images(images)
        layers = list(self.layer_names if layers is None else layers)
        for layer in layers:
            self._check_layer(layer)
        activations, _ = self._forward(images, layers, batch_size)
        return {layer: activations[layer].numpy() for layer in layers}

    # -- projection --------------------------------------------------------

    def _projector(self, layer, whole_map):
        key = (layer, whole_map)
        if key in self._projectors:
            return self._projectors[key]
        point = self._points[layer]
        shape = self.map_shape(layer)
        rectified = self._rectified[layer]
        steps = self._steps[: point + 1]

        def project(activation, pool_inputs, rows, channels, ys, xs):
            # The seed: the chosen activation(s) of one map, all else zero.
            # A non-rectified unit (a class score) is seeded with 1.
            mask = tf.one_hot(channels, shape[-1], dtype=activation.dtype)
            start = None  # None: the signal is the whole map, else a window at start.
            if len(shape) == 1:
                seed = tf.gather(activation, rows) if rectified else tf.ones_like(mask)
                signal = seed * mask
            elif whole_map:
                maps = tf.gather_nd(
                    tf.transpose(activation, [0, 3, 1, 2]), tf.stack([rows, channels], axis=1)
                )
                signal = maps[..., None] * mask[:, None, None, :]
            else:
                if rectified:
                    unit = tf.gather_nd(activation, tf.stack([rows, ys, xs, channels], axis=1))
                else:
                    unit = tf.ones_like(ys, activation.dtype)
                signal = (unit[:, None] * mask)[:, None, None, :]
                start = tf.stack([ys, xs], axis=1)
            for index in range(point, -1, -1):
                signal, start = _step_down(
                    steps[index], signal, start, pool_inputs.get(index), rows
                )
            if start is not None:
                signal = _whole(signal, start, self._input_shape[:2])
            return signal

        function = tf.function(project, reduce_retracing=True)
        self._projectors[key] = function
        return function

    def project(
        self,
        images,
        image_index,
        layer,
        channel,
        mode="max",
        positions=None,
        batch_size=32,
    ):
        """Projects feature-map activations to pixel space, many at once.

        Each request r is (image_index[r], layer[r], channel[r]); scalars are
        broadcast. One forward pass is made per distinct image, and the
        requests are projected in batches grouped by layer.

        Args:
            images: float32 (N, H, W, C) model inputs (already preprocessed).
            image_index: int or R ints, rows of `images`.
            layer: a layer name or R names (`layer_names`).
            channel: int or R ints: feature map, fc unit, or class.
            mode: "max" projects the strongest single activation of the map
                (the paper's figures; all others zeroed); "map" the whole map.
                Ignored by fc layers (their "map" is one unit).
            positions: optional int (R, 2) explicit (y, x) units to project
                (e.g. from a mining pass), instead of `mode`'s choice.
            batch_size: images per forward pass and requests per deconv pass.

        Returns:
            A `Projections`.

        Raises:
            Error: for an unknown layer, a channel, image index or position
                out of range, or images of the wrong shape.
        """
        images = self._check_images(images)
        if mode not in MODES:
            raise Error(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
        if positions is not None and mode != "max":
            raise Error("explicit positions project single units; use mode='max' with them")
        count = max(
            np.size(image_index),
            1 if isinstance(layer, str) else len(layer),
            np.size(channel),
            0 if positions is None else len(positions),
        )
        rows = _broadcast("image_index", image_index, count, np.int64)
        channels = _broadcast("channel", channel, count, np.int64)
        names = [layer] * count if isinstance(layer, str) else list(layer)
        if len(names) == 1:
            names = names * count
        if len(names) != count:
            raise Error(f"layer must be one name or {count} names, not {len(names)}")
        if len(images) == 0 or rows.min() < 0 or rows.max() >= len(images):
            raise Error(f"image_index out of range for {len(images)} images")
        if positions is not None:
            positions = np.asarray(positions, np.int64).reshape(-1, 2)
            if len(positions) not in (1, count):
                raise Error(f"positions must be (y, x) or {count} of them, not {len(positions)}")
            positions = np.broadcast_to(positions, (count, 2))
        names = np.asarray(names, dtype=object)
        for name in set(names):
            self._check_layer(name)
            mine = names == name
            size = self.num_channels(name)
            bad = channels[mine][(channels[mine] < 0) | (channels[mine] >= size)]
            if bad.size:
                raise Error(
                    f"channel {int(bad[0])} out of range for {name} ({size} maps: 0-{size - 1})"
                )
            shape = self.map_shape(name)
            if positions is not None and len(shape) == 3:
                p = positions[mine]
                if (p < 0).any() or (p[:, 0] >= shape[0]).any() or (p[:, 1] >= shape[1]).any():
                    raise Error(f"positions out of range for {name} ({shape[0]}x{shape[1]} maps)")

        # One forward pass per distinct image.
        distinct, local_rows = np.unique(rows, return_inverse=True)
        activations, pool_inputs = self._forward(
            images[distinct], names, batch_size, pool_inputs=True
        )

        height, width, depth = self._input_shape
        projections = np.zeros((count, height, width, depth), np.float32)
        values = np.zeros(count, np.float32)
        out_positions = np.zeros((count, 2), np.int64)
        boxes = np.zeros((count, 4), np.int64)
        for name in sorted(set(names), key=self.layer_names.index):
            where = np.flatnonzero(names == name)
            activation = activations[name]
            act = activation.numpy()
            r, c = local_rows[where], channels[where]
            if act.ndim == 2:
                values[where] = act[r, c]
                ys = xs = np.zeros(len(where), np.int64)
                boxes[where] = self._boxes(name, ys, xs)
            else:
                maps = act[r, :, :, c]
                flat = maps.reshape(len(where), -1)
                if positions is None:
                    best = flat.argmax(axis=1)
                    ys, xs = np.divmod(best, maps.shape[2])
                else:
                    ys, xs = positions[where, 0], positions[where, 1]
                values[where] = maps[np.arange(len(where)), ys, xs]
                boxes[where] = self._boxes(name, ys, xs)
                if mode == "map" and positions is None:
                    boxes[where] = self._map_boxes(name, maps, boxes[where])
            out_positions[where] = np.stack([ys, xs], axis=1)
            projector = self._projector(name, mode == "map" and positions is None)
            needed = {self._pool_steps[k]: pool_inputs[k] for k in self._pools_below(name)}
            for start in range(0, len(where), batch_size):
                part = slice(start, start + batch_size)
                projections[where[part]] = projector(
                    activation,
                    needed,
                    *(tf.constant(v[part], tf.int32) for v in (r, c, ys, xs)),
                ).numpy()
        return Projections(
            projections=projections,
            values=values,
            positions=out_positions,
            boxes=boxes,
            image_index=rows,
            layers=tuple(names),
            channels=channels,
        )

    def _map_boxes(self, layer, maps, fallback):
        """Bounding boxes of the receptive fields of each map's positive units."""
        positive = maps > 0
        any_row = positive.any(axis=2)
        any_col = positive.any(axis=1)
        nonempty = any_row.any(axis=1)
        height = maps.shape[1]
        width = maps.shape[2]
        y_first = any_row.argmax(axis=1)
        y_last = height - 1 - any_row[:, ::-1].argmax(axis=1)
        x_first = any_col.argmax(axis=1)
        x_last = width - 1 - any_col[:, ::-1].argmax(axis=1)
        low = self._boxes(layer, y_first, x_first)
        high = self._boxes(layer, y_last, x_last)
        boxes = np.concatenate([low[:, :2], high[:, 2:]], axis=1)
        return np.where(nonempty[:, None], boxes, fallback)


def _concat(parts):
    return parts[0] if len(parts) == 1 else tf.concat(parts, 0)


def strongest_channels(activation, top):
    """The `top` feature maps (or units) with the strongest activation.

    Args:
        activation: (N, h, w, C) maps or (N, C) units of one layer.
        top: how many (capped at C).

    Returns:
        int (N, min(top, C)): channel indices by decreasing maximum activation.
    """
    activation = np.asarray(activation)
    strength = activation.reshape(len(activation), -1, activation.shape[-1]).max(axis=1)
    top = min(int(top), activation.shape[-1])
    return np.argsort(-strength, axis=1, kind="stable")[:, :top]


# ---------------------------------------------------------------------------
# Projections of a few images from a trained run (tools/deconv.py).


@dataclasses.dataclass(frozen=True)
class DeconvConfig:
    """What `visualize_images` draws.

    Attributes:
        images: image files (JPEG, PNG, BMP, GIF).
        checkpoint: a training work dir or a .keras file.
        output_dir: where the PNG and JSON files go.
        layers: layers to show (default: every conv layer).
        top: the strongest feature maps shown per layer and image.
        channels: explicit feature maps per layer instead of the top ones.
        mode: "max" (strongest single activation of each map) or "map".
        batch_size: images per forward pass, requests per deconv pass.
    """

    images: tuple
    checkpoint: str
    output_dir: str
    layers: tuple = ()
    top: int = 9
    channels: tuple = ()
    mode: str = "max"
    batch_size: int = 32


def _output_stems(paths):
    stems, seen = [], {}
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0] or "image"
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return stems


def _check_request(config, dn):
    if config.mode not in MODES:
        raise Error(f"unknown mode {config.mode!r}; valid: {', '.join(MODES)}")
    if config.top < 1:
        raise Error(f"top must be >= 1, not {config.top}")
    layers = tuple(config.layers) or dn.conv_layer_names
    if not layers:
        raise Error(f"{config.checkpoint}: the model has no conv layers; pass --layers")
    for layer in layers:
        if layer not in dn.layer_names:
            raise Error(
                f"{config.checkpoint}: unknown layer {layer!r}; valid: {', '.join(dn.layer_names)}"
            )
        for channel in config.channels:
            size = dn.num_channels(layer)
            if not 0 <= int(channel) < size:
                raise Error(
                    f"channel {channel} out of range for {layer} ({size} maps: 0-{size - 1})"
                )
    if os.path.exists(config.output_dir) and not os.path.isdir(config.output_dir):
        raise Error(f"{config.output_dir}: exists and is not a directory")
    return layers


def visualize_images(config):
    """Projects the strongest feature maps of images and writes one figure each.

    For each image: its evaluation view (the model's own resize, centre crop,
    channels and mean), and per layer the `top` feature maps with the
    strongest activation for this image (or `channels`), each projected to
    pixel space beside the image patch of its receptive field (Fig. 2 /
    Fig. 7(c)). Writes `<name>_deconv.png` and `<name>_deconv.json` (layer,
    channel, activation, position, box in the pixels of the view) into
    `output_dir`. All images go through the network together.

    Everything is checked before anything is written, and the files appear
    together (written to a temporary folder, then renamed): a bad input
    leaves no partial output.

    Args:
        config: a `DeconvConfig`.

    Returns:
        A list of dicts, one per image: image, figure, json, prediction.

    Raises:
        Error: for a bad image, checkpoint, layer or channel (one line).
    """
    # Imported here: the Deconvnet itself needs neither datasets nor matplotlib.
    from zfkeras import data, figures, images, runs

    run = runs.load_run(config.checkpoint)
    try:
        dn = Deconvnet(run.model)
    except Error as e:
        raise Error(f"{config.checkpoint}: {e}") from None
    layers = _check_request(config, dn)
    if not config.images:
        raise Error("no images given")
    views = np.stack(
        [data.eval_view(images.read_image(path), run.preprocessing) for path in config.images]
    )
    inputs = data.subtract_mean(views, run.preprocessing, run.mean)
    probabilities = np.asarray(run.model.predict(inputs, batch_size=config.batch_size, verbose=0))
    activations = dn.activations(inputs, layers, config.batch_size)

    rows, names, channels = [], [], []  # requests: a few per layer and image
    for layer in layers:
        if config.channels:
            chosen = np.tile(np.asarray(config.channels, np.int64), (len(inputs), 1))
        else:
            chosen = strongest_channels(activations[layer], config.top)
        rows.append(np.repeat(np.arange(len(inputs)), chosen.shape[1]))
        channels.append(chosen.reshape(-1))
        names += [layer] * chosen.size
    result = dn.project(
        inputs,
        np.concatenate(rows),
        names,
        np.concatenate(channels),
        mode=config.mode,
        batch_size=config.batch_size,
    )

    request_layers = np.asarray(result.layers, dtype=object)
    records = []
    for index, path in enumerate(config.images):
        best = int(np.argmax(probabilities[index]))
        name = run.class_names[best] if best < len(run.class_names) else str(best)
        prediction = {"class": best, "name": name, "probability": float(probabilities[index, best])}
        record = {
            "image": path,
            "checkpoint": config.checkpoint,
            "mode": config.mode,
            "view_shape": list(views.shape[1:]),
            "prediction": prediction,
            "layers": {},
        }
        figure_rows = []
        for layer in layers:
            entries = []
            mine = np.flatnonzero((result.image_index == index) & (request_layers == layer))
            record["layers"][layer] = []
            for r in mine:
                y0, x0, y1, x1 = (int(v) for v in result.boxes[r])
                value = float(result.values[r])
                record["layers"][layer].append(
                    {
                        "channel": int(result.channels[r]),
                        "activation": value,
                        "position": [int(v) for v in result.positions[r]],
                        "box": [y0, x0, y1, x1],
                    }
                )
                entries.append(
                    {
                        "projection": result.projections[r, y0:y1, x0:x1],
                        "patch": views[index, y0:y1, x0:x1],
                        "label": f"{int(result.channels[r])}: {value:.3g}",
                    }
                )
            figure_rows.append((layer, entries))
        title = f"{os.path.basename(path)}\npredicted: {name} ({prediction['probability']:.2f})"
        records.append((record, figures.deconv_figure(views[index], figure_rows, title)))
    return _write_outputs(config.output_dir, config.images, records)


def _write_outputs(output_dir, paths, records):
    from zfkeras import figures

    fileio.ensure_dir(output_dir)
    staging = fileio.temp_dir_like(os.path.join(output_dir, "deconv"))
    summary, moves = [], []
    try:
        for stem, (record, figure) in zip(_output_stems(paths), records, strict=True):
            png, js = f"{stem}_deconv.png", f"{stem}_deconv.json"
            record["figure"] = png
            figures.save_figure(figure, os.path.join(staging, png))
            fileio.write_json(os.path.join(staging, js), record)
            moves += [png, js]
            summary.append(
                {
                    "image": record["image"],
                    "figure": os.path.join(output_dir, png),
                    "json": os.path.join(output_dir, js),
                    "prediction": record["prediction"],
                }
            )
        for name in moves:
            os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
    except OSError as e:
        raise Error(f"{output_dir}: cannot write ({e.strerror or e})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary
