"""TokenPooling: the class token or the mean of the patch tokens (registers excluded)."""

import numpy as np
import pytest

from tests.kit import assert_layer_round_trip
from tfmet.layers import TokenPooling

# [1, 4, 2]: class token, one register, two patches.
TOKENS = np.array([[[1.0, 2.0], [100.0, 100.0], [3.0, 5.0], [5.0, 9.0]]], np.float32)


def test_cls_and_avg_hand_checked(tmp_path):
    cls = assert_layer_round_trip(TokenPooling("cls", num_prefix_tokens=2), TOKENS, tmp_path)
    np.testing.assert_array_equal(cls, [[1.0, 2.0]])
    avg = assert_layer_round_trip(TokenPooling("avg", num_prefix_tokens=2), TOKENS, tmp_path)
    np.testing.assert_array_equal(avg, [[4.0, 7.0]])
    assert TokenPooling("avg").compute_output_shape((None, 9, 2)) == (None, 2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="`mode` must be one of"):
        TokenPooling("gem")
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        TokenPooling("avg", num_prefix_tokens=0)
