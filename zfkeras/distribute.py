"""Distribution strategies for training: default, mirrored, multi-worker, TPU.

`make_strategy(name)` builds the `tf.distribute.Strategy` the training loop
runs under; `is_chief`, `num_workers`, `worker_dir`, `backup_dir`,
`all_gather_int` and `distribute_dataset_options` are what a multi-worker
run needs beside it.

How a training loop calls `fit` under 'multi_worker'
----------------------------------------------------
Every worker runs the same program with its own TF_CONFIG:

1. `make_strategy("multi_worker")` before any other TensorFlow op.
2. The same seed everywhere (`keras.utils.set_random_seed`, and a seed on
   `Dataset.shuffle`), so DATA sharding splits the same global batches.
3. Batch by the global batch size with `drop_remainder=True`, then
   `distribute_dataset_options(dataset, strategy)`, for the validation set
   too. Each worker then gets the same number of batches; `steps_per_epoch`
   is needed only for `repeat()`ed (or FILE-sharded) datasets.
4. Build and compile the model inside `strategy.scope()`, with
   `steps_per_execution=1` (larger values fail under tf.distribute in Keras
   3.15, mirrored too).
5. Give every worker the same callbacks: checkpoints and exports to
   `worker_dir(workdir, strategy)` (only the chief's survive; call
   `remove_worker_dir` after `fit`), training checkpoints
   (`zfkeras.checkpoint`, or Keras' `BackupAndRestore`) to
   `backup_dir(workdir, strategy)`, progress output (`verbose`) and summaries
   only where `is_chief(strategy)`. Workers checkpoint at the same batches;
   a kill can still fall between two workers' writes, so a resuming run
   compares positions first (`all_gather_int`).

The logged loss and metrics are means over replicas of each replica's own
value, identical on every worker.

Multi-worker training and Keras 3.15
------------------------------------
`Model.fit` under `tf.distribute.MultiWorkerMirroredStrategy` fails in Keras
3.15 (keras-team/keras issue 20585). `make_strategy("multi_worker")` therefore
patches two functions of Keras' TensorFlow trainer
(`keras/src/backend/tensorflow/trainer.py`), once per process, and only after
checking that the installed Keras is 3.15.x (any other version raises `Error`
instead of patching code it was not written for):

=============================================  ================================
Keras 3.15 does                                the patch does instead
=============================================  ================================
`TensorFlowTrainer._maybe_symbolic_build`      build from the first local
reduces the first distributed batch with       replica's batch: the symbolic
`strategy.reduce("MEAN", batch)` to get a      build needs only shapes and
batch to build the model from; the             dtypes, and taking a local value
collective reduce of a `PerReplica` fails      involves no other worker.
("Attempt to convert a value (PerReplica...)
to a Tensor").
`reduce_per_replica(..., "auto"/"mean")`       `strategy.reduce("MEAN", value,
reduces every step's logs (scalar loss and     axis=None)`: the mean over
metric values) with `strategy.reduce("MEAN",   replicas, which is what the
value, axis=0)`, which fails on scalars        single-worker branch of the same
("Invalid reduction dimension 0 for input      function computes.
with 0 dimensions").
=============================================  ================================

Both replacements fall through to the original code unless the strategy is a
`MultiWorkerMirroredStrategy` in multi-worker mode, so single-worker training is
untouched. Gradients were already all-reduced correctly by Keras' TF optimizer,
so with the patch every worker ends each step with identical weights
(tests/test_distribute.py trains two workers on 127.0.0.1 and compares them
with each other and with a single-process run).
"""

import json
import os
import socket
from urllib import parse

import keras
import tensorflow as tf
from absl import logging

from zfkeras.errors import Error

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
PATCHED_KERAS_VERSION = "3.15"
_JOB_TYPES = ("chief", "worker")
_TPU_PROBE_SECONDS = 10.0
_ORIGINALS = {}


def make_strategy(name, tpu_address=None):
    """Builds a distribution strategy by name.

    Args:
        name: 'default' (the current strategy, normally no distribution),
            'mirrored' (one replica per GPU, or per logical CPU device when
            there is no GPU), 'multi_worker' (`MultiWorkerMirroredStrategy`
            configured by the TF_CONFIG environment variable; must be called
            before any other TensorFlow op) or 'tpu'.
        tpu_address: for 'tpu', the TPU name, 'local' or 'grpc://host:port';
            None uses the environment (e.g. TPU_NAME).

    Returns:
        A `tf.distribute.Strategy`.

    Raises:
        Error: for an unknown name, a missing or malformed TF_CONFIG, a Keras
            version the multi-worker patch was not written for, or no
            reachable TPU.
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return _mirrored_strategy()
    if name == "multi_worker":
        return _multi_worker_strategy()
    if name == "tpu":
        return _tpu_strategy(tpu_address)
    raise Error(f"strategy: unknown strategy {name!r}; valid: {', '.join(STRATEGIES)}")


def is_chief(strategy):
    """Whether this process writes the run's real outputs.

    True for single-worker strategies. Under multi-worker training the chief
    is the 'chief' task, or worker 0 when the cluster has no 'chief' job.
    """
    task_type, task_id, cluster = _task(strategy)
    if task_type is None or task_type == "chief":
        return True
    return task_type == "worker" and task_id == 0 and "chief" not in cluster


def worker_dir(workdir, strategy):
    """The directory this worker writes checkpoints and exports to.

    Keras' multi-worker convention: every worker runs the same callbacks and
    saves (a save may read synchronised variables), but only the chief's
    files are kept. The chief gets `workdir`; any other worker gets a
    throwaway `workdir/workertemp_<index>` (created here), to be removed with
    `remove_worker_dir` after training.

    Args:
        workdir: the run's work directory.
        strategy: the training strategy.

    Returns:
        A directory path.
    """
    if is_chief(strategy):
        return workdir
    path = _worker_temp(workdir, strategy)
    tf.io.gfile.makedirs(path)
    return path


def remove_worker_dir(workdir, strategy):
    """Deletes a non-chief worker's throwaway directory (no-op on the chief)."""
    if is_chief(strategy):
        return
    path = _worker_temp(workdir, strategy)
    if tf.io.gfile.exists(path):
        tf.io.gfile.rmtree(path)


def _worker_temp(workdir, strategy):
    _, task_id, _ = _task(strategy)
    return os.path.join(workdir, f"workertemp_{task_id}")


def backup_dir(workdir, strategy, name="backup"):
    """The training-checkpoint directory of this worker.

    `zfkeras.train` keeps its crash-safe checkpoints there (older versions,
    and `keras.callbacks.BackupAndRestore`, their backup files).

    Unlike `worker_dir`, this one must survive a restart on every worker:
    restored weights are not broadcast between workers, so each restores its
    own copy (the copies are identical because the variables are mirrored).
    The chief uses `workdir/<name>`, worker i `workdir/<name>_worker<i>`;
    siblings, not nested, because `BackupAndRestore` deletes its directory
    when training ends.

    Args:
        workdir: the run's work directory.
        strategy: the training strategy.
        name: the chief's backup directory name.

    Returns:
        A directory path.
    """
    if is_chief(strategy):
        return os.path.join(workdir, name)
    _, task_id, _ = _task(strategy)
    return os.path.join(workdir, f"{name}_worker{task_id}")


def num_workers(strategy):
    """Worker processes training together: 1 unless multi-worker."""
    task_type, _, cluster = _task(strategy)
    if task_type is None:
        return 1
    return sum(len(tasks) for tasks in cluster.values())


def all_gather_int(strategy, value):
    """Every replica's `value` (a Python int), gathered on every worker.

    A collective: under multi-worker training every worker must call it at
    the same point. Each worker's value appears once per local replica.

    Returns:
        A list of ints ([value] for a single worker).
    """
    if num_workers(strategy) < 2:
        return [int(value)]
    local = strategy.run(lambda: tf.constant([int(value)], tf.int64))
    gathered = strategy.gather(local, axis=0)
    return [int(v) for v in gathered.numpy()]


def distribute_dataset_options(dataset, strategy, by_files=False):
    """Sets how `dataset` is split between workers under multi-worker training.

    The default is DATA sharding: every worker runs the whole pipeline and
    keeps its share of each global batch. It works with any tf.data pipeline
    and gives all workers the same number of batches, which synchronous
    training needs (a worker that runs out first leaves the others waiting in
    an all-reduce). FILE sharding (`by_files=True`) reads only this worker's
    files, which is cheaper, but needs at least as many input files as
    workers and can give workers different batch counts: use it only with
    `dataset.repeat()` and `fit(steps_per_epoch=...)`. Single-worker
    strategies do not shard, and get `dataset` back unchanged.

    Args:
        dataset: a batched `tf.data.Dataset` (global batch size).
        strategy: the training strategy.
        by_files: shard by input files instead of by data.

    Returns:
        The dataset with its auto-shard policy set.
    """
    if _task(strategy)[0] is None:
        return dataset
    policy = tf.data.experimental.AutoShardPolicy
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = policy.FILE if by_files else policy.DATA
    return dataset.with_options(options)


def patch_keras_for_multi_worker():
    """Patches Keras' TF trainer so `fit` works multi-worker (idempotent).

    See the module docstring for what changes and why.

    Raises:
        Error: if the installed Keras is not 3.15.x or its trainer lacks the
            functions the patch replaces.
    """
    version = keras.version()
    if version.split(".")[:2] != PATCHED_KERAS_VERSION.split("."):
        raise Error(
            f"keras {version}: the multi-worker fit patch is written for Keras "
            f"{PATCHED_KERAS_VERSION}.x; check keras-team/keras issue 20585 and update "
            "zfkeras/distribute.py"
        )
    from keras.src.backend.tensorflow import trainer as tf_trainer

    if _ORIGINALS:
        return
    needed = ("TensorFlowTrainer", "reduce_per_replica", "_collective_all_reduce_multi_worker")
    missing = [attr for attr in needed if not hasattr(tf_trainer, attr)]
    if missing:
        raise Error(
            f"keras {version}: keras/src/backend/tensorflow/trainer.py lacks "
            f"{', '.join(missing)}; the multi-worker fit patch cannot be applied"
        )
    _ORIGINALS["module"] = tf_trainer
    _ORIGINALS["build"] = tf_trainer.TensorFlowTrainer._maybe_symbolic_build
    _ORIGINALS["reduce"] = tf_trainer.reduce_per_replica
    tf_trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build
    tf_trainer.reduce_per_replica = _reduce_per_replica
    logging.info("Patched Keras %s's TF trainer for multi-worker fit.", version)


def _multi_worker_mode(strategy):
    return _ORIGINALS["module"]._collective_all_reduce_multi_worker(strategy)


def _maybe_symbolic_build(self, iterator=None, data_batch=None):
    """Keras' `_maybe_symbolic_build`, built from the first local replica."""
    strategy = self._distribute_strategy
    if iterator is not None and strategy is not None and _multi_worker_mode(strategy):
        for _, _, batches in iterator:
            data_batch = tf.nest.map_structure(
                lambda value: _first_local_value(value, strategy), next(batches)
            )
            break
        iterator = None
    return _ORIGINALS["build"](self, iterator=iterator, data_batch=data_batch)


def _first_local_value(value, strategy):
    if isinstance(value, tf.distribute.DistributedValues):
        return strategy.experimental_local_results(value)[0]
    return value


def _reduce_per_replica(values, strategy, reduction):
    """Keras' `reduce_per_replica`, with a mean over replicas multi-worker."""
    if reduction in ("auto", "mean") and _multi_worker_mode(strategy):
        return tf.nest.map_structure(
            lambda value: strategy.reduce("MEAN", value, axis=None), values
        )
    return _ORIGINALS["reduce"](values, strategy, reduction)


def _mirrored_strategy():
    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    strategy = tf.distribute.MirroredStrategy([device.name for device in devices])
    logging.info("MirroredStrategy over %s.", ", ".join(device.name for device in devices))
    return strategy


def _multi_worker_strategy():
    task_type, task_id, _ = _read_tf_config()
    patch_keras_for_multi_worker()
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    except RuntimeError as e:
        if "startup" not in str(e):
            raise
        raise Error(
            "strategy: multi_worker must be created before any other TensorFlow op "
            "(make the strategy first)"
        ) from None
    logging.info(
        "MultiWorkerMirroredStrategy: %s %d, %d replicas in sync.",
        task_type,
        task_id,
        strategy.num_replicas_in_sync,
    )
    return strategy


def _read_tf_config():
    """Checks TF_CONFIG; returns (task type, task index, cluster dict)."""
    text = os.environ.get("TF_CONFIG")
    if not text:
        raise Error(
            "TF_CONFIG: not set; multi_worker needs it, e.g. "
            '{"cluster": {"worker": ["host1:port", "host2:port"]}, '
            '"task": {"type": "worker", "index": 0}}'
        )
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise Error(f"TF_CONFIG: not valid JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(config, dict):
        raise Error("TF_CONFIG: must be a JSON object with 'cluster' and 'task'")
    cluster, task = config.get("cluster"), config.get("task")
    if not isinstance(cluster, dict) or not cluster:
        raise Error("TF_CONFIG: 'cluster' must map job names to lists of 'host:port'")
    for job, addresses in cluster.items():
        if job not in _JOB_TYPES:
            raise Error(f"TF_CONFIG: job {job!r} in 'cluster'; multi_worker accepts chief, worker")
        if (
            not isinstance(addresses, list)
            or not addresses
            or not all(isinstance(a, str) and ":" in a for a in addresses)
        ):
            raise Error(f"TF_CONFIG: cluster job {job!r} must be a non-empty list of 'host:port'")
    if len(cluster.get("chief", [])) > 1:
        raise Error("TF_CONFIG: the cluster may have at most one chief")
    if not isinstance(task, dict):
        raise Error("TF_CONFIG: 'task' must be an object with 'type' and 'index'")
    task_type, task_id = task.get("type"), task.get("index", 0)
    if task_type not in cluster:
        raise Error(f"TF_CONFIG: task type {task_type!r} is not a job in 'cluster'")
    if not isinstance(task_id, int) or not 0 <= task_id < len(cluster[task_type]):
        raise Error(
            f"TF_CONFIG: task index {task_id!r} is out of range for "
            f"{len(cluster[task_type])} {task_type} address(es)"
        )
    return task_type, task_id, cluster


def _task(strategy):
    """(task type, task index, cluster dict) of a multi-worker strategy, else Nones."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return None, None, {}
    resolver = strategy.cluster_resolver
    if resolver is None or not resolver.task_type:
        return None, None, {}
    cluster = resolver.cluster_spec().as_dict()
    if sum(len(tasks) for tasks in cluster.values()) < 2:
        return None, None, {}
    return resolver.task_type, int(resolver.task_id or 0), cluster


def _tpu_strategy(tpu_address):
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu_address)
    except (ValueError, OSError, RuntimeError, ImportError) as e:
        raise Error(f"tpu: no TPU found at {tpu_address!r} ({_first_line(e)})") from None
    master = resolver.master()
    if master.startswith("grpc://"):
        _probe(master)
    if tpu_address != "local":
        tf.config.experimental_connect_to_cluster(resolver)
    try:
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (tf.errors.OpError, ValueError, RuntimeError) as e:
        raise Error(f"tpu: no TPU reachable at {tpu_address!r} ({_first_line(e)})") from None
    strategy = tf.distribute.TPUStrategy(resolver)
    logging.info("TPUStrategy, %d replicas.", strategy.num_replicas_in_sync)
    return strategy


def _probe(master):
    """Fails fast on a dead TPU address (TensorFlow would retry for minutes)."""
    address = parse.urlparse(master)
    try:
        port = address.port
    except ValueError:
        port = None
    if not address.hostname or port is None:
        raise Error(f"tpu: {master!r} is not a grpc://host:port address")
    try:
        with socket.create_connection((address.hostname, port), timeout=_TPU_PROBE_SECONDS):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise Error(f"tpu: no TPU reachable at {master} ({reason})") from None


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
