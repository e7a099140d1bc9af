"""Met ground truth: reading the JSON splits, validation messages, safe path resolution."""

import json
import os

import numpy as np
import pytest

from tests.kit.met_tree import write_met_tree
from tfmet.data import met


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_met_tree(tmp_path_factory.mktemp("met"), num_exhibits=3, images_per_exhibit=2)


@pytest.mark.parametrize(
    ("split", "mini"), [("train", False), ("train", True), ("val", False), ("test", True)]
)
def test_load_split_matches_the_json(tree, split, mini):
    entries = tree.entries(split, mini)
    loaded = met.load_split(tree.info_dir, split, mini=mini)
    assert loaded.split == split
    assert loaded.paths == [e["path"] for e in entries]
    key = "id" if split == "train" else "MET_id"
    expected = np.array([e.get(key, -1) for e in entries], np.int64)
    assert loaded.labels.dtype == np.int64
    np.testing.assert_array_equal(loaded.labels, expected)
    assert len(loaded) == len(entries)
    name = {
        "train": "mini_MET_database.json" if mini else "MET_database.json",
        "val": "valset.json",
        "test": "testset.json",
    }[split]
    assert loaded.source == os.path.join(tree.info_dir, name)


def test_distractors_are_minus_one(tree):
    val = met.load_split(tree.info_dir, "val")
    # 3 Met queries then 2 + 2 distractors, as written by the tree helper.
    np.testing.assert_array_equal(val.is_distractor, [False] * 3 + [True] * 4)
    np.testing.assert_array_equal(val.labels[:3], [1000, 1037, 1074])


def test_mini_database_is_the_first_half_of_exhibits(tree):
    mini = met.load_split(tree.info_dir, "train", mini=True)
    np.testing.assert_array_equal(mini.labels, [1000, 1000])


def _write(tmp_path, name, obj):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


@pytest.mark.parametrize(
    ("split", "content", "message"),
    [
        ("train", {"id": 1, "path": "a.jpg"}, r"expected a JSON list"),
        ("train", "[{", r"not valid JSON"),
        ("train", [{"id": 1, "path": "a.jpg"}, 5], r"entry 1 must be an object"),
        ("train", [{"id": 1}], r"entry 0 has no 'path' key"),
        ("train", [{"id": 1, "path": "a.jpg"}, {"path": "b.jpg"}], r"entry 1 has no 'id' key"),
        ("train", [{"id": "7", "path": "a.jpg"}], r"entry 0 has 'id' '7'; expected a non-negative"),
        ("train", [{"id": True, "path": "a.jpg"}], r"entry 0 has 'id' True"),
        ("val", [{"path": "a.jpg", "MET_id": -3}], r"entry 0 has 'MET_id' -3"),
        ("val", [{"path": "a.jpg"}, {"path": 3}], r"entry 1: 'path' must be a non-empty string"),
        ("val", [{"path": ""}], r"entry 0: 'path' must be a non-empty string"),
        (
            "test",
            [{"path": "a.jpg"}, {"path": "b.jpg"}, {"path": "a.jpg"}],
            r"entry 2 repeats path 'a.jpg' of entry 0",
        ),
        ("test", [{"path": "../secret.jpg"}], r"entry 0: 'path' '../secret.jpg' escapes"),
        ("test", [{"path": "MET/../../x.jpg"}], r"entry 0: 'path' 'MET/../../x.jpg' escapes"),
        ("test", [{"path": "/etc/passwd"}], r"entry 0: 'path' '/etc/passwd' is absolute"),
        ("test", [{"path": "a\\..\\..\\b.jpg"}], r"entry 0: 'path' .* backslash"),
    ],
)
def test_invalid_files_name_file_entry_and_problem(tmp_path, split, content, message):
    name = {"train": "MET_database.json", "val": "valset.json", "test": "testset.json"}[split]
    path = _write(tmp_path, name, content)
    with pytest.raises(ValueError, match=message) as info:
        met.load_split(str(tmp_path), split)
    assert str(info.value).startswith(path)


def test_missing_file_and_bad_split(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"valset\.json"):
        met.load_split(str(tmp_path), "val")
    with pytest.raises(ValueError, match=r"`split` must be one of"):
        met.load_split(str(tmp_path), "database")


def test_resolve_image_path(tmp_path):
    root = str(tmp_path)
    assert met.resolve_image_path(root, "MET/1/0.jpg") == os.path.join(
        root, "images", "MET", "1", "0.jpg"
    )
    assert met.resolve_image_path(root, "MET/x/../1/0.jpg") == os.path.join(
        root, "images", "MET", "1", "0.jpg"
    )
    for bad in ("../x.jpg", "a/../../x.jpg", "/abs.jpg", "..", "", "."):
        with pytest.raises(ValueError):
            met.resolve_image_path(root, bad)


def test_image_paths_of_a_split(tree):
    split = met.load_split(tree.info_dir, "train")
    paths = met.image_paths(split, tree.image_root)
    assert paths[0] == tree.image_path(tree.train[0]["path"])
    assert all(os.path.isfile(p) for p in paths)
