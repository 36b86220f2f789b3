"""Max pooling with switches, and unpooling, from TFLite builtin ops only.

`tf.nn.max_pool_with_argmax` becomes the Select-TF op `FlexMaxPoolWithArgmax`
in TFLite, which no Python runtime here can run. `argmax_pool` rebuilds it
from k*k strided slices: the window offsets are visited in row-major order
and an offset replaces the running maximum only when strictly greater, so
ties go to the first offset, exactly as TensorFlow's CPU kernel picks its
argmax. Padded cells ('same') hold -inf and are never chosen. Everything is
PAD, STRIDED_SLICE, GREATER, SELECT and MAXIMUM in TFLite.

The switches are the window offset (dy * k_w + dx) of each maximum, int32,
shaped like the pooled map; `unpool` turns them into flat positions and
places the signal with `tf.scatter_nd`, which sums coincident updates (what
the max-pool gradient does where overlapping 3x3/2 windows share a maximum).
"""

import tensorflow as tf


def _same_padding(size, kernel, stride):
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return out, total // 2, total - total // 2


def pool_geometry(input_size, pool_size, strides, padding):
    """Per axis (output size, padding before, padding after) of a max pool.

    Args:
        input_size: (height, width) of the pooled map.
        pool_size: (k_h, k_w).
        strides: (s_h, s_w).
        padding: 'valid' or 'same' (TensorFlow's rules).

    Returns:
        ((out_h, top, bottom), (out_w, left, right)).
    """
    geometry = []
    for size, kernel, stride in zip(input_size, pool_size, strides):
        if padding == "same":
            geometry.append(_same_padding(size, kernel, stride))
        else:
            geometry.append(((size - kernel) // stride + 1, 0, 0))
    return tuple(geometry)


def argmax_pool(inputs, pool_size, strides, padding):
    """Max pooling that also returns the window offset of each maximum.

    Args:
        inputs: float (N, H, W, C) with static H, W, C.
        pool_size: (k_h, k_w).
        strides: (s_h, s_w).
        padding: 'valid' or 'same'.

    Returns:
        (pooled, switches): pooled equals `tf.nn.max_pool2d`; switches int32
        in [0, k_h * k_w), the row-major offset of the maximum in its window.
    """
    height, width = int(inputs.shape[1]), int(inputs.shape[2])
    (out_h, top, bottom), (out_w, left, right) = pool_geometry(
        (height, width), pool_size, strides, padding
    )
    if top or bottom or left or right:
        lowest = tf.constant(float("-inf"), inputs.dtype)
        inputs = tf.pad(
            inputs, [[0, 0], [top, bottom], [left, right], [0, 0]], constant_values=lowest
        )
    (k_h, k_w), (s_h, s_w) = pool_size, strides
    pooled = switches = None
    for dy in range(k_h):
        for dx in range(k_w):
            window = inputs[
                :, dy : dy + s_h * (out_h - 1) + 1 : s_h, dx : dx + s_w * (out_w - 1) + 1 : s_w, :
            ]
            if pooled is None:
                pooled = window
                switches = tf.zeros_like(window, dtype=tf.int32)
                continue
            better = window > pooled
            pooled = tf.where(better, window, pooled)
            switches = tf.where(better, tf.constant(dy * k_w + dx, tf.int32), switches)
    return pooled, switches


def unpool(signal, switches, input_size, pool_size, strides, padding):
    """Places each signal value at its switch in a zero map; coincident ones sum.

    Args:
        signal: float (N, out_h, out_w, C).
        switches: int32 window offsets from `argmax_pool`, same shape.
        input_size: (H, W) of the map before pooling.
        pool_size, strides, padding: those of the forward pool.

    Returns:
        float (N, H, W, C).
    """
    height, width = input_size
    (out_h, top, _), (out_w, left, _) = pool_geometry(input_size, pool_size, strides, padding)
    channels = int(signal.shape[-1])
    k_w = pool_size[1]
    rows = tf.range(out_h, dtype=tf.int32)[None, :, None, None] * strides[0] - top
    cols = tf.range(out_w, dtype=tf.int32)[None, None, :, None] * strides[1] - left
    ys = rows + switches // k_w
    xs = cols + switches % k_w
    batch = tf.shape(signal)[0]
    examples = tf.range(batch, dtype=tf.int32)[:, None, None, None]
    depth = tf.range(channels, dtype=tf.int32)[None, None, None, :]
    flat = ((examples * height + ys) * width + xs) * channels + depth
    size = batch * (height * width * channels)
    placed = tf.scatter_nd(
        tf.reshape(flat, [-1, 1]), tf.reshape(signal, [-1]), tf.reshape(size, [1])
    )
    return tf.reshape(placed, [batch, height, width, channels])
