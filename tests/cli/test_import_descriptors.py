"""Importing the reference descriptors.pkl: values, ground-truth checks, malicious pickles."""

import os
import pickle

import numpy as np
import pytest

from tests.kit import cli as kit_cli
from tests.kit.met_tree import write_met_tree
from tfmet.data import descriptor_store as store
from tfmet.io.safe_pickle import UnsafePickleError


class _Exploit:
    """Unpickling this runs `touch <marker>` -- unless the unpickler refuses it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _reference_pickle(path, arrays):
    with open(path, "wb") as f:
        pickle.dump(arrays, f)
    return str(path)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_met_tree(tmp_path_factory.mktemp("met"), num_exhibits=4, images_per_exhibit=1)


def _arrays(rng, train_rows):
    return {
        "train_descriptors": rng.standard_normal((train_rows, 6)).astype(np.float32),
        "val_descriptors": rng.standard_normal((7, 6)).astype(np.float32),
        "test_descriptors": rng.standard_normal((7, 6)).astype(np.float32),
    }


def test_import_round_trip_with_ground_truth(tree, tmp_path):
    arrays = _arrays(np.random.default_rng(0), train_rows=2)  # the mini database has 2 rows
    arrays["val_descriptors"][3, 1] = np.nan
    path = _reference_pickle(tmp_path / "descriptors.pkl", arrays)
    manifests = store.import_reference_descriptors(
        path, tmp_path / "out", info_dir=tree.info_dir, backbone="r18INgem"
    )
    assert sorted(manifests) == ["test", "train", "val"]
    for split in ("train", "test"):
        loaded = store.read_store(tmp_path / "out", split)
        np.testing.assert_array_equal(loaded.descriptors, arrays[f"{split}_descriptors"])
        assert loaded.valid.all()
    train = store.read_store(tmp_path / "out", "train").manifest
    assert train["source"].endswith("mini_MET_database.json")
    assert train["paths"] == [e["path"] for e in tree.mini] and train["backbone"] == "r18INgem"
    val = store.read_store(tmp_path / "out", "val")
    assert val.valid.tolist() == [True] * 3 + [False] + [True] * 3
    np.testing.assert_array_equal(val.descriptors[3], 0.0)
    assert val.manifest["labels"][:3] == [1000, 1037, 1074]
    with pytest.raises(ValueError, match="exists; pass overwrite=True"):
        store.import_reference_descriptors(path, tmp_path / "out")


def test_row_count_must_match_the_ground_truth(tree, tmp_path):
    path = _reference_pickle(tmp_path / "d.pkl", _arrays(np.random.default_rng(1), train_rows=3))
    with pytest.raises(
        ValueError,
        match=r"d\.pkl: train_descriptors has 3 rows but "
        r"MET_database\.json has 4, mini_MET_database\.json has 2",
    ):
        store.import_reference_descriptors(path, tmp_path / "out", info_dir=tree.info_dir)


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = _reference_pickle(tmp_path / "evil.pkl", {"train_descriptors": _Exploit(marker)})
    with pytest.raises(
        UnsafePickleError, match=r"evil\.pkl: refusing to load global 'posix\.system'"
    ):
        store.import_reference_descriptors(path, tmp_path / "out")
    assert not marker.exists()
    assert not store.has_store(tmp_path / "out", "train")


def _cli(*flags):
    return kit_cli.run_cli("import_descriptors", *flags, timeout=300)


@pytest.mark.slow
def test_cli_imports_and_refuses_malicious_files(tree, tmp_path):
    arrays = _arrays(np.random.default_rng(2), train_rows=4)  # the full database has 4 rows
    good = _reference_pickle(tmp_path / "descriptors.pkl", arrays)
    done = _cli(
        f"--descriptors={good}", f"--output_dir={tmp_path / 'out'}", f"--info_dir={tree.info_dir}"
    )
    assert done.returncode == 0, done.stderr
    loaded = store.read_store(tmp_path / "out", "train")
    np.testing.assert_array_equal(loaded.descriptors, arrays["train_descriptors"])
    assert loaded.manifest["source"].endswith(os.sep + "MET_database.json")

    marker = tmp_path / "pwned"
    evil = _reference_pickle(tmp_path / "evil.pkl", {"val_descriptors": _Exploit(marker)})
    done = _cli(f"--descriptors={evil}", f"--output_dir={tmp_path / 'out2'}")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"tfmet-import-descriptors: error: {evil}: refusing to load global 'posix.system': "
        "only numpy arrays and plain containers are allowed in this file"
    ]
    assert not marker.exists()
