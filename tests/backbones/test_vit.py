"""DINOv2 / DINOv3 through keras-hub against the Hugging Face PyTorch models on the same pixels."""

import numpy as np
import pytest
import tensorflow as tf

from tests.kit import vit_models
from tfmet import backbones
from tfmet.backbones import vit
from tfmet.descriptors import MET_SCALES, DescriptorExtractor, Embedder
from tfmet.descriptors.resize import resize

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module", params=vit_models.KINDS)
def checkpoint(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    model = vit_models.make_model(request.param, directory)
    return request.param, str(directory), model


def _pixels(height, width, seed=0):
    return np.random.RandomState(seed).randn(2, height, width, 3).astype(np.float32)


def _cls_descriptor(model, pixels):
    tokens = vit_models.torch_tokens(model, pixels)
    return tokens[:, 0] / np.linalg.norm(tokens[:, 0], axis=1, keepdims=True)


@pytest.mark.parametrize("size", [(101, 77), (37, 29), (56, 56), (16, 100)])
def test_tokens_and_cls_descriptor_match_pytorch_at_odd_sizes(checkpoint, size):
    _, directory, model = checkpoint
    embedder = Embedder.from_registry("hf:" + directory)
    assert embedder.pooling == "cls"
    pixels = _pixels(*size)
    tokens = embedder.backbone(pixels).numpy()
    np.testing.assert_allclose(tokens, vit_models.torch_tokens(model, pixels), atol=1e-4)
    np.testing.assert_allclose(embedder(pixels).numpy(), _cls_descriptor(model, pixels), atol=1e-4)


def test_tokens_match_pytorch_at_every_met_scale(checkpoint):
    _, directory, model = checkpoint
    transformer = backbones.get("hf:" + directory)
    pixels = _pixels(123, 95, seed=1)
    for scale in MET_SCALES:
        ours = transformer(resize(pixels, scale)).numpy()
        nchw = torch.from_numpy(np.transpose(pixels, (0, 3, 1, 2)).copy())
        if scale != 1.0:
            nchw = torch.nn.functional.interpolate(
                nchw, scale_factor=scale, mode="bilinear", align_corners=False
            )
        theirs = vit_models.torch_tokens(model, np.transpose(nchw.numpy(), (0, 2, 3, 1)))
        np.testing.assert_allclose(ours, theirs, atol=1e-4, err_msg=f"scale {scale}")


def test_avg_pooling_is_the_mean_of_patch_tokens_without_registers(checkpoint):
    kind, directory, model = checkpoint
    embedder = Embedder.from_registry("hf:" + directory, pooling="avg")
    pixels = _pixels(45, 60, seed=2)
    tokens = vit_models.torch_tokens(model, pixels)
    prefix = 1 + (2 if kind != "dinov2" else 0)
    mean = tokens[:, prefix:].mean(axis=1)
    expected = mean / np.linalg.norm(mean, axis=1, keepdims=True)
    np.testing.assert_allclose(embedder(pixels).numpy(), expected, atol=1e-4)


def test_extractor_traces_once_for_many_sizes(checkpoint):
    _, directory, _ = checkpoint
    extractor = DescriptorExtractor(Embedder.from_registry("hf:" + directory))
    for height, width in [(60, 80), (33, 47), (101, 77), (64, 64)]:
        out = extractor(np.full((1, height, width, 3), 128.0, np.float32))
        assert out.shape == (1, 32)
    assert extractor.extract.experimental_get_tracing_count() == 1


def test_position_interpolation_weights_match_torch():
    grid = torch.arange(7 * 9, dtype=torch.float32).reshape(1, 1, 7, 9) ** 1.5
    for out in [(3, 4), (7, 9), (12, 5), (20, 31)]:
        for antialias in (False, True):
            expected = torch.nn.functional.interpolate(
                grid, size=out, mode="bicubic", align_corners=False, antialias=antialias
            )[0, 0].numpy()
            weights = vit.bicubic_antialias_weights if antialias else vit.bicubic_weights
            ours = tf.einsum(
                "hi,wj,ij->hw", weights(7, out[0]), weights(9, out[1]), grid[0, 0].numpy()
            )
            np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-5, atol=1e-3)


def test_shortcut_checks_the_directory_config(checkpoint):
    _, directory, _ = checkpoint
    with pytest.raises(ValueError, match="not a dinov2_vits14 checkpoint: .*hidden_size=32"):
        backbones.get("dinov2_vits14", weights=directory)


def test_embedder_with_a_vit_round_trips_through_a_keras_file(tmp_path):
    import keras

    vit_models.make_model("dinov3_vit", tmp_path / "ckpt")
    embedder = Embedder.from_registry(f"hf:{tmp_path / 'ckpt'}", pooling="avg", projector_dim=8)
    pixels = _pixels(40, 50, seed=3)
    expected = embedder(pixels).numpy()
    embedder.save(tmp_path / "embedder.keras")
    loaded = keras.saving.load_model(tmp_path / "embedder.keras")
    assert loaded.pooling == "avg" and loaded.pool.num_prefix_tokens == 3
    np.testing.assert_allclose(loaded(pixels).numpy(), expected, atol=1e-6)


def test_bfloat16_descriptors_are_float32_ones_up_to_rounding(checkpoint):
    """--precision=bfloat16 on a ViT: the whole multi-scale extraction traces and runs in
    bfloat16 (position embeddings interpolated in float32, then rounded); its descriptors are the
    float32 ones (those of the Hugging Face model, above) up to bfloat16's rounding."""
    from tfmet.backbones.precision import model_precision, set_precision

    _, directory, _ = checkpoint
    images = np.random.RandomState(5).uniform(0, 255, (1, 101, 77, 3)).astype(np.float32)
    descriptors = {}
    for precision in ("float32", "bfloat16"):
        embedder = Embedder.from_registry(f"hf:{directory}")
        set_precision(embedder.backbone, precision)
        assert model_precision(embedder.backbone) == precision
        descriptors[precision] = DescriptorExtractor(embedder).extract(images).numpy()[0]
    cosine = float(np.dot(descriptors["float32"], descriptors["bfloat16"]))
    assert descriptors["bfloat16"].dtype == np.float32
    assert 0.9999 < cosine < 1.0  # measured 0.999990-0.999997; 1.0 would be float32 again
