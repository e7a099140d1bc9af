"""The Met journey with the real embedded model, as a new user walks it after `make demo`.

tfmet-demo (EfficientNet-Lite0, ImageNet weights, the benchmark of real photos) prints the
tfmet-extract and tfmet-knn-eval commands equivalent to its steps, and its next step: a
tfmet-export and a tfmet-serve command. They are run here as printed, then:
- the equivalent commands give the demo's descriptors and its k, tau and test metrics;
- tfmet-recognize --json on every test photo gives knn-eval's test ACC (top-1) and the
  threshold's test precision / recall, which the demo's knn_results.json records;
- the export, reloaded by plain TensorFlow (no tfmet import), gives tfmet-extract's descriptors
  (< 1e-5) and tfmet-recognize's answers;
- `make serve` (the README's line; the demo's serve.sh) serves it, and in chromium a Met photo
  shows its exhibit (name and database photo), a distractor "not in the collection".
"""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import urllib.request

import numpy as np
import pytest

from tests.kit import REPO, run_command
from tests.kit.cli import ENV
from tests.kit.web import free_port, headless_chromium, needs_chromium, wait_until_serving
from tfmet.serving.client import decimals

pytestmark = pytest.mark.slow
BIN = os.path.dirname(sys.executable)


def _printed(stdout, program):
    """The command line the demo printed for `program`, split as a shell would (the lines of its
    equivalent commands start with "= ")."""
    lines = [line.strip().removeprefix("= ") for line in stdout.splitlines()]
    found = [line for line in lines if line.startswith(program + " ")]
    assert len(found) == 1, f"the demo printed {len(found)} {program} lines:\n{stdout[-3000:]}"
    return shlex.split(found[0])


def _run_printed(argv, timeout=600):
    """A printed command, run as printed (its program from this environment's bin/)."""
    result = run_command([os.path.join(BIN, argv[0]), *argv[1:]], timeout=timeout)
    assert result.returncode == 0, f"{shlex.join(argv)} failed:\n{result.stderr[-3000:]}"
    return result


def _flag(argv, name):
    return argv[argv.index(name) + 1]


@pytest.fixture(scope="module")
def demo(demo_run):
    workdir, stdout = demo_run  # tests/journeys/conftest.py: the session's demo run
    export = _printed(stdout, "tfmet-export")
    serve = _printed(stdout, "tfmet-serve")
    _run_printed(export)
    info_dir = _flag(export, "--info_dir")
    return dict(
        workdir=str(workdir),
        stdout=stdout,
        export=export,
        serve=serve,
        model=_flag(export, "--out"),
        info_dir=info_dir,
        image_root=_flag(serve, "--image_root"),
        results=json.load(open(_flag(export, "--results_json"), encoding="utf-8")),
        descriptors=_flag(export, "--descriptor_dir"),
        test=json.load(open(os.path.join(info_dir, "testset.json"), encoding="utf-8")),
    )


@pytest.fixture(scope="module")
def answers(demo):
    """tfmet-recognize --json on every test photo: {path under the image root: answer}."""
    photos = [os.path.join(demo["image_root"], "images", q["path"]) for q in demo["test"]]
    result = run_command(
        [os.path.join(BIN, "tfmet-recognize"), "--model", demo["model"], "--json", *photos]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    prefix = os.path.join(demo["image_root"], "images") + os.sep
    return {row["path"][len(prefix) :]: row for row in rows}


def test_recognize_gives_knn_evals_test_accuracy_precision_and_recall(demo, answers):
    queries = demo["test"]
    assert len(answers) == len(queries) == 66
    met = [q for q in queries if "MET_id" in q]
    top1 = sum(answers[q["path"]]["best_met_id"] == q["MET_id"] for q in met)
    right = sum(
        answers[q["path"]]["accepted"] and answers[q["path"]]["met_id"] == q["MET_id"] for q in met
    )
    accepted = sum(answers[q["path"]]["accepted"] for q in queries)
    results = demo["results"]
    assert top1 / len(met) == pytest.approx(results["test"]["acc"], abs=1e-12)
    threshold = results["threshold"]
    assert threshold["rule"] == "max_f1" and 0 < threshold["value"] < 1
    assert right / accepted == pytest.approx(threshold["test"]["precision"], abs=1e-12)
    assert right / len(met) == pytest.approx(threshold["test"]["recall"], abs=1e-12)
    # The real model recognises most of them (the demo's documented ACC is 92.9%).
    assert results["test"]["acc"] > 0.85


_PLAIN_TF = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf
    model = tf.saved_model.load(sys.argv[1])
    out = {"descriptors": [], "answers": []}
    for pixels, photo in json.loads(sys.argv[2]):
        image = np.load(pixels, allow_pickle=False)[None]
        described = model.signatures["images"](images=tf.constant(image))
        out["descriptors"].append(described["descriptor"].numpy()[0].tolist())
        data = tf.constant([open(photo, "rb").read()])
        answer = model.signatures["serving_default"](image_bytes=data)
        out["answers"].append({k: v.numpy()[0].tolist() for k, v in answer.items()})
    assert not any(name.startswith("tfmet") for name in sys.modules)
    print(json.dumps(out))
    """
)


def test_export_reloaded_by_plain_tensorflow_gives_the_librarys_numbers(demo, answers, tmp_path):
    from tfmet.data.descriptor_store import read_store
    from tfmet.data.images import decode_image

    rows = [0, 7, 30, 65]  # Met photos and distractors of different sizes
    queries = [demo["test"][i] for i in rows]
    jobs = []
    for row, query in zip(rows, queries, strict=True):
        photo = os.path.join(demo["image_root"], "images", query["path"])
        with open(photo, "rb") as f:
            np.save(tmp_path / f"{row}.npy", decode_image(f.read()).numpy())
        jobs.append((str(tmp_path / f"{row}.npy"), photo))
    result = run_command([sys.executable, "-c", _PLAIN_TF, demo["model"], json.dumps(jobs)])
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    extracted = np.asarray(read_store(demo["descriptors"], "test").descriptors)[rows]
    assert np.abs(np.asarray(out["descriptors"]) - extracted).max() < 1e-5
    for query, served in zip(queries, out["answers"], strict=True):
        library = answers[query["path"]]
        assert served["met_id"] == library["best_met_id"]
        assert served["accepted"] == library["accepted"]
        assert abs(served["confidence"] - library["confidence"]) < 1e-5


def test_the_printed_equivalent_commands_give_the_demos_numbers(demo, tmp_path):
    """The demo's "= tfmet-extract ..." and "= tfmet-knn-eval ..." lines, run as printed into
    another folder (so the demo's own results, which serve.sh dates the export by, stay)."""
    from tfmet.data.descriptor_store import read_store

    extract = _printed(demo["stdout"], "tfmet-extract")
    out = str(tmp_path / "descriptors")
    extract[extract.index("--output_dir") + 1] = out
    _run_printed(extract)
    for split in ("train", "val", "test"):
        ours, demos = (read_store(d, split) for d in (out, demo["descriptors"]))
        np.testing.assert_array_equal(ours.valid, demos.valid)
        assert np.abs(np.asarray(ours.descriptors) - np.asarray(demos.descriptors)).max() < 1e-6
    knn_eval = _printed(demo["stdout"], "tfmet-knn-eval")
    assert knn_eval[1] == demo["descriptors"]
    knn_eval[1] = out
    _run_printed(knn_eval)
    results = json.load(open(os.path.join(out, "knn_results.json"), encoding="utf-8"))
    assert (results["k"], results["t"]) == (demo["results"]["k"], demo["results"]["t"])  # t: tau
    for key in ("gap", "gap_minus", "acc"):
        assert results["test"][key] == pytest.approx(demo["results"]["test"][key], abs=1e-9)
    # The threshold sits between two confidences: float rounding of the descriptors (~1e-7) moves
    # it by as much, not the decisions it makes.
    threshold, demos = results["threshold"], demo["results"]["threshold"]
    assert threshold["value"] == pytest.approx(demos["value"], abs=1e-5)
    assert threshold["test"] == demos["test"]


def test_the_printed_commands_are_what_make_serve_runs(demo):
    script = open(os.path.join(demo["workdir"], "serve.sh"), encoding="utf-8").read()
    assert f"|| {shlex.join(demo['export'])} --force\n" in script
    assert f'exec {shlex.join(demo["serve"])} "$@"\n' in script
    assert "(or: make serve, which runs" in demo["stdout"]


@pytest.fixture(scope="module")
def page(demo):
    """`make serve` on the demo's work folder (the README's line), on a free port."""
    port = free_port()
    if shutil.which("make") and os.path.exists(os.path.join(REPO, ".venv", ".installed")):
        command = ["make", "-s", "-C", REPO, "serve", f"DEMO_WORKDIR={demo['workdir']}",
                   f"SERVE_FLAGS=--port={port}"]  # fmt: skip
    else:  # not the README's .venv: the script make serve runs, with this environment's bin/
        command = ["sh", os.path.join(demo["workdir"], "serve.sh"), f"--port={port}"]
    env = dict(ENV, PATH=BIN + os.pathsep + os.environ.get("PATH", ""))
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_until_serving(url, process, lambda: os.killpg(process.pid, signal.SIGKILL), "make serve")
    yield url, process
    os.killpg(process.pid, signal.SIGTERM)
    output = process.communicate(timeout=60)[0]
    assert f"serving {demo['model']} on http://127.0.0.1:{port}/" in output, output[-2000:]


def _pick(demo, answers):
    """A Met test photo answered right, and a distractor rejected."""
    right = next(
        q for q in demo["test"]
        if "MET_id" in q and answers[q["path"]]["accepted"]
        and answers[q["path"]]["met_id"] == q["MET_id"]
    )  # fmt: skip
    rejected = next(
        q for q in demo["test"] if "MET_id" not in q and not answers[q["path"]]["accepted"]
    )
    return right, rejected


@needs_chromium
def test_the_page_shows_the_exhibit_and_rejects_a_distractor(demo, answers, page, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = page
    names = json.load(open(os.path.join(demo["workdir"], "exhibit_names.json"), encoding="utf-8"))
    right, rejected = _pick(demo, answers)
    driver = headless_chromium(tmp_path / "profile", window_size="1000,900")

    def ask(query):
        driver.get(url + "/")
        photo = os.path.join(demo["image_root"], "images", query["path"])
        driver.find_element(By.ID, "file").send_keys(photo)
        WebDriverWait(driver, 120).until(lambda d: d.find_element(By.ID, "answer").text.strip())
        thumbnails = driver.find_elements(By.CSS_SELECTOR, "#matches img, #exhibit img")
        WebDriverWait(driver, 60).until(
            lambda d: all(
                d.execute_script("return arguments[0].complete", t)
                for t in thumbnails
                if t.is_displayed()
            )
        )
        return {
            key: driver.find_element(By.ID, key).text.strip()
            for key in ("answer", "name", "confidence", "exhibit", "matches")
        }

    try:
        shown = ask(right)
        met_id = right["MET_id"]
        assert shown["answer"] == f"Met {met_id}"
        assert shown["name"] == names[str(met_id)]
        assert shown["exhibit"] == f"In the collection: Met {met_id} \u00b7 {names[str(met_id)]}"
        exhibit = driver.find_element(By.CSS_SELECTOR, "#exhibit img")
        assert driver.execute_script("return arguments[0].naturalWidth", exhibit) > 0
        confidence = answers[right["path"]]["confidence"]
        threshold = demo["results"]["threshold"]["value"]
        d = decimals(confidence, threshold)
        assert shown["confidence"] == (
            f"Confidence {confidence:.{d}f}, at or above the threshold of {threshold:.{d}f} "
            "needed for an answer: recognised."
        )
        shot = tmp_path / "recognize.png"
        assert driver.save_screenshot(str(shot))
        if os.environ.get("TFMET_SCREENSHOT"):
            shutil.copy(shot, os.environ["TFMET_SCREENSHOT"])

        shown = ask(rejected)
        closest = answers[rejected["path"]]["best_met_id"]
        assert shown["answer"] == "not in the collection"
        assert shown["name"] == "" and shown["exhibit"] == ""
        assert "is below the threshold of" in shown["confidence"]
        assert shown["confidence"].endswith(
            f"The closest is Met {closest} \u00b7 {names[str(closest)]}."
        )
        link = driver.find_element(By.LINK_TEXT, "JSON API")
        assert link.get_attribute("href") == url + "/v1"
    finally:
        driver.quit()
    api = json.load(urllib.request.urlopen(url + "/v1"))
    assert "POST /v1/recognize" in api
