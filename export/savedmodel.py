"""SavedModel for TensorFlow Serving: signatures, layout, versions.

Signatures (input keys are the TensorSpec names):

| signature          | inputs                                    | outputs                     |
|--------------------|-------------------------------------------|-----------------------------|
| serving_default    | images: string (N,) encoded JPEG/PNG/...  | classes, class_names,       |
|                    |                                           | probabilities (N, k),       |
|                    |                                           | all_probabilities (N, C)    |
| classify_pixels    | pixels: uint8 (N, H, W, channels)         | as serving_default          |
| classify_inputs    | inputs: float32 (N, crop, crop, channels) | as serving_default          |
|                    | (preprocessed: minus mean, times scale)   |                             |
| deconv_convL       | images: string (N,), feature_map: int32   | projections, activations,   |
| (each conv layer)  | (N,)                                      | positions, boxes, views     |

Every output is batch-major, so TF Serving's row ("instances") form works
for every signature. The artifact holds only TensorFlow ops and variables:
`tf.saved_model.load` needs nothing from this project.

Layout (TF Serving): `<base_dir>/<model_name>/<version>/` with a numeric
version; `assets.extra/zfkeras_export.json` records the source, the
preprocessing and the verification numbers (TF Serving ignores it).
"""

import os

import keras
import tensorflow as tf

from zfkeras.errors import Error
from zfkeras_export import graph as graph_lib

DEFAULT_SIGNATURE = "serving_default"
PIXELS_SIGNATURE = "classify_pixels"
INPUTS_SIGNATURE = "classify_inputs"
INFO_FILE = os.path.join("assets.extra", "zfkeras_export.json")


def deconv_signature(layer):
    """The signature name of a conv layer's deconvnet: 'deconv_conv5'."""
    return f"deconv_{layer}"


def signature_names(conv_layers):
    """All signature names of an export, classification first."""
    names = [DEFAULT_SIGNATURE, PIXELS_SIGNATURE, INPUTS_SIGNATURE]
    return names + [deconv_signature(layer) for layer in conv_layers]


def build_archive(serving_graph):
    """A `keras.export.ExportArchive` with every signature of the module docstring.

    Args:
        serving_graph: a `graph.ServingGraph`.
    """
    g = serving_graph
    crop, channels = g.preprocessing.crop_size, g.preprocessing.channels
    images_spec = tf.TensorSpec([None], tf.string, name="images")
    pixels_spec = tf.TensorSpec([None, None, None, channels], tf.uint8, name="pixels")
    inputs_spec = tf.TensorSpec([None, crop, crop, channels], tf.float32, name="inputs")
    feature_map_spec = tf.TensorSpec([None], tf.int32, name="feature_map")

    archive = keras.export.ExportArchive()

    def classify(inputs):
        return graph_lib.unless_empty(g.classify, inputs)

    def classify_images(images):
        return classify(g.preprocess_images(images)[1])

    def classify_pixels(pixels):
        return classify(g.preprocess_pixels(g.check_pixels(pixels))[1])

    def classify_inputs(inputs):
        return classify(g.check_inputs(inputs))

    archive.add_endpoint(DEFAULT_SIGNATURE, classify_images, [images_spec])
    archive.add_endpoint(PIXELS_SIGNATURE, classify_pixels, [pixels_spec])
    archive.add_endpoint(INPUTS_SIGNATURE, classify_inputs, [inputs_spec])
    for layer in g.source.conv_layers:
        archive.add_endpoint(
            deconv_signature(layer), _deconv_endpoint(g, layer), [images_spec, feature_map_spec]
        )
    return archive


def _deconv_endpoint(g, layer):
    def project(images, feature_map):
        views, inputs = g.preprocess_images(images)
        outputs = graph_lib.unless_empty(lambda x, f: g.deconv(x, f, layer), inputs, feature_map)
        outputs["views"] = views
        return outputs

    return project


def write_savedmodel(serving_graph, path):
    """Writes the SavedModel of `serving_graph` to the new directory `path`."""
    try:
        build_archive(serving_graph).write_out(path, verbose=False)
    except (OSError, tf.errors.OpError) as e:
        raise Error(f"{path}: cannot write the SavedModel ({e})") from None


def versions(model_dir):
    """Sorted numeric version folders of a TF Serving model directory."""
    if not os.path.isdir(model_dir):
        return []
    return sorted(
        int(name)
        for name in os.listdir(model_dir)
        if name.isdigit() and os.path.isdir(os.path.join(model_dir, name))
    )


def resolve_version_dir(path):
    """A SavedModel folder from `path`: a version folder, or a model folder's latest."""
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return path
    found = versions(path)
    if found:
        return os.path.join(path, str(found[-1]))
    raise Error(f"{path}: not a SavedModel (no saved_model.pb) nor a model folder with versions")
