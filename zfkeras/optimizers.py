"""SGD with momentum whose update is one fused kernel per weight.

Keras' SGD applies momentum with separate multiply, subtract and assign ops:
over ZFNet's 62M parameters that reads and writes each weight array several
times and took 6-8 % of a training step (BENCHMARKS.md). `SGD` computes the
same update,

    m <- momentum * m - lr * g
    w <- w + m

with TensorFlow's ResourceApplyKerasMomentum, which reads g, m and w once.
Everything else (learning-rate schedules, weight decay, constraints,
distribution strategies, checkpoints) is Keras' SGD unchanged; the optimizer
variables are the same, so checkpoints of either load into the other.
"""

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="zfkeras")
class SGD(keras.optimizers.SGD):
    """`keras.optimizers.SGD` with a fused momentum update on TensorFlow."""

    def update_step(self, gradient, variable, learning_rate):
        fusable = (
            self.momentum != 0
            and not self.nesterov
            and keras.backend.backend() == "tensorflow"
            and not isinstance(gradient, tf.IndexedSlices)
        )
        if not fusable:
            super().update_step(gradient, variable, learning_rate)
            return
        momentum = self.momentums[self._get_variable_index(variable)]
        if isinstance(variable, keras.Variable):
            variable = variable.value
        tf.raw_ops.ResourceApplyKerasMomentum(
            var=variable.handle,
            accum=momentum.value.handle,
            lr=tf.cast(learning_rate, variable.dtype),
            grad=tf.cast(gradient, variable.dtype),
            momentum=tf.cast(self.momentum, variable.dtype),
            use_locking=False,
            use_nesterov=False,
        )
