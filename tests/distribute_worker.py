"""One training process for tests/test_distribute.py.

Trains a tiny ZFNet on fixed synthetic data under the strategy named on the
command line, the way the training loop does (see zfkeras/distribute.py), and
saves its final weights and loss history to an .npz file:

    python tests/distribute_worker.py --strategy=mirrored --logical_cpus=2 \
        --out_dir=/tmp/run --result_file=/tmp/run/result.npz

For 'multi_worker', TF_CONFIG must be set. Not a test module itself.
"""

import argparse
import os

import numpy as np

from zfkeras import quiet

GLOBAL_BATCH = 16
TRAIN_EXAMPLES = 64
VAL_EXAMPLES = 32
NUM_CLASSES = 4
IMAGE_SIZE = 64


def synthetic_data(count, seed):
    """Noise images whose class is the quadrant holding a bright square."""
    rng = np.random.default_rng(seed)
    images = rng.normal(0.0, 0.5, (count, IMAGE_SIZE, IMAGE_SIZE, 1)).astype("float32")
    labels = np.arange(count) % NUM_CLASSES
    half = IMAGE_SIZE // 2
    for image, label in zip(images, labels):
        row, col = divmod(int(label), 2)
        image[row * half + 8 : row * half + 24, col * half + 8 : col * half + 24] += 2.0
    return images, labels.astype("int32")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", required=True)
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--result_file", required=True)
    parser.add_argument("--logical_cpus", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=3)
    return parser.parse_args()


def main():
    args = parse_args()
    tf = quiet.import_tensorflow()
    # Device and thread settings must come before any TensorFlow op.
    if args.logical_cpus:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * args.logical_cpus
        )
    if args.strategy == "multi_worker":
        # Two worker processes share two cores.
        tf.config.threading.set_intra_op_parallelism_threads(1)

    import keras

    from zfkeras import distribute
    from zfkeras.models import ZFNet

    strategy = distribute.make_strategy(args.strategy)
    keras.utils.set_random_seed(0)

    train = tf.data.Dataset.from_tensor_slices(synthetic_data(TRAIN_EXAMPLES, seed=1))
    train = train.batch(GLOBAL_BATCH, drop_remainder=True)
    train = distribute.distribute_dataset_options(train, strategy)
    val = tf.data.Dataset.from_tensor_slices(synthetic_data(VAL_EXAMPLES, seed=2))
    val = distribute.distribute_dataset_options(val.batch(GLOBAL_BATCH), strategy)

    with strategy.scope():
        # No dropout: its masks are drawn per replica, so a distributed run
        # could not match the single-process reference.
        model = ZFNet(
            NUM_CLASSES,
            (IMAGE_SIZE, IMAGE_SIZE, 1),
            width=0.25,
            fc_units=64,
            dropout=0.0,
            init="he",
            seed=0,
        )
        model.compile(
            optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )

    write_dir = distribute.worker_dir(args.out_dir, strategy)
    callbacks = [
        keras.callbacks.BackupAndRestore(
            distribute.backup_dir(args.out_dir, strategy), delete_checkpoint=False
        ),
        keras.callbacks.ModelCheckpoint(
            os.path.join(write_dir, "model.weights.h5"), save_weights_only=True
        ),
    ]
    history = model.fit(
        train, epochs=args.epochs, validation_data=val, callbacks=callbacks, verbose=0
    )
    distribute.remove_worker_dir(args.out_dir, strategy)

    policy = tf.data.experimental.AutoShardPolicy(
        train.options().experimental_distribute.auto_shard_policy
    )
    weights = {f"weight_{i}": w for i, w in enumerate(model.get_weights())}
    np.savez(
        args.result_file,
        loss=np.array(history.history["loss"]),
        val_loss=np.array(history.history["val_loss"]),
        is_chief=distribute.is_chief(strategy),
        replicas=strategy.num_replicas_in_sync,
        shard_policy=policy.name,
        **weights,
    )


if __name__ == "__main__":
    main()
