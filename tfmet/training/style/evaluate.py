"""Evaluation of a style classifier: top-1/3/5, per-class precision/recall, confusion matrices.

Everything works on class probabilities (or logits) and integer labels per attribute; labels of -1
(not annotated) are left out of every number.
"""

import csv
import io
import os

import numpy as np

from tfmet.io.atomic import atomic_path, save_json
from tfmet.metrics.topk import top_k_accuracy

TOP_KS = (1, 3, 5)


def confusion_matrix(labels, predictions, num_classes):
    """int64 [num_classes, num_classes]: rows are true classes, columns predicted ones."""
    labels = np.asarray(labels).reshape(-1)
    predictions = np.asarray(predictions).reshape(-1)
    keep = labels >= 0
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (labels[keep], predictions[keep]), 1)
    return matrix


def precision_recall(matrix):
    """Per-class (precision, recall, support) from a confusion matrix; 0 where undefined."""
    matrix = np.asarray(matrix, np.float64)
    true_positives = np.diag(matrix)
    predicted = matrix.sum(axis=0)
    support = matrix.sum(axis=1)
    precision = np.divide(
        true_positives, predicted, out=np.zeros_like(true_positives), where=predicted > 0
    )
    recall = np.divide(
        true_positives, support, out=np.zeros_like(true_positives), where=support > 0
    )
    return precision, recall, support.astype(np.int64)


def evaluate_scores(scores, labels, class_names, top_ks=TOP_KS):
    """Metrics of one attribute.

    Args:
      scores: [n, classes] probabilities or logits.
      labels: [n] ints, -1 = missing.
      class_names: list of names.

    Returns:
      (report dict with "count", "top{k}" and "per_class" rows, confusion matrix).
    """
    scores = np.asarray(scores, np.float32)
    labels = np.asarray(labels).reshape(-1)
    predictions = scores.argmax(axis=1)
    matrix = confusion_matrix(labels, predictions, len(class_names))
    precision, recall, support = precision_recall(matrix)
    report = {"count": int((labels >= 0).sum())}
    for k in top_ks:
        report[f"top{k}"] = top_k_accuracy(scores, labels, k)
    report["per_class"] = [
        {"class": name, "precision": float(p), "recall": float(r), "support": int(s)}
        for name, p, r, s in zip(class_names, precision, recall, support, strict=True)
    ]
    return report, matrix


def confusion_image(matrix, cell=12):
    """uint8 RGB heatmap [n * cell, n * cell, 3] of a row-normalised confusion matrix.

    White = 0, dark blue = 1 (all of the row's images); a cheap per-epoch picture for
    TensorBoard (rows are true classes, columns predictions, in class-name order).
    """
    matrix = np.asarray(matrix, np.float64)
    totals = matrix.sum(axis=1, keepdims=True)
    shown = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    white, blue = np.array([255.0, 255.0, 255.0]), np.array([8.0, 48.0, 107.0])
    colours = white + shown[..., None] * (blue - white)
    image = np.repeat(np.repeat(colours, cell, axis=0), cell, axis=1)
    image[::cell, :, :] = 200.0  # grid lines
    image[:, ::cell, :] = 200.0
    return image.round().astype(np.uint8)


def confusion_png(matrix, class_names, title="", normalize=True):
    """PNG bytes of a confusion-matrix plot (rows normalised to recall by default)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    matrix = np.asarray(matrix, np.float64)
    shown = matrix
    if normalize:
        totals = matrix.sum(axis=1, keepdims=True)
        shown = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    n = len(class_names)
    size = min(max(4.0, 0.45 * n + 2.0), 24.0)
    figure, axes = plt.subplots(figsize=(size, size), dpi=80)
    axes.imshow(shown, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None)
    axes.set_xticks(range(n), labels=class_names, rotation=90, fontsize=7)
    axes.set_yticks(range(n), labels=class_names, fontsize=7)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    if title:
        axes.set_title(title)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    axes.text(
                        j,
                        i,
                        int(matrix[i, j]),
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if shown[i, j] > 0.5 else "black",
                    )
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def write_confusion_csv(path, matrix, class_names):
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["true \\ predicted", *class_names])
            for name, row in zip(class_names, np.asarray(matrix), strict=True):
                writer.writerow([name, *[int(v) for v in row]])


def write_per_class_csv(path, report):
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["class", "precision", "recall", "support"])
            for row in report["per_class"]:
                writer.writerow(
                    [
                        row["class"],
                        f"{row['precision']:.6f}",
                        f"{row['recall']:.6f}",
                        row["support"],
                    ]
                )


def write_evaluation(output_dir, reports, matrices, class_names, **metadata):
    """Writes metrics.json and, per attribute, per_class_<a>.csv, confusion_<a>.csv and .png."""
    os.makedirs(output_dir, exist_ok=True)
    for attribute, report in reports.items():
        names = class_names[attribute]
        write_per_class_csv(os.path.join(output_dir, f"per_class_{attribute}.csv"), report)
        write_confusion_csv(
            os.path.join(output_dir, f"confusion_{attribute}.csv"), matrices[attribute], names
        )
        with atomic_path(os.path.join(output_dir, f"confusion_{attribute}.png")) as tmp:
            with open(tmp, "wb") as f:
                f.write(confusion_png(matrices[attribute], names, title=attribute))
    save_json(os.path.join(output_dir, "metrics.json"), {**metadata, "attributes": reports})
