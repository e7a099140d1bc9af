"""The test kit itself: its checks can fail, and unmarked tests cannot start subprocesses."""

import sys

import numpy as np
import pytest

from tests.kit import numpy_gem, run_command, run_layer_test
from tfmet.layers import L2Normalize


def test_unmarked_test_cannot_start_a_python_subprocess():
    with pytest.raises(RuntimeError, match="mark it @pytest.mark.slow"):
        run_command([sys.executable, "-c", "pass"])


def test_run_layer_test_fails_on_a_wrong_hand_value(tmp_path):
    with pytest.raises(AssertionError, match="hand-checked value"):
        run_layer_test(L2Normalize, {}, [[3.0, 4.0]], [[0.8, 0.6]], tmp_path=tmp_path)


def test_run_layer_test_checks_the_compute_output_shape_flag(tmp_path):
    with pytest.raises(AssertionError, match="implements compute_output_shape: True"):
        run_layer_test(L2Normalize, {}, [[3.0, 4.0]], has_compute_output_shape=False)


def test_numpy_gem_by_hand():
    # One channel holding 1 and 2: ((1 + 8) / 2)^(1/3); unnormalised, then L2 of (a, 2).
    features = np.array([[[[1.0, 2.0], [2.0, 2.0]]]])
    a = 4.5 ** (1 / 3)
    np.testing.assert_allclose(numpy_gem(features, normalize=False), [[a, 2.0]], rtol=1e-12)
    np.testing.assert_allclose(numpy_gem(features), [[a, 2.0]] / np.hypot(a, 2.0), rtol=1e-12)
