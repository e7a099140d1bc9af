"""tfmet.training.style.fit and .monitor: epoch monitor, scalars, early stopping, checkpoints."""

import glob
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfmet.training.style import checkpoints
from tfmet.training.style import fit as style_train
from tfmet.training.style import monitor as style_monitor
from tfmet.training.style.model import (
    StyleHead,
    masked_cross_entropy,
)


def test_monitor_scalars_and_early_stopping(tmp_path):
    """Fabricated validation logits: top-1 0.5, 0.75, 0.75, 0.5 -> best epoch 2, stop after 4."""
    head = StyleHead({"style": ["a", "b"]})
    head.build((None, 3))
    style_train.compile_for_attributes(head, ["style"], keras.optimizers.SGD(0.01))
    head.optimizer.build(head.trainable_variables)
    labels = np.array([0, 0, 1, 1])
    good, bad = [5.0, 0.0], [0.0, 5.0]
    rows = [
        [good, bad, bad, good],
        [good, good, bad, good],
        [good, good, good, bad],
        [bad, bad, bad, bad],
    ]
    epochs = iter(rows)
    features = np.eye(4, 3, dtype=np.float32)

    def evaluate(model):
        return {"style": np.array(next(epochs), np.float32)}, features

    workdir = str(tmp_path)
    monitor = style_monitor.StyleMonitor(
        workdir,
        evaluate,
        {"style": labels},
        head.class_names,
        patience=2,
        projector_metadata=(["path", "style"], [[f"img{i}.jpg", "a"] for i in range(4)]),
    )
    monitor.set_model(head)
    for epoch in range(4):
        logs = {"loss": 1.0 - epoch / 10, "style_top1": 0.25 * epoch}
        monitor.on_epoch_end(epoch, logs)
        if head.stop_training:
            break
    monitor.on_train_end()
    assert epoch == 3 and head.stop_training
    state = checkpoints.read_state(workdir)
    assert (state["best_epoch"], state["best_top1"], state["epoch"]) == (2, 0.75, 4)
    assert [h["val/style/top1"] for h in state["history"]] == [0.5, 0.75, 0.75, 0.5]
    values = {}
    for split in ("train", "val"):
        for path in glob.glob(os.path.join(workdir, "tensorboard", split, "events.*")):
            for event in tf.compat.v1.train.summary_iterator(path):
                for v in event.summary.value:
                    if v.metadata.plugin_data.plugin_name == "scalars":
                        value = float(tf.make_ndarray(v.tensor))
                        values.setdefault((split, v.tag), []).append((event.step, value))
    assert values[("val", "style/top1")] == [(1, 0.5), (2, 0.75), (3, 0.75), (4, 0.5)]
    assert [v for _, v in values[("train", "style/top1")]] == [0.0, 0.25, 0.5, 0.75]
    np.testing.assert_allclose([v for _, v in values[("train", "learning_rate")]], [0.01] * 4)
    val_loss = masked_cross_entropy(labels, np.array(rows[0], np.float32))
    assert values[("val", "loss")][0][1] == pytest.approx(val_loss, rel=1e-6)
    best = StyleHead({"style": ["a", "b"]})
    best.build((None, 3))
    checkpoints.load_weights(best, checkpoints.checkpoint_paths(workdir)["best"])
    with open(os.path.join(workdir, "tensorboard", "metadata.tsv")) as f:
        assert f.read().splitlines()[1] == "img0.jpg\ta"
