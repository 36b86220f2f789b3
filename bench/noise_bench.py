"""How steady is this machine? The ceiling, a memory copy and a model step, second by second.

    python bench/noise_bench.py                  # ZFNet training step, batch 32, 40 rounds (~5 min)
    python bench/noise_bench.py --forward        # the inference pass instead
    python bench/noise_bench.py --smoke          # a tiny model, seconds (used by the tests)

One process (`common.run_session`, inline) runs `--rounds` rounds, each three
short blocks back to back, the first of them in turn: the 4096^3 float32
matmul (the ceiling of the other scripts), a copy of a `--copy_mb` NumPy
array (memory bandwidth, one core) and ZFNet's compiled training step
(`train_on_batch`, 10 classes, as train_bench's bare step) or, with
`--forward`, its inference pass (1,000 classes, as inference_bench).

It prints the spread of each over the rounds, the step's fraction of the
ceiling taken round by round against the fraction of the medians, and the
correlations between them. The other scripts divide each repetition's rate
by the ceiling timed in the same repetition, which removes the noise only as
far as the two move together; the correlation says how far that is on this
machine.
"""

import time

import common
import flops
from absl import app, flags

_INPUT_SIZE = flags.DEFINE_integer("input_size", 224, "Crop (model input) size.", lower_bound=32)
_BATCH = flags.DEFINE_integer("batch_size", 32, "Images per step.", lower_bound=1)
_FORWARD = flags.DEFINE_bool("forward", False, "Time the inference pass, not a training step.")
_ROUNDS = flags.DEFINE_integer("rounds", 40, "Rounds of the three blocks.", lower_bound=2)
_STEP_S = flags.DEFINE_float("step_s", 3.0, "Shortest step block, seconds.", lower_bound=0.0)
_CEILING_S = flags.DEFINE_float("ceiling_s", 1.0, "Shortest matmul block, seconds.", 0.0)
_COPY_S = flags.DEFINE_float("copy_s", 0.5, "Shortest copy block, seconds.", lower_bound=0.0)
_COPY_MB = flags.DEFINE_integer("copy_mb", 256, "Size of the copied array, MB.", lower_bound=1)
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny model, two short rounds (for tests).")

QUANTILES = (("lowest", 0.0), ("25 %", 0.25), ("median", 0.5), ("75 %", 0.75), ("highest", 1.0))


def for_at_least(run, min_s):
    """A measurement that calls `run` until `min_s` has passed (at least once).

    Returns (seconds, items), the form `common.run_session` takes from a
    measurement that times itself; `run` returns the items it processed.
    """

    def block():
        items, start = 0, time.perf_counter()
        while True:
            items += run()
            elapsed = time.perf_counter() - start
            if elapsed >= min_s:
                return elapsed, items

    return block


def quantile_row(name, unit, values, digits=2):
    import numpy as np

    cells = [f"{np.quantile(values, q):.{digits}f}" for _, q in QUANTILES]
    return (name, unit, *cells)


def correlation(a, b):
    """Pearson's r as text; 'n/a' when either series is constant."""
    import numpy as np

    if np.std(a) == 0 or np.std(b) == 0:
        return "n/a"
    return f"{np.corrcoef(a, b)[0, 1]:+.2f}"


def main(argv):
    del argv
    size, batch, rounds = _INPUT_SIZE.value, _BATCH.value, _ROUNDS.value
    step_s, ceiling_s, copy_s = _STEP_S.value, _CEILING_S.value, _COPY_S.value
    copy_mb = _COPY_MB.value
    width, fc_units, matmul_size = 1.0, 4096, common.MATMUL_SIZE
    if _SMOKE.value:
        size, batch, rounds, width, fc_units, matmul_size = 67, 2, 2, 0.125, 16, 256
        step_s = ceiling_s = copy_s = 0.0
        copy_mb = 1
    from zfkeras import quiet

    quiet.import_tensorflow()
    import numpy as np

    if _FORWARD.value:
        model = common.inference_model(size, width, fc_units)
        step = common.forward_step(model, batch, size)
        step_flops = sum(f for _, f in flops.forward_flops(model))
        computed = flops.computed_flops(model)[0]
        what = "inference pass"
    else:
        model = common.compiled_training_model(common.training_config(batch, size, width, fc_units))
        step = common.train_step(model, batch, size)
        step_flops = flops.training_flops(model)
        computed = flops.computed_flops(model)[1]
        what = "training step"
    source = np.ones(copy_mb * (1 << 20) // 4, np.float32)
    target = np.empty_like(source)

    def copy():
        np.copyto(target, source)
        return 1

    works = {
        "matmul": for_at_least(common.matmul_worker(matmul_size)["matmul"], ceiling_s),
        "copy": for_at_least(copy, copy_s),
        "step": for_at_least(step, step_s),
    }
    print(
        f"{model.name} {size}x{size}x3, batch {batch}, float32, {what} "
        f"{step_flops / 1e9:.3f} GFLOP/image (computed with Winograd: {computed / 1e9:.3f}); "
        f"{rounds} rounds of a {ceiling_s:g} s matmul "
        f"({matmul_size}^3), a {copy_s:g} s copy ({copy_mb} MB) and a {step_s:g} s {what} block"
    )
    print(common.machine_info())
    worker = common.Worker("noise", lambda: works)
    session = common.run_session([worker], rounds, 0.0, True, common.log_to_stderr)

    def per_round(name, units):
        return units / np.array(session.results[name].per_item_s)

    ceilings = per_round("matmul", common.matmul_flops(matmul_size) / 1e9)
    copies = per_round("copy", 2 * source.nbytes / 1e9)  # read + write
    steps = per_round("step", step_flops / 1e9)
    fractions = session.of_ceiling("step", step_flops, matmul_size)
    print(
        common.table(
            ("measurement", "unit", *(name for name, _ in QUANTILES)),
            [
                quantile_row("matmul ceiling", "GFLOP/s", ceilings, 1),
                quantile_row("memory copy", "GB/s", copies, 1),
                quantile_row(what, "GFLOP/s", steps, 1),
                quantile_row(f"{what} / ceiling, same round", "", fractions),
            ],
        )
    )
    print(
        f"{what} / ceiling: median of the rounds' ratios {np.median(fractions):.2f}, "
        f"ratio of the medians {np.median(steps) / np.median(ceilings):.2f}"
    )
    print(
        f"correlation over the rounds: {what} with the ceiling "
        f"{correlation(steps, ceilings)}, with the copy {correlation(steps, copies)}; "
        f"ceiling with the copy {correlation(ceilings, copies)}"
    )


if __name__ == "__main__":
    app.run(main)
