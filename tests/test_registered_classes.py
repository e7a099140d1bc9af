"""Every Keras class tfmet registers (package "tfmet") through the kit's round-trip checks.

Each case builds its class from the registry by its registered name (so modules can move without
touching this file) and gives one value worked out by hand in the comment beside it.
HubModule, Embedder, StyleHead and StyleClassifier do not implement `compute_output_shape`
(their cases say so with has_compute_output_shape=False; only the symbolic output spec is
checked); the kit fails once one of them gains the method, so that the flag is then removed.
`test_every_registered_class_has_a_case` fails when a new class is registered without a case.
"""

import importlib
import math
import pkgutil

import keras
import numpy as np
import pytest

import tfmet
from tests.kit import hub_modules, relu_backbone, run_layer_test, run_serialization_test


def _registered():
    """{"tfmet>Name": class} after importing every tfmet module but the programs (absl flags)."""
    for module in pkgutil.walk_packages(tfmet.__path__, "tfmet."):
        if not module.name.startswith("tfmet.cli"):
            importlib.import_module(module.name)
    objects = keras.saving.get_custom_objects()
    return {name: cls for name, cls in objects.items() if name.startswith("tfmet>")}


def _cls(name):
    return keras.saving.get_registered_object(f"tfmet>{name}")


# --- layers and models: run_layer_test -------------------------------------------------------


def _gem(tmp_path):
    # Channel 0 holds 1 and 2: ((1^3 + 2^3) / 2)^(1/3) = 4.5^(1/3); channel 1 holds 2 and 2: 2.
    x = [[[[1.0, 2.0], [2.0, 2.0]]]]
    expected = [[4.5 ** (1 / 3), 2.0]]
    run_layer_test(_cls("GeMPooling2D"), {"p": 3.0}, x, expected, tmp_path=tmp_path)


def _l2_normalize(tmp_path):
    # (3, 4) / 5; the all-zero row stays zero (divided by eps, not by 0).
    x = [[3.0, 4.0], [0.0, 0.0]]
    run_layer_test(_cls("L2Normalize"), {}, x, [[0.6, 0.8], [0.0, 0.0]], tmp_path=tmp_path)


def _projector(tmp_path):
    # (1, 2, 3) @ [[1, 0], [0, 1], [1, 1]] + (0.5, -1) = (1 + 3 + 0.5, 2 + 3 - 1).
    kernel = np.array([[1, 0], [0, 1], [1, 1]], np.float32)
    bias = np.array([0.5, -1.0], np.float32)
    run_layer_test(
        _cls("Projector"),
        {"units": 2},
        [[1.0, 2.0, 3.0]],
        [[4.5, 4.0]],
        weights=[kernel, bias],
        tmp_path=tmp_path,
    )


def _grouped_conv(tmp_path):
    # Two groups of two channels, 1x1: filter 0 sees (1, 2) with weights (1, 2) -> 5, filter 1
    # sees (3, 4) with weights (10, 20) -> 110 (an ungrouped conv would mix all four channels).
    kernel = np.array([[[[1, 10], [2, 20]]]], np.float32)  # [1, 1, in/groups, filters]
    run_layer_test(
        _cls("GroupedConv2D"),
        {"filters": 2, "kernel_size": 1, "groups": 2, "use_bias": False},
        [[[[1.0, 2.0, 3.0, 4.0]]]],
        [[[[5.0, 110.0]]]],
        weights=[kernel],
        tmp_path=tmp_path,
    )


def _folded_batchnorm(tmp_path):
    # The identity.
    x = [[1.0, -2.0, 3.0]]
    run_layer_test(_cls("FoldedBatchNorm"), {}, x, x, tmp_path=tmp_path)


def _hub_module(tmp_path):
    # The fake module's two 1x1 convs computed in numpy from its known weights: one pixel image
    # (1, 2, 0.5) -> relu((1, 2, 0.5) @ K1) @ K2 + B2 - MEAN2. A hub module runs a SavedModel's
    # code, so keras loads it only outside safe mode.
    handle = hub_modules.save_module(hub_modules.TensorModule(), str(tmp_path / "hub"))
    x = np.array([[[[1.0, 2.0, 0.5]]]], np.float32)
    expected = np.maximum(x @ hub_modules.K1, 0) @ hub_modules.K2 + hub_modules.B2
    expected = expected - hub_modules.MEAN2
    run_layer_test(
        _cls("HubModule"),
        {"handle": handle},
        x,
        expected,
        atol=1e-5,
        safe_mode=False,
        has_compute_output_shape=False,
        tmp_path=tmp_path,
    )


def _embedder(tmp_path):
    # Feature map = the image (ReLU of non-negative values): GeM = (4.5^(1/3), 2) as in _gem,
    # then divided by its norm sqrt(4.5^(2/3) + 4).
    gem = np.array([4.5 ** (1 / 3), 2.0])
    x = [[[[1.0, 2.0], [2.0, 2.0]]]]
    run_layer_test(
        _cls("Embedder"),
        {"backbone": relu_backbone(2)},
        x,
        [gem / math.sqrt(4.5 ** (2 / 3) + 4.0)],
        has_compute_output_shape=False,
        tmp_path=tmp_path,
    )


def _style_head(tmp_path):
    # (1, 2) @ [[1, 2], [3, 4]] + (0.5, -0.5) = (7.5, 9.5); dropout 0.
    weights = [np.array([[1, 2], [3, 4]], np.float32), np.array([0.5, -0.5], np.float32)]
    run_layer_test(
        _cls("StyleHead"),
        {"class_names": {"style": ["a", "b"]}},
        [[1.0, 2.0]],
        {"style": [[7.5, 9.5]]},
        weights=weights,
        has_compute_output_shape=False,
        tmp_path=tmp_path,
    )


def _style_classifier(tmp_path):
    # Global average of the pixels (1, 2) and (3, 4) = (2, 3); (2, 3) @ [[1, 2], [3, 4]] = (11, 16)
    # plus the bias (0.5, -0.5).
    head = _cls("StyleHead")({"style": ["a", "b"]})
    weights = [np.array([[1, 2], [3, 4]], np.float32), np.array([0.5, -0.5], np.float32)]
    run_layer_test(
        _cls("StyleClassifier"),
        {"backbone": relu_backbone(2), "head": head},
        [[[[1.0, 2.0], [3.0, 4.0]]]],
        {"style": [[11.5, 15.5]]},
        weights=weights,
        has_compute_output_shape=False,
        tmp_path=tmp_path,
    )


# --- metrics, losses, optimizers: run_serialization_test -------------------------------------


def _metric_result(y_true, y_pred):
    def compute(metric):
        metric.update_state(y_true, y_pred)
        return metric.result()

    return compute


# Four Met queries ranked by confidence: right, distractor (label -1) answered 2, right, wrong.
MET_PRED = (np.array([1, 2, 3, 0]), np.array([0.9, 0.8, 0.7, 0.6]))
MET_LABELS = np.array([1, -1, 3, 4])


def _gap(tmp_path):
    # GAP = (1/M) sum_i P(i) rel(i), M = 3 non-distractor queries: (1/1 + 2/3) / 3 = 5/9.
    compute = _metric_result(MET_LABELS, MET_PRED)
    run_serialization_test(_cls("GlobalAveragePrecision"), {}, compute, 5 / 9, tmp_path=tmp_path)


def _met_accuracy(tmp_path):
    # Two of the three non-distractor queries are right.
    compute = _metric_result(MET_LABELS, MET_PRED)
    run_serialization_test(_cls("MetAccuracy"), {}, compute, 2 / 3, tmp_path=tmp_path)


def _top_k(tmp_path):
    # Top-2 sets {1, 2}, {0, 1}, {2, 0}: labels 2 and 1 are in, label 1 of row 3 is not; the
    # fourth row has no label (-1) and is skipped -> 2/3.
    scores = np.array(
        [[0.1, 0.5, 0.4], [0.7, 0.2, 0.1], [0.35, 0.25, 0.4], [0.9, 0.05, 0.05]], np.float32
    )
    compute = _metric_result(np.array([2, 1, 1, -1]), scores)
    run_serialization_test(_cls("TopKAccuracy"), {"k": 2}, compute, 2 / 3, tmp_path=tmp_path)


def _contrastive_loss(tmp_path):
    # Positive pair at distance 1: 0.5 * 1^2; negative pair at distance 0.5 with margin 1:
    # 0.5 * (1 - 0.5)^2 = 0.125; the mean over the two pairs is 0.3125.
    y_pred = np.array([[[0, 0], [0.6, 0.8]], [[0, 0], [0.3, 0.4]]], np.float32)
    run_serialization_test(
        _cls("ContrastiveLoss"),
        {"margin": 1.0, "eps": 0.0},
        lambda loss: loss(np.array([1.0, 0.0]), y_pred),
        0.3125,
        tmp_path=tmp_path,
    )


def _masked_cross_entropy(tmp_path):
    # Rows 1 and 3 are labelled 0: -log(1/2) and -log(3/4) (logits (log 3, 0)); row 2 (-1) is
    # skipped. Mean = (log 2 + log 4/3) / 2 = log(8/3) / 2.
    logits = np.array([[0.0, 0.0], [5.0, 1.0], [math.log(3.0), 0.0]], np.float32)
    run_serialization_test(
        _cls("MaskedSparseCrossEntropy"),
        {},
        lambda loss: loss(np.array([0, -1, 0]), logits),
        math.log(8 / 3) / 2,
        tmp_path=tmp_path,
    )


def _torch_adam_steps(optimizer):
    variable = keras.Variable(1.0)
    for _ in range(2):
        optimizer.apply_gradients([(keras.ops.convert_to_tensor(0.5), variable)])
    return variable


def _torch_adam(tmp_path):
    # A constant gradient 0.5 gives m_hat = 0.5 and sqrt(v_hat) = 0.5 at every step, so each step
    # moves lr * 0.5 / (0.5 + epsilon) = 0.1 * 0.5 / 1.0 = 0.05: 1 -> 0.9 after two steps.
    # (Keras's Adam, epsilon outside the bias correction, would move ~0.003 per step.)
    run_serialization_test(
        _cls("TorchAdam"),
        {"learning_rate": 0.1, "epsilon": 0.5},
        _torch_adam_steps,
        0.9,
        tmp_path=tmp_path,
    )


def _token_pooling(tmp_path):
    # [class, register, patch, patch]: "cls" is the class token, "avg" the mean of the two patches
    # ((3 + 5) / 2, (5 + 9) / 2), the register left out.
    tokens = [[[1.0, 2.0], [100.0, 100.0], [3.0, 5.0], [5.0, 9.0]]]
    layer = _cls("TokenPooling")
    run_layer_test(layer, {"mode": "cls", "num_prefix_tokens": 2}, tokens, [[1.0, 2.0]])
    run_layer_test(
        layer, {"mode": "avg", "num_prefix_tokens": 2}, tokens, [[4.0, 7.0]], tmp_path=tmp_path
    )


def _vision_transformer(tmp_path):
    # The wrapper at the keras-hub model's own build size (no interpolation needed) gives the
    # keras-hub backbone's own output: an independent forward pass of the same weights.
    pytest.importorskip("transformers")
    from tests.kit import vit_models
    from tfmet import backbones

    vit_models.make_model("dinov2", tmp_path / "ckpt", image_size=28)
    model = backbones.get(f"hf:{tmp_path / 'ckpt'}")
    pixels = np.random.RandomState(0).randn(1, 28, 28, 3).astype(np.float32)
    expected = model.backbone(pixels).numpy()
    run_layer_test(
        _cls("VisionTransformer"),
        {"backbone": model.backbone, "interpolation": model.interpolation},
        pixels,
        expected,
        tmp_path=tmp_path,
        atol=1e-5,
    )


CASES = {
    "tfmet>GeMPooling2D": _gem,
    "tfmet>TokenPooling": _token_pooling,
    "tfmet>VisionTransformer": _vision_transformer,
    "tfmet>L2Normalize": _l2_normalize,
    "tfmet>Projector": _projector,
    "tfmet>GroupedConv2D": _grouped_conv,
    "tfmet>FoldedBatchNorm": _folded_batchnorm,
    "tfmet>HubModule": _hub_module,
    "tfmet>Embedder": _embedder,
    "tfmet>StyleHead": _style_head,
    "tfmet>StyleClassifier": _style_classifier,
    "tfmet>GlobalAveragePrecision": _gap,
    "tfmet>MetAccuracy": _met_accuracy,
    "tfmet>TopKAccuracy": _top_k,
    "tfmet>ContrastiveLoss": _contrastive_loss,
    "tfmet>MaskedSparseCrossEntropy": _masked_cross_entropy,
    "tfmet>TorchAdam": _torch_adam,
}


def test_every_registered_class_has_a_case():
    registered = _registered()
    missing = sorted(set(registered) - set(CASES))
    assert not missing, f"registered Keras classes without a case in {__name__}: {missing}"
    assert sorted(set(CASES) - set(registered)) == []


@pytest.mark.parametrize("name", sorted(CASES))
def test_registered_class(name, tmp_path):
    _registered()
    CASES[name](tmp_path)
