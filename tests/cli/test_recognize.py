"""Answering photos: the export's `accepted`, tfmet-recognize, and tfmet-serve's web application.

One tiny recogniser (resnet_tiny, random weights, a small demo benchmark, threshold chosen on val
by max F1) is built once for the module, in process.
"""

import base64
import concurrent.futures
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import urllib.request
import zlib

import numpy as np
import pytest
from PIL import Image

from tests.kit import run_cli
from tests.kit.met_tree import small_benchmark_config
from tests.kit.web import free_port, headless_chromium, needs_chromium, wait_until_serving
from tfmet.data import met
from tfmet.demo import benchmark

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
CONFIG = small_benchmark_config(5, ("chelsea", "coffee", "astronaut", "coins_left", "colorwheel"))


def _build_export(root):
    from tfmet.descriptors import extraction
    from tfmet.descriptors import spec as spec_lib
    from tfmet.export import RecognizerModule, metadata_signature, save_module
    from tfmet.retrieval import evaluation

    bench = benchmark.build_benchmark(os.path.join(root, "bench"), CONFIG, progress=False)
    extractor, spec = spec_lib.build_extractor(backbone="resnet_tiny", seed=1)
    splits = extraction.load_met_splits(bench.info_dir)
    desc = os.path.join(root, "desc")
    extraction.extract_met(extractor, spec, splits, bench.image_root, desc, progress=False)
    data = evaluation.load_met_descriptors(desc, bench.info_dir)
    result = evaluation.knn_eval(data, raw=True, autotune=True, ks=(3,), taus=(2.0, 5.0, 20.0))
    train = data["train"]
    module = RecognizerModule(
        extractor.embedder,
        train.valid_descriptors(),
        train.labels[train.valid],
        k=result.k,
        tau=result.tau,
        threshold=result.threshold["value"],
        top_k=3,
        scales=spec.scales,
        resize_method=spec.resize_method,
        max_side=spec.max_side,
    )
    metadata = {"kind": "recognizer", "threshold": module.threshold, "threshold_rule": "max_f1"}
    signatures = module.signatures()
    signatures["metadata"] = metadata_signature(metadata)
    out = os.path.join(root, "export")
    save_module(module, out, signatures, metadata)
    return bench, out, result


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from tfmet.serving import Recognizer

    bench, export, result = _build_export(str(tmp_path_factory.mktemp("recognize")))
    test = met.load_split(bench.info_dir, "test")
    photos = met.image_paths(test, bench.image_root)
    recognizer = Recognizer(export)
    images = [open(p, "rb").read() for p in photos]
    answers = recognizer.recognize(images)
    return dict(
        bench=bench, export=export, result=result, photos=photos, images=images, labels=test.labels,
        answers=answers, recognizer=recognizer, threshold=recognizer.threshold,
    )  # fmt: skip


def test_accepted_is_confidence_at_least_threshold(built):
    import tensorflow as tf

    served = tf.saved_model.load(built["export"]).signatures["serving_default"]
    out = served(image_bytes=tf.constant(built["images"] + [b"not an image"]))
    threshold = np.float32(built["result"].threshold["value"])
    conf, accepted, valid = (out[n].numpy() for n in ("confidence", "accepted", "valid"))
    assert valid.tolist() == [True] * len(built["images"]) + [False]
    np.testing.assert_array_equal(accepted, valid & (conf >= threshold))
    # The threshold separates something on this benchmark: both outcomes occur among the photos.
    assert built["recognizer"].threshold == pytest.approx(float(threshold))
    assert all(a.accepted == (a.confidence >= threshold) for a in built["answers"])
    for a in built["answers"]:
        assert a.label == (f"Met {a.met_id}" if a.accepted else "not in the collection")


@pytest.mark.slow
def test_recognize_cli_answers_equal_the_exports(built, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, path in enumerate(built["photos"]):
        shutil.copy(path, folder / f"{i:02d}.jpg")
    (folder / "zz_broken.jpg").write_bytes(b"this is not a jpeg")
    bench = built["bench"]
    html = tmp_path / "report.html"
    done = run_cli(
        "recognize", f"--model={built['export']}", "--json", f"--info_dir={bench.info_dir}",
        f"--image_root={bench.image_root}", f"--html={html}", "--noprogress", str(folder),
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]  # every photo answered, one file skipped
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(records) == len(built["answers"])
    train = met.load_split(bench.info_dir, "train")
    database = {}
    for label, path in zip(train.labels.tolist(), train.paths, strict=True):
        database.setdefault(label, path)
    for record, answer in zip(records, built["answers"], strict=True):
        assert record["answer"] == answer.label
        assert record["confidence"] == pytest.approx(answer.confidence, abs=1e-6)
        assert [m["met_id"] for m in record["top_k"]] == [m for m, _ in answer.top]
        expected_path = database.get(answer.met_id) if answer.accepted else None
        assert record["database_image"] == expected_path
        assert record["threshold"] == built["threshold"]
    assert done.stderr.splitlines()[0] == (
        f"tfmet-recognize: skipped {folder / 'zz_broken.jpg'}: not an image: not a JPEG, PNG, "
        "GIF, BMP, WEBP file that can be read"
    )
    page = html.read_text()
    assert page.count("<tr>") == len(records) + 1 and "data:image/jpeg;base64," in page

    # Plain lines: the answer, its confidence against the threshold (and the closest exhibit of a
    # rejected photo). A missing path is reported like a non-image; the others are answered.
    missing = tmp_path / "missing.jpg"
    first, answer = str(built["photos"][0]), built["answers"][0]
    text = run_cli("recognize", f"--model={built['export']}", str(missing), first)
    assert text.returncode == 2
    skipped = f"tfmet-recognize: skipped {missing}: no such file or folder"
    assert text.stderr.splitlines() == [skipped]
    assert text.stdout.splitlines()[0] == f"{first}: {answer.describe(built['threshold'])}"
    bad = run_cli("recognize", f"--model={built['export']}", str(missing))
    assert bad.returncode == 2
    assert bad.stderr.splitlines() == [skipped, "tfmet-recognize: error: no photo could be read"]


@pytest.fixture(scope="module")
def client(built):
    from fastapi.testclient import TestClient

    from tfmet.serving import Gallery
    from tfmet.serving.web import create_app

    gallery = Gallery(built["bench"].info_dir, built["bench"].image_root)
    return TestClient(create_app(built["recognizer"], gallery, max_upload_bytes=200_000))


def test_web_page_upload_and_json_endpoint(client, built):
    page = client.get("/")
    assert page.status_code == 200 and 'id="answer"' in page.text
    for image, answer in zip(built["images"], built["answers"], strict=True):
        multipart = client.post("/v1/recognize", files={"image": ("p.jpg", image, "image/jpeg")})
        assert multipart.status_code == 200
        body = multipart.json()
        assert body["answer"] == answer.label and body["accepted"] == answer.accepted
        assert body["confidence"] == pytest.approx(answer.confidence, abs=1e-6)
        encoded = {"image_base64": base64.b64encode(image).decode()}
        assert client.post("/v1/recognize", json=encoded).json() == body
        for match in body["top_k"]:
            thumb = client.get(match["thumbnail"])
            assert thumb.status_code == 200 and thumb.content[:2] == b"\xff\xd8"


def test_web_names_thumbnail_sizes_and_api(built, tmp_path):
    from fastapi.testclient import TestClient

    from tfmet.serving import Gallery
    from tfmet.serving.web import API, create_app

    answer = built["answers"][0]
    best, other = answer.met_id, answer.top[1][0]  # the best Met id, accepted or not
    names = tmp_path / "names.json"
    names.write_text(json.dumps({str(best): "Best exhibit", "123456789": "not in the database"}))
    gallery = Gallery(built["bench"].info_dir, built["bench"].image_root, names=names)
    client = TestClient(create_app(built["recognizer"], gallery))
    body = client.post(
        "/v1/recognize", files={"image": ("p.jpg", built["images"][0], "image/jpeg")}
    ).json()
    assert body["name"] == "Best exhibit"  # of best_met_id: the page names the closest exhibit
    named = {match["met_id"]: match["name"] for match in body["top_k"]}
    assert named[best] == "Best exhibit" and named[other] is None
    sides = {}
    for size in ("small", "large"):
        thumb = client.get(f"/v1/thumbnail/{best}?size={size}")
        assert thumb.status_code == 200
        sides[size] = max(Image.open(io.BytesIO(thumb.content)).size)
    database = Image.open(gallery.image_path(best)).size
    assert sides == {"small": min(160, max(database)), "large": min(360, max(database))}
    assert client.get(f"/v1/thumbnail/{best}?size=huge").status_code == 422
    assert client.get("/v1").json() == API
    assert 'href="/v1"' in client.get("/").text


def _png_header(width, height):
    """A PNG with only its IHDR and IEND chunks: any declared size, a few bytes."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_web_refuses_bad_uploads(client):
    big = client.post("/v1/recognize", files={"image": ("b.jpg", b"\xff" * 200_001, "image/jpeg")})
    assert big.status_code == 413
    huge = client.post(
        "/v1/recognize", content=b"x" * 400_000, headers={"content-type": "image/jpeg"}
    )
    assert huge.status_code == 413
    text = client.post("/v1/recognize", files={"image": ("a.txt", b"hello", "text/plain")})
    assert text.status_code == 415 and "not an image" in text.json()["detail"]
    # PNG headers declaring 100000 x 100000 and 30000 x 10 pixels: refused before decoding.
    for (width, height), detail in (
        ((100_000, 100_000), "10000000000 pixels"),
        ((30_000, 10), "30000x10"),
    ):
        png = _png_header(width, height)
        absurd = client.post("/v1/recognize", files={"image": ("a.png", png, "image/png")})
        assert absurd.status_code == 422
        assert (
            "declared size out of range" in absurd.json()["detail"]
            and detail in absurd.json()["detail"]
        )
    assert client.post("/v1/recognize", json={"image": "x"}).status_code == 400
    assert client.get("/v1/thumbnail/999999").status_code == 404
    assert client.get("/v1/thumbnail/..%2F..%2Fetc%2Fpasswd").status_code in (404, 422)


@pytest.fixture(scope="module")
def server(built):
    port = free_port()
    bench = built["bench"]
    process = subprocess.Popen(
        [sys.executable, "-m", "tfmet.cli.serve", f"--model={built['export']}",
         f"--info_dir={bench.info_dir}", f"--image_root={bench.image_root}", f"--port={port}",
         # Not a shedding test: a slot waited for on a loaded machine is not a failure.
         "--queue_timeout=3600"],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_until_serving(url, process, process.kill, "tfmet-serve")
    yield url, process
    process.terminate()
    process.wait(timeout=30)


def _post(url, image):
    request = urllib.request.Request(
        url + "/v1/recognize",
        data=json.dumps({"image_base64": base64.b64encode(image).decode()}).encode(),
        headers={"content-type": "application/json"},
    )
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as response:
        body = json.load(response)
    return body, time.perf_counter() - start


@pytest.mark.slow
def test_server_under_load(server, built):
    url, process = server
    jobs = [i % len(built["images"]) for i in range(48)]  # 6 rounds of 8 concurrent requests
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: (i, *_post(url, built["images"][i])), jobs))
    for i, body, _ in results:
        assert body["answer"] == built["answers"][i].label
    latencies = np.array([seconds for _, _, seconds in results])
    print(
        f"\n{len(jobs)} requests, 8 threads: p50 {np.percentile(latencies, 50) * 1000:.0f} ms, "
        f"p99 {np.percentile(latencies, 99) * 1000:.0f} ms"
    )
    assert process.poll() is None
    assert json.load(urllib.request.urlopen(url + "/healthz")) == {"status": "ok"}


@pytest.mark.slow
@needs_chromium
def test_page_in_a_headless_browser(server, built, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = server
    driver = headless_chromium(tmp_path / "profile")
    try:
        # A right accepted answer when there is one, else any accepted one, else the first photo.
        right = [
            a.accepted and a.met_id == label
            for a, label in zip(built["answers"], built["labels"], strict=True)
        ]
        accepted = [a.accepted for a in built["answers"]]
        pick = right.index(True) if any(right) else accepted.index(True) if any(accepted) else 0
        driver.get(url + "/")
        driver.find_element(By.ID, "file").send_keys(str(built["photos"][pick]))
        answer = WebDriverWait(driver, 120).until(
            lambda d: d.find_element(By.ID, "answer").text.strip()
        )
        assert answer == built["answers"][pick].label
        thumbnails = driver.find_elements(By.CSS_SELECTOR, "#matches img")
        assert len(thumbnails) == len(built["answers"][pick].top)
        WebDriverWait(driver, 60).until(
            lambda d: all(d.execute_script("return arguments[0].complete", t) for t in thumbnails)
        )
    finally:
        driver.quit()
