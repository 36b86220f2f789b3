"""Silences C++ logging that bypasses Python: TensorFlow's start-up chatter,
decoder warnings, the TFLite converter.

TensorFlow and XLA log through absl's C++ logger before it is initialised,
straight to file descriptor 2, so TF_CPP_MIN_LOG_LEVEL alone does not hush
them; nor can Python silence libjpeg, libtiff or the XNNPACK delegate.
`stderr_silenced()` points descriptor 2 at /dev/null for a block; Python
exceptions raised in it still propagate.
"""

import contextlib
import logging
import os
import sys
import warnings


@contextlib.contextmanager
def stderr_silenced():
    """Points file descriptor 2 at /dev/null for the block (process-wide)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def import_tensorflow():
    """Imports and returns `tensorflow` quietly (idempotent)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with stderr_silenced():
        import keras  # noqa: F401
        import tensorflow as tf
    tf.get_logger().setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="keras")
    warnings.filterwarnings("ignore", module="tensorflow")
    return tf
