"""tfmet.export.collection: exhibits added to / removed from an export answer as a rebuild would.

A tiny Met tree (6 exhibits, resnet_tiny with random weights, raw descriptors) is extracted once;
the export of the whole database is the reference, the export without exhibits A and B is the
one changed.
"""

import json
import os
import shutil

import numpy as np
import pytest

from tests.kit.met_tree import write_met_tree
from tfmet.export import collection as lib

REMOVED = (1000 + 37 * 1, 1000 + 37 * 4)  # exhibits A and B of write_met_tree


def _export(root, tree, entries, name, searcher="exact"):
    """tfmet-export's recogniser export of the database `entries` (extracted here)."""
    from tfmet.descriptors import extraction
    from tfmet.descriptors import spec as spec_lib
    from tfmet.export import builders, metadata_signature, save_module

    info = os.path.join(root, f"info-{name}")
    shutil.copytree(tree.info_dir, info)
    with open(os.path.join(info, "MET_database.json"), "w") as f:
        json.dump(entries, f)
    extractor, spec = spec_lib.build_extractor(backbone="resnet_tiny", seed=1)
    desc = os.path.join(root, f"desc-{name}")
    splits = extraction.load_met_splits(info, splits=("train",))
    extraction.extract_met(extractor, spec, splits, tree.image_root, desc, progress=False)
    module, described = builders.build_recognizer(
        extractor, spec, desc, info, k=3, tau=5.0, raw=True, searcher=searcher, top_k=3
    )
    metadata = {"kind": "recognizer", **described}
    signatures = module.signatures()
    signatures["metadata"] = metadata_signature({"kind": "recognizer"})
    out = os.path.join(root, f"export-{name}")
    save_module(module, out, signatures, metadata)
    return out, info


def _answers(export, images):
    from tfmet.serving import Recognizer

    return Recognizer(export).recognize(images)


def _assert_same_answers(got, expected):
    assert [a.met_id for a in got] == [a.met_id for a in expected]
    assert [[m for m, _ in a.top] for a in got] == [[m for m, _ in a.top] for a in expected]
    np.testing.assert_allclose(
        [a.confidence for a in got], [a.confidence for a in expected], rtol=1e-5, atol=1e-6
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from tfmet.descriptors import spec as spec_lib

    root = str(tmp_path_factory.mktemp("collection"))
    tree = write_met_tree(os.path.join(root, "met"), num_exhibits=6, met_queries=6)
    full, _ = _export(root, tree, tree.train, "full")
    partial = [e for e in tree.train if e["id"] not in REMOVED]
    part, part_info = _export(root, tree, partial, "part")
    photos = [tree.image_path(e["path"]) for e in tree.test + tree.val]
    images = [open(p, "rb").read() for p in photos]
    extractor, spec = spec_lib.build_extractor(backbone="resnet_tiny", seed=1)
    return dict(
        root=root, tree=tree, full=full, part=part, part_info=part_info, images=images,
        extractor=extractor, spec=spec,
    )  # fmt: skip


def _add_removed(built, export, info_dir=None):
    collection = lib.open_collection(export, info_dir)
    lib.check_model(collection, built["spec"])
    for met_id in REMOVED:
        files = [
            built["tree"].image_path(e["path"]) for e in built["tree"].train if e["id"] == met_id
        ]
        collection = lib.add_images(collection, built["extractor"], met_id, files)
        change = {"action": "add", "met_id": met_id, "images": len(files)}
        lib.save_collection(collection, built["extractor"], export, change)
        collection = lib.open_collection(export)
    return collection


def test_adding_the_missing_exhibits_answers_as_the_whole_database(built, tmp_path):
    export = str(tmp_path / "export")
    shutil.copytree(built["part"], export)
    before = _answers(export, built["images"])
    collection = _add_removed(built, export, built["part_info"])
    assert collection.version == 2 and len(collection.labels) == len(built["tree"].train)
    expected = _answers(built["full"], built["images"])
    assert {a.met_id for a in expected} & set(REMOVED)  # the test photos need A or B
    _assert_same_answers(_answers(export, built["images"]), expected)
    with open(os.path.join(export, "assets", "MET_database.json")) as f:
        truth = json.load(f)
    assert sorted(map(json.dumps, truth)) == sorted(map(json.dumps, built["tree"].train))
    with open(os.path.join(export, "assets", "tfmet_metadata.json")) as f:
        record = json.load(f)["collection"]
    assert [c["met_id"] for c in record["changes"]] == list(REMOVED)

    for met_id in REMOVED:
        collection = lib.remove_rows(lib.open_collection(export), met_id=met_id)
        lib.save_collection(collection, built["extractor"], export, {"action": "remove"})
    _assert_same_answers(_answers(export, built["images"]), before)


def test_one_image_is_removed_by_its_path(built, tmp_path):
    collection = lib.open_collection(built["full"], os.path.join(built["tree"].info_dir))
    path = built["tree"].train[3]["path"]
    changed = lib.remove_rows(collection, image=path)
    assert len(changed.labels) == len(collection.labels) - 1
    assert path not in changed.paths.tolist()


def test_bad_changes_are_one_line_errors(built, tmp_path):
    from tfmet.descriptors import spec as spec_lib

    collection = lib.open_collection(built["full"])
    with pytest.raises(lib.CollectionError, match="Met id 4242: not in the collection"):
        lib.remove_rows(collection, met_id=4242)
    with pytest.raises(lib.CollectionError, match="MET/1/x.jpg: no such image"):
        lib.remove_rows(collection, image="MET/1/x.jpg")
    _, other = spec_lib.build_extractor(backbone="resnet_tiny", seed=2)
    with pytest.raises(lib.CollectionError, match="built with another model .weights_sha256"):
        lib.check_model(collection, other)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(lib.CollectionError, match=f"{broken}: does not decode"):
        lib.add_images(collection, built["extractor"], 7, [str(broken)])
    with pytest.raises(lib.CollectionError, match="info-part: its 8 database entries"):
        lib.open_collection(built["full"], built["part_info"])
    with lib.writer_lock(built["full"]):
        with pytest.raises(lib.CollectionError, match="another tfmet-collection is changing it"):
            with lib.writer_lock(built["full"]):
                pass
