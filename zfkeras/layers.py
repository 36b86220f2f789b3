"""Custom Keras objects of zfkeras: every one is serializable and round-trips.

- `ContrastNorm`: the local contrast normalisation across feature maps of
  Krizhevsky et al. (2012), used by ZFNet after pools 1 and 2 (paper Fig. 3).
- `FilterRMSConstraint`: the paper's filter renormalisation (Section 3): any
  convolution filter whose RMS exceeds a radius is scaled back to it.
- `MaxPoolWithArgmax`: max pooling that also returns the switches.
- `MaxUnpool`: places values at their switches, summing coincident ones.
- `TiedConv2DTranspose`: a `Conv2DTranspose` whose kernel IS the kernel
  variable of a forward `Conv2D`.
"""

import keras
import tensorflow as tf

_PACKAGE = "zfkeras"


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


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ContrastNorm(keras.layers.Layer):
    """Local response (contrast) normalisation across feature maps.

    b_c = a_c / (bias + alpha * sum_{c' in [c-r, c+r]} a_c'^2) ^ beta, the
    formula of Krizhevsky et al. 2012 Section 3.3 (alpha is not divided by the
    window size), which ZFNet applies after pools 1 and 2.

    In the deconvnet this layer is passed through unchanged (Zeiler & Fergus
    Section 2.1 list only unpool, rectify and filter).

    Args:
        depth_radius: half-width r of the channel window (window 2r+1).
        bias: the constant k.
        alpha: the scale of the sum of squares.
        beta: the exponent.
    """

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
        return tf.nn.local_response_normalization(
            inputs,
            depth_radius=self.depth_radius,
            bias=self.bias,
            alpha=self.alpha,
            beta=self.beta,
        )

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
        shape = tf.shape(inputs)
        output_shape = tf.stack([shape[0], *self.output_size, self.filters])
        strides = (1, *self.strides, 1)
        padding = self.padding.upper()
        kernel = tf.convert_to_tensor(self.kernel)
        if self.groups_ == 1:
            return tf.nn.conv2d_transpose(inputs, kernel, output_shape, strides, padding)
        signals = tf.split(inputs, self.groups_, axis=-1)
        kernels = tf.split(kernel, self.groups_, axis=-1)
        group_shape = tf.stack([shape[0], *self.output_size, self.filters // self.groups_])
        return tf.concat(
            [
                tf.nn.conv2d_transpose(s, k, group_shape, strides, padding)
                for s, k in zip(signals, kernels)
            ],
            axis=-1,
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
