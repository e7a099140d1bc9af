"""How an answer reads: the confidence against the threshold with the decimals that tell them
apart (tfmet-recognize's lines, its HTML report, tfmet-serve's page), and bad uploads in words."""

import io
import json
import shutil
import subprocess

import pytest
from PIL import Image

from tfmet.serving import BadImage, check_image, html_report, page
from tfmet.serving.client import Answer, decimals

THRESHOLD = 0.11075950413942337  # a threshold as knn-eval chooses it: between two confidences


def _answer(confidence, accepted, met_id=42, valid=True):
    return Answer(met_id, confidence, accepted, valid, [(met_id, confidence), (7, 0.05)])


def test_decimals_tell_a_rejected_confidence_from_the_threshold():
    assert decimals(0.5, THRESHOLD) == 3
    assert decimals(THRESHOLD, THRESHOLD) == 3  # equal: accepted, and printed equal
    assert decimals(0.1107, THRESHOLD) == 4  # 0.111 and 0.111 at 3 decimals; 0.1107 < 0.1108
    assert decimals(0.110759, THRESHOLD) == 6  # 0.110759 < 0.110760
    assert decimals(0.1, 0.0) == 3


def test_answer_lines_say_the_threshold_and_a_rejected_photos_closest_exhibit():
    assert _answer(0.5, True).describe(THRESHOLD) == (
        "Met 42 (confidence 0.500, at or above the threshold 0.111)"
    )
    assert _answer(0.1107, False).describe(THRESHOLD) == (
        "not in the collection (confidence 0.1107, below the threshold 0.1108; closest: Met 42)"
    )
    assert _answer(0.3, True).describe(0.0) == (
        "Met 42 (confidence 0.300; no operating threshold: every photo is answered)"
    )
    assert _answer(0.0, False, met_id=-1, valid=False).describe(THRESHOLD) == (
        "not in the collection (the image could not be decoded)"
    )


def _jpeg():
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (120, 80, 40)).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_html_report_rounds_the_threshold_as_its_answers(tmp_path):
    rows = [("a.jpg", _jpeg(), _answer(0.5, True)), ("b.jpg", _jpeg(), _answer(0.1107, False))]
    path = tmp_path / "report.html"
    html_report.write_html(path, rows, None, THRESHOLD)
    text = path.read_text(encoding="utf-8")
    assert "<p>Operating threshold: 0.1108</p>" in text
    assert "0.11075950413942337" not in text
    assert "confidence 0.500, at or above the threshold 0.111</td>" in text
    assert "confidence 0.1107, below the threshold 0.1108; closest: Met 42</td>" in text
    html_report.write_html(path, rows[:1], None, None)
    assert "<p>Operating threshold: none (every photo is answered)</p>" in path.read_text()


@pytest.mark.skipif(not shutil.which("node"), reason="needs node")
def test_the_pages_decimals_are_the_pythons():
    pairs = [(0.5, THRESHOLD), (THRESHOLD, THRESHOLD), (0.1107, THRESHOLD), (0.110759, THRESHOLD),
             (0.1, 0.0), (0.87654, 0.8766), (0.2, 0.2000000001)]  # fmt: skip
    script = page.PAGE.split("<script>")[1].split("function confidenceWords")[0]
    script += f"console.log(JSON.stringify({json.dumps(pairs)}.map(p => decimals(p[0], p[1]))));"
    out = subprocess.run(["node", "-e", script], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [decimals(v, t) for v, t in pairs] == [3, 3, 4, 6, 3, 4, 10]


def test_the_page_shows_no_result_headings_before_an_upload():
    body = page.PAGE.split("<body>")[1].split("<script>")[0]
    assert '<div id="result" hidden>' in body and '<div id="closest" hidden><h3>' in body
    assert body.count("<h3>") == 1  # the only heading besides the title is the hidden one


def test_a_file_that_is_not_an_image_is_said_in_words():
    with pytest.raises(BadImage) as caught:
        check_image(b"this is not an image")
    expected = "not an image: not a JPEG, PNG, GIF, BMP, WEBP file that can be read"
    assert str(caught.value) == expected
