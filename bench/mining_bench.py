"""Top-9 mining of conv1-conv5 against a bare forward pass, at two dataset sizes.

    python bench/mining_bench.py                 # ZFNet 224x224, N = 200 and 800 (~5 min)
    python bench/mining_bench.py --smoke         # a tiny model, seconds (used by the tests)

The images are generated from their index (seeded normal noise, like
mean-subtracted pixels), so the data take no memory and every pass sees the
same images. Worker processes, interleaved with the matmul ceiling:

- `mine N=n` (one process per N): what tools/mine_top9.py does after
  loading the data: `topk.mine_top_k` over the n images (k=9, conv1-conv5,
  batches of `--batch_size`), fetching the winning images again (here:
  regenerating them) and `topk.project_winners` of `--maps` random maps per
  layer (their 9 winners each, at the recorded positions, 32 per batch).
  Timed in phases: mine, fetch, project.
- `pass N=n` (one process per N): the mining pass alone (`mine_top_k`),
  so that its time compares with the forward pass and its peak memory
  with N, without the fetched winners (at most maps x k views, more
  distinct ones for larger N).
- `reference`: a bare forward pass of the Keras model over the same n images
  (`forward N=n`, same batches), and `Deconvnet.project` of exactly the
  mined requests (`projections N=n`, 32 per batch; the winners come from an
  untimed mining pass at set-up).

The target is mining <= 1.3 x (forward + projections); the memory of the
mining pass should not depend on N.
"""

import common
import flops
import numpy as np
from absl import app, flags

_INPUT_SIZE = flags.DEFINE_integer("input_size", 224, "Input height and width.", lower_bound=32)
_WIDTH = flags.DEFINE_float("width", 1.0, "Conv filter multiplier.", lower_bound=0.01)
_FC_UNITS = flags.DEFINE_integer("fc_units", 4096, "Width of fc6 and fc7.", lower_bound=1)
_NUM_IMAGES = flags.DEFINE_list("num_images", ["200", "800"], "Dataset sizes N.")
_BATCH = flags.DEFINE_integer("batch_size", 100, "Images per mining batch (the tool's).", 1)
_MAPS = flags.DEFINE_integer("maps", 8, "Maps projected per layer.", lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Interleaved repetitions.", lower_bound=1)
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny model, one repetition, inline (for tests).")

_K = 9
_SCALE = 50.0


def _image(index, size):
    import tensorflow as tf

    seed = tf.stack([tf.cast(index, tf.int64), tf.constant(7, tf.int64)])
    return tf.random.stateless_normal([size, size, 3], seed=seed) * _SCALE


def image_batches(count, size, batch):
    """(int64 index, float32 model input) batches of `count` generated images."""
    import tensorflow as tf

    from zfkeras import data

    ds = tf.data.Dataset.range(count).map(
        lambda index: (index, _image(index, size)), num_parallel_calls=data.PARALLEL_CALLS
    )
    return data.untuned(ds.batch(batch).prefetch(data.PREFETCH_BATCHES))  # as model_input_batches


def _setup(size, width, fc_units, maps):
    from zfkeras import deconv
    from zfkeras.analysis import topk

    model = common.inference_model(size, width, fc_units)
    dn = deconv.Deconvnet(model)
    layers = dn.conv_layer_names
    chosen = topk.choose_maps(dn, layers, {}, maps, seed=0)
    return model, dn, layers, chosen


def _fetch(top_k, layers, chosen, size):
    """The winning images (regenerated), as `topk.fetch_views` returns them."""
    import tensorflow as tf

    wanted = np.concatenate([top_k.image_index[layer][chosen[layer]].ravel() for layer in layers])
    wanted = np.unique(wanted[wanted >= 0])
    views = tf.map_fn(
        lambda index: _image(index, size), tf.constant(wanted), fn_output_signature=tf.float32
    ).numpy()
    view_rows = {int(index): row for row, index in enumerate(wanted)}
    return views, np.zeros(len(wanted), np.int64), view_rows


class _ModelInputs:
    """A stand-in `Run` whose "views" are already model inputs."""

    @staticmethod
    def model_input(views):
        return views


def pass_worker(num_images, size, width, fc_units, batch, maps):
    from zfkeras.analysis import topk

    model, _, layers, _ = _setup(size, width, fc_units, maps)
    batches = image_batches(num_images, size, batch)

    def mining_pass():
        topk.mine_top_k(model, batches, layers, _K)
        return num_images

    return {f"pass N={num_images}": mining_pass}


def mining_worker(num_images, size, width, fc_units, batch, maps):
    import time

    from zfkeras.analysis import topk

    model, dn, layers, chosen = _setup(size, width, fc_units, maps)
    batches = image_batches(num_images, size, batch)

    def mine():
        start = time.perf_counter()
        top_k = topk.mine_top_k(model, batches, layers, _K)
        mined = time.perf_counter()
        views, labels, view_rows = _fetch(top_k, layers, chosen, size)
        fetched = time.perf_counter()
        for layer in layers:
            topk.project_winners(
                dn, _ModelInputs, top_k, layer, chosen[layer], views, labels, view_rows
            )
        done = time.perf_counter()
        phases = {"mine": mined - start, "fetch": fetched - mined, "project": done - fetched}
        return done - start, num_images, phases

    return {f"mine N={num_images}": mine}


def reference_worker(num_images, size, width, fc_units, batch, maps):
    import tensorflow as tf

    from zfkeras.analysis import topk

    model, dn, layers, chosen = _setup(size, width, fc_units, maps)
    forward = tf.function(lambda x: model(x, training=False))
    works = {}
    for count in num_images:
        batches = image_batches(count, size, batch)

        def run_forward(ds=batches, n=count):
            for _, images in ds:
                forward(images).numpy()
            return n

        # The requests `project_winners` makes, from the same (untimed) mining pass.
        top_k = topk.mine_top_k(model, batches, layers, _K)
        views, _, view_rows = _fetch(top_k, layers, chosen, size)
        requests = []
        for layer in layers:
            images = top_k.image_index[layer][chosen[layer]]
            valid = images >= 0
            wanted = np.unique(images[valid])
            rows = np.array([view_rows[int(i)] for i in wanted])
            requests.append(
                (
                    views[rows],
                    np.searchsorted(wanted, images[valid]),
                    layer,
                    np.broadcast_to(chosen[layer][:, None], images.shape)[valid],
                    top_k.positions[layer][chosen[layer]][valid],
                )
            )

        def run_projections(requests=requests, n=count):
            for inputs, index, layer, channel, positions in requests:
                dn.project(inputs, index, layer, channel, positions=positions, batch_size=32)
            return n

        works[f"forward N={count}"] = run_forward
        works[f"projections N={count}"] = run_projections
    return works


def main(argv):
    del argv
    size, width, fc_units, repeats = _INPUT_SIZE.value, _WIDTH.value, _FC_UNITS.value, 1
    repeats, inline, batch, maps = _REPEATS.value, False, _BATCH.value, _MAPS.value
    counts = [int(n) for n in _NUM_IMAGES.value]
    matmul_size = common.MATMUL_SIZE
    if _SMOKE.value:
        size, width, fc_units, repeats, inline = 48, 0.125, 16, 1, True
        counts, batch, maps, matmul_size = [6, 12], 4, 2, 256
    from zfkeras import quiet

    quiet.import_tensorflow()
    model, dn, layers, _ = _setup(size, width, fc_units, maps)
    forward_flops = sum(f for _, f in flops.forward_flops(model))
    projections = len(layers) * maps * _K
    projection_flops = sum(flops.projection_flops(model, layer) for layer in layers) * maps * _K
    print(
        f"zfnet {size}x{size}x3 width {width} ({model.count_params():,} params), float32; "
        f"top {_K} of every map of {', '.join(layers)}, {maps} maps per layer projected "
        f"({projections} projections, {projection_flops / 1e9:.1f} GFLOP); forward "
        f"{forward_flops / 1e9:.3f} GFLOP/image"
    )
    print(common.machine_info())
    kwargs = dict(size=size, width=width, fc_units=fc_units, batch=batch, maps=maps)
    workers = [common.Worker("matmul", common.matmul_worker, {"size": matmul_size})]
    for n in counts:
        workers.append(common.Worker(f"mine N={n}", mining_worker, dict(kwargs, num_images=n)))
        workers.append(common.Worker(f"pass N={n}", pass_worker, dict(kwargs, num_images=n)))
    workers.append(common.Worker("reference", reference_worker, dict(kwargs, num_images=counts)))
    session = common.run_session(workers, repeats, 0.0, inline, common.log_to_stderr)
    ceiling = common.ceiling_gflops(session, matmul_size)
    results = session.results
    rows = [("matmul ceiling", "", "", f"{ceiling:.1f}", "1.00", "", "")]
    for n in counts:
        mine, forward = results[f"mine N={n}"], results[f"forward N={n}"]
        mining_pass = results[f"pass N={n}"]
        project = results[f"projections N={n}"]
        # Per repetition: mining / (forward + projections), then the median.
        ratios = [
            m / (f + p) for m, f, p in zip(mine.per_item_s, forward.per_item_s, project.per_item_s)
        ]
        phases = ", ".join(f"{p} {mine.phase_s(p):.1f} s" for p in ("mine", "fetch", "project"))
        useful = n * forward_flops + projection_flops
        for result, text, flop_count, versus in (
            (forward, "", n * forward_flops, ""),
            (project, "", projection_flops, ""),
            (mine, phases, useful, common.median_range(ratios)),
            (
                mining_pass,
                "",
                n * forward_flops,
                common.median_range(session.ratios(mining_pass.name, forward.name)) + " x forward",
            ),
        ):
            seconds = result.median_s * n
            fraction = session.of_ceiling(result.name, flop_count / n, matmul_size)
            rows.append(
                (
                    result.name,
                    f"{seconds:.2f}",
                    text,
                    f"{flop_count / seconds / 1e9:.1f}",
                    common.median_range(fraction),
                    versus,
                    f"{result.spread:.0%}",
                )
            )
    print(
        common.ranges_caption(
            repeats,
            ("'of ceiling'", "'x reference'"),
            "'x reference' = mining time / (forward + projections time)",
            "mining GFLOP/s counts the forward passes over N and the projections",
            "'pass' = the mining pass alone, against the forward pass",
        )
    )
    print(
        common.table(
            (
                "measurement",
                "wall s",
                "phases",
                "GFLOP/s",
                "of ceiling",
                "x reference",
                "spread",
            ),
            rows,
        )
    )
    print(common.memory_table(session))


if __name__ == "__main__":
    app.run(main)
