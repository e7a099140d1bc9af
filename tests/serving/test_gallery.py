"""Gallery thumbnails: database images read as the extraction reads them, never blocking."""

import csv
import io
import json
import os
import signal

import pytest
from PIL import Image

from tests.kit import bombs
from tests.kit.met_tree import write_met_tree
from tfmet.serving import gallery as gallery_module
from tfmet.serving.gallery import Gallery, read_exhibit_names


@pytest.fixture
def alarm():
    """Fails a test that blocks (a FIFO opened for reading) instead of hanging the suite."""

    def stuck(signum, frame):
        raise AssertionError("blocked for 20 s")

    previous = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_thumbnails_of_good_and_bad_database_images(tmp_path, alarm, caplog):
    tree = write_met_tree(tmp_path, num_exhibits=5)
    ids = sorted({entry["id"] for entry in tree.train})
    gallery = Gallery(tree.info_dir, tree.image_root)
    first = {}
    for entry in tree.train:
        first.setdefault(entry["id"], tree.image_path(entry["path"]))
    good, fifo, bomb, broken, large = ids[:5]

    with Image.open(first[good]) as image:
        width, height = image.size
    thumbnail = Image.open(io.BytesIO(gallery.thumbnail(good, side=8)))
    assert thumbnail.format == "JPEG"
    scale = min(8 / width, 8 / height, 1.0)
    assert thumbnail.size == (round(width * scale), round(height * scale)) != (width, height)

    os.remove(first[fifo])
    os.mkfifo(first[fifo])
    bombs.write_png_bomb(first[bomb])
    with open(first[broken], "wb") as f:
        f.write(b"not an image")
    bombs.write_png_bomb(first[large], side=10000)  # within PIL's limit, over tfmet's
    for met_id in (fifo, bomb, broken, large):
        assert gallery.thumbnail(met_id) is None
    assert gallery.thumbnail(-1) is None  # not in the ground truth
    warnings = [r.getMessage() for r in caplog.records if "no thumbnail" in r.getMessage()]
    assert len(warnings) == 4
    assert f"{first[fifo]}: no thumbnail for Met id {fifo}: not a regular file (a FIFO)" in warnings
    assert "(400000000 pixels) exceeds limit" in warnings[1]  # PIL's own refusal, before decoding
    assert warnings[2].endswith(": not an image file PIL can read")
    assert warnings[3].endswith(  # PIL only warns (under twice its limit); tfmet refuses
        ": image declares 10000x10000 = 100.0 Mpx, over the limit of 89.5 Mpx"
    )


def test_exhibit_names_from_json_and_met_objects_csv(tmp_path):
    tree = write_met_tree(tmp_path / "met", num_exhibits=3)
    first, second, third = sorted({entry["id"] for entry in tree.train})
    table = tmp_path / "names.json"
    names = {str(first): " Astronaut ", str(second): "", "999999": "Elsewhere"}
    table.write_text(json.dumps(names))
    gallery = Gallery(tree.info_dir, tree.image_root, names=table)
    # Trimmed; an empty name and an id outside the database are dropped.
    assert [gallery.name(i) for i in (first, second, third, 999999)] == [
        "Astronaut", None, None, None,
    ]  # fmt: skip
    # The Met's Open Access table: a BOM, many columns, quoted titles; names cut to 200 chars.
    csv_file = tmp_path / "MetObjects.csv"
    rows = [
        ["Object Number", "Object ID", "Department", "Title"],
        ["1.2", str(first), "Arms", 'Helmet, "Burgonet"'],
        ["3.4", str(third), "Paintings", "x" * 500],
        ["5.6", "424242", "Drawings", "Not in this database"],
    ]
    with open(csv_file, "w", encoding="utf-8-sig", newline="") as f:
        csv.writer(f).writerows(rows)
    assert read_exhibit_names(csv_file, [first, second, third]) == {
        first: 'Helmet, "Burgonet"', third: "x" * 200,
    }  # fmt: skip


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("names.json", "[1, 2]", r"names.json: exhibit names must be a JSON object"),
        ("names.json", '{"abc": "x"}', r"names.json: 'abc' is not a Met id"),
        ("names.json", "{", r"names.json: not valid JSON"),
        ("names.csv", "id,name\n1,x\n", r"names.csv: a CSV of exhibit names needs the columns"),
        ("names.csv", b"Object ID,Title\n1,\xff\n", r"names.csv: not a readable CSV file"),
    ],
)
def test_bad_exhibit_names_files_name_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_exhibit_names(path, [1])


def test_exhibit_names_file_missing_fifo_or_oversized_json(tmp_path, monkeypatch, alarm):
    with pytest.raises(FileNotFoundError, match=r"missing.json: exhibit names file not found"):
        read_exhibit_names(tmp_path / "missing.json", [1])
    os.mkfifo(tmp_path / "fifo.csv")  # not a regular file: refused without opening it
    with pytest.raises(FileNotFoundError, match=r"fifo.csv: exhibit names file not found"):
        read_exhibit_names(tmp_path / "fifo.csv", [1])
    monkeypatch.setattr(gallery_module, "MAX_NAMES_JSON_BYTES", 16)
    (tmp_path / "big.json").write_text(json.dumps({"1": "a name longer than the limit"}))
    with pytest.raises(ValueError, match=r"big.json: a JSON exhibit names file may have at most"):
        read_exhibit_names(tmp_path / "big.json", [1])
