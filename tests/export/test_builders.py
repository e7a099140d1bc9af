"""tfmet.export's builders: what the recogniser export takes from a knn-eval results file."""

import json

import pytest

from tfmet.export import builders


def _results(tmp_path, **entries):
    path = tmp_path / "knn_results.json"
    path.write_text(json.dumps(entries))
    return str(path)


def test_classifier_settings_take_the_file_then_explicit_values(tmp_path):
    path = _results(tmp_path, k=7, t=25.0, dim=64)
    assert builders.classifier_settings(path) == (7, 25.0, 64)
    assert builders.classifier_settings(path, k=3, tau=2.0, dim=32) == (3, 2.0, 32)


def test_a_raw_run_keeps_dim_none_and_no_file_keeps_the_default(tmp_path):
    assert builders.classifier_settings(_results(tmp_path, k=1, t=1.0, dim=None))[2] is None
    assert builders.classifier_settings(k=5, tau=10.0) == (5, 10.0, 512)


def test_classifier_settings_errors_name_the_parameter_or_the_file(tmp_path):
    with pytest.raises(ValueError, match="needs `k` and `tau`, or `results_json`"):
        builders.classifier_settings(k=5)
    bad = _results(tmp_path, gap=0.5)
    with pytest.raises(ValueError, match=f"{bad}: not a tfmet-knn-eval results file"):
        builders.classifier_settings(bad)


def test_whitening_none_for_raw_or_nothing_to_fit():
    assert builders.whitening(raw=True, pca="x.npz") is None
    assert builders.whitening() is None
