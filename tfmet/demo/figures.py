"""What the demo shows: the metrics explained, a PNG of queries with their top matches, and
TensorBoard logs."""

import io
import os

import numpy as np

from tfmet.io.atomic import atomic_path

EXPLANATION = """\
How to read these numbers (fractions from 0 to 1, higher is better):
  GAP   Global Average Precision over ALL test queries, distractors included. Queries are sorted
        by the classifier's confidence; GAP averages the precision at every rank where a Met
        query is recognised correctly, over the number of Met queries. Being wrong, or confident
        about a distractor (a photo of something not in the collection), pushes correct answers
        down the ranking and costs GAP.
  GAP-  The same, with the distractor queries left out.
  ACC   Top-1 accuracy: the fraction of Met queries whose predicted exhibit is the right one.
k (neighbours) and tau (softmax inverse temperature of the confidence) were chosen on the
validation queries (best val GAP); the test queries were not used for that."""


def format_metrics(metrics):
    """ "GAP 0.712  GAP- 0.801  ACC 0.840": fractions, like every tfmet output of the metrics."""
    return f"GAP {metrics['gap']:.3f}  GAP- {metrics['gap_minus']:.3f}  ACC {metrics['acc']:.3f}"


def choose_examples(pred, conf, labels, count=8, seed=0):
    """Indices of up to `count` test queries to draw: right, wrong and distractor cases mixed.

    Half the rows go to Met queries (the most confident correct ones first, then mistakes),
    the rest to distractors (the most confident first: the ones that hurt GAP most).
    """
    pred, conf, labels = np.asarray(pred), np.asarray(conf), np.asarray(labels)
    met = np.flatnonzero(labels >= 0)
    distractors = np.flatnonzero(labels < 0)
    right = met[pred[met] == labels[met]]
    wrong = met[pred[met] != labels[met]]
    by_conf = lambda rows: rows[np.argsort(-conf[rows], kind="stable")]
    rng = np.random.default_rng(seed)
    n_met = min(len(met), max(count - min(len(distractors), count // 4 + 1), count // 2))
    n_wrong = min(len(wrong), max(1, n_met // 3)) if len(wrong) else 0
    n_right = min(len(right), n_met - n_wrong)
    picked = list(rng.permutation(by_conf(right)[: 2 * n_right])[:n_right])
    picked += list(by_conf(wrong)[:n_wrong])
    picked += list(by_conf(distractors)[: count - len(picked)])
    return [int(i) for i in picked]


def _load(path, size=160):
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((size, size))
            return np.asarray(image)
    except OSError:
        return np.full((size, size, 3), 128, np.uint8)


def matches_figure(queries, database_paths, database_labels, names, columns=4):
    """A PNG (bytes): one row per query, the query then its top `columns` database matches.

    Args:
      queries: dicts with "path", "label" (-1 for distractors), "pred", "conf",
        "neighbors" (database indices), "similarities" and optionally "caption" (what the
        query shows, e.g. the source photo of a distractor).
      database_paths, database_labels: the database images and their labels.
      names: {label: display name}.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = max(1, len(queries))
    figure, axes = plt.subplots(
        rows, columns + 1, figsize=(2.3 * (columns + 1), 2.5 * rows), squeeze=False
    )
    name = lambda label: names.get(int(label), f"Met id {int(label)}")
    for row, query in enumerate(queries):
        label = int(query["label"])
        ok = label >= 0 and int(query["pred"]) == label
        ax = axes[row, 0]
        ax.imshow(_load(query["path"]))
        truth = name(label) if label >= 0 else "distractor"
        if query.get("caption"):
            truth = f"{truth}\n({query['caption']})" if label < 0 else query["caption"]
        verdict = "right" if ok else "wrong"
        ax.set_title(
            f"query: {truth}\n-> {name(query['pred'])} ({verdict})\nconf {query['conf']:.2f}",
            fontsize=8,
            color="green" if ok else "red",
        )
        for col in range(columns):
            ax = axes[row, col + 1]
            if col < len(query["neighbors"]) and query["neighbors"][col] >= 0:
                index = int(query["neighbors"][col])
                match_label = int(database_labels[index])
                ax.imshow(_load(database_paths[index]))
                same = match_label == label
                ax.set_title(
                    f"#{col + 1} {name(match_label)}\nsim {query['similarities'][col]:.3f}",
                    fontsize=8,
                    color="green" if same else "black",
                )
                for spine in ax.spines.values():
                    spine.set_edgecolor("green" if same else "lightgray")
                    spine.set_linewidth(3 if same else 1)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    for ax in axes[0, 1:]:
        ax.set_xlabel("")
    figure.suptitle("Test queries (left) and their nearest database images", fontsize=10)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.35 / rows))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    plt.close(figure)
    return buffer.getvalue()


def write_png(path, data):
    """Writes PNG bytes atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return path


def write_tensorboard(logdir, scalars, png=None, text=None):
    """TensorBoard event files under `logdir`: scalars, the matches image and the explanation.

    (`tfmet.retrieval.report.write_tensorboard` adds the kNN evaluation's own summaries: tuning
    grid, precision-recall curves.)
    """
    import tensorflow as tf

    os.makedirs(logdir, exist_ok=True)
    writer = tf.summary.create_file_writer(logdir)
    with writer.as_default(step=0):
        for name, value in scalars.items():
            tf.summary.scalar(name, float(value))
        if png is not None:
            tf.summary.image("matches", tf.image.decode_png(png, channels=3)[None])
        if text is not None:
            tf.summary.text("explanation", tf.constant("```\n" + text + "\n```"))
    writer.flush()
    writer.close()
    return logdir
