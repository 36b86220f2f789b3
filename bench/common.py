"""What the benchmarks share: worker processes, interleaved repetitions, medians, tables.

A benchmark is a list of *workers*, each a fresh Python process (so each
reports its own peak resident memory), holding one or more *measurements*: a
callable doing one unit of work and returning how many items (images,
projections) it processed. The parent starts the workers one after the other,
lets each set up and warm up, then asks for one timed block of every
measurement in turn, rotating the order each repetition, so slow drifts and
bursts of load on a shared 2-core machine hit every measurement alike. Only
one worker computes at any time; the others wait on their pipe.

Reported: the median over repetitions of each measurement's time per item,
and ratios between measurements as the median of the per-repetition ratios
(each repetition's blocks ran within seconds of each other). Peak memory is
`ru_maxrss` of each worker process: its Python, TensorFlow and everything it
built (for a worker with several measurements, the largest of them); "above
its imports" subtracts the resident memory right after its imports.

With `inline=True` (used by `--smoke` runs in the tests) the measurements run
in the calling process instead: no memory figures, one TensorFlow import.
"""

import dataclasses
import math
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
import traceback

MATMUL_SIZE = 4096


@dataclasses.dataclass
class Work:
    """One measurement in a worker.

    Attributes:
        run: callable doing one unit of work; returns the items processed, or
            (seconds, items) when it times itself (e.g. the steady part of a
            training epoch), optionally with a dict {phase: seconds} third.
        settle_s: seconds the worker waits after each block before reporting,
            so that background work it started (tf.data prefetching) is done
            before the next measurement starts.
        close: optional callable run when the session ends.
    """

    run: object
    settle_s: float = 0.0
    close: object = None


def _close(works):
    for work in works.values():
        if work.close is not None:
            work.close()


@dataclasses.dataclass(frozen=True)
class Worker:
    """A process holding measurements.

    Attributes:
        name: shown in the memory table.
        factory: a module-level function (picklable) returning {measurement
            name: Work or callable}; it builds models, data, etc.
        kwargs: its keyword arguments.
        imports: modules imported before the memory baseline is read.
        env: environment variables set in the worker before its imports (for
            settings TensorFlow reads once, such as TF_ENABLE_ONEDNN_OPTS);
            only for worker processes, not inline sessions.
    """

    name: str
    factory: object
    kwargs: dict = dataclasses.field(default_factory=dict)
    imports: tuple = ("tensorflow",)
    env: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Result:
    """Per-repetition seconds per item of one measurement."""

    name: str
    worker: str
    per_item_s: list
    items: int = 0
    phases: list = dataclasses.field(default_factory=list)  # per repetition

    def phase_s(self, phase):
        """Median seconds of one phase of one unit of work."""
        return statistics.median(p[phase] for p in self.phases)

    @property
    def median_s(self):
        return statistics.median(self.per_item_s)

    @property
    def rate(self):
        """Items per second (of the median time per item)."""
        return 1.0 / self.median_s

    @property
    def spread(self):
        """(max - min) / median of the time per item, over repetitions."""
        values = self.per_item_s
        return (max(values) - min(values)) / self.median_s if len(values) > 1 else 0.0


@dataclasses.dataclass
class Session:
    """What `run_session` measured."""

    results: dict
    memory_mb: dict  # worker name -> {"baseline": RSS MB after imports, "peak": MB}
    repeats: int

    def ratios(self, numerator, denominator):
        """Per repetition: time-per-item(numerator) / time-per-item(denominator)."""
        a, b = self.results[numerator].per_item_s, self.results[denominator].per_item_s
        return [x / y for x, y in zip(a, b)]

    def ratio(self, numerator, denominator):
        """The median of `ratios`."""
        return statistics.median(self.ratios(numerator, denominator))

    def of_ceiling(self, name, flop_per_item, size=MATMUL_SIZE, ceiling="matmul"):
        """Per repetition: `name`'s FLOP rate / the ceiling matmul's rate in that repetition.

        Each repetition times both within seconds of each other, so a slow
        stretch of the machine slows both and cancels out of the ratio.
        """
        return [flop_per_item / matmul_flops(size) * ratio for ratio in self.ratios(ceiling, name)]


def peak_rss_mb():
    """Peak resident memory of this process so far, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_mb():
    """Resident memory of this process now, MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _time_once(work):
    """(seconds, items, {phase: seconds}) of one call of `work.run`."""
    start = time.perf_counter()
    outcome = work.run()
    elapsed = time.perf_counter() - start
    if not isinstance(outcome, tuple):
        return elapsed, outcome, {}
    if len(outcome) == 2:
        return (*outcome, {})
    return outcome


def _prepare(factory, kwargs, min_block_s):
    """Builds and warms up a worker's measurements; returns (works, calls per block)."""
    works = {name: w if isinstance(w, Work) else Work(w) for name, w in factory(**kwargs).items()}
    calls = {}
    for name, work in works.items():
        _time_once(work)  # tracing, allocation
        calls[name] = 1
        if min_block_s > 0:
            seconds, _, _ = _time_once(work)
            calls[name] = max(1, math.ceil(min_block_s / max(seconds, 1e-6)))
        time.sleep(work.settle_s)
    return works, calls


def _block(work, calls):
    seconds, items, phases = 0.0, 0, {}
    for _ in range(calls):
        s, n, p = _time_once(work)
        seconds, items = seconds + s, items + n
        for phase, t in p.items():
            phases[phase] = phases.get(phase, 0.0) + t / calls
    time.sleep(work.settle_s)
    return seconds, items, phases


def _import(modules):
    for module in modules:
        if module == "tensorflow":
            from zfkeras import quiet

            quiet.import_tensorflow()
        else:
            __import__(module)


def _serve(factory, kwargs, imports, env, min_block_s, conn):
    """The worker process: set up, then time blocks on request."""
    try:
        os.environ.update(env)
        _import(imports)
        baseline = rss_mb()
        works, calls = _prepare(factory, kwargs, min_block_s)
        conn.send(("ready", {"baseline": baseline, "names": list(works)}))
        while True:
            message = conn.recv()
            if message[0] == "run":
                conn.send(("done", _block(works[message[1]], calls[message[1]])))
            else:
                peak = peak_rss_mb()
                _close(works)
                conn.send(("stopped", peak))
                return
    except BaseException:  # Reported to the parent, which raises it.
        conn.send(("error", traceback.format_exc()))


class _Remote:
    def __init__(self, worker, min_block_s):
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=_serve,
            args=(worker.factory, worker.kwargs, worker.imports, worker.env, min_block_s, child),
            daemon=True,
        )
        self.process.start()
        child.close()
        self.name = worker.name
        self.info = self._receive("ready")

    def _receive(self, expected):
        try:
            kind, payload = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"benchmark worker {self.name!r} died") from None
        if kind == "error":
            raise RuntimeError(f"benchmark worker {self.name!r} failed:\n{payload}")
        assert kind == expected, (kind, expected)
        return payload

    def run(self, name):
        self.conn.send(("run", name))
        return self._receive("done")

    def stop(self):
        self.conn.send(("stop",))
        peak = self._receive("stopped")
        self.process.join(30)
        return peak

    def kill(self):
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(10)


class _Local:
    def __init__(self, worker, min_block_s):
        if worker.env:
            raise ValueError(f"worker {worker.name!r} sets environment variables: not inline")
        self.name = worker.name
        _import(worker.imports)
        self.works, self.calls = _prepare(worker.factory, worker.kwargs, min_block_s)
        self.info = {"baseline": float("nan"), "names": list(self.works)}

    def run(self, name):
        return _block(self.works[name], self.calls[name])

    def stop(self):
        _close(self.works)
        return float("nan")

    def kill(self):
        pass


def run_session(workers, repeats, min_block_s=1.0, inline=False, log=None):
    """Times every measurement of `workers` in interleaved repetitions.

    Args:
        workers: a list of `Worker`s (measurement names unique across them).
        repeats: timed blocks per measurement.
        min_block_s: each block repeats its measurement's unit of work until
            it takes at least this long (calibrated during warm-up).
        inline: run in this process (no memory figures).
        log: optional callable(str) for progress lines.

    Returns:
        A `Session`.
    """
    log = log or (lambda text: None)
    started, owners = [], {}
    try:
        for worker in workers:
            log(f"setting up {worker.name}")
            handle = (_Local if inline else _Remote)(worker, min_block_s)
            started.append(handle)
            for name in handle.info["names"]:
                if name in owners:
                    raise ValueError(f"measurement {name!r} defined twice")
                owners[name] = handle
        names = list(owners)
        times = {name: [] for name in names}
        phases = {name: [] for name in names}
        items = {}
        for repeat in range(repeats):
            log(f"repetition {repeat + 1}/{repeats}")
            shift = repeat % len(names)
            for name in names[shift:] + names[:shift]:
                seconds, count, parts = owners[name].run(name)
                times[name].append(seconds / count)
                phases[name].append(parts)
                items[name] = count
        memory = {}
        for handle in started:
            memory[handle.name] = {"baseline": handle.info["baseline"], "peak": handle.stop()}
    finally:
        for handle in started:
            handle.kill()
    results = {
        name: Result(name, owners[name].name, times[name], items[name], phases[name])
        for name in names
    }
    return Session(results, memory, repeats)


def _call_child(function, kwargs, conn):
    try:
        conn.send(("ok", function(**kwargs)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))


def call(function, kwargs, inline=False):
    """`function(**kwargs)` in a fresh process (or inline); its picklable result.

    For set-up work (exports, conversions) whose memory must not count in
    any worker's peak.
    """
    if inline:
        return function(**kwargs)
    context = multiprocessing.get_context("spawn")
    conn, child = context.Pipe()
    process = context.Process(target=_call_child, args=(function, kwargs, child), daemon=True)
    process.start()
    child.close()
    try:
        kind, payload = conn.recv()
    except EOFError:
        raise RuntimeError(f"{function.__name__} died") from None
    finally:
        process.join(60)
    if kind == "error":
        raise RuntimeError(f"{function.__name__} failed:\n{payload}")
    return payload


# ---------------------------------------------------------------------------
# The machine ceiling: a large float32 matmul through TensorFlow.


def matmul_flops(size=MATMUL_SIZE):
    return 2.0 * size**3


def matmul_worker(size=MATMUL_SIZE):
    """Measurement 'matmul': one (size x size) @ (size x size) float32 product."""
    import tensorflow as tf

    a = tf.random.stateless_normal([size, size], seed=[0, 1])
    b = tf.random.stateless_normal([size, size], seed=[0, 2])
    product = tf.function(lambda: tf.matmul(a, b)[0, 0])

    def run():
        product().numpy()  # waits for the result
        return 1

    return {"matmul": run}


def ceiling_gflops(session, size=MATMUL_SIZE, name="matmul"):
    """The rate of a session's matmul measurement `name`, GFLOP/s."""
    return matmul_flops(size) / session.results[name].median_s / 1e9


def ranges_caption(repeats, columns, *notes):
    """The line above a table: repetitions, `notes`, and which columns `median_range` fills."""
    ranged = " and ".join(columns)
    return "; ".join(
        (
            f"median of {repeats} interleaved repetitions",
            *notes,
            f"{ranged}: median (lowest-highest) of per-repetition ratios",
        )
    )


def median_range(values, digits=2):
    """Per-repetition values as 'median (lowest-highest)': '0.72 (0.66-0.75)'.

    One value is shown alone, so that a one-repetition run reads as a number.
    """
    median = f"{statistics.median(values):.{digits}f}"
    if len(values) < 2:
        return median
    return f"{median} ({min(values):.{digits}f}-{max(values):.{digits}f})"


# ---------------------------------------------------------------------------
# The training model (train_bench.py, layer_profile.py).

TRAINING_CLASSES = 10  # Fashion-MNIST
INFERENCE_CLASSES = 1000  # the paper's ImageNet head


def training_config(batch, size, width, fc_units, dataset="fashion_mnist", data_dir=""):
    """A `zfkeras.train.TrainConfig` of ZFNet at `size` (resize 256/224 of it)."""
    from zfkeras import train

    return train.TrainConfig(
        workdir="",  # nothing is written
        dataset=dataset,
        data_dir=data_dir,
        resize_size=round(size * 256 / 224),
        crop_size=size,
        channels=3,
        width=width,
        fc_units=fc_units,
        init="paper",
        batch_size=batch,
        epochs=2,
    )


def compiled_training_model(config, keras_sgd=False):
    """The model of tools/train.py, compiled as `zfkeras.train` compiles it.

    `keras_sgd` swaps zfkeras' fused-momentum SGD for Keras' own (to measure it).
    """
    from zfkeras import train

    return compile_like(train.build_model(config, TRAINING_CLASSES, 3), config, keras_sgd)


def compile_like(model, config, keras_sgd=False):
    """Compiles `model` as `compiled_training_model` does; returns it."""
    import keras

    from zfkeras import optimizers

    sgd = keras.optimizers.SGD if keras_sgd else optimizers.SGD
    model.compile(
        optimizer=sgd(learning_rate=config.learning_rate, momentum=0.9),
        loss="sparse_categorical_crossentropy",
        metrics=[
            keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
            keras.metrics.SparseTopKCategoricalAccuracy(k=5, name="top5"),
        ],
    )
    return model


def inference_model(size, width=1.0, fc_units=4096):
    """The forward benchmarks' model: ZFNet, 1,000 classes, He-initialised with seed 0."""
    from zfkeras import models

    shape = (size, size, 3)
    return models.ZFNet(INFERENCE_CLASSES, shape, width=width, fc_units=fc_units, init="he", seed=0)


def forward_step(model, batch, size):
    """A callable running `model`'s inference pass on a fixed random batch; returns `batch`."""
    import tensorflow as tf

    images = tf.random.stateless_normal([batch, size, size, 3], seed=[0, 0]) * 50.0
    forward = tf.function(lambda x: model(x, training=False))

    def step():
        forward(images).numpy()  # waits for the result
        return batch

    return step


def train_step(model, batch, size):
    """A callable running one compiled training step on a fixed random batch; returns `batch`."""
    import tensorflow as tf

    images = tf.random.stateless_normal([batch, size, size, 3], seed=[0, 0]) * 50.0
    labels = tf.random.stateless_uniform([batch], [0, 0], maxval=TRAINING_CLASSES, dtype=tf.int64)

    def step():
        model.train_on_batch(images, labels)
        return batch

    return step


# ---------------------------------------------------------------------------
# Reporting.


def machine_info():
    """One line: CPU, cores, memory, OS, Python and library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
        if "avx512f" in flags:
            cpu += " (AVX-512)"
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = []
    for module in ("tensorflow", "keras", "numpy", "ai_edge_litert"):
        version = _version(module)
        if version:
            versions.append(f"{module} {version}")
    return (
        f"{cpu}, {cores} cores, {memory:.0f} GiB RAM, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}, {', '.join(versions)}"
    )


def _version(module):
    from importlib import metadata

    names = {"tensorflow": "tensorflow", "ai_edge_litert": "ai-edge-litert"}
    try:
        return metadata.version(names.get(module, module))
    except metadata.PackageNotFoundError:
        return ""


def table(header, rows):
    """A Markdown table as a string (columns padded for reading in a terminal)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def memory_table(session):
    rows = []
    for name, memory in session.memory_mb.items():
        if math.isnan(memory["peak"]):
            rows.append((name, "n/a (inline)", "n/a"))
        else:
            rows.append(
                (name, f"{memory['peak']:.0f}", f"{memory['peak'] - memory['baseline']:.0f}")
            )
    return table(("worker process", "peak RSS MB", "above its imports MB"), rows)


def log_to_stderr(text):
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {text}\n")
    sys.stderr.flush()
