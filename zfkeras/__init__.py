"""zfkeras: Zeiler & Fergus (2013) in TensorFlow/Keras.

ZFNet and AlexNet builders (`zfkeras.models`), their data pipelines
(`zfkeras.data`), training (`zfkeras.train`), the deconvnet
(`zfkeras.deconv`) and the paper's analyses. Submodules import TensorFlow;
this package file does not, so tools can silence it first.
"""

__version__ = "0.1.0"
