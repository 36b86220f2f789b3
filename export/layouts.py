"""The classification forward pass of the exports, with weights laid out for serving.

Keras keeps a Dense kernel [in, out], the layout training uses; TensorFlow's
matmul (oneDNN) then repacks the whole kernel on every call. Stored [out, in],
ZFNet's fc6 at batch 32 took 19.1 ms as W x^T (transposed back), 21.7 ms as
x W^T and 32.0 ms as Keras' x W; the whole forward pass of the portable op
set 0.997x Keras' time against 0.971x with x W^T (2 cores, BENCHMARKS.md
section 16). LiteRT gets x W^T, which is TFLite's FULLY_CONNECTED. A
`WinogradConv2D` transforms its kernel on every call; an export keeps it
transformed (`zfkeras.layers.winograd_kernel`).

`ServingForward(model)` holds these copies as variables and replays the
model's layers with them. A SavedModel saves the variables its graphs use:
the [out, in] copies instead of the Dense kernels they replace, and the
transformed Winograd kernels besides the originals, which the deconvnet
signatures and batches below 4 images use (ZFNet: 22 MB more). A model whose
layers are not one chain runs as it is.
"""

import keras
import tensorflow as tf

from zfkeras import layers as zlayers


def _chain(model):
    """The layers after the input, if each takes the previous one's output; else None."""
    layers = model.layers
    if not layers or not isinstance(layers[0], keras.layers.InputLayer):
        return None
    try:
        linked = all(b.input is a.output for a, b in zip(layers, layers[1:]))
        ends = layers[0].output is model.inputs[0] and layers[-1].output is model.outputs[0]
    except (AttributeError, ValueError):  # a layer called more than once
        return None
    return layers[1:] if linked and ends else None


def _plain_dense(layer):
    return (
        type(layer) is keras.layers.Dense
        and not layer.lora_enabled
        and layer.quantization_mode is None
        and len(layer.kernel.shape) == 2
    )


class ServingForward:
    """`model(inputs, training=False)` with the serving layouts above.

    Switches the model to the portable op set (`use_ops`).

    Args:
        model: a built Keras model.
    """

    def __init__(self, model):
        self.model = model
        self.ops = zlayers.PORTABLE
        zlayers.use_ops(model, self.ops)
        self._layers = _chain(model)
        self._dense_kernels = {}
        self._winograd_kernels = {}
        for layer in self._layers or ():
            if _plain_dense(layer):
                self._dense_kernels[layer.name] = tf.Variable(
                    tf.transpose(layer.kernel), trainable=False, name=f"{layer.name}_kernel_out_in"
                )
            elif isinstance(layer, zlayers.WinogradConv2D):
                self._winograd_kernels[layer.name] = tf.Variable(
                    zlayers.winograd_kernel(tf.convert_to_tensor(layer.kernel)),
                    trainable=False,
                    name=f"{layer.name}_kernel_winograd",
                )

    def use_ops(self, ops):
        """Makes later traces run op set `ops` (`zfkeras.layers.use_ops`)."""
        zlayers.use_ops(self.model, ops)
        self.ops = ops

    @property
    def replays(self):
        """Whether the model runs layer by layer with the serving layouts."""
        return self._layers is not None

    def __call__(self, inputs):
        if self._layers is None:
            return self.model(inputs, training=False)
        x = inputs
        for layer in self._layers:
            if layer.name in self._dense_kernels and x.shape.rank == 2:
                x = self._dense(layer, x)
            elif layer.name in self._winograd_kernels:
                x = self._winograd(layer, x)
            else:
                x = layer(x, training=False)
        return x

    def _dense(self, layer, x):
        kernel = self._dense_kernels[layer.name]
        if self.ops == zlayers.BUILTIN:
            y = tf.matmul(x, kernel, transpose_b=True)
        else:
            y = tf.transpose(tf.matmul(kernel, x, transpose_b=True))
        if layer.use_bias:
            y = tf.nn.bias_add(y, layer.bias)
        return layer.activation(y)

    def _winograd(self, layer, x):
        if not layer.uses_winograd(x):
            return layer(x, training=False)
        y = layer.convolve(x, layer.kernel, transformed=self._winograd_kernels[layer.name])
        if layer.use_bias:
            y = tf.nn.bias_add(y, layer.bias)
        return layer.activation(y)
