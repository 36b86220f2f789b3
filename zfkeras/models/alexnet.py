"""AlexNet (Krizhevsky et al. 2012), the baseline of Zeiler & Fergus."""

import keras

from zfkeras.models import common


def AlexNet(
    num_classes=1000,
    input_shape=(224, 224, 3),
    towers=1,
    width=1.0,
    fc_units=4096,
    conv_widths=(384, 384, 256),
    remove=(),
    dropout=0.5,
    filter_rms=None,
    init="paper",
    seed=None,
    name=None,
):
    """Builds AlexNet with ZFNet's layer names.

    conv1 96 11x11/4 -> ReLU -> contrast norm -> pool 3x3/2; conv2 256 5x5 ->
    ReLU -> norm -> pool; conv3 384, conv4 384, conv5 256 (3x3) -> pool; fc6,
    fc7, softmax. At 224x224: conv1 55x55, pool1 27x27, conv2 27x27, pool2
    13x13, conv3-5 13x13, pool5 6x6. With `towers=2` conv2, conv4 and conv5
    are grouped in two (the original two-GPU net); conv3 and the fc layers stay
    dense, as in the 2012 paper. Normalisation precedes pooling, as there.

    Args:
        num_classes: size of the softmax.
        input_shape: (height, width, channels), channels 1 or 3.
        towers: 1 (single-tower) or 2 (grouped conv2/4/5).
        width: multiplier of the conv filter counts.
        fc_units: width of fc6 and fc7.
        conv_widths: conv3, conv4, conv5 filters before `width`.
        remove: layers to leave out, any of 'conv3', 'conv4', 'conv5', 'fc6',
            'fc7'.
        dropout: dropout rate after fc6 and fc7.
        filter_rms: radius of the filter renormalisation, or None (AlexNet
            did not use it; set 0.1 to compare with ZFNet's training).
        init: 'paper' (weights N(0, 1e-2)), 'he', or a Keras initializer.
        seed: optional int for reproducible initial weights.
        name: the model's name; 'alexnet' or 'alexnet2' by default.

    Returns:
        A `keras.Model` from images to class probabilities.

    Raises:
        ValueError: for a bad argument or an input too small for the network.
    """
    if towers not in (1, 2):
        raise ValueError(f"`towers` must be 1 or 2. Received: towers={towers}")
    common.check_args(num_classes, input_shape, width, fc_units, dropout, remove, conv_widths)
    name = name or ("alexnet" if towers == 1 else "alexnet2")
    inputs = keras.Input(shape=tuple(input_shape), name="images")
    net = common.Builder(inputs, init, seed, filter_rms, name)

    # Block 1: 11x11/4.
    net.pad("pad1", 2)
    net.conv(1, common.scaled(96, width, towers), 11, 4, "valid")
    net.norm(1)
    net.pool(1)

    # Block 2: 5x5/1, grouped in the two-tower net.
    net.conv(2, common.scaled(256, width, towers), 5, 1, "same", groups=towers)
    net.norm(2)
    net.pool(2)

    # Blocks 3-5: conv3 sees both towers; conv4 and conv5 are grouped.
    for index, filters in zip((3, 4, 5), conv_widths):
        if f"conv{index}" not in remove:
            groups = 1 if index == 3 else towers
            net.conv(index, common.scaled(filters, width, towers), 3, 1, "same", groups=groups)
    net.pool(5)

    # Classifier.
    outputs = net.head(fc_units, dropout, remove, num_classes)
    return keras.Model(inputs, outputs, name=name)
