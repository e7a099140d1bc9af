"""The test kit itself: its checks can fail, and unmarked tests cannot start subprocesses."""

import ast
import pathlib
import sys

import numpy as np
import pytest

from tests.conftest import DEMO_RUN_FILES, scheduling_scope
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


def test_the_demo_run_journeys_share_one_worker():
    # Every test file taking the session fixture `demo_run` is listed, so that the demo is not
    # run again on a second worker; the rest are scheduled file by file.
    root = pathlib.Path(__file__).resolve().parent.parent
    takers = set()
    for path in sorted(root.glob("tests/**/test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and "demo_run" in [a.arg for a in node.args.args]:
                takers.add(path.relative_to(root).as_posix())
    assert takers == set(DEMO_RUN_FILES)
    assert scheduling_scope("tests/journeys/test_met_journey.py::test_a[x]") == "demo_run"
    assert scheduling_scope("tests/journeys/test_collection_journey.py::test_b") == "demo_run"
    assert scheduling_scope("tests/journeys/test_style_journey.py::test_c") == (
        "tests/journeys/test_style_journey.py"
    )
