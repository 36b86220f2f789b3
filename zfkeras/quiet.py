"""Imports TensorFlow without its start-up chatter.

TensorFlow and XLA log through absl's C++ logger before it is initialised,
straight to file descriptor 2, so TF_CPP_MIN_LOG_LEVEL alone does not hush
them. `import_tensorflow()` points descriptor 2 at /dev/null for the import
only; Python errors raised during the import still propagate.
"""

import logging
import os
import warnings


def import_tensorflow():
    """Imports and returns `tensorflow` quietly (idempotent)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import keras  # noqa: F401
        import tensorflow as tf
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    tf.get_logger().setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="keras")
    warnings.filterwarnings("ignore", module="tensorflow")
    return tf
