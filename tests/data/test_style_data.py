"""Style dataset loaders, stratified splits and the image pipeline, on generated datasets."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from tests.kit import style_data
from tfmet.data import style_datasets, style_images, style_splits


@pytest.fixture(scope="module")
def pandora(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("pandora"))
    truth = style_data.make_pandora18k(root, num_classes=3, artists=2, images_per_artist=3)
    return root, truth


def test_pandora_keeps_artists_and_duplicate_names(pandora):
    root, truth = pandora
    records = style_datasets.load_pandora18k(root)
    assert len(records) == 3 * 2 * 3 + 2
    assert records.class_names["style"] == list(style_data.MOVEMENTS[:3])
    assert records.class_names["artist"] == sorted({a for a in truth["artist"] if a})
    # Same file name under two artists: two distinct records.
    same_name = [p for p in records.paths if p.endswith("/painting_00.jpg")]
    assert len(same_name) == 6 and len(set(same_name)) == 6
    by_path = dict(
        zip(truth["paths"], zip(truth["style"], truth["artist"], strict=True), strict=True)
    )
    for i, path in enumerate(records.paths):
        movement, artist = by_path[path]
        assert records.class_names["style"][records.labels["style"][i]] == movement
        if artist:
            assert records.class_names["artist"][records.labels["artist"][i]] == artist
        else:  # loose image in the movement folder: no artist
            assert records.labels["artist"][i] == -1
            assert "/" not in path[len(movement) + 1 :]
    assert os.path.isfile(records.abspath(0))


def test_folders_plain_and_rasta_split_trees(tmp_path):
    plain = str(tmp_path / "plain")
    truth = style_data.make_folders(plain, num_classes=3, images_per_class=2)
    records = style_datasets.load_folders(plain)
    assert records.paths == truth["paths"]
    assert [records.class_names["style"][v] for v in records.labels["style"]] == truth["style"]
    assert records.splits is None

    rasta = tmp_path / "rasta"
    style_data.make_folders(str(rasta / "wikipaintings_train"), num_classes=2, images_per_class=3)
    style_data.make_folders(str(rasta / "wikipaintings_val"), num_classes=2, images_per_class=1)
    records = style_datasets.load_folders(str(rasta))
    assert {s: len(v) for s, v in records.splits.items()} == {"train": 6, "val": 2}
    assert all(records.paths[i].startswith("wikipaintings_val/") for i in records.splits["val"])


def test_wikipaintings_lists_with_classes_file_and_spaces(tmp_path):
    root = str(tmp_path)
    truth = style_data.make_wikipaintings(root, num_classes=3, per_split=(2, 1, 1))
    records = style_datasets.load_wikipaintings_lists(root)
    assert records.class_names["style"] == list(style_data.STYLES[:3])
    for split in ("train", "val", "test"):
        indices = records.splits[split]
        assert [records.paths[i] for i in indices] == truth[split]["paths"]
        names = [records.class_names["style"][records.labels["style"][i]] for i in indices]
        assert names == truth[split]["style"]
    assert " " in records.paths[0] and os.path.isfile(records.abspath(0))

    with open(os.path.join(root, "val.txt"), "a") as f:
        f.write("images/x.jpg 7\n")
    with pytest.raises(ValueError, match=r"val\.txt: label '7' is not a class index"):
        style_datasets.load_wikipaintings_lists(root)
    with open(os.path.join(root, "val.txt"), "w") as f:
        f.write("just_a_path\n")
    with pytest.raises(ValueError, match=r"val\.txt:1: expected 'path label'"):
        style_datasets.load_wikipaintings_lists(root)


def test_list_file_with_names_and_commas(tmp_path):
    (tmp_path / "train.csv").write_text("a/1.jpg,Baroque\na/2.jpg,Cubism\n")
    records = style_datasets.load_wikipaintings_lists(str(tmp_path))
    assert records.paths == ["a/1.jpg", "a/2.jpg"]
    assert records.class_names["style"] == ["Baroque", "Cubism"]
    assert list(records.splits) == ["train"]


def test_csv_multi_attribute_with_missing_values(tmp_path):
    root = str(tmp_path)
    truth = style_data.make_csv(root, num_classes=2, images_per_class=5)
    records = style_datasets.load_csv(os.path.join(root, "labels.csv"))
    assert records.attributes == ["style", "artist", "genre"]
    genre = records.labels["genre"]
    assert [g == "" for g in truth["genre"]] == list(genre == -1)
    assert records.class_names["genre"] == sorted({g for g in truth["genre"] if g})
    only = style_datasets.load_dataset("csv", root, attributes=["genre"])
    assert only.attributes == ["genre"]
    with pytest.raises(ValueError, match=r"no column\(s\) \['period'\]"):
        style_datasets.load_csv(os.path.join(root, "labels.csv"), attributes=["period"])
    with pytest.raises(ValueError, match="Unknown attribute"):
        style_datasets.load_dataset("csv", root, attributes=["period"])


def test_bad_roots_and_formats(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        style_datasets.load_pandora18k(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no images"):
        style_datasets.load_pandora18k(str(tmp_path))
    with pytest.raises(ValueError, match="Received: format='imagenet'"):
        style_datasets.load_dataset("imagenet", str(tmp_path))


def test_stratified_split_counts_by_hand():
    # class 0: 10 images -> 8/1/1; class 1: 7 images -> exact 5.6/0.7/0.7 -> floors 5/0/0 and
    # the 2 leftover images go to the largest remainders (val, test) -> 5/1/1; class 2: 1 -> train.
    labels = np.array([0] * 10 + [1] * 7 + [2])
    split = style_splits.stratified_split(labels, (0.8, 0.1, 0.1), seed=3)
    counts = {s: np.bincount(labels[v], minlength=3).tolist() for s, v in split.items()}
    assert counts == {"train": [8, 5, 1], "val": [1, 1, 0], "test": [1, 1, 0]}
    together = np.sort(np.concatenate(list(split.values())))
    np.testing.assert_array_equal(together, np.arange(len(labels)))
    again = style_splits.stratified_split(labels, (0.8, 0.1, 0.1), seed=3)
    assert all(np.array_equal(split[s], again[s]) for s in split)
    other = style_splits.stratified_split(labels, (0.8, 0.1, 0.1), seed=4)
    assert any(not np.array_equal(split[s], other[s]) for s in split)
    with pytest.raises(ValueError, match="summing to 1"):
        style_splits.stratified_split(labels, (0.8, 0.1, 0.2))


def test_split_file_round_trip_and_changed_dataset(pandora, tmp_path):
    root, _ = pandora
    records = style_datasets.load_pandora18k(root)
    path = str(tmp_path / "split.json")
    first = style_splits.load_or_create_split(records, path, (0.6, 0.2, 0.2), seed=0)
    with open(path) as f:
        stored = json.load(f)
    assert stored["stratify"] == "style" and stored["seed"] == 0
    assert sorted(stored["splits"]["val"]) == sorted(records.paths[i] for i in first["val"])
    # A different seed does not matter once the file exists: runs stay comparable.
    second = style_splits.load_or_create_split(records, path, (0.6, 0.2, 0.2), seed=99)
    assert all(np.array_equal(first[s], second[s]) for s in first)
    fewer = records.subset(np.arange(5))
    with pytest.raises(ValueError, match="the dataset changed"):
        style_splits.read_split(path, fewer)


def test_resize_eager_equals_dataset_map():
    image = tf.random.stateless_uniform([37, 23, 3], seed=(1, 2), maxval=255.0)
    eager = style_images.resize_image(image, 16).numpy()
    mapped = next(
        iter(tf.data.Dataset.from_tensors(image).map(lambda x: style_images.resize_image(x, 16)))
    )
    np.testing.assert_allclose(eager, mapped.numpy(), atol=1e-4)
    assert eager.shape == (16, 16, 3)


def test_image_dataset_skips_and_scan_reports_corrupt_files(tmp_path):
    root = str(tmp_path)
    truth = style_data.make_folders(root, num_classes=2, images_per_class=3, size=20)
    style_data.write_corrupt(os.path.join(root, truth["style"][0], "broken.jpg"))
    records = style_datasets.load_folders(root)
    paths = records.abspaths()
    bad = style_images.scan_images(paths)
    assert [(i, os.path.basename(p)) for i, p, _ in bad] == [
        (records.paths.index(f"{truth['style'][0]}/broken.jpg"), "broken.jpg")
    ]
    assert bad[0][2]  # a reason
    dataset = style_images.image_dataset(paths, records.labels, image_size=8, batch_size=4)
    images, labels = zip(*[(x.numpy(), y["style"].numpy()) for x, y in dataset], strict=True)
    images, labels = np.concatenate(images), np.concatenate(labels)
    keep = [i for i in range(len(paths)) if i != bad[0][0]]
    assert images.shape == (6, 8, 8, 3)
    np.testing.assert_array_equal(labels, records.labels["style"][keep])
    first = style_images.resize_image(
        tf.io.decode_jpeg(open(paths[keep[0]], "rb").read(), dct_method="INTEGER_ACCURATE"), 8
    )
    np.testing.assert_allclose(images[0], first.numpy(), atol=1e-3)
