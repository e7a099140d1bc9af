"""The living-collection journey with the real embedded model, on the demo's recogniser.

The demo (EfficientNet-Lite0, its packaged ImageNet weights) prints the tfmet-export that makes
its recogniser; a copy of that export is changed with tfmet-collection as docs/collection.md
says, the model flags being the printed export's (`--backbone efficientnet_lite0 --weights
imagenet`):
- `remove --met_id` of an exhibit a test photo is recognised as: the photo is no longer
  answered with it, no photo has it among its candidates, and the export's ground truth lacks
  its rows;
- `add` of that exhibit's own image files back: every test photo is answered as by the export
  the demo printed (exact search: the same Met id, acceptance and candidates, the confidences
  and scores to float rounding, the new rows being described by the export's own pipeline);
- `list` prints the version, the exhibit and its images, and the two changes.
"""

import json
import os
import shlex
import shutil
import sys

import numpy as np
import pytest

from tests.kit import run_cli, run_command

pytestmark = pytest.mark.slow
BIN = os.path.dirname(sys.executable)
# tfmet-export's flags that are not the model's (the rest of the printed line is the model).
EXPORT_ONLY = ("--kind", "--out", "--descriptor_dir", "--info_dir", "--results_json")


def _printed_export(stdout):
    lines = [line.strip() for line in stdout.splitlines()]
    found = [shlex.split(line) for line in lines if line.startswith("tfmet-export ")]
    assert len(found) == 1, f"the demo printed {len(found)} tfmet-export lines:\n{stdout[-3000:]}"
    return found[0]


def _model_flags(export):
    """The printed tfmet-export's model flags (what tfmet-collection takes as they are)."""
    model, words = [], iter(export[1:])
    for word in words:
        if word in EXPORT_ONLY:
            next(words)
        else:
            model.append(word)
    return model


def _answers(export, photos):
    from tfmet.serving import Recognizer

    return Recognizer(export).recognize([open(p, "rb").read() for p in photos])


def _collection(*args):
    args = [str(a) for a in args]
    result = run_cli("collection", *args)
    assert result.returncode == 0, f"tfmet-collection {shlex.join(args)}:\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def journey(demo_run, tmp_path_factory):
    """The demo's recogniser export (the printed line's folder when another journey made it,
    else made here by the printed command into this module's folder), its answers on every test
    photo, and the exhibit removed: the one with the most database images among those a test
    photo is recognised as."""
    _, stdout = demo_run
    export = _printed_export(stdout)
    model = _model_flags(export)
    assert model[:4] == ["--backbone", "efficientnet_lite0", "--weights", "imagenet"], export
    root = tmp_path_factory.mktemp("collection_journey")
    original = export[export.index("--out") + 1]
    if not os.path.exists(os.path.join(original, "saved_model.pb")):
        original = str(root / "original")
        argv = [*export]
        argv[argv.index("--out") + 1] = original
        result = run_command([os.path.join(BIN, argv[0]), *argv[1:]], timeout=600)
        assert result.returncode == 0, f"{shlex.join(argv)}:\n{result.stderr[-3000:]}"
    info_dir = export[export.index("--info_dir") + 1]
    image_root = os.path.dirname(info_dir)  # the demo's benchmark: info/ beside images/
    read = lambda name: json.load(open(os.path.join(info_dir, name), encoding="utf-8"))  # noqa: E731
    test, database = read("testset.json"), read("MET_database.json")
    photos = [os.path.join(image_root, "images", q["path"]) for q in test]
    answers = _answers(original, photos)
    counts = {i: sum(e["id"] == i for e in database) for i in {e["id"] for e in database}}
    right = [
        row
        for row, (q, a) in enumerate(zip(test, answers, strict=True))
        if "MET_id" in q and a.accepted and a.met_id == q["MET_id"]
    ]
    photo = max(right, key=lambda row: (counts[test[row]["MET_id"]], -row))
    met_id = test[photo]["MET_id"]
    changed = str(root / "export")
    shutil.copytree(original, changed)
    return dict(
        model=model, info_dir=info_dir, image_root=image_root, test=test, database=database,
        photos=photos, answers=answers, export=changed, met_id=met_id, photo=photo,
        images=[os.path.join(image_root, "images", e["path"]) for e in database
                if e["id"] == met_id],
    )  # fmt: skip


@pytest.fixture(scope="module")
def removed(journey):
    """`tfmet-collection remove --met_id` (the export's first change: with --info_dir)."""
    j = journey
    stdout = _collection(
        "remove", "--export", j["export"], *j["model"], "--met_id", j["met_id"],
        "--info_dir", j["info_dir"],
    )  # fmt: skip
    with open(os.path.join(j["export"], "assets", "MET_database.json"), encoding="utf-8") as f:
        truth = json.load(f)
    return dict(stdout=stdout, truth=truth, answers=_answers(j["export"], j["photos"]))


@pytest.fixture(scope="module")
def added(journey, removed):
    """`tfmet-collection add` of the removed exhibit's own image files (after `removed`)."""
    j = journey
    stdout = _collection(
        "add", "--export", j["export"], *j["model"], "--met_id", j["met_id"],
        "--images", ",".join(j["images"]),
    )  # fmt: skip
    return dict(stdout=stdout, answers=_answers(j["export"], j["photos"]))


def test_a_removed_exhibit_is_no_longer_the_answer(journey, removed):
    j, met_id = journey, journey["met_id"]
    rows, exhibits = len(j["database"]), len({e["id"] for e in j["database"]})
    assert removed["stdout"].splitlines()[-1] == (
        f"tfmet-collection: wrote version 1 to {j['export']} ({rows - len(j['images'])} images "
        f"of {exhibits - 1} exhibits)"
    )
    assert removed["truth"] == [e for e in j["database"] if e["id"] != met_id]
    before, after = j["answers"][j["photo"]], removed["answers"][j["photo"]]
    assert before.accepted and before.met_id == met_id == j["test"][j["photo"]]["MET_id"]
    assert after.valid and after.met_id != met_id
    for answer in removed["answers"]:
        assert met_id not in [m for m, _ in answer.top]
    # An exhibit scores its nearest row among the k neighbours (tfmet.retrieval.knn): with every
    # remaining row a neighbour, the photo's candidates are the other ones, in their order.
    with open(os.path.join(j["export"], "assets", "tfmet_metadata.json"), encoding="utf-8") as f:
        assert json.load(f)["k"] >= rows - len(j["images"])
    others = [m for m, _ in before.top if m != met_id]
    assert after.met_id == others[0]
    assert [m for m, _ in after.top][: len(others)] == others


def test_the_exhibit_added_back_answers_as_the_demos_export(journey, added):
    j = journey
    rows, exhibits = len(j["database"]), len({e["id"] for e in j["database"]})
    assert added["stdout"].splitlines()[-1] == (
        f"tfmet-collection: wrote version 2 to {j['export']} ({rows} images of {exhibits} exhibits)"
    )
    got, expected = added["answers"], j["answers"]
    assert len(got) == len(expected) == len(j["test"])
    assert [(a.met_id, a.accepted, a.valid) for a in got] == [
        (a.met_id, a.accepted, a.valid) for a in expected
    ]
    assert [[m for m, _ in a.top] for a in got] == [[m for m, _ in a.top] for a in expected]
    # The rows added back are described by the export's own pipeline, tfmet-extract's by its
    # batched one: the same numbers to float rounding (measured: 3e-8).
    np.testing.assert_allclose(
        [a.confidence for a in got], [a.confidence for a in expected], rtol=0, atol=1e-6
    )
    np.testing.assert_allclose(
        [s for a in got for _, s in a.top], [s for a in expected for _, s in a.top],
        rtol=0, atol=1e-6,
    )  # fmt: skip
    assert got[j["photo"]].met_id == j["met_id"] and got[j["photo"]].accepted


def test_list_prints_the_exhibit_and_the_changes(journey, added):
    j, met_id = journey, journey["met_id"]
    rows, exhibits = len(j["database"]), len({e["id"] for e in j["database"]})
    lines = _collection("list", "--export", j["export"]).splitlines()
    assert (
        lines[0]
        == f"{j['export']}: version 2, {rows} images of {exhibits} exhibits, searcher exact"
    )
    changes = [json.loads(line.removeprefix("  change: ")) for line in lines if "change:" in line]
    n = len(j["images"])
    assert changes == [
        {"action": "remove", "met_id": met_id, "image": None, "images": n},
        {"action": "add", "met_id": met_id, "images": n},
    ]
    assert f"  {met_id}\t{n} images" in lines
    counted = [line for line in lines[1:] if "change:" not in line]
    assert len(counted) == exhibits
    lines = _collection("list", "--export", j["export"], "--met_id", met_id).splitlines()
    assert [line for line in lines if line.startswith(f"  {met_id}\t")] == [
        f"  {met_id}\t{e['path']}" for e in j["database"] if e["id"] == met_id
    ]
