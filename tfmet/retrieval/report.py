"""Outputs of a kNN evaluation: results JSON, per-query predictions, TensorBoard summaries."""

import io
import os
import shutil

import numpy as np

from tfmet.io.atomic import (
    atomic_path,
    clean_stale_temporaries,
    commit_files,
    save_json,
    staging_directory,
    temporary_prefix,
)
from tfmet.metrics import recognition


def write_results(path, result):
    """The results JSON (`KnnEvalResult.to_json()`), atomically."""
    save_json(path, result.to_json())


def write_predictions(path, result):
    """Per-query predictions as .npz: <split>_pred, <split>_conf, <split>_labels."""
    arrays = {}
    for split, (pred, conf, labels) in result.predictions.items():
        arrays.update({f"{split}_pred": pred, f"{split}_conf": conf, f"{split}_labels": labels})
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def _figure():
    # A Figure with an Agg canvas: no pyplot, no global backend change.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _png(figure):
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def grid_heatmap_png(tuning_result):
    """PNG bytes: val GAP over the (k, tau) grid, the chosen point outlined."""
    from matplotlib.patches import Rectangle

    figure = _figure()
    axes = figure.add_subplot()
    grid = tuning_result.grid
    image = axes.imshow(grid, cmap="viridis", aspect="auto")
    figure.colorbar(image, ax=axes, label="val GAP")
    axes.set_xticks(range(len(tuning_result.taus)), [f"{t:g}" for t in tuning_result.taus])
    axes.set_yticks(range(len(tuning_result.ks)), [str(k) for k in tuning_result.ks])
    axes.set_xlabel("tau")
    axes.set_ylabel("k")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            axes.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", fontsize=6, color="w")
    best = (tuning_result.ks.index(tuning_result.k), tuning_result.taus.index(tuning_result.tau))
    axes.add_patch(
        Rectangle((best[1] - 0.5, best[0] - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2)
    )
    axes.set_title(f"val GAP; best k={tuning_result.k} tau={tuning_result.tau:g}")
    figure.tight_layout()
    return _png(figure)


def pr_curve_png(pred, conf, labels, title):
    """PNG bytes: the precision-recall curve whose area is GAP (recall over Met queries)."""
    precision, recall, _ = recognition.precision_recall_curve(pred, conf, labels)
    figure = _figure()
    axes = figure.add_subplot()
    axes.plot(recall, precision)
    axes.set_xlabel("recall (Met queries)")
    axes.set_ylabel("precision")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.05)
    axes.set_title(f"{title}: GAP {recognition.gap(pred, conf, labels):.4f}")
    figure.tight_layout()
    return _png(figure)


def threshold_curve_png(result):
    """PNG bytes: precision against recall over the acceptance thresholds (val, and test when
    evaluated), the chosen operating threshold marked on each curve."""
    from tfmet.metrics import operating_point

    block = result.threshold
    figure = _figure()
    axes = figure.add_subplot()
    for split, (pred, conf, labels) in result.predictions.items():
        curve = operating_point.metrics_at(
            pred, conf, labels, operating_point.candidate_thresholds(conf)
        )
        (line,) = axes.plot(curve["recall"], curve["precision"], label=split)
        chosen = block.get(split)
        if chosen is not None:
            axes.plot(chosen["recall"], chosen["precision"], "o", color=line.get_color())
    axes.set_xlabel("recall (correct accepted / Met queries)")
    axes.set_ylabel("precision of accepted answers")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.05)
    axes.legend(loc="lower left")
    axes.set_title(f"operating threshold {block['value']:.4f} ({block['rule']})")
    figure.tight_layout()
    return _png(figure)


def write_threshold_png(path, result):
    """The operating-threshold curve as a PNG file (nothing without a threshold)."""
    if result.threshold is None:
        return
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(threshold_curve_png(result))


def write_tensorboard(logdir, result):
    """Heat-map of the tuning grid, PR curves (plugin + exact image), final metrics as scalars."""
    import tensorflow as tf
    from tensorboard.plugins.pr_curve import summary as pr_summary

    def image(name, png):
        tf.summary.image(name, tf.image.decode_png(png, channels=4)[None], step=0)

    writer = tf.summary.create_file_writer(logdir)
    with writer.as_default():
        if result.tuning is not None:
            image("tuning/val_gap_grid", grid_heatmap_png(result.tuning))
            tf.summary.scalar("tuning/k", result.k, step=0)
            tf.summary.scalar("tuning/tau", result.tau, step=0)
        for split, (pred, conf, labels) in result.predictions.items():
            right = recognition.correct(pred, labels)
            proto = pr_summary.pb(
                f"{split}/correct_vs_confidence",
                labels=right,
                predictions=np.clip(conf, 0.0, 1.0).astype(np.float32),
                num_thresholds=201,
            )
            tf.summary.experimental.write_raw_pb(proto.SerializeToString(), step=0)
            image(f"{split}/precision_recall", pr_curve_png(pred, conf, labels, split))
        if result.threshold is not None:
            image("threshold/precision_recall", threshold_curve_png(result))
            tf.summary.scalar("threshold/value", result.threshold["value"], step=0)
            for split in ("val", "test"):
                for name, value in (result.threshold[split] or {}).items():
                    tf.summary.scalar(f"threshold/{split}/{name}", value, step=0)
        for split in ("val", "test"):
            values = getattr(result, split)
            for name, value in (values or {}).items():
                tf.summary.scalar(f"{split}/{name}", value, step=0)
        search = getattr(result, "search", None)
        if search is not None:
            tf.summary.scalar(f"search/recall_at_{search['k']}", search["recall"], step=0)
            tf.summary.text("search/choice", search["reason"], step=0)
        for name, seconds in result.timings_s.items():
            tf.summary.scalar(f"timings_s/{name}", seconds, step=0)
    writer.flush()
    writer.close()


def write_outputs(paths, result, log_lines, name="knn_eval"):
    """Every output of one evaluation, replaced as one set (`tfmet.io.atomic.commit_files`).

    Args:
      paths: {"results", "predictions", "tensorboard", "threshold_png", "log"} target paths;
        the journal goes in the folder of "log".
      result: the `KnnEvalResult`.
      log_lines: lines appended to the log file.
      name: the set's name (one journal per set of outputs).

    A kill at any instant leaves the previous evaluation's outputs or this one's (a kill after
    the commit point is completed by the next evaluation in the folder), never new results
    beside old predictions; a previous threshold curve is removed when this result has none.
    """
    directory = os.path.dirname(os.path.abspath(paths["log"]))
    for target in paths.values():
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    clean_stale_temporaries(directory)  # and finish a set a kill interrupted

    def temporary(target):
        target = os.path.abspath(target)
        return os.path.join(os.path.dirname(target), temporary_prefix() + os.path.basename(target))

    moves = []
    try:
        for key, write in (("results", write_results), ("predictions", write_predictions)):
            moves.append((temporary(paths[key]), paths[key]))
            write(moves[-1][0], result)
        if result.threshold is None:
            moves.append((None, paths["threshold_png"]))
        else:
            moves.append((temporary(paths["threshold_png"]), paths["threshold_png"]))
            write_threshold_png(moves[-1][0], result)
        board = staging_directory(os.path.dirname(os.path.abspath(paths["tensorboard"])), "tb")
        moves.append((board, paths["tensorboard"]))
        write_tensorboard(board, result)
        moves.append((temporary(paths["log"]), paths["log"]))
        _append_log(paths["log"], moves[-1][0], log_lines)
        commit_files(directory, name, moves)
    except BaseException:
        for temp, _ in moves:
            if temp is not None and os.path.isdir(temp):
                shutil.rmtree(temp, ignore_errors=True)
            elif temp is not None and os.path.exists(temp):
                os.remove(temp)
        raise


def _append_log(path, output, lines):
    """`path`'s text (if any) plus `lines`, written to `output` atomically."""
    old = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = f.read()
    with atomic_path(output) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(old + "\n" + "\n".join(lines) + "\n")
