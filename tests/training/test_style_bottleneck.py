"""tfmet.training.style.bottleneck: the feature cache keyed by extractor and image content."""

import glob
import os
import shutil

import keras
import numpy as np
import tensorflow as tf

from tests.kit import style_data
from tfmet.training.style import bottleneck as style_bottleneck


def test_bottleneck_cache_reuse_by_content(dataset, tmp_path):
    paths = sorted(glob.glob(os.path.join(dataset, "*", "*", "*.jpg")))[:6]
    copy = str(tmp_path / "renamed.jpg")
    shutil.copy(paths[0], copy)
    broken = str(tmp_path / "broken.jpg")
    style_data.write_corrupt(broken)
    backbone = keras.Sequential([keras.Input((None, None, 3)), keras.layers.Dense(4)])
    key = style_bottleneck.extractor_key("toy", backbone, "gap", 16)
    calls = []

    def feature_fn(images):
        calls.append(1)
        return tf.reduce_mean(backbone(images), axis=[1, 2])

    cache = style_bottleneck.BottleneckCache(str(tmp_path / "cache"), key)
    features, ok, errors = style_bottleneck.extract_features(
        feature_fn, paths + [broken], 16, batch_size=4, cache=cache
    )
    assert ok.tolist() == [True] * 6 + [False]
    assert [(i, os.path.basename(p)) for i, p, _ in errors] == [(6, "broken.jpg")]
    assert not np.any(features[6])
    n_calls = len(calls)
    assert n_calls > 0
    # A new cache object (a new run) on the same key: nothing is recomputed, a renamed copy is
    # found by content, values are identical.
    again = style_bottleneck.BottleneckCache(str(tmp_path / "cache"), key)
    assert len(again) == 6
    features2, ok2, _ = style_bottleneck.extract_features(
        feature_fn, [copy] + paths, 16, batch_size=4, cache=again
    )
    assert len(calls) == n_calls and ok2.all()
    np.testing.assert_array_equal(features2[1:], features[:6])
    np.testing.assert_array_equal(features2[0], features[0])
    for shard in glob.glob(os.path.join(again.path, "shard-*.npz")):
        with np.load(shard, allow_pickle=False) as data:
            assert data["hashes"].dtype.kind == "S" and data["features"].dtype == np.float32
    # Other weights -> another key -> another directory.
    backbone.layers[0].kernel.assign(backbone.layers[0].kernel + 1.0)
    other = style_bottleneck.extractor_key("toy", backbone, "gap", 16)
    assert other["weights_sha256"] != key["weights_sha256"]
    assert style_bottleneck.BottleneckCache(str(tmp_path / "cache"), other).path != cache.path
