"""The TensorFlow functions the exported artifacts serve.

`ServingGraph` holds a `Source` and builds, as plain TF code:

- `preprocess_images`: encoded images (JPEG, PNG, BMP, GIF) -> the uint8
  centre views and float32 model inputs, exactly `zfkeras.images.read_image`
  (alpha composited over white) followed by `zfkeras.data.eval_view` and
  `subtract_mean` (Zeiler & Fergus Section 3: short side resized, centre
  crop, per-pixel mean subtracted, centre `crop_size` crop). The format and
  the declared size are checked before decoding (`checked_decode`, the
  limits of `zfkeras.images`); bytes that fail a check or do not decode fail
  the whole call with InvalidArgument.
- `preprocess_pixels`: the same from uint8 pixel batches.
- `classify`: model inputs -> top-k classes, names and probabilities, from
  the model with the serving weight layouts of `layouts.ServingForward`.
- `deconv`: model inputs and one feature-map index per image -> the
  deconvnet projection of the strongest activation of that map (Section 2.1,
  the paper's figures; `zfkeras.deconv.Deconvnet.project(mode="max")`),
  with switches from `builtin_pool`, so that TFLite needs builtins only.

The switches and the unpooling are rebuilt here, not taken from
`zfkeras.deconv`, because `tf.nn.max_pool_with_argmax` is a Flex op in
TFLite; tests check both against the library.
"""

import contextlib

import keras
import numpy as np
import tensorflow as tf

from zfkeras import data, images
from zfkeras import deconv as zdeconv
from zfkeras import layers as zlayers
from zfkeras.errors import Error
from zfkeras_export import builtin_pool, layouts

CLASSIFY_OUTPUTS = ("classes", "class_names", "probabilities", "all_probabilities")
DECONV_OUTPUTS = ("projections", "activations", "positions", "boxes")


def _composite_over_white(image):
    """uint8 (H, W, C+1) -> (H, W, C): `zfkeras.images` rule, op for op."""
    colour, alpha = image[..., :-1], image[..., -1:]
    alpha = tf.cast(alpha, tf.float32) / 255.0
    blended = tf.cast(colour, tf.float32) * alpha + 255.0 * (1.0 - alpha)
    return tf.cast(tf.clip_by_value(tf.round(blended), 0.0, 255.0), tf.uint8)


def _colour_channels(image, channels):
    """uint8 (H, W, 1-4) -> (H, W, channels), alpha composited over white."""
    depth = tf.shape(image)[-1]
    image = tf.cond(tf.equal(depth % 2, 0), lambda: _composite_over_white(image), lambda: image)
    depth = tf.shape(image)[-1]
    if channels == 1:
        image = tf.cond(
            tf.equal(depth, 3),
            lambda: tf.image.rgb_to_grayscale(tf.ensure_shape(image, [None, None, 3])),
            lambda: image,
        )
    else:
        image = tf.cond(tf.equal(depth, 1), lambda: tf.tile(image, [1, 1, 3]), lambda: image)
    return tf.ensure_shape(image, [None, None, channels])


# ---------------------------------------------------------------------------
# Decoding with the checks of `zfkeras.images`, before any pixel is decoded.


def _bytes_at(encoded, start, count):
    """uint8 (count,): bytes start..start+count of a scalar string, zeros past its end."""
    start = tf.minimum(tf.cast(start, tf.int32), tf.strings.length(encoded))
    padded = tf.strings.join([encoded, tf.constant(b"\0" * count)])
    return tf.reshape(tf.io.decode_raw(tf.strings.substr(padded, start, count), tf.uint8), [count])


def _number(raw, little_endian):
    """Unsigned integer (int64) from uint8 bytes."""
    raw = tf.cast(raw, tf.int64)
    count = raw.shape[0]
    shifts = [8 * i for i in range(count)]
    if not little_endian:
        shifts = shifts[::-1]
    return tf.reduce_sum(tf.bitwise.left_shift(raw, tf.constant(shifts, tf.int64)))


def _gif_largest_frame(encoded):
    """`zfkeras.images.gif_largest_frame` in TensorFlow ops (one block per step)."""
    length = tf.cast(tf.strings.length(encoded), tf.int64)

    def byte(pos):
        return tf.cast(_bytes_at(encoded, pos, 1)[0], tf.int64)

    def table(flags):
        size = 3 * tf.bitwise.left_shift(tf.constant(2, tf.int64), flags % 8)
        return tf.where(flags >= 128, size, tf.constant(0, tf.int64))

    def body(pos, in_blocks, largest, done):
        block = byte(pos)
        # In data sub-blocks: skip one (a zero length ends them).
        sub_pos = pos + 1 + block
        # At a block: an image descriptor (its frame size, local colour
        # table, LZW code size, then sub-blocks), an extension (label, then
        # sub-blocks), or anything else: the end.
        descriptor = _bytes_at(encoded, pos, 10)
        width = _number(descriptor[5:7], True)
        height = _number(descriptor[7:9], True)
        image = tf.equal(block, 0x2C)
        extension = tf.equal(block, 0x21)
        block_pos = tf.where(image, pos + 11 + table(tf.cast(descriptor[9], tf.int64)), pos + 2)
        next_pos = tf.where(in_blocks, sub_pos, block_pos)
        next_in_blocks = tf.where(in_blocks, tf.not_equal(block, 0), image | extension)
        largest = tf.where(~in_blocks & image, tf.maximum(largest, width * height), largest)
        done = (pos >= length) | (~in_blocks & ~image & ~extension)
        return next_pos, next_in_blocks, largest, done

    start = 13 + table(byte(10))
    _, _, largest, _ = tf.while_loop(
        lambda pos, in_blocks, largest, done: ~done,
        body,
        (start, tf.constant(False), tf.constant(0, tf.int64), tf.constant(False)),
    )
    return largest


def _declared_pixels(encoded, kind):
    """Pixels the header of a JPEG (0), PNG (1), BMP (2) or GIF (3) declares."""

    def jpeg():
        shape = tf.cast(tf.image.extract_jpeg_shape(encoded), tf.int64)
        return shape[0] * shape[1]

    def png():
        width = _number(_bytes_at(encoded, 16, 4), False)
        return width * _number(_bytes_at(encoded, 20, 4), False)

    def bmp():
        # int32 width and height (negative height: rows stored top-down).
        width = _number(_bytes_at(encoded, 18, 4), True)
        height = _number(_bytes_at(encoded, 22, 4), True)
        height = tf.where(height >= 2**31, 2**32 - height, height)
        width = tf.where(width >= 2**31, 2**32 - width, width)
        return width * height

    def gif():
        width = _number(_bytes_at(encoded, 6, 2), True)
        screen = width * _number(_bytes_at(encoded, 8, 2), True)
        return tf.maximum(screen, _gif_largest_frame(encoded))

    return tf.switch_case(kind, [jpeg, png, bmp, gif])


_MAGIC = ((b"\xff\xd8\xff",), (b"\x89PNG\r\n\x1a\n",), (b"BM",), (b"GIF87a", b"GIF89a"))


def _kind(encoded):
    """0-3 for JPEG, PNG, BMP, GIF by the leading bytes; -1 for anything else."""
    kind = tf.constant(-1)
    for index, magics in enumerate(_MAGIC):
        for magic in magics:
            head = tf.strings.substr(encoded, 0, len(magic))
            kind = tf.where(tf.equal(head, magic), index, kind)
    return kind


def checked_decode(encoded, index):
    """Decodes one encoded image as `zfkeras.images.read_image` checks it.

    The format (JPEG, PNG, BMP or GIF) and the size its header declares (at
    most `images.MAX_PIXELS`, every GIF frame included) are checked before
    decoding, the sides (at most `images.MAX_ASPECT` to 1) after: a failed
    check is an InvalidArgument naming `index`, e.g. "images[2]: declares
    900000000 pixels, more than the limit of 67108864". TIFF files and EXIF
    orientations are not handled here; `zfkeras.images.encode_for_serving`
    turns such files into PNG bytes.

    Returns:
        uint8 (H, W, 1-4), as `tf.io.decode_image`.
    """
    kind = _kind(encoded)
    known = tf.debugging.Assert(
        kind >= 0,
        [
            tf.strings.format(
                "images[{}]: not a JPEG, PNG, BMP or GIF image ({} bytes)",
                (index, tf.strings.length(encoded)),
            )
        ],
    )
    with tf.control_dependencies([known]):
        pixels = _declared_pixels(encoded, tf.maximum(kind, 0))
    small = tf.debugging.Assert(
        pixels <= images.MAX_PIXELS,
        [
            tf.strings.format(
                "images[{}]: declares {} pixels, more than the limit of {} (a decompression "
                "bomb?); refused before decoding",
                (index, pixels, images.MAX_PIXELS),
            )
        ],
    )
    with tf.control_dependencies([small]):
        image = tf.io.decode_image(encoded, expand_animations=False, dtype=tf.uint8)
    shape = tf.shape(image)
    long_side, short_side = tf.reduce_max(shape[:2]), tf.reduce_min(shape[:2])
    proportioned = tf.debugging.Assert(
        long_side <= images.MAX_ASPECT * short_side,
        [
            tf.strings.format(
                "images[{}]: {} x {} pixels, sides more than {} to 1",
                (index, shape[1], shape[0], images.MAX_ASPECT),
            )
        ],
    )
    with tf.control_dependencies([proportioned]):
        return tf.identity(image)


def unless_empty(fn, *tensors):
    """`fn(*tensors)` on a batch, also when the batch is empty.

    oneDNN's convolution and pooling kernels fail on a batch of zero, so an
    empty batch is replaced by one zero example, and the outputs are cut back
    to the batch size. Only the inputs pass through a `tf.cond`, so `fn` is
    traced once, and a non-empty batch goes on as it is: appending the
    example instead (a concatenation, a `tf.pad`) copied the 19 MB of a
    batch of 32 on every call.
    """
    count = tf.shape(tensors[0])[0]

    def one_zero_example(t):
        return tf.zeros([1, *t.shape[1:]], t.dtype)

    padded = [tf.cond(count > 0, lambda t=t: t, lambda t=t: one_zero_example(t)) for t in tensors]
    return tf.nest.map_structure(lambda out: out[:count], fn(*padded))


class ServingGraph:
    """The serving computations of one exported model.

    Switches the model to the portable op set for good (its computations in
    plain TensorFlow ops, no XLA: `zfkeras.layers.use_ops`), except inside
    `using_ops`.

    Args:
        source: a `zfkeras_export.source.Source`.
        top_k: how many classes the classify functions return.
    """

    def __init__(self, source, top_k=5):
        self.source = source
        self.model = source.model
        # Portable ops, no XLA clusters: TF Serving compiles none unless
        # started with --xla_cpu_compilation_enabled.
        self.forward = layouts.ServingForward(self.model)
        self.preprocessing = source.preprocessing
        self.top_k = max(1, min(int(top_k), source.num_classes))
        crop = self.preprocessing.crop_size
        self._mean = np.ascontiguousarray(data.center_crop(source.mean, crop), np.float32)
        self._class_names = np.array(source.class_names, dtype=object)
        self.deconvnet = zdeconv.Deconvnet(self.model)
        self._chains = {name: self._chain(name) for name in source.conv_layers}

    @contextlib.contextmanager
    def using_ops(self, ops):
        """Inside: graphs traced from here run op set `ops` (`zfkeras.layers`).

        `XLA`: Keras' own computations, for a SavedModel served from
        TensorFlow with XLA (TF Serving needs --xla_cpu_compilation_enabled).
        `BUILTIN`: TFLite builtin ops (LiteRT).
        """
        self.forward.use_ops(ops)
        try:
            yield
        finally:
            self.forward.use_ops(zlayers.PORTABLE)

    @property
    def input_shape(self):
        return self.source.input_shape

    # -- preprocessing -----------------------------------------------------

    def _view_spec(self):
        crop, channels = self.preprocessing.crop_size, self.preprocessing.channels
        return tf.TensorSpec([crop, crop, channels], tf.uint8)

    def _eval_view(self, image):
        return data.center_crop(data.view(image, self.preprocessing), self.preprocessing.crop_size)

    def input_spec_text(self):
        """The model-input spec in words, for error messages."""
        crop, channels = self.preprocessing.crop_size, self.preprocessing.channels
        return (
            f"float32 (batch, {crop}, {crop}, {channels}) model inputs (pixels minus the mean "
            f"view, times {self.preprocessing.input_scale:g})"
        )

    def check_inputs(self, inputs):
        """`inputs` with an assertion of their shape (InvalidArgument naming the spec).

        A loaded SavedModel signature checks dtypes but not shapes, and a
        wrongly sized batch would otherwise fail deep inside a kernel.
        """
        crop, channels = self.preprocessing.crop_size, self.preprocessing.channels
        check = tf.debugging.assert_equal(
            tf.shape(inputs)[1:],
            tf.constant([crop, crop, channels]),
            message=f"inputs must be {self.input_spec_text()}; got shape",
        )
        with tf.control_dependencies([check]):
            return tf.identity(inputs)

    def check_pixels(self, pixels):
        """`pixels` with an assertion of their channels and a non-empty image."""
        channels = self.preprocessing.channels
        shape = tf.shape(pixels)
        checks = [
            tf.debugging.assert_equal(
                shape[3],
                channels,
                message=f"pixels must be uint8 (batch, height, width, {channels}); got channels",
            ),
            tf.debugging.assert_positive(
                shape[1:3], message="pixels must have height and width >= 1; got"
            ),
        ]
        with tf.control_dependencies(checks):
            return tf.identity(pixels)

    def model_input(self, views):
        """uint8 centre views -> float32 model input (`data.subtract_mean`)."""
        scale = tf.constant(self.preprocessing.input_scale, tf.float32)
        return (tf.cast(views, tf.float32) - tf.constant(self._mean)) * scale

    def preprocess_images(self, images):
        """Encoded images, string (N,) -> (uint8 views, float32 model inputs).

        Each image's format and declared size are checked before it is
        decoded (`checked_decode`); a bad one fails the call with
        InvalidArgument naming its index.
        """
        channels = self.preprocessing.channels

        def one(args):
            encoded, index = args
            image = checked_decode(encoded, index)
            return self._eval_view(_colour_channels(image, channels))

        indices = tf.range(tf.shape(images)[0])
        views = tf.map_fn(one, (images, indices), fn_output_signature=self._view_spec())
        return views, self.model_input(views)

    def preprocess_pixels(self, pixels):
        """uint8 (N, H, W, C) pixels -> (uint8 views, float32 model inputs)."""
        views = tf.map_fn(self._eval_view, pixels, fn_output_signature=self._view_spec())
        return views, self.model_input(views)

    # -- classification ----------------------------------------------------

    def probabilities(self, inputs):
        return self.forward(inputs)

    def classify(self, inputs):
        """Model inputs -> {classes, class_names, probabilities, all_probabilities}.

        classes int32 (N, k) and class_names (N, k) by decreasing probability,
        probabilities float32 (N, k) their softmax values, all_probabilities
        float32 (N, num_classes).
        """
        probabilities = self.probabilities(inputs)
        top = tf.math.top_k(probabilities, k=self.top_k)
        names = tf.gather(tf.constant(self._class_names, tf.string), top.indices)
        return {
            "classes": top.indices,
            "class_names": names,
            "probabilities": top.values,
            "all_probabilities": probabilities,
        }

    # -- deconvnet ---------------------------------------------------------

    def _chain(self, layer_name):
        """The layers from the input to `layer_name`'s rectified feature map."""
        chain = []
        for layer in self.model.layers:
            if isinstance(layer, keras.layers.InputLayer):
                continue
            chain.append(layer)
            if chain[-1].name == layer_name:
                break
        following = self.model.layers[self.model.layers.index(chain[-1]) + 1]
        if not isinstance(following, keras.layers.ReLU):
            raise Error(f"layer {layer_name!r} is not followed by a ReLU")
        return [*chain, following]

    def _forward(self, inputs, chain):
        """Replays `chain`; returns (feature map, {pool: (switches, size)}, {conv: shape})."""
        x, switches, shapes = inputs, {}, {}
        for layer in chain:
            if isinstance(layer, keras.layers.Conv2D):
                shapes[layer.name] = (int(x.shape[1]), int(x.shape[2]), int(x.shape[3]))
            if isinstance(layer, keras.layers.MaxPooling2D):
                size = (int(x.shape[1]), int(x.shape[2]))
                x, switch = builtin_pool.argmax_pool(
                    x, layer.pool_size, layer.strides, layer.padding
                )
                switches[layer.name] = (switch, size)
            else:
                x = layer(x, training=False)
        return x, switches, shapes

    def _backward(self, signal, chain, switches, shapes):
        for layer in reversed(chain):
            if isinstance(layer, keras.layers.ReLU):
                signal = tf.nn.relu(signal)
            elif isinstance(layer, keras.layers.Conv2D):
                signal = self._transpose_conv(signal, layer, shapes[layer.name])
            elif isinstance(layer, keras.layers.MaxPooling2D):
                switch, size = switches[layer.name]
                signal = builtin_pool.unpool(
                    signal, switch, size, layer.pool_size, layer.strides, layer.padding
                )
            elif isinstance(layer, keras.layers.ZeroPadding2D):
                (top, bottom), (left, right) = layer.padding
                height, width = int(signal.shape[1]), int(signal.shape[2])
                signal = signal[:, top : height - bottom, left : width - right, :]
            # ContrastNorm: passed through (Section 2.1 lists unpool, rectify, filter).
        return signal

    @staticmethod
    def _transpose_conv(signal, layer, input_shape):
        height, width, channels = input_shape
        batch = tf.shape(signal)[0]
        strides = (1, *layer.strides, 1)
        padding = layer.padding.upper()
        kernel = tf.convert_to_tensor(layer.kernel)
        groups = layer.groups
        shape = tf.stack([batch, height, width, channels // groups])
        if groups == 1:
            return tf.nn.conv2d_transpose(signal, kernel, shape, strides, padding)
        parts = zip(tf.split(signal, groups, axis=-1), tf.split(kernel, groups, axis=-1))
        return tf.concat(
            [tf.nn.conv2d_transpose(s, k, shape, strides, padding) for s, k in parts], axis=-1
        )

    def deconv(self, inputs, feature_map, layer_name, check=True):
        """Projects the strongest activation of one feature map per image.

        Args:
            inputs: float32 (N, crop, crop, C) model inputs.
            feature_map: int32 (N,), the feature map of `layer_name` per image.
            layer_name: a conv layer ('conv1'...).
            check: assert feature_map is in range (InvalidArgument); TFLite
                graphs skip it (Assert is not a builtin), where an out-of-range
                index gives a zero projection.

        Returns:
            {projections float32 (N, crop, crop, C), activations float32 (N,)
            the unit's value, positions int32 (N, 2) its (y, x), boxes int32
            (N, 4) its receptive field (y0, x0, y1, x1) in the crop}.
        """
        chain = self._chains[layer_name]
        maps_shape = self.deconvnet.map_shape(layer_name)
        height, width, depth = (int(d) for d in maps_shape)
        feature_map = tf.cast(feature_map, tf.int32)
        if check:
            checks = [
                tf.debugging.assert_non_negative(
                    feature_map, message=f"feature_map must be in [0, {depth})"
                ),
                tf.debugging.assert_less(
                    feature_map, depth, message=f"feature_map must be in [0, {depth})"
                ),
                tf.debugging.assert_equal(
                    tf.shape(feature_map)[0],
                    tf.shape(inputs)[0],
                    message="one feature_map per image",
                ),
            ]
            with tf.control_dependencies(checks):
                feature_map = tf.identity(feature_map)
        activation, switches, shapes = self._forward(inputs, chain)
        # The seed: the strongest activation of the chosen map, all else zero.
        mask = tf.one_hot(feature_map, depth, dtype=activation.dtype)
        maps = tf.reduce_sum(activation * mask[:, None, None, :], axis=3)
        flat = tf.reshape(maps, [-1, height * width])
        best = tf.argmax(flat, axis=1, output_type=tf.int32)
        unit = tf.one_hot(best, height * width, dtype=maps.dtype)
        seeds = tf.reshape(flat * unit, [-1, height, width])
        signal = seeds[..., None] * mask[:, None, None, :]
        projections = self._backward(signal, chain, switches, shapes)
        ys, xs = np.divmod(np.arange(height * width), width)
        table = np.stack(self.deconvnet.receptive_field(layer_name, ys, xs), axis=1)
        return {
            "projections": projections,
            "activations": tf.reduce_max(flat, axis=1),
            "positions": tf.stack([best // width, best % width], axis=1),
            "boxes": tf.gather(tf.constant(table.astype(np.int32)), best),
        }
