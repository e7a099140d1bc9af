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


SCANN = dict(  # a tree searched whole: its answers are exact search's, its recall 1
    num_leaves=2, num_leaves_to_search=2, spherical=True, use_ah=False, training_sample_size=8
)


def _export(root, tree, entries, name, searcher="exact", scann_config=None):
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
        extractor, spec, desc, info, k=3, tau=5.0, raw=True, searcher=searcher, top_k=3,
        scann_config=scann_config,
    )  # fmt: skip
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
    scann, _ = _export(root, tree, partial, "scann", searcher="scann", scann_config=SCANN)
    photos = [tree.image_path(e["path"]) for e in tree.test + tree.val]
    images = [open(p, "rb").read() for p in photos]
    extractor, spec = spec_lib.build_extractor(backbone="resnet_tiny", seed=1)
    return dict(
        root=root, tree=tree, full=full, part=part, part_info=part_info, images=images,
        extractor=extractor, spec=spec, scann=scann,
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


def test_a_scann_tree_takes_the_exhibits_in_place_and_measures_its_recall(built, tmp_path):
    export = str(tmp_path / "scann")
    shutil.copytree(built["scann"], export)
    before = _answers(export, built["images"])
    collection = _add_removed(built, export, built["part_info"])
    assert collection.scann["datapoint_to_token"].shape == (len(built["tree"].train),)
    with open(os.path.join(export, "assets", "tfmet_metadata.json")) as f:
        metadata = json.load(f)
    record = metadata["collection"]
    assert (record["recall"], record["min_recall"], record["rebuilt"]) == (1.0, 0.999, False)
    assert metadata["scann_config"] == dict(built_config(), **SCANN)
    _assert_same_answers(
        _answers(export, built["images"]), _answers(built["full"], built["images"])
    )
    for met_id in REMOVED:
        collection = lib.remove_rows(lib.open_collection(export), met_id=met_id)
        lib.save_collection(collection, built["extractor"], export, {"action": "remove"})
    _assert_same_answers(_answers(export, built["images"]), before)


def built_config():
    from tfmet.retrieval.scann_build import ScannConfig

    return ScannConfig().to_dict()


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
    with pytest.raises(lib.CollectionError, match=f"{tmp_path}: not a regular file .a directory"):
        lib.add_images(collection, built["extractor"], 7, [str(tmp_path)])
    with pytest.raises(lib.CollectionError, match="missing.jpg: cannot read .No such file"):
        lib.add_images(collection, built["extractor"], 7, [str(tmp_path / "missing.jpg")])
    with pytest.raises(lib.CollectionError, match="info-part: its 8 database entries"):
        lib.open_collection(built["full"], built["part_info"])
    # A backend this module cannot change (its metadata read before anything is loaded).
    other_backend = tmp_path / "faiss_export"
    (other_backend / "assets").mkdir(parents=True)
    meta = {"kind": "recognizer", "searcher": "faiss"}
    (other_backend / "assets" / "tfmet_metadata.json").write_text(json.dumps(meta))
    with pytest.raises(lib.CollectionError, match="searching with 'faiss' cannot be changed in"):
        lib.open_collection(other_backend)
    with lib.writer_lock(built["full"]):
        with pytest.raises(lib.CollectionError, match="another tfmet-collection is changing it"):
            with lib.writer_lock(built["full"]):
                pass


def test_a_server_under_load_switches_to_the_new_version_without_a_failed_request(built, tmp_path):
    import concurrent.futures
    import threading
    import time

    from tests.serving.test_shedding import post, serving
    from tfmet.serving import Recognizer
    from tfmet.serving.web import Shedding, create_app

    export = str(tmp_path / "export")
    shutil.copytree(built["part"], export)
    old = [a.met_id for a in _answers(export, built["images"])]
    new = [a.met_id for a in _answers(built["full"], built["images"])]
    assert old != new  # the swap shows in the answers
    shedding = Shedding(concurrency=2, queue=32)
    reload = lambda: (Recognizer(export), None)  # noqa: E731
    app = create_app(Recognizer(export), shedding=shedding, reload=reload)
    swapped, stop = threading.Event(), threading.Event()
    done = []

    def client(offset):
        answers, after = [], 0
        for turn in range(2000):  # bounded: until a whole round of photos after the swap
            if stop.is_set():
                return answers
            i = (offset + turn) % len(built["images"])
            started_after = swapped.is_set()
            status, _, body = post(port, built["images"][i])
            answers.append((i, status, body.get("best_met_id"), started_after))
            done.append(1)
            after += started_after
            if after >= len(built["images"]):
                return answers
        pytest.fail("the client never finished a round after the swap")

    with serving(app, shedding) as port:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(client, offset) for offset in range(3)]
            try:
                for _ in range(60_000):  # bounded: 10 minutes
                    if len(done) >= 6:  # answers from the first version
                        break
                    time.sleep(0.01)
                _add_removed(built, export, built["part_info"])
                status, _, body = post_reload(port)
                swapped.set()
                results = [f.result(600) for f in futures]
            finally:
                stop.set()
    assert (status, body["version"], body["database_size"]) == (200, 2, len(built["tree"].train))
    answers = [a for r in results for a in r]
    assert len(done) >= 6 + 3 * len(built["images"])
    assert {status for _, status, _, _ in answers} == {200}
    for i, _, met_id, started_after in answers:  # in flight at the swap: either version
        assert met_id == new[i] if started_after else met_id in (old[i], new[i])


def post_reload(port):
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        connection.request("POST", "/v1/reload", b"")
        response = connection.getresponse()
        return response.status, None, json.loads(response.read())
    finally:
        connection.close()


@pytest.mark.slow  # the program in subprocesses
def test_the_program_lists_and_refuses_bad_changes_in_one_line(built):
    from tests.kit import run_cli

    listed = run_cli("collection", "list", f"--export={built['full']}")
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert listed.stdout.splitlines()[0].endswith(
        "version 0, 12 images of 6 exhibits, searcher exact"
    )
    model = ("--backbone=resnet_tiny", "--seed=1")
    unknown = run_cli("collection", "remove", f"--export={built['full']}", *model, "--met_id=4242")
    assert unknown.returncode == 2
    assert unknown.stderr.strip().splitlines()[-1] == (
        f"tfmet-collection: error: Met id 4242: not in the collection {built['full']}"
    )
    other = run_cli(
        "collection", "add", f"--export={built['full']}", "--backbone=resnet_tiny", "--seed=2",
        "--met_id=7", f"--images={built['tree'].image_path(built['tree'].train[0]['path'])}",
    )  # fmt: skip
    assert other.returncode == 2
    last = other.stderr.strip().splitlines()[-1]
    assert last.startswith(f"tfmet-collection: error: {built['full']}: the export was built with")
    assert "another model (weights_sha256 'random:seed=1'" in last
