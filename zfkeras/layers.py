"""Custom Keras objects of zfkeras: every one is serializable and round-trips.

- `ContrastNorm`: the local contrast normalisation across feature maps of
  Krizhevsky et al. (2012), used by ZFNet after pools 1 and 2 (paper Fig. 3).
- `FilterRMSConstraint`: the paper's filter renormalisation (Section 3): any
  convolution filter whose RMS exceeds a radius is scaled back to it.
- `MaxPoolWithArgmax`: max pooling that also returns the switches.
- `MaxUnpool`: places values at their switches, summing coincident ones.
- `TiedConv2DTranspose`: a `Conv2DTranspose` whose kernel IS the kernel
  variable of a forward `Conv2D`.
- `GroupedConv2D`: a `Conv2D` whose groups run as separate convolutions
  (the two-tower AlexNet's conv2, conv4, conv5): same weights and results,
  5x faster to train on CPU than TensorFlow's grouped kernel.
- `WinogradConv2D`: a `Conv2D` that runs 3x3 stride-1 convolutions (conv3-5)
  by Winograd F(2x2, 3x3): same weights and results, fewer multiplies.

Importing this module also registers `zfkeras.optimizers.SGD`, the
optimizer saved in the compile settings of tools/train.py's models, so that
`import zfkeras.layers` is all `keras.saving.load_model` needs.

Functions: `transpose_convolution` (the full transposed convolution, with a
fast path for few output channels) and `padding_before` (TensorFlow's padding
rule), shared by the layers and the deconvnet's receptive-field windows;
`contrast_norm` and `banded_contrast_norm` (ContrastNorm's computations),
`winograd_conv` and `winograd_kernel` (WinogradConv2D's) and `use_ops`,
which picks the op set the exporters trace: XLA (Keras), portable (the
SavedModel: same computations, no XLA) or builtin (LiteRT: TFLite builtin
ops).
"""

import keras
import numpy as np
import tensorflow as tf

from zfkeras import optimizers  # noqa: F401  (registers zfkeras>SGD, see above)

_PACKAGE = "zfkeras"

# The op sets ContrastNorm and WinogradConv2D can trace (`use_ops`).
XLA = "xla"
PORTABLE = "portable"
BUILTIN = "builtin"
OP_SETS = (XLA, PORTABLE, BUILTIN)


def _pair(value, name):
    if isinstance(value, int):
        value = (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2 or min(value) < 1:
        raise ValueError(
            f"`{name}` must be a positive int or a pair of them. Received: {name}={value}"
        )
    return value


def _padding(value):
    value = str(value).lower()
    if value not in ("valid", "same"):
        raise ValueError(f"`padding` must be 'valid' or 'same'. Received: padding={value!r}")
    return value


def padding_before(size_in, size_out, kernel, stride, padding):
    """Rows (or columns) of zeros TensorFlow adds before a map for a conv or pool.

    Args:
        size_in, size_out: the map's size along one axis before and after.
        kernel, stride: the window along that axis.
        padding: 'valid' or 'same'.
    """
    if padding == "valid":
        return 0
    return max((size_out - 1) * stride + kernel - size_in, 0) // 2


# Below this many output channels per group, TensorFlow's CPU kernel for a
# strided conv2d_transpose (Conv2DBackpropInput) is slow: 2.7x slower than the
# phase decomposition for ZFNet's conv1 (3 channels, 7x7/2), but 1.3x faster
# for conv2 (96 channels, 5x5/2), measured on 2 cores (see BENCHMARKS.md).
_PHASE_MAX_CHANNELS = 8


def _phase_kernel(kernel, stride):
    """The stride-1 kernel of the phase decomposition of a transposed conv.

    Output pixel q * s + a of the transposed convolution sums signal[q - m] *
    kernel[m * s + a] over m: for each phase a, a stride-1 correlation with a
    sub-kernel. All s*s phases become the channels of one stride-1 conv
    (flipped sub-kernels of ceil(k / s) taps, zero-padded), and
    `depth_to_space` interleaves them into the output grid.
    """
    k_h, k_w, channels_in, channels_out = kernel.shape
    taps = max(-(-k_h // stride), -(-k_w // stride))
    padded = tf.pad(kernel, [[0, taps * stride - k_h], [0, taps * stride - k_w], [0, 0], [0, 0]])
    phases = tf.reshape(padded, [taps, stride, taps, stride, channels_in, channels_out])
    phases = tf.reverse(phases, axis=[0, 2])
    # (taps_y, taps_x, out, phase_y, phase_x, in): depth_to_space's channel order.
    phases = tf.transpose(phases, [0, 2, 5, 1, 3, 4])
    return tf.reshape(phases, [taps, taps, channels_out, stride * stride * channels_in]), taps


def _transpose_one(signal, kernel, strides):
    (k_h, k_w, channels_in, _), (s_h, s_w) = kernel.shape, strides
    batch, height, width = tf.shape(signal)[0], int(signal.shape[1]), int(signal.shape[2])
    out_h, out_w = (height - 1) * s_h + k_h, (width - 1) * s_w + k_w
    if s_h == s_w > 1 and channels_in <= _PHASE_MAX_CHANNELS:
        phase_kernel, taps = _phase_kernel(kernel, s_h)
        margin = [[0, 0], [taps - 1, taps - 1], [taps - 1, taps - 1], [0, 0]]
        phases = tf.nn.conv2d(tf.pad(signal, margin), phase_kernel, 1, "VALID")
        return tf.nn.depth_to_space(phases, s_h)[:, :out_h, :out_w, :]
    shape = tf.stack([batch, out_h, out_w, channels_in])
    return tf.nn.conv2d_transpose(signal, kernel, shape, (1, s_h, s_w, 1), "VALID")


def crop_transposed(full, input_size, output_size, kernel_size, strides, padding):
    """The forward convolution's input frame of a `transpose_convolution`.

    Drops what fell on the forward padding and adds zero rows (columns) where
    a 'valid' convolution never read its input's last rows.

    Args:
        full: the full transposed convolution (N, H', W', C).
        input_size: (H, W) of the forward convolution's input.
        output_size: (h, w) of its output (the signal's size).
        kernel_size, strides, padding: the forward convolution's.

    Returns:
        float (N, H, W, C).
    """
    starts, missing = [], []
    for axis in range(2):
        start = padding_before(
            input_size[axis], output_size[axis], kernel_size[axis], strides[axis], padding
        )
        starts.append(start)
        missing.append(max(input_size[axis] - (int(full.shape[axis + 1]) - start), 0))
    (top, left), (height, width) = starts, input_size
    cropped = full[:, top : top + height - missing[0], left : left + width - missing[1], :]
    if missing[0] or missing[1]:
        cropped = tf.pad(cropped, [[0, 0], [0, missing[0]], [0, missing[1]], [0, 0]])
    return cropped


def transpose_convolution(signal, kernel, strides, groups=1):
    """The full ('VALID') transposed convolution by a forward Conv2D kernel.

    The input gradient of a 'valid' convolution, before any cropping: output
    row y receives every signal row o with o * s <= y < o * s + k, so the
    output is ((h - 1) * s + k) x ((w - 1) * s + k). A 'same' or truncated
    forward convolution is this, cropped (see `TiedConv2DTranspose`).

    Args:
        signal: float (N, h, w, filters) with static h, w.
        kernel: the forward kernel (k_h, k_w, in_channels / groups, filters).
        strides: (s_h, s_w) of the forward convolution.
        groups: the forward convolution's groups.

    Returns:
        float (N, (h - 1) * s_h + k_h, (w - 1) * s_w + k_w, in_channels).
    """
    kernel = tf.convert_to_tensor(kernel)
    if groups == 1:
        return _transpose_one(signal, kernel, strides)
    signals = tf.split(signal, groups, axis=-1)
    kernels = tf.split(kernel, groups, axis=-1)
    return tf.concat([_transpose_one(s, k, strides) for s, k in zip(signals, kernels)], axis=-1)


def _window_sum(v, radius):
    """Sums each channel's window [c - radius, c + radius] (zeros past the ends).

    2r+1 shifted slices of the channel-padded input: inside an XLA cluster one
    fused pass over memory. (A C x C band matrix product did the same with 2C
    FLOPs per element: for norm1 of ZFNet 1.8 GFLOP at batch 32.)
    """
    channels = int(v.shape[-1])
    padded = tf.pad(v, [[0, 0]] * (v.shape.rank - 1) + [[radius, radius]])
    return tf.add_n([padded[..., d : d + channels] for d in range(2 * radius + 1)])


def _inverse_power(scale, beta):
    if beta == 0.75:  # the paper's: s^-3/4 = rsqrt(s * sqrt(s)), 7x faster than pow
        return tf.math.rsqrt(scale * tf.sqrt(scale))
    return tf.pow(scale, -beta)


def _lrn_scale(x, radius, bias, alpha):
    """s = bias + alpha * (sum of squares over each channel's window)."""
    return bias + alpha * _window_sum(tf.square(x), radius)


@tf.function(jit_compile=True)
def _lrn_forward(x, radius, bias, alpha, beta):
    return x * _inverse_power(_lrn_scale(x, radius, bias, alpha), beta)


@tf.function(jit_compile=True)
def _lrn_backward(upstream, x, radius, bias, alpha, beta):
    # s is recomputed from x (read anyway) instead of kept from the forward pass.
    scale = _lrn_scale(x, radius, bias, alpha)
    power = _inverse_power(scale, beta)
    weighted = _window_sum(upstream * x * power / scale, radius)
    return upstream * power - (2.0 * alpha * beta) * x * weighted


def contrast_norm(inputs, depth_radius, bias, alpha, beta):
    """`tf.nn.local_response_normalization`, compiled by XLA, with its gradient.

    With s = bias + alpha * W(x * x), where W sums each channel's window, the
    output is y = x * s^-beta and the input gradient

        dx = dy * s^-beta - 2 * alpha * beta * x * W(dy * x * s^-beta / s)

    (W is symmetric, so it is its own transpose). Each pass is one XLA
    cluster that reads x (and dy) once. Against TensorFlow's LRN op and its
    gradient (LRNGrad), norm1 of ZFNet at batch 32 (55x55x96): forward 47 ->
    15 ms, forward + backward 227 -> 43 ms (bench/layer_profile.py). Equal to
    the op to float32 rounding (tests/test_layers.py).
    """

    @tf.custom_gradient
    def normalize(x):
        def gradient(upstream):
            return _lrn_backward(upstream, x, depth_radius, bias, alpha, beta)

        return _lrn_forward(x, depth_radius, bias, alpha, beta), gradient

    return normalize(inputs)


# `banded_contrast_norm` reads the channels in groups of this many: 8 took 0.94x
# the time of one band matrix over all 96 channels for norm1 of ZFNet and 0.50x
# over the 256 of norm2 (4, 16 and 32 were slower; BENCHMARKS.md section 16).
_BAND_GROUP = 8


def _band_kernel(channels, depth_radius, alpha):
    """(1, taps, group, group) weights of `banded_contrast_norm`'s window sums.

    The channels (N, H, W, C) are read as (N * H * W, 1, C / group, group):
    channel c is member c % group of position c // group. Output member j of
    position p sums the squares of channels within `depth_radius` of it,
    which lie at positions p - reach .. p + reach.
    """
    group = _BAND_GROUP if channels % _BAND_GROUP == 0 else channels
    reach = min(-(-depth_radius // group), channels // group - 1)
    offset = np.arange(-reach, reach + 1)[:, None, None] * group
    members = np.arange(group)
    near = np.abs(offset + members[:, None] - members[None, :]) <= depth_radius
    return (near * alpha)[None].astype(np.float32), group


def banded_contrast_norm(inputs, depth_radius, bias, alpha, beta):
    """`contrast_norm` of (N, H, W, C) inputs in plain TensorFlow ops (no XLA).

    The window sums of squares are one convolution, with the bias fused
    (oneDNN): the channels, in groups of 8, become a row of positions, and
    each group's sums take the squares of its own and its neighbours'
    (`_band_kernel`), 24 multiply-adds per element for a radius of 2 instead
    of C for a C x C band matrix. TensorFlow's LRN op does the product with
    Eigen and a slower power. ZFNet at batch 32 (2 cores): norm1 22.2 ms
    against 35.1 for the LRN op and 8.0 in XLA; norm2 3.4, 6.3 and 1.5 ms
    (BENCHMARKS.md section 16).
    """
    channels = int(inputs.shape[-1])
    weights, group = _band_kernel(channels, depth_radius, alpha)
    squares = tf.reshape(tf.square(inputs), [-1, 1, channels // group, group])
    window = tf.nn.conv2d(squares, tf.constant(weights, inputs.dtype), 1, "SAME")
    scale = tf.nn.bias_add(window, tf.fill([group], tf.cast(bias, inputs.dtype)))
    return inputs * _inverse_power(tf.reshape(scale, tf.shape(inputs)), beta)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ContrastNorm(keras.layers.Layer):
    """Local response (contrast) normalisation across feature maps.

    b_c = a_c / (bias + alpha * sum_{c' in [c-r, c+r]} a_c'^2) ^ beta, the
    formula of Krizhevsky et al. 2012 Section 3.3 (alpha is not divided by the
    window size), which ZFNet applies after pools 1 and 2.

    In the deconvnet this layer is passed through unchanged (Zeiler & Fergus
    Section 2.1 list only unpool, rectify and filter).

    It runs as `contrast_norm` (XLA). Exporters pick another op set before
    tracing (`use_ops`): `banded_contrast_norm` (portable) or TensorFlow's
    LRN op (builtin: TFLite has it). The setting, `ops`, is not saved.

    Args:
        depth_radius: half-width r of the channel window (window 2r+1).
        bias: the constant k.
        alpha: the scale of the sum of squares.
        beta: the exponent.
    """

    ops = XLA

    def __init__(self, depth_radius=2, bias=2.0, alpha=1e-4, beta=0.75, **kwargs):
        super().__init__(**kwargs)
        if int(depth_radius) < 0:
            raise ValueError(f"`depth_radius` must be >= 0. Received: depth_radius={depth_radius}")
        if float(bias) <= 0:
            raise ValueError(f"`bias` must be > 0. Received: bias={bias}")
        self.depth_radius = int(depth_radius)
        self.bias = float(bias)
        self.alpha = float(alpha)
        self.beta = float(beta)

    def call(self, inputs):
        args = (inputs, self.depth_radius, self.bias, self.alpha, self.beta)
        if self.ops == BUILTIN:
            return tf.nn.local_response_normalization(*args)
        if self.ops == PORTABLE:
            return banded_contrast_norm(*args)
        return contrast_norm(*args)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            depth_radius=self.depth_radius, bias=self.bias, alpha=self.alpha, beta=self.beta
        )
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class FilterRMSConstraint(keras.constraints.Constraint):
    """Renormalises every convolution filter whose RMS exceeds `max_rms`.

    Zeiler & Fergus Section 3: "each filter in the convolutional layers whose
    RMS value exceeds a fixed radius of 1e-1 is renormalized to this fixed
    radius". A filter is one output channel of the kernel; its RMS is taken
    over the spatial and input-channel axes. Keras applies constraints after
    each optimizer step.

    Args:
        max_rms: the radius (0.1 in the paper).
    """

    def __init__(self, max_rms=0.1):
        if not float(max_rms) > 0:
            raise ValueError(f"`max_rms` must be > 0. Received: max_rms={max_rms}")
        self.max_rms = float(max_rms)

    def __call__(self, w):
        axes = list(range(len(w.shape) - 1))
        rms = keras.ops.sqrt(keras.ops.mean(keras.ops.square(w), axis=axes, keepdims=True))
        scale = keras.ops.minimum(1.0, self.max_rms / keras.ops.maximum(rms, 1e-12))
        return w * keras.ops.cast(scale, w.dtype)

    def get_config(self):
        return {"max_rms": self.max_rms}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MaxPoolWithArgmax(keras.layers.Layer):
    """Max pooling that also returns the switches (the argmax locations).

    Returns `(pooled, switches)`; `switches` is int64 with the shape of
    `pooled`, each the flat index ((b * H + y) * W + x) * C + c of the maximum
    in the input (batch included, `tf.nn.max_pool_with_argmax`). Windows may
    overlap (3x3 stride 2 in ZFNet), so two outputs can share a switch.

    Args:
        pool_size: window size, int or pair.
        strides: stride, int or pair; defaults to `pool_size`.
        padding: 'valid' or 'same'.
    """

    def __init__(self, pool_size=3, strides=None, padding="valid", **kwargs):
        super().__init__(**kwargs)
        self.pool_size = _pair(pool_size, "pool_size")
        self.strides = _pair(pool_size if strides is None else strides, "strides")
        self.padding = _padding(padding)

    def call(self, inputs):
        pooled, switches = tf.nn.max_pool_with_argmax(
            inputs,
            ksize=(1, *self.pool_size, 1),
            strides=(1, *self.strides, 1),
            padding=self.padding.upper(),
            output_dtype=tf.int64,
            include_batch_in_index=True,
        )
        return pooled, switches

    def _pooled_shape(self, input_shape):
        batch, height, width, channels = input_shape
        out = []
        for size, k, s in zip((height, width), self.pool_size, self.strides):
            if size is None:
                out.append(None)
            elif self.padding == "same":
                out.append(-(-size // s))
            else:
                out.append((size - k) // s + 1)
        return (batch, out[0], out[1], channels)

    def compute_output_shape(self, input_shape):
        shape = self._pooled_shape(input_shape)
        return shape, shape

    def compute_output_spec(self, inputs):
        shape = self._pooled_shape(inputs.shape)
        return (
            keras.KerasTensor(shape, dtype=inputs.dtype),
            keras.KerasTensor(shape, dtype="int64"),
        )

    def get_config(self):
        config = super().get_config()
        config.update(pool_size=self.pool_size, strides=self.strides, padding=self.padding)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MaxUnpool(keras.layers.Layer):
    """Places each value at its switch in a zero map; coincident switches sum.

    The inverse of `MaxPoolWithArgmax` used by the deconvnet (Zeiler & Fergus
    Section 2.1, "unpooling"). Summing where overlapping windows share a
    maximum is what the max-pool gradient does. Switches may carry any batch
    offset: only their position within one example is used, so switches
    gathered from another batch still work.

    Args:
        output_size: (height, width) of the map before pooling.
    """

    def __init__(self, output_size, **kwargs):
        super().__init__(**kwargs)
        self.output_size = _pair(output_size, "output_size")

    def call(self, inputs):
        values, switches = inputs
        shape = tf.shape(values)
        batch, channels = shape[0], shape[3]
        per_example = self.output_size[0] * self.output_size[1] * channels
        local = tf.math.floormod(switches, tf.cast(per_example, switches.dtype))
        offsets = tf.cast(tf.range(batch), switches.dtype)[:, None, None, None] * tf.cast(
            per_example, switches.dtype
        )
        flat = tf.reshape(local + offsets, [-1])
        unpooled = tf.math.unsorted_segment_sum(
            tf.reshape(values, [-1]), flat, num_segments=tf.cast(batch * per_example, flat.dtype)
        )
        return tf.reshape(unpooled, [batch, *self.output_size, channels])

    def compute_output_shape(self, input_shape):
        values_shape = input_shape[0]
        return (values_shape[0], *self.output_size, values_shape[3])

    def get_config(self):
        config = super().get_config()
        config.update(output_size=self.output_size)
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class GroupedConv2D(keras.layers.Conv2D):
    """`keras.layers.Conv2D` with `groups` > 1, one convolution per group.

    The kernel (k_h, k_w, in / groups, filters), the arguments and the result
    are Conv2D's; only the computation differs: the input and the kernel are
    split by group, convolved separately and concatenated, as the two GPUs of
    Krizhevsky et al. did. TensorFlow's own grouped convolution has no fast
    CPU gradient: a training step of the two-tower AlexNet took 3.5-4.3x the
    one-tower's with it, 0.72-0.74x this way (BENCHMARKS.md, section 2).
    """

    def convolution_op(self, inputs, kernel):
        if self.groups == 1:
            return super().convolution_op(inputs, kernel)
        pieces = zip(
            keras.ops.split(inputs, self.groups, axis=-1),
            keras.ops.split(kernel, self.groups, axis=-1),
        )
        return keras.ops.concatenate(
            [super(GroupedConv2D, self).convolution_op(x, k) for x, k in pieces], axis=-1
        )


# Winograd F(2x2, 3x3) (Lavin & Gray, 2016): a 2x2 output tile of a 3x3
# correlation is A^T [(G g G^T) * (B^T d B)] A for the 4x4 input tile d, so
# per tile 16 products replace 36. Summed over input channels, the 16
# elementwise products become 16 matrix products (tiles x in) @ (in x out).
_WINOGRAD_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
# Below this batch the products are too small: ZFNet's forward pass took 1.13x
# (batch 1) and 1.07x (2) the direct convolutions' time, 0.95x at 4 and 0.92x
# at 32 (2 cores, BENCHMARKS.md section 14).
_WINOGRAD_MIN_BATCH = 4


def _winograd_b(v):
    """B^T along one axis, given the 4 views v[i] = rows i, i+2, i+4, ..."""
    return [v[0] - v[2], v[1] + v[2], v[2] - v[1], v[1] - v[3]]


def _winograd_a(m):
    """A^T along the leading axis of 4."""
    return [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]


def _winograd_tiles(x):
    """(N, H, W, C) -> (16, N * ceil(H/2) * ceil(W/2), C): B^T d B of every tile.

    Tile (r, c) starts at row 2r, column 2c of the padded map, so its row i is
    row r + i // 2 of the map's rows of parity i % 2. `space_to_batch` puts
    the four parity phases in the batch, and every view below is a plain
    slice (without XLA, strided slices took 8x as long: BENCHMARKS.md section 15).
    """
    height, width, channels = (int(d) for d in x.shape[1:])
    rows, cols = -(-height // 2), -(-width // 2)
    # 'same' padding of 1, plus what the last tile needs past the edge.
    padding = [[1, 2 * rows + 1 - height], [1, 2 * cols + 1 - width]]
    phases = tf.space_to_batch(x, [2, 2], padding)
    phases = tf.reshape(phases, [2, 2, -1, rows + 1, cols + 1, channels])
    tiles = []
    for by_row in _winograd_b([phases[i % 2, :, :, i // 2 : i // 2 + rows] for i in range(4)]):
        tiles += _winograd_b([by_row[j % 2, :, :, j // 2 : j // 2 + cols] for j in range(4)])
    return tf.reshape(tf.stack(tiles), [16, -1, channels])


def winograd_kernel(kernel):
    """(3, 3, in, out) -> (16, in, out): G g G^T, one matrix product.

    The kernel as `winograd_conv` multiplies it. Exports store it
    (`WinogradConv2D.convolve`), so that serving does not transform the
    kernel on every call.
    """
    gg = tf.constant(np.kron(_WINOGRAD_G, _WINOGRAD_G), kernel.dtype)  # (16, 9)
    channels_in, channels_out = int(kernel.shape[2]), int(kernel.shape[3])
    flat = tf.reshape(kernel, [9, channels_in * channels_out])
    return tf.reshape(tf.matmul(gg, flat), [16, channels_in, channels_out])


def _place_tiles(quarters, height, width):
    """(4, N * rows * cols, out) -> (N, height, width, out): output tiles in place.

    Output (a, b) of every tile is quarter 2a + b: the batch order that
    `batch_to_space` interleaves (the inverse of `_winograd_tiles`' phases).
    """
    rows, cols, channels = -(-height // 2), -(-width // 2), int(quarters.shape[-1])
    quarters = tf.reshape(quarters, [-1, rows, cols, channels])
    return tf.batch_to_space(quarters, [2, 2], [[0, 2 * rows - height], [0, 2 * cols - width]])


def _winograd_untile(products, height, width):
    """(16, tiles, out) -> (N, height, width, out): A^T M A, tiles back in place."""
    m = tf.reshape(products, [4, 4, -1, int(products.shape[-1])])
    out = [_winograd_a(by_row) for by_row in _winograd_a([m[i] for i in range(4)])]
    return _place_tiles(tf.stack([out[0][0], out[0][1], out[1][0], out[1][1]]), height, width)


def _winograd_untile_by_matmul(products, height, width):
    """`_winograd_untile` as one product by A^T (x) A^T, for plain TensorFlow ops.

    Without XLA the sums above are 12 ops, each a pass over memory; the
    product reads the 16 products once. conv4 of ZFNet at batch 32: 3.6 ms
    against 5.3 (in XLA the sums take 1.9 ms, the product 2.4; BENCHMARKS.md
    section 16).
    """
    at = np.array([[1, 1, 1, 0], [0, 1, -1, -1]])
    channels = int(products.shape[-1])
    flat = tf.reshape(products, [16, -1])
    quarters = tf.matmul(tf.constant(np.kron(at, at), products.dtype), flat)
    return _place_tiles(tf.reshape(quarters, [4, -1, channels]), height, width)


_WINOGRAD_PLAIN = (_winograd_tiles, winograd_kernel, _winograd_untile_by_matmul)
_WINOGRAD_XLA = tuple(
    tf.function(f, jit_compile=True) for f in (_winograd_tiles, winograd_kernel, _winograd_untile)
)


def winograd_conv(x, kernel, xla=True, transformed=None):
    """`tf.nn.conv2d(x, kernel, 1, 'SAME')` for a 3x3 kernel, by Winograd F(2x2, 3x3).

    The tile and kernel transforms and the placing of the output tiles run
    as XLA clusters (with `xla=False`, as plain TensorFlow ops, the output
    tiles placed by one matrix product: conv4's transforms take 15 ms
    against 10.5 in XLA at batch 32) and the 16 products as one batched
    matmul; gradients go through the same path. Equal to tf.nn.conv2d to
    float32 rounding (tests/test_layers.py); on 2 cores it made ZFNet's
    training step 1.15x as fast (BENCHMARKS.md, sections 14-16).

    Args:
        x: float32 (N, H, W, in) with static H and W.
        kernel: float32 (3, 3, in, out), not read if `transformed` is given.
        xla: False for no XLA (exported SavedModels).
        transformed: `winograd_kernel(kernel)` computed beforehand, or None.
    """
    tiles, transform, untile = _WINOGRAD_XLA if xla else _WINOGRAD_PLAIN
    if transformed is None:
        transformed = transform(tf.convert_to_tensor(kernel))
    products = tf.matmul(tiles(x), transformed)
    return untile(products, int(x.shape[1]), int(x.shape[2]))


@keras.saving.register_keras_serializable(package=_PACKAGE)
class WinogradConv2D(keras.layers.Conv2D):
    """`keras.layers.Conv2D` that runs 3x3 stride-1 'same' convolutions by Winograd.

    Same arguments, weights and results (to float32 rounding) as Conv2D; the
    computation is `winograd_conv` where it applies (`uses_winograd`) to
    batches of at least 4, and Conv2D's own otherwise (a batch size known
    only when the graph runs is chosen by `tf.cond`). Exporters pick the op
    set before tracing (`use_ops`): portable runs `winograd_conv` without
    XLA, builtin the direct convolution. The setting, `ops`, is not saved.
    """

    ops = XLA

    def uses_winograd(self, inputs):
        """Whether `inputs` go through `winograd_conv` at batches of 4 or more.

        Needs a 3x3 kernel, stride 1, no dilation, 'same', one group,
        channels_last, float32 inputs with a static map size, TensorFlow,
        and an op set other than builtin.
        """
        return (
            self.ops != BUILTIN
            and keras.backend.backend() == "tensorflow"
            and tuple(self.kernel_size) == (3, 3)
            and tuple(self.strides) == (1, 1)
            and tuple(self.dilation_rate) == (1, 1)
            and self.padding == "same"
            and self.groups == 1
            and self.data_format == "channels_last"
            and tf.as_dtype(inputs.dtype) == tf.float32
            and inputs.shape[1] is not None
            and inputs.shape[2] is not None
        )

    def convolution_op(self, inputs, kernel):
        return self.convolve(inputs, kernel)

    def convolve(self, inputs, kernel, transformed=None):
        """`convolution_op`, optionally given `winograd_kernel(kernel)` (exports store it)."""

        def direct():
            return keras.layers.Conv2D.convolution_op(self, inputs, kernel)

        if not self.uses_winograd(inputs):
            return direct()

        def winograd():
            return winograd_conv(inputs, kernel, xla=self.ops == XLA, transformed=transformed)

        batch = inputs.shape[0]
        if batch is not None:
            return winograd() if batch >= _WINOGRAD_MIN_BATCH else direct()
        return tf.cond(tf.shape(inputs)[0] >= _WINOGRAD_MIN_BATCH, winograd, direct)


def use_ops(model, ops):
    """Makes later traces of `model` run one op set (exporters call it).

    - `XLA` ("xla", the default): ContrastNorm as `contrast_norm` and
      WinogradConv2D's transforms as XLA clusters (Keras, training).
    - `PORTABLE` ("portable"): the same computations in plain TensorFlow ops
      (`banded_contrast_norm`, `winograd_conv(xla=False)`): the SavedModel,
      which any TF Serving runs without XLA.
    - `BUILTIN` ("builtin"): TensorFlow's LRN op and direct convolutions,
      TFLite builtin ops: LiteRT.
    """
    if ops not in OP_SETS:
        raise ValueError(f"`ops` must be one of {', '.join(OP_SETS)}. Received: ops={ops!r}")
    for layer in model.layers:
        if isinstance(layer, OP_SET_LAYERS):
            layer.ops = ops


# The layers whose computation `use_ops` picks.
OP_SET_LAYERS = (ContrastNorm, WinogradConv2D)


# The convolution layers every zfkeras tool accepts: Keras' own and the above.
CONV_TYPES = (keras.layers.Conv2D, GroupedConv2D, WinogradConv2D)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class TiedConv2DTranspose(keras.layers.Conv2DTranspose):
    """The transposed convolution of a forward `Conv2D`, sharing its kernel.

    The kernel is the forward layer's own variable (tied, not copied), so
    training the forward network changes this layer. No bias (Zeiler & Fergus
    Section 2.1). The output has the forward layer's input size; grouped
    forward convolutions (two-tower AlexNet) are transposed group by group.

    Args:
        forward_layer: a built `keras.layers.Conv2D`.
        output_size: (height, width) of the forward layer's input.
    """

    def __init__(self, forward_layer, output_size, **kwargs):
        if isinstance(forward_layer, dict):
            forward_layer = keras.saving.deserialize_keras_object(forward_layer)
        if not isinstance(forward_layer, keras.layers.Conv2D):
            raise ValueError(
                "`forward_layer` must be a keras.layers.Conv2D. "
                f"Received: forward_layer={forward_layer!r}"
            )
        if not forward_layer.built:
            raise ValueError(f"`forward_layer` {forward_layer.name!r} must be built first.")
        if forward_layer.data_format != "channels_last":
            raise ValueError(f"{forward_layer.name!r}: only channels_last is supported.")
        if tuple(forward_layer.dilation_rate) != (1, 1):
            raise ValueError(f"{forward_layer.name!r}: dilated convolutions are not supported.")
        kwargs.pop("use_bias", None)
        groups = forward_layer.groups
        in_channels = forward_layer.kernel.shape[2] * groups
        super().__init__(
            filters=in_channels,
            kernel_size=forward_layer.kernel_size,
            strides=forward_layer.strides,
            padding=forward_layer.padding,
            use_bias=False,
            **kwargs,
        )
        self.forward_layer = forward_layer
        self.output_size = _pair(output_size, "output_size")
        self.groups_ = groups

    def build(self, input_shape):
        # No variables of its own: `kernel` is the forward layer's. The exact
        # output size is given to conv2d_transpose, so no output_padding.
        self.built = True

    @property
    def kernel(self):
        return self.forward_layer.kernel

    def call(self, inputs):
        full = transpose_convolution(inputs, self.kernel, self.strides, self.groups_)
        return crop_transposed(
            full, self.output_size, inputs.shape[1:3], self.kernel_size, self.strides, self.padding
        )

    def compute_output_shape(self, input_shape):
        return (input_shape[0], *self.output_size, self.filters)

    def get_config(self):
        config = super().get_config()
        for key in ("filters", "kernel_size", "strides", "padding", "use_bias"):
            config.pop(key, None)
        config.update(
            forward_layer=keras.saving.serialize_keras_object(self.forward_layer),
            output_size=self.output_size,
        )
        return config
