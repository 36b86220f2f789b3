"""Top-1 / top-5 error with the centre crop or the paper's 10 crops."""

import dataclasses
import os

import tensorflow as tf

from zfkeras import data, fileio, runs
from zfkeras.errors import Error


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What `evaluate_checkpoint` evaluates."""

    checkpoint: str
    dataset: str = ""
    split: str = "test"
    data_dir: str = ""
    manual_dir: str = ""
    crops: tuple = (1, 10)
    batch_size: int = 100
    snapshot: int = None
    output_file: str = ""


def evaluate(model, dataset, preprocessing, mean, crops=1, batch_size=100, cache=False):
    """Top-1 and top-5 error of `model` on (image, label) examples.

    Args:
        crops: 1 (centre crop) or 10 (the paper's 10 crops, softmax averaged).

    Returns:
        dict with top1_error, top5_error, accuracy (all in %), examples.
    """
    batches = data.eval_batches(dataset, preprocessing, mean, batch_size, crops, cache)
    k = min(5, int(model.output_shape[-1]))

    @tf.function
    def step(images, labels):
        if crops == 10:
            shape = tf.shape(images)
            flat = tf.reshape(images, tf.concat([[-1], shape[2:]], 0))
            probs = model(flat, training=False)
            probs = tf.reduce_mean(tf.reshape(probs, [shape[0], crops, -1]), axis=1)
        else:
            probs = model(images, training=False)
        labels = tf.cast(labels, tf.int32)
        top1 = tf.reduce_sum(tf.cast(tf.math.in_top_k(labels, probs, 1), tf.int64))
        topk = tf.reduce_sum(tf.cast(tf.math.in_top_k(labels, probs, k), tf.int64))
        return top1, topk, tf.size(labels, out_type=tf.int64)

    correct1 = correct5 = total = 0
    for images, labels in batches:
        a, b, n = step(images, labels)
        correct1, correct5, total = correct1 + int(a), correct5 + int(b), total + int(n)
    if total == 0:
        raise Error("evaluation split is empty")
    return {
        "crops": crops,
        "examples": total,
        "accuracy": 100.0 * correct1 / total,
        "top1_error": 100.0 * (1 - correct1 / total),
        "top5_error": 100.0 * (1 - correct5 / total),
    }


def evaluate_checkpoint(config):
    """Evaluates a run (or .keras file) on a dataset split and writes JSON.

    Returns:
        dict with dataset, split, checkpoint, results (one per crop setting)
        and output_file.
    """
    run = runs.load_run(config.checkpoint, snapshot=config.snapshot)
    dataset = config.dataset or run.meta.get("dataset")
    if not dataset:
        raise Error(f"{config.checkpoint}: a bare .keras file needs --dataset")
    ds, info = data.load(
        dataset,
        config.split,
        data_dir=config.data_dir or None,
        manual_dir=config.manual_dir or None,
        channels=run.preprocessing.channels,
    )
    classes = int(run.model.output_shape[-1])
    if info.num_classes != classes:
        raise Error(
            f"{config.checkpoint}: model has {classes} classes, dataset {dataset!r} "
            f"has {info.num_classes}"
        )
    results = [
        evaluate(run.model, ds, run.preprocessing, run.mean, crops, config.batch_size)
        for crops in config.crops
    ]
    out = {
        "checkpoint": config.checkpoint,
        "snapshot": config.snapshot,
        "dataset": dataset,
        "split": config.split,
        "results": results,
    }
    output = config.output_file
    if not output and os.path.isdir(config.checkpoint):
        safe = "".join(c if c.isalnum() else "_" for c in config.split).strip("_")
        output = os.path.join(config.checkpoint, f"eval_{safe}.json")
    if output:
        fileio.write_json(output, out)
        out["output_file"] = output
    return out
