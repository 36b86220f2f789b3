"""ZFNet, the network of Zeiler & Fergus (2013) Fig. 3."""

import keras

from zfkeras.models import common


def ZFNet(
    num_classes=1000,
    input_shape=(224, 224, 3),
    width=1.0,
    fc_units=4096,
    conv_widths=(384, 384, 256),
    remove=(),
    dropout=0.5,
    filter_rms=0.1,
    init="paper",
    seed=None,
    name="zfnet",
):
    """Builds ZFNet (Zeiler & Fergus 2013, Fig. 3) as a functional Keras model.

    At the defaults the maps are exactly the paper's: conv1 110x110x96, pool1
    55x55, conv2 26x26x256, pool2 13x13, conv3-5 13x13, pool5 6x6x256. Pools
    are 3x3 stride 2 in Caffe's ceil mode. Layer names: pad1 conv1 relu1
    pool1 norm1 conv2 relu2 pool2 norm2 conv3 relu3 conv4 relu4 conv5 relu5
    pool5 flatten fc6 relu6 drop6 fc7 relu7 drop7 predictions.

    Args:
        num_classes: size of the softmax.
        input_shape: (height, width, channels), channels 1 or 3. Smaller inputs
            keep every layer; too small an input raises ValueError.
        width: multiplier of the conv1-conv5 filter counts.
        fc_units: width of fc6 and fc7 (paper Table 3: 2048, 4096, 8192).
        conv_widths: conv3, conv4, conv5 filters before `width` (384, 384, 256;
            Table 2's bigger net uses 512, 1024, 512).
        remove: layers to leave out for the Table 3 ablations, any of
            'conv3', 'conv4', 'conv5', 'fc6', 'fc7'.
        dropout: dropout rate after fc6 and fc7 (0.5 in the paper).
        filter_rms: radius of the filter renormalisation (Section 3), or None
            to switch it off (Fig. 6(a)).
        init: 'paper' (weights N(0, 1e-2)), 'he', or a Keras initializer;
            biases are 0.
        seed: optional int for reproducible initial weights.
        name: the model's name.

    Returns:
        A `keras.Model` from images to class probabilities.

    Raises:
        ValueError: for a bad argument or an input too small for the network.
    """
    common.check_args(num_classes, input_shape, width, fc_units, dropout, remove, conv_widths)
    inputs = keras.Input(shape=tuple(input_shape), name="images")
    net = common.Builder(inputs, init, seed, filter_rms, name)

    # Block 1: 7x7/2 (the paper's change from AlexNet's 11x11/4).
    net.pad("pad1", 1)
    net.conv(1, common.scaled(96, width), 7, 2, "valid")
    net.pool(1)
    net.norm(1)

    # Block 2: 5x5/2, dense (AlexNet's two towers merged).
    net.conv(2, common.scaled(256, width), 5, 2, "valid")
    net.pool(2)
    net.norm(2)

    # Blocks 3-5: 3x3/1.
    for index, filters in zip((3, 4, 5), conv_widths):
        if f"conv{index}" not in remove:
            net.conv(index, common.scaled(filters, width), 3, 1, "same")
    net.pool(5)

    # Classifier.
    outputs = net.head(fc_units, dropout, remove, num_classes)
    return keras.Model(inputs, outputs, name=name)
