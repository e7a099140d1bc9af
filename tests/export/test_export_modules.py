"""Export modules, reloaded in a fresh process without tfmet: outputs equal the pipeline."""

import io
import json
import os
import sys
import textwrap

import keras
import numpy as np
import pytest
from PIL import Image

from tests.kit import run_command, tiny_backbone
from tfmet.backbones import IMAGENET_TORCH
from tfmet.descriptors import DescriptorExtractor, Embedder
from tfmet.export import DescriptorModule, RecognizerModule, save_module


def reference_knn(sims, labels, tau, num_classes):
    """The Met reference rule, written out per query in float64."""
    preds, confs = [], []
    for s, lab in zip(sims, labels, strict=True):
        distinct = np.unique(lab)
        best = np.zeros(len(distinct))
        for sim, label in zip(s, lab, strict=True):
            i = np.searchsorted(distinct, label)
            best[i] = max(best[i], sim)
        logits = tau * best
        peak = max(logits.max(), 0.0)
        total = np.exp(logits - peak).sum() + (num_classes - len(distinct)) * np.exp(-peak)
        probs = np.exp(logits - peak) / total
        preds.append(distinct[np.argmax(probs)])
        confs.append(probs.max())
    return np.array(preds), np.array(confs)


def _jpeg(seed, size):
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _decode(data):
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float32)


def _fresh_process(script, tmp_path):
    """Runs `script` in a new interpreter that never imports tfmet; returns its JSON output."""
    path = os.path.join(tmp_path, "client.py")
    with open(path, "w") as f:
        f.write(textwrap.dedent(script))
    result = run_command([sys.executable, path], cwd=tmp_path, env={"PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def embedder():
    return Embedder(tiny_backbone(channels=16, seed=3), preprocessing=IMAGENET_TORCH)


@pytest.mark.parametrize(
    "mean_shape, projection_shape", [(15, (16, 4)), (16, (15, 4)), (16, (16,)), ((16, 1), (16, 4))]
)
def test_a_whitening_of_the_wrong_shape_is_refused(embedder, mean_shape, projection_shape):
    pca = (np.zeros(mean_shape), np.zeros(projection_shape))
    with pytest.raises(ValueError, match=r"`pca` must be \(mean \[16\], projection \[16, dim\]\)"):
        DescriptorModule(embedder, pca=pca)


def test_saving_traces_the_backbone_only_for_the_signatures(tmp_path, embedder, monkeypatch):
    """tf.saved_model.save traces again each tf.function reachable from the object it saves
    (four more backbone graphs for a recogniser, 2/3 of its save time): the export's root holds
    the signatures, their variables and the state tfmet reads back, not the module."""
    from tfmet.descriptors import embedder as embedder_lib

    traces = []
    real = embedder_lib.multiscale_embed
    monkeypatch.setattr(
        embedder_lib, "multiscale_embed", lambda *a, **k: traces.append(1) or real(*a, **k)
    )
    database = np.eye(16, dtype=np.float32)[:6]
    module = RecognizerModule(embedder, database, [1, 1, 2, 2, 3, 3], k=2, tau=5.0)
    signatures = module.signatures()
    save_module(module, tmp_path / "export", signatures, {"kind": "recognizer"})
    # serving_default and images each pass the images through the backbone; descriptors not.
    assert len(traces) == 2
    import tensorflow as tf

    loaded = tf.saved_model.load(str(tmp_path / "export"))
    assert sorted(loaded.signatures) == ["descriptors", "images", "serving_default"]
    np.testing.assert_array_equal(loaded.neighbor_search.database.numpy(), database)
    np.testing.assert_array_equal(loaded.labels.numpy(), [1, 1, 2, 2, 3, 3])
    assert not hasattr(loaded, "recognize_bytes") and not hasattr(loaded, "extractor")


@pytest.mark.slow
def test_descriptor_export_round_trip(tmp_path, embedder):
    rng = np.random.default_rng(1)
    mean, projection = rng.normal(size=16) * 0.1, rng.normal(size=(16, 6))
    module = DescriptorModule(embedder, pca=(mean, projection))
    images = [_jpeg(0, (40, 33)), _jpeg(1, (25, 47)), b"", b"not an image", _jpeg(2, (30, 30))[:60]]
    extractor = DescriptorExtractor(embedder)
    expected = []
    for data in images[:2]:
        d = extractor(_decode(data)[None]).numpy()[0]
        w = (d - mean) @ projection
        expected.append(w / np.linalg.norm(w))
    export = save_module(module, tmp_path / "descriptor", module.signatures(), {"kind": "x"})
    with pytest.raises(FileExistsError, match="--force"):
        save_module(module, export, module.signatures(), {})
    np.save(tmp_path / "images.npy", np.stack([_decode(images[0])]))
    with open(tmp_path / "bytes.json", "w") as f:
        json.dump([list(b) for b in images], f)
    out = _fresh_process(
        f"""
        import json, numpy as np, tensorflow as tf
        model = tf.saved_model.load({str(export)!r})
        data = [bytes(b) for b in json.load(open("bytes.json"))]
        res = model.signatures["serving_default"](image_bytes=tf.constant(data))
        img = model.signatures["images"](images=tf.constant(np.load("images.npy")))
        print(json.dumps({{"d": res["descriptor"].numpy().tolist(),
                          "valid": res["valid"].numpy().tolist(),
                          "img": img["descriptor"].numpy().tolist()}}))
        """,
        tmp_path,
    )
    assert out["valid"] == [True, True, False, False, False]
    np.testing.assert_allclose(np.array(out["d"])[:2], expected, atol=1e-5)
    np.testing.assert_array_equal(np.array(out["d"])[2:], 0.0)
    np.testing.assert_allclose(np.array(out["img"])[0], expected[0], atol=1e-5)
    with open(os.path.join(export, "assets", "tfmet_metadata.json")) as f:
        assert json.load(f) == {"kind": "x"}


@pytest.mark.slow
@pytest.mark.parametrize("searcher", ["exact", "scann"])
def test_recognizer_export_matches_numpy_knn(tmp_path, embedder, searcher):
    rng = np.random.default_rng(2)
    queries = [_jpeg(10 + i, (36 + i, 30)) for i in range(3)]
    extractor = DescriptorExtractor(embedder)
    query_desc = np.stack([extractor(_decode(q)[None]).numpy()[0] for q in queries])
    database = rng.normal(size=(300, 16)).astype(np.float32)
    database[:3] = query_desc + 0.02 * rng.normal(size=(3, 16))
    database /= np.linalg.norm(database, axis=1, keepdims=True)
    labels = rng.integers(1000, 1100, 300)
    k, tau = 5, 25.0
    module = RecognizerModule(embedder, database, labels, k=k, tau=tau, searcher=searcher, top_k=3)
    sims = query_desc @ database.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    ref_pred, ref_conf = reference_knn(
        np.take_along_axis(sims, order, 1), labels[order], tau, np.unique(labels).size
    )
    assert ref_pred.tolist() == labels[:3].tolist()
    export = save_module(module, tmp_path / "recognizer", module.signatures(), {"k": k})
    with open(tmp_path / "bytes.json", "w") as f:
        json.dump([list(b) for b in queries + [b"junk"]], f)
    out = _fresh_process(
        f"""
        import json, tensorflow as tf
        {"import scann" if searcher == "scann" else ""}
        model = tf.saved_model.load({str(export)!r})
        data = [bytes(b) for b in json.load(open("bytes.json"))]
        res = model.signatures["serving_default"](image_bytes=tf.constant(data))
        print(json.dumps({{key: value.numpy().tolist() for key, value in res.items()}}))
        """,
        tmp_path,
    )
    assert out["met_id"] == ref_pred.tolist() + [-1]
    assert out["valid"] == [True, True, True, False]
    np.testing.assert_allclose(out["confidence"][:3], ref_conf, atol=1e-5)
    assert [row[0] for row in out["top_k_ids"][:3]] == ref_pred.tolist()
    assert out["top_k_ids"][3] == [-1, -1, -1]


def test_an_invalid_variable_name_is_refused_before_anything_is_written(tmp_path):
    inputs = keras.Input((None, None, 3))
    outputs = keras.layers.Conv2D(4, 1, name="_conv")(inputs)
    module = DescriptorModule(Embedder(keras.Model(inputs, outputs)), scales=(1.0,))
    target = tmp_path / "export"
    names = r"export: cannot export: 2 variable names .*'_conv/kernel', '_conv/bias'"
    with pytest.raises(ValueError, match=names):
        save_module(module, target, module.signatures(), {})
    assert not target.exists() and os.listdir(tmp_path) == []
