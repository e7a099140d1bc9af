"""Gallery thumbnails: database images read as the extraction reads them, never blocking."""

import io
import os
import signal

import pytest
from PIL import Image

from tests.kit import bombs
from tests.kit.met_tree import write_met_tree
from tfmet.serving.gallery import Gallery


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
