"""Feature evolution during training (Zeiler & Fergus 2013, Fig. 4).

For chosen feature maps, the strongest activation over a dataset split is
found anew with the weights of each snapshot epoch the training run kept
(`snapshots/epoch_NNN.keras`), projected to pixel space with that
snapshot's deconvnet, and shown one column per epoch: lower layers settle in
a few epochs, upper ones much later.

`run_evolution(EvolutionConfig(...))` draws the figure for a run;
`EvolutionCallback` logs the same kind of projections to TensorBoard while a
model trains (strongest activation over a small fixed batch of images).
"""

import dataclasses
import json
import os

import keras
import numpy as np
import tensorflow as tf

from zfkeras import deconv, fileio, runs
from zfkeras.analysis import topk
from zfkeras.errors import Error

# ---------------------------------------------------------------------------
# Projections of the strongest activation of some maps over a small batch.


def strongest_in_batch(dn, images, layer, channels, batch_size=32):
    """Projects, for each map, its strongest activation over a batch of images.

    Args:
        dn: a `zfkeras.deconv.Deconvnet`.
        images: float32 (N, H, W, C) model inputs.
        layer: a visualizable layer.
        channels: the maps.
        batch_size: images per forward pass.

    Returns:
        A `zfkeras.deconv.Projections`, one row per channel: the image and
        position of the map's maximum over all images and positions (the
        first in (image, y, x) order on ties).
    """
    channels = np.asarray(channels, np.int64)
    activation = dn.activations(images, [layer], batch_size)[layer]
    if activation.ndim == 2:
        rows = activation[:, channels].argmax(axis=0)
        return dn.project(images, rows, layer, channels, batch_size=batch_size)
    chosen = activation[..., channels]  # (N, h, w, M)
    flat = chosen.reshape(-1, len(channels)).argmax(axis=0)
    rows, ys, xs = np.unravel_index(flat, chosen.shape[:3])
    positions = np.stack([ys, xs], axis=1)
    return dn.project(images, rows, layer, channels, positions=positions, batch_size=batch_size)


def _strip(dn, layer, result, min_px=28):
    """The projections of one layer side by side, each in a receptive-field cell."""
    from zfkeras import figures
    from zfkeras.analysis import plots_a

    cell = plots_a.cell_size(dn, layer)
    image_size = tuple(int(d) for d in dn.model.inputs[0].shape[1:3])
    scale = max(1, -(-min_px // max(cell)))
    cells = []
    for r in range(len(result.channels)):
        y0, x0, y1, x1 = result.boxes[r]
        crop = figures.projection_to_rgb(result.projections[r, y0:y1, x0:x1])
        image = plots_a.place(crop, result.boxes[r], cell, image_size)
        cells.append(np.repeat(np.repeat(image, scale, axis=0), scale, axis=1))
    gap = np.ones((cells[0].shape[0], 2, 3), np.float32)
    pieces = [piece for c in cells for piece in (c, gap)][:-1]
    return np.concatenate(pieces, axis=1)


class EvolutionCallback(keras.callbacks.Callback):
    """Logs projections of chosen feature maps to TensorBoard during training.

    At the end of each chosen epoch, for each chosen map of each chosen
    layer, the strongest activation over `images` is projected with the
    current weights (the deconvnet shares the model's variables) and the
    projections of a layer are written side by side as one image,
    `feature_evolution/<layer>`, at step = epoch (1-based): TensorBoard's
    step slider then plays Fig. 4.

    Args:
        layers: visualizable layer names, e.g. ("conv1", "conv5").
        channels: map indices shown for every layer, or a dict {layer: maps}.
        images: float32 (N, H, W, C) model inputs (preprocessed), a small
            batch (a few dozen images).
        log_dir: TensorBoard folder (a `feature_evolution` run is written
            under it).
        epochs: 1-based epochs to log (default: every epoch).
        batch_size: images per forward pass.
    """

    def __init__(self, layers, channels, images, log_dir, epochs=None, batch_size=32):
        super().__init__()
        self.layers = tuple(layers)
        if not self.layers:
            raise Error("EvolutionCallback needs at least one layer")
        if isinstance(channels, dict):
            self.channels = {layer: tuple(int(c) for c in channels[layer]) for layer in channels}
            missing = [layer for layer in self.layers if layer not in self.channels]
            if missing:
                raise Error(f"EvolutionCallback: no channels given for {', '.join(missing)}")
        else:
            self.channels = {layer: tuple(int(c) for c in channels) for layer in self.layers}
        if any(not c for c in self.channels.values()):
            raise Error("EvolutionCallback needs at least one channel per layer")
        self.images = np.asarray(images, np.float32)
        self.log_dir = log_dir
        self.epochs = None if epochs is None else {int(e) for e in epochs}
        self.batch_size = batch_size
        self._dn = None
        self._writer = None

    def _deconvnet(self):
        if self._dn is None:
            self._dn = deconv.Deconvnet(self.model)
            for layer in self.layers:
                if layer not in self._dn.layer_names:
                    raise Error(
                        f"EvolutionCallback: unknown layer {layer!r}; valid: "
                        f"{', '.join(self._dn.layer_names)}"
                    )
                size = self._dn.num_channels(layer)
                bad = [c for c in self.channels[layer] if not 0 <= c < size]
                if bad:
                    raise Error(f"EvolutionCallback: map {bad[0]} out of range for {layer}")
        return self._dn

    def on_train_begin(self, logs=None):
        self._deconvnet()  # Fail before the first epoch, not after it.

    def strips(self):
        """{layer: float32 (h, w, 3) image in [0, 1]} of the current weights."""
        dn = self._deconvnet()
        out = {}
        for layer in self.layers:
            result = strongest_in_batch(
                dn, self.images, layer, self.channels[layer], self.batch_size
            )
            out[layer] = _strip(dn, layer, result)
        return out

    def on_epoch_end(self, epoch, logs=None):
        if self.epochs is not None and epoch + 1 not in self.epochs:
            return
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(
                os.path.join(self.log_dir, "feature_evolution")
            )
        with self._writer.as_default():
            for layer, strip in self.strips().items():
                tf.summary.image(f"feature_evolution/{layer}", strip[None], step=epoch + 1)
        self._writer.flush()


# ---------------------------------------------------------------------------
# The figure from a run's snapshots (tools/evolution.py).


@dataclasses.dataclass(frozen=True)
class EvolutionConfig:
    """What `run_evolution` draws.

    Attributes:
        checkpoint: a training work dir with snapshots/.
        output_dir: where evolution.png and evolution.json go.
        dataset, split, data_dir, manual_dir: the data (default: the run's
            dataset and data_dir, the test split).
        layers: layers shown (default: every conv layer).
        maps: ((layer, (channels...)), ...) maps shown explicitly.
        num_maps: random maps per layer otherwise.
        num_images: search only the first N images of the split (0: all).
        epochs: snapshot epochs shown (default: all).
        include_final: add the final model as the last column.
        batch_size: images per batch.
        seed: seed of the random map choice.
    """

    checkpoint: str
    output_dir: str
    dataset: str = ""
    split: str = "test"
    data_dir: str = ""
    manual_dir: str = ""
    layers: tuple = ()
    maps: tuple = ()
    num_maps: int = 4
    num_images: int = 0
    epochs: tuple = ()
    include_final: bool = True
    batch_size: int = 100
    seed: int = 0


def _final_epoch(workdir):
    path = os.path.join(workdir, "eval.json")
    try:
        with open(path) as f:
            history = json.load(f).get("history", {})
        return len(history.get("loss", [])) or None
    except (OSError, ValueError, AttributeError):
        return None


def _columns(config):
    workdir = config.checkpoint
    if not os.path.isdir(workdir):
        raise Error(f"{workdir}: needs a training work dir (with snapshots/), not a file")
    available = runs.snapshot_epochs(workdir)
    if config.epochs:
        missing = sorted(set(config.epochs) - set(available))
        if missing:
            have = ", ".join(map(str, available)) or "none"
            raise Error(f"{workdir}: no snapshot for epoch {missing[0]} (snapshots: {have})")
        epochs = sorted(set(config.epochs))
    else:
        epochs = available
    columns = [(f"epoch {e}", e) for e in epochs]
    if config.include_final and os.path.isfile(os.path.join(workdir, runs.MODEL_FILE)):
        final = _final_epoch(workdir)
        if final is None or final not in epochs:
            columns.append((f"epoch {final} (final)" if final else "final", None))
    if not columns:
        raise Error(f"{workdir}: has no snapshots/epoch_NNN.keras and no model.keras")
    return columns


def run_evolution(config, progress=None):
    """Draws Fig. 4 for a run: chosen maps' strongest activation per snapshot.

    For every column (snapshot epoch, then the final model), the top-1
    activation of every map of the chosen layers over the split is mined
    with that snapshot's weights (`topk.mine_top_k`), and the chosen maps'
    winners are projected with that snapshot's deconvnet. Writes
    `evolution.png` (rows: maps, columns: epochs; each cell the projection
    cropped to its receptive field) and `evolution.json` (per map and
    column: image index, label, activation, position, box).

    Args:
        config: an `EvolutionConfig`.
        progress: optional callable(done_batches, total_batches, column label).

    Returns:
        dict: figure, json, columns, layers.

    Raises:
        Error: bad run, snapshot epoch, data, layer or map (one line).
    """
    from zfkeras import figures  # matplotlib only when drawing.
    from zfkeras.analysis import plots_a

    columns = _columns(config)
    if os.path.exists(config.output_dir) and not os.path.isdir(config.output_dir):
        raise Error(f"{config.output_dir}: exists and is not a directory")

    def load(epoch):
        return runs.load_run(config.checkpoint, snapshot=epoch)

    first = load(columns[0][1])
    try:
        dn = deconv.Deconvnet(first.model)
    except Error as e:
        raise Error(f"{config.checkpoint}: {e}") from None
    layers = topk.check_layers(dn, config.layers, config.checkpoint)
    maps = topk.choose_maps(dn, layers, dict(config.maps), config.num_maps, config.seed)
    raw, info, count = topk.load_dataset(
        first, config.dataset, config.split, config.data_dir, config.manual_dir
    )
    if config.num_images:
        count = min(count, config.num_images) if count else config.num_images
    total = -(-count // config.batch_size) if count else None

    # Pass 1: mine the top-1 of every map with each snapshot's weights.
    mined = []
    for label, epoch in columns:
        run = first if epoch == columns[0][1] else load(epoch)
        batches = topk.model_input_batches(
            raw, run.preprocessing, run.mean, config.batch_size, config.num_images
        )
        report = None if progress is None else (lambda d, t, label=label: progress(d, t, label))
        top_k = topk.mine_top_k(run.model, batches, layers, 1, total_batches=total, progress=report)
        if top_k.num_images == 0:
            raise Error(f"split {config.split!r} is empty")
        mined.append(top_k)
        del run
    # Pass 2: the winning images, once for all columns.
    wanted = np.concatenate(
        [t.image_index[layer][maps[layer]].reshape(-1) for t in mined for layer in layers]
    )
    wanted = np.unique(wanted[wanted >= 0])
    views, labels = topk.fetch_views(raw, first.preprocessing, wanted)
    view_rows = {int(index): row for row, index in enumerate(wanted)}
    # Pass 3: project with each snapshot's deconvnet.
    cells = {(layer, int(c)): [] for layer in layers for c in maps[layer]}
    record = {
        "checkpoint": config.checkpoint,
        "dataset": config.dataset or first.meta.get("dataset", ""),
        "split": config.split,
        "num_images": mined[0].num_images,
        "columns": [label for label, _ in columns],
        "epochs": [epoch for _, epoch in columns],
        "layers": {layer: {str(int(c)): [] for c in maps[layer]} for layer in layers},
    }
    image_size = tuple(int(d) for d in first.model.inputs[0].shape[1:3])
    for (label, epoch), top_k in zip(columns, mined):
        run = load(epoch)
        snapshot_dn = deconv.Deconvnet(run.model)
        for layer in layers:
            winners = topk.project_winners(
                snapshot_dn, run, top_k, layer, maps[layer], views, labels, view_rows
            )
            cell = plots_a.cell_size(snapshot_dn, layer)
            for i, channel in enumerate(winners.channels):
                crop = winners.projections[i][0]
                image = None
                if crop is not None:
                    image = plots_a.place(
                        figures.projection_to_rgb(crop), winners.boxes[i, 0], cell, image_size
                    )
                cells[(layer, int(channel))].append(image)
                index = int(winners.image_index[i, 0])
                name = ""
                if 0 <= winners.labels[i, 0] < len(info.class_names):
                    name = info.class_names[int(winners.labels[i, 0])]
                record["layers"][layer][str(int(channel))].append(
                    {
                        "column": label,
                        "image_index": index,
                        "label": int(winners.labels[i, 0]),
                        "class_name": name,
                        "activation": float(winners.values[i, 0]),
                        "position": [int(v) for v in winners.positions[i, 0]],
                        "box": [int(v) for v in winners.boxes[i, 0]],
                    }
                )
        del run, snapshot_dn
    rows = [(f"{layer} #{channel}", images) for (layer, channel), images in cells.items()]
    title = (
        f"strongest activation over {mined[0].num_images} {config.split} images,\n"
        "projected with each snapshot's weights"
    )
    figure = plots_a.projection_grid(rows, [label for label, _ in columns], title=title)
    fileio.ensure_dir(config.output_dir)
    png = plots_a.save(figure, os.path.join(config.output_dir, "evolution.png"))
    json_path = os.path.join(config.output_dir, "evolution.json")
    fileio.write_json(json_path, record)
    return {"figure": png, "json": json_path, "columns": record["columns"], "layers": layers}
