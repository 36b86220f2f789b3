"""zfkeras: Zeiler & Fergus (2013) in TensorFlow/Keras.

ZFNet and AlexNet builders (`zfkeras.models`), their data pipelines
(`zfkeras.data`), training (`zfkeras.train`), the deconvnet
(`zfkeras.deconv`) and the paper's analyses. Submodules import TensorFlow;
this package file does not, so tools can silence it first.

Importing zfkeras before TensorFlow turns on TensorFlow's oneDNN kernels on
every x86-64 CPU. TensorFlow turns them on by itself only on CPUs with
AVX-512 VNNI, BF16 or AMX; on others (AMD EPYC here) they ran ZFNet's
training step 1.77x and inference 1.31x as fast as the Eigen kernels
it falls back to (BENCHMARKS.md, section 7). A TF_ENABLE_ONEDNN_OPTS that is
already set wins; once TensorFlow is imported, the setting no longer
changes anything.
"""

import os as _os
import platform as _platform

if _platform.machine().lower() in ("x86_64", "amd64"):
    _os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

__version__ = "0.1.0"
