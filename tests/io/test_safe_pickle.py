import os
import pickle

import numpy as np
import pytest

from tfmet.io.safe_pickle import UnsafePickleError, load_reference_descriptors


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_reference_descriptors_load(tmp_path, protocol):
    rng = np.random.default_rng(0)
    data = {
        "train_descriptors": rng.normal(size=(5, 4)).astype(np.float32),
        "val_descriptors": rng.normal(size=(2, 4)).astype(np.float32),
        "test_descriptors": np.asfortranarray(rng.normal(size=(3, 4)).astype(np.float32)),
    }
    path = tmp_path / "descriptors.pkl"
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=protocol)
    loaded = load_reference_descriptors(path)
    assert sorted(loaded) == sorted(data)
    for key, value in data.items():
        np.testing.assert_array_equal(loaded[key], value)
        assert loaded[key].dtype == np.float32


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "descriptors.pkl"
    with open(path, "wb") as f:
        pickle.dump({"train_descriptors": _Exploit(marker)}, f)
    with pytest.raises(UnsafePickleError, match=r"descriptors.pkl.*refusing.*system"):
        load_reference_descriptors(path)
    assert not marker.exists()


def test_not_a_dict_of_arrays(tmp_path):
    path = tmp_path / "descriptors.pkl"
    with open(path, "wb") as f:
        pickle.dump({"train_descriptors": np.zeros(3, np.float32)}, f)
    with pytest.raises(ValueError, match="not a 2-D array"):
        load_reference_descriptors(path)
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable descriptors pickle"):
        load_reference_descriptors(path)
