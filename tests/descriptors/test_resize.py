"""The torch-compatible resize against an independent numpy transcription of PyTorch's rule."""

import math

import numpy as np
import pytest
import tensorflow as tf

from tests.kit.references import numpy_torch_bilinear
from tfmet.descriptors.resize import resize, tf_bilinear_resize, torch_bilinear_resize


@pytest.mark.parametrize("height,width", [(37, 29), (101, 77)])
@pytest.mark.parametrize("scale", [1.0, 1 / math.sqrt(2), 0.5])
def test_torch_resize_matches_numpy(height, width, scale):
    image = np.random.default_rng(height).normal(size=(height, width, 3)).astype(np.float32)
    expected = numpy_torch_bilinear(image, scale)
    out = torch_bilinear_resize(image[None], scale).numpy()[0]
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_output_sizes_are_floor_of_scaled_size():
    x = tf.zeros((1, 101, 77, 3))
    assert torch_bilinear_resize(x, 1 / math.sqrt(2)).shape == (1, 71, 54, 3)
    assert torch_bilinear_resize(x, 0.5).shape == (1, 50, 38, 3)
    assert tf_bilinear_resize(x, 0.5).shape == (1, 50, 38, 3)


def test_resize_inside_tf_function_and_dataset_map():
    image = np.random.default_rng(3).normal(size=(37, 29, 3)).astype(np.float32)
    expected = numpy_torch_bilinear(image, 0.5)
    fn = tf.function(
        lambda x: torch_bilinear_resize(x, 0.5),
        input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)],
    )
    np.testing.assert_allclose(fn(image[None]).numpy()[0], expected, atol=1e-5)
    other = np.ones((1, 20, 30, 3), np.float32)
    np.testing.assert_allclose(fn(other).numpy(), np.ones((1, 10, 15, 3)), atol=1e-6)
    assert fn.experimental_get_tracing_count() == 1
    ds = tf.data.Dataset.from_tensors(image).map(lambda x: torch_bilinear_resize(x[None], 0.5)[0])
    np.testing.assert_allclose(next(iter(ds)).numpy(), expected, atol=1e-5)


def test_tf_method_is_close_but_not_identical():
    image = np.random.default_rng(4).normal(size=(1, 37, 29, 3)).astype(np.float32)
    torch_out = resize(image, 1 / math.sqrt(2), "torch").numpy()
    tf_out = resize(image, 1 / math.sqrt(2), "tf").numpy()
    assert torch_out.shape == tf_out.shape
    assert np.abs(torch_out - tf_out).max() > 1e-3


def test_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        resize(np.zeros((1, 4, 4, 3), np.float32), 0.5, "nearest")
    with pytest.raises(ValueError, match="scale"):
        torch_bilinear_resize(np.zeros((1, 4, 4, 3), np.float32), 0.0)
