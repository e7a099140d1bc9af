import json
import os

import numpy as np
import pytest

from tfmet.data.descriptor_store import array_path, manifest_path, read_store, write_store


def test_write_then_read_round_trip(tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    write_store(tmp_path, "val", x, valid=[True, False, True, True], backbone="resnet18")
    store = read_store(tmp_path, "val")
    np.testing.assert_array_equal(store.descriptors, x)
    assert isinstance(store.descriptors, np.memmap)
    assert store.valid.tolist() == [True, False, True, True]
    assert store.manifest["backbone"] == "resnet18" and store.count == 4 and store.dim == 3
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="test_manifest.json"):
        read_store(tmp_path, "test")
    write_store(tmp_path, "test", np.zeros((2, 3), np.float32))
    with open(manifest_path(tmp_path, "test")) as f:
        manifest = json.load(f)
    manifest["count"], manifest["valid"] = 5, [True] * 5  # consistent, but not the array's
    with open(manifest_path(tmp_path, "test"), "w") as f:
        json.dump(manifest, f)
    with pytest.raises(ValueError, match=r"test_descriptors.npy.*manifest says"):
        read_store(tmp_path, "test")
    os.remove(array_path(tmp_path, "test"))
    with pytest.raises(FileNotFoundError, match="descriptor array missing"):
        read_store(tmp_path, "test")
    with open(manifest_path(tmp_path, "test"), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_store(tmp_path, "test")


def test_failed_write_keeps_previous_store(tmp_path):
    write_store(tmp_path, "train", np.ones((2, 2), np.float32))
    with pytest.raises(ValueError, match="valid must have shape"):
        write_store(tmp_path, "train", np.zeros((3, 2), np.float32), valid=[True])
    np.testing.assert_array_equal(read_store(tmp_path, "train").descriptors, np.ones((2, 2)))
