# ruff: noqa: E501  (the tables hold the docs' command lines as they are written)
"""The documented commands of README.md and docs/*.md, run on the demo's data (issue #28).

Every `tfmet-...` line of a code block (fenced, or indented by four spaces; `\\` continues it)
is either in RUNNABLE, and run here on the demo's benchmark and descriptors (the session's
`tfmet-demo` run, tests/journeys/conftest.py) with the doc's placeholders replaced by the demo's
paths (PLACEHOLDERS), or in ELSEWHERE with the reason it cannot run on the demo's data and the
test that covers it if one does. A docs file that gains a command in neither fails
`test_every_documented_command_is_run_here_or_says_why_not` (fast, no subprocess).

Bracketed options (`[--json]`) are given; `...` in a command means "the flags above" and such a
line is never runnable as written.
"""

import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import urllib.request

import pytest

from tests.kit import REPO, run_command
from tests.kit.cli import ENV
from tests.kit.web import free_port, wait_until_serving

BIN = os.path.dirname(sys.executable)
DOCS = ["README.md", *sorted(os.path.relpath(p, REPO) for p in glob.glob(f"{REPO}/docs/*.md"))]


def documented_commands():
    """[(file, command)]: each code-block line starting with `tfmet-`, continuation lines joined
    (one space), a trailing `# comment` cut."""
    found = []
    for name in DOCS:
        lines = open(os.path.join(REPO, name), encoding="utf-8").read().splitlines()
        fenced, i = False, 0
        while i < len(lines):
            line = lines[i]
            if line.lstrip().startswith("```"):
                fenced = not fenced
            elif (fenced or line.startswith("    ")) and line.strip().startswith("tfmet-"):
                parts = [line.strip()]
                while parts[-1].endswith("\\") and i + 1 < len(lines):
                    parts[-1] = parts[-1][:-1].strip()
                    i += 1
                    parts.append(lines[i].strip())
                command = re.sub(r"\s+#.*$", "", " ".join(parts))
                found.append((name, re.sub(r"\s+", " ", command)))
            i += 1
    return found


# The README's and docs/export.md's Met pipeline, docs/recognition.md's kNN lines and
# docs/recognize.md's two programs: (file, command) -> the group of runs that checks it.
RUNNABLE = {
    (
        "README.md",
        "tfmet-extract --info_dir met/ --image_root met/ --output_dir desc/ --backbone resnet18 --weights r18.weights.h5",
    ): "pipeline",
    ("README.md", "tfmet-knn-eval desc/ --info_dir met/ --autotune --output_dir knn/"): "pipeline",
    (
        "README.md",
        "tfmet-export --kind recognizer --backbone resnet18 --weights r18.weights.h5 --descriptor_dir desc/ --info_dir met/ --results_json knn/knn_results.json --out exports/met",
    ): "pipeline",
    (
        "docs/export.md",
        "tfmet-extract --info_dir met/ --image_root met/ --output_dir desc/ --backbone resnet18 --weights r18.weights.h5",
    ): "pipeline",
    (
        "docs/export.md",
        "tfmet-knn-eval desc/ --info_dir met/ --autotune --output_dir knn/",
    ): "pipeline",
    (
        "docs/export.md",
        "tfmet-export --kind recognizer --backbone resnet18 --weights r18.weights.h5 --descriptor_dir desc/ --info_dir met/ --results_json knn/knn_results.json --out exports/met",
    ): "pipeline",
    ("docs/recognition.md", "tfmet-knn-eval DESCRIPTOR_DIR --info_dir INFO_DIR --autotune"): "knn",
    (
        "docs/recognition.md",
        "tfmet-knn-eval DESCRIPTOR_DIR --info_dir INFO_DIR -k 15 -t 50 --val_eval",
    ): "knn",
    (
        "docs/recognition.md",
        "tfmet-knn-eval DESCRIPTOR_DIR --info_dir INFO_DIR --autotune --backend scann --log r50",
    ): "knn",
    (
        "docs/recognize.md",
        "tfmet-recognize --model exports/met photo.jpg more/ [--json] [--info_dir met/ground_truth --image_root met/] [--html report.html]",
    ): "pipeline",
    (
        "docs/recognize.md",
        "tfmet-serve --model exports/met --info_dir met/ground_truth --image_root met/ [--names MetObjects.csv] [--port 8080]",
    ): "serve",
}

_CHECKPOINT = "a converted PyTorch checkpoint the demo does not have"
_MET = "the real Met dataset"
_LOCAL = (
    "stores with local features (tfmet-extract --local_features N), which the demo does not "
    "extract; tests/retrieval/test_rerank.py runs knn-eval --rerank=spatial on such a store"
)
_COLLECTION = (
    "changes an export with new image files of an exhibit; tests/export/test_collection.py "
    "adds, removes and serves changed exports of a tiny Met tree (exact and ScaNN), "
    "tests/journeys/test_collection_journey.py removes, adds back and lists an exhibit of the "
    "demo's export (EfficientNet-Lite0, ImageNet weights)"
)
ELSEWHERE = {
    (
        "docs/collection.md",
        "tfmet-collection list --export exports/met",
    ): "tests/export/test_collection.py opens and changes exports of a tiny Met tree, "
    "tests/journeys/test_collection_journey.py lists the demo's changed export",
    (
        "docs/collection.md",
        "tfmet-collection add --export exports/met --backbone resnet18 --weights r18.weights.h5 --met_id 436535 --images new/436535_front.jpg,new/436535_back.jpg",
    ): _COLLECTION,
    (
        "docs/collection.md",
        "tfmet-collection remove --export exports/met --backbone resnet18 --weights r18.weights.h5 --met_id 436535",
    ): _COLLECTION,
    (
        "docs/collection.md",
        "tfmet-collection remove --export exports/met --backbone resnet18 --weights r18.weights.h5 --image MET/436535/436535_back.jpg",
    ): _COLLECTION,
    (
        "README.md",
        "tfmet-convert-weights --from resnet18-swsl.pth --arch resnet18 --out r18.weights.h5",
    ): f"{_CHECKPOINT} (resnet18-swsl.pth); tests/backbones/test_convert_weights.py converts generated ones",
    (
        "docs/backbones.md",
        "tfmet-extract --backbone dinov2_vitl14 --weights /ckpt/dinov2-large --multiscale --info_dir met/ --image_root met/ --output_dir desc_dinov2_l14/",
    ): "a DINOv2-L/14 checkpoint folder and a GPU; tests/cli/test_vit_programs.py runs a tiny ViT",
    (
        "docs/backbones.md",
        "tfmet-knn-eval desc_dinov2_l14/ --info_dir met/ --autotune --output_dir knn_dinov2_l14/",
    ): "the DINOv2 descriptors of the line above (the same knn-eval flags run here in the pipeline)",
    (
        "docs/backbones.md",
        "tfmet-convert-weights --from dinov2_vitl14_pretrain.pth --arch dinov2_vitl14 --out l14.weights.h5",
    ): f"{_CHECKPOINT} (dinov2_vitl14_pretrain.pth); tests/backbones/test_vit_convert.py",
    (
        "docs/backbones.md",
        "tfmet-extract --backbone dinov2_vitl14 --weights l14.weights.h5 ...",
    ): "'...' stands for the flags above; the converted DINOv2 weights",
    (
        "docs/beam.md",
        "tfmet-extract-beam --info_dir=MET/ground_truth --image_root=MET --output_dir=desc/r18 --backbone=resnet18 --weights=r18_imagenet.weights.h5 --direct_num_workers=4 --direct_running_mode=multi_processing --tf_threads=2",
    ): f"{_CHECKPOINT} (ResNet-18) and 4 worker processes; tests/journeys/test_beam_journey.py runs DirectRunner on real photos",
    (
        "docs/beam.md",
        "tfmet-extract-beam --beam_runner=DataflowRunner --info_dir=MET/ground_truth --image_root=gs://BUCKET/met --output_dir=gs://BUCKET/desc/r50 --backbone=resnet50 --weights=r50_swsl.weights.h5 --project=PROJECT --region=europe-west4 --temp_location=gs://BUCKET/tmp --job_name=tfmet-r50-desc --machine_type=n2-standard-4 --max_num_workers=50 --sdk_container_image=europe-west4-docker.pkg.dev/PROJECT/REPO/tfmet-beam:0.1.0 --tf_threads=1 --batch_size=8",
    ): "a Google Cloud project, bucket and Dataflow",
    (
        "docs/beam.md",
        "tfmet-extract --merge --output_dir=desc/r50",
    ): "the shards of the Dataflow job above; tests/cli/test_extract_cli.py merges shards",
    (
        "docs/beam.md",
        "tfmet-extract-beam --beam_runner=FlinkRunner --info_dir=MET/ground_truth --image_root=s3://BUCKET/met --output_dir=s3://BUCKET/desc/r18 --backbone=resnet18 --weights=r18_imagenet.weights.h5 --flink_master=flink-jobmanager:8081 --flink_version=1.20 --parallelism=32 --environment_type=DOCKER --sdk_container_image=REGISTRY/tfmet-beam:0.1.0 --tf_threads=1",
    ): "a Flink cluster and an S3 bucket",
    (
        "docs/contrastive.md",
        "tfmet-train-contrastive --config=configs/met_contrastive_r18.py --info_dir=MET/ground_truth --image_root=MET --workdir=runs/r18_closest --weights=weights/resnet18_swsl.weights.h5",
    ): f"{_MET}, {_CHECKPOINT} and GPU hours; tests/journeys/test_contrastive_journey.py trains the smoke config",
    (
        "docs/contrastive.md",
        "tfmet-train-contrastive ... --resume",
    ): "'...' stands for the training's flags; tests/cli/test_train_contrastive_cli.py resumes",
    (
        "docs/contrastive.md",
        "tfmet-extract --model=runs/r18_closest/model/embedder.keras --info_dir=MET/ground_truth --image_root=MET --output_dir=runs/r18_closest/extracted",
    ): "the training run above; tests/journeys/test_contrastive_journey.py runs the line its training prints",
    (
        "docs/contrastive.md",
        "tfmet-train-contrastive ... --strategy=mirrored",
    ): "'...'; several GPUs (tests/training/test_distribute.py: two logical CPU devices)",
    (
        "docs/contrastive.md",
        "tfmet-train-contrastive ... --strategy=multi_worker",
    ): "'...'; several hosts (tests/training/test_distribute.py)",
    (
        "docs/demo.md",
        "tfmet-demo --workdir demo_work --random_baseline",
    ): "runnable, not run: two more extractions (~100 s on 2 shared cores); the session's demo run is the line above it (make demo)",
    (
        "docs/extraction.md",
        "tfmet-extract --info_dir=MET/ground_truth --image_root=MET --output_dir=desc/r50_swsl --backbone=resnet50 --weights=weights/r50_swsl.weights.h5 [--mini] [--queries_only]",
    ): f"{_MET} and {_CHECKPOINT} (ResNet-50 SWSL); the pipeline here runs the same flags",
    (
        "docs/extraction.md",
        "tfmet-import-descriptors --descriptors=r18INgem/descriptors.pkl --output_dir=desc/r18_ref --info_dir=MET/ground_truth --backbone=r18INgem",
    ): "the reference's descriptors.pkl of the real Met; tests/cli/test_import_descriptors.py converts generated ones",
    (
        "docs/recognition.md",
        "tfmet-knn-eval DESCRIPTOR_DIR --info_dir INFO_DIR --autotune --rerank=spatial",
    ): _LOCAL,
    (
        "docs/export.md",
        "tfmet-extract ... --local_features 200 --output_dir desc/",
    ): "a synopsis (...); tests/retrieval/test_rerank.py extracts a tree with --local_features",
    (
        "docs/export.md",
        "tfmet-knn-eval desc/ --info_dir met/ --autotune --rerank=spatial",
    ): _LOCAL,
    (
        "docs/export.md",
        "tfmet-export --kind recognizer ... --descriptor_dir desc/ --info_dir met/ --results_json desc/knn_results.json --rerank=spatial --out exports/met_rr",
    ): "a synopsis (...) over local features; tests/export/test_rerank_export.py exports and answers",
    (
        "docs/style.md",
        "tfmet-train-style --config configs/<experiment>.py[:variant] --workdir RUN",
    ): "a synopsis (<experiment>, [:variant]); the lines below it",
    (
        "docs/style.md",
        "tfmet-evaluate-style --workdir RUN --split test [--flip_bagging] [--outliers_k K]",
    ): "a synopsis (RUN, K)",
    (
        "docs/style.md",
        "tfmet-predict --model RUN image.jpg [...] [--top_k 5] [--nearest N]",
    ): "a synopsis (RUN, N)",
    (
        "docs/style.md",
        "tfmet-train-style --config configs/pandora18k.py:smoke --config.dataset.root /tmp/pandora_smoke --workdir /tmp/pandora_smoke_run",
    ): "a Pandora18k-layout tree, not the demo's data; tests/journeys/test_style_journey.py runs these three on one cut from real photos",
    (
        "docs/style.md",
        "tfmet-evaluate-style --workdir /tmp/pandora_smoke_run --split test",
    ): "the style run above (tests/journeys/test_style_journey.py)",
    (
        "docs/style.md",
        "tfmet-predict --model /tmp/pandora_smoke_run /tmp/pandora_smoke/02_Early_Renaissance/artist_1_0/painting_00.jpg",
    ): "the style run above (tests/journeys/test_style_journey.py)",
    (
        "docs/style.md",
        "tfmet-train-style --config configs/pandora18k.py:finetune --config.dataset.root DATA --workdir RUN --strategy mirrored",
    ): "Pandora18k and several GPUs",
    (
        "docs/style.md",
        "tfmet-train-style --config configs/pandora18k.py:finetune --config.dataset.root DATA --workdir RUN --strategy multi_worker",
    ): "Pandora18k and several hosts",
    (
        "docs/weights.md",
        "tfmet-convert-weights --from resnet50-0676ba61.pth --arch resnet50 --out r50.weights.h5",
    ): f"{_CHECKPOINT} (torchvision's resnet50-0676ba61.pth); tests/backbones/test_convert_weights.py",
    (
        "docs/weights.md",
        "tfmet-extract --backbone resnet50 --weights r50.weights.h5 ...",
    ): "'...' stands for the Met flags; the converted ResNet-50",
}

# (flag before it or None, doc placeholder) -> the demo's path ({...} from `paths`). The demo has
# no converted ResNet-18: its own backbone and weights stand in for `resnet18 r18.weights.h5`.
PLACEHOLDERS = {
    ("--info_dir", "met/"): "{info}",
    ("--info_dir", "met/ground_truth"): "{info}",
    ("--info_dir", "INFO_DIR"): "{info}",
    ("--image_root", "met/"): "{root}",
    ("--backbone", "resnet18"): "efficientnet_lite0",
    ("--weights", "r18.weights.h5"): "imagenet",
    ("--output_dir", "desc/"): "{tmp}/desc",
    ("--descriptor_dir", "desc/"): "{tmp}/desc",
    (None, "desc/"): "{tmp}/desc",
    (None, "DESCRIPTOR_DIR"): "{tmp}/knn_desc",
    ("--output_dir", "knn/"): "{tmp}/knn",
    ("--results_json", "knn/knn_results.json"): "{tmp}/knn/knn_results.json",
    ("--out", "exports/met"): "{tmp}/exports/met",
    ("--model", "exports/met"): "{tmp}/exports/met",
    (None, "photo.jpg"): "{photo}",
    (None, "more/"): "{more}",
    ("--html", "report.html"): "{tmp}/report.html",
    ("--names", "MetObjects.csv"): "{names}",
    ("--port", "8080"): "{port}",
}


def on_demo(command, paths):
    """The documented `command` as an argv on the demo's data: brackets dropped (their options
    given), each placeholder replaced; a doc path left unreplaced fails the test."""
    tokens = shlex.split(command.replace("[", " ").replace("]", " "))
    argv, previous = [os.path.join(BIN, tokens[0])], None
    for token in tokens[1:]:
        inline = token.startswith("--") and "=" in token
        flag, value = token.split("=", 1) if inline else (None, token)
        after = previous if previous is not None and previous.startswith("-") else None
        key = (flag, value) if inline else (after, value)
        new = PLACEHOLDERS.get(key, PLACEHOLDERS.get((None, value)))
        if new is not None:
            new = new.format(**paths)
            argv.append(f"{flag}={new}" if inline else new)
        else:
            placeholder = "/" in value or re.fullmatch(r"[A-Z][A-Z_]+", value)
            assert not placeholder, f"{command}: {token} has no demo path"
            argv.append(token)
        previous = token
    return argv


def test_every_documented_command_is_run_here_or_says_why_not():
    documented = documented_commands()
    assert len(documented) == len(set(documented)), "a command twice in one file"
    assert set(RUNNABLE).isdisjoint(ELSEWHERE)
    missing = [c for c in documented if c not in RUNNABLE and c not in ELSEWHERE]
    assert missing == [], f"documented commands in neither RUNNABLE nor ELSEWHERE: {missing}"
    gone = sorted((set(RUNNABLE) | set(ELSEWHERE)) - set(documented))
    assert gone == [], f"listed but no longer documented: {gone}"
    assert all(reason.strip() for reason in ELSEWHERE.values())
    assert (len(RUNNABLE), len(ELSEWHERE)) == (11, 35)


def test_placeholders_become_the_demos_paths():
    paths = dict(info="/d/info", root="/d", tmp="/t", photo="/d/p.jpg", more="/d/m", names="/n",
                 port=9)  # fmt: skip
    command = next(c for (_, c) in RUNNABLE if c.startswith("tfmet-recognize"))
    assert on_demo(command, paths)[1:] == [
        "--model", "/t/exports/met", "/d/p.jpg", "/d/m", "--json", "--info_dir", "/d/info",
        "--image_root", "/d", "--html", "/t/report.html",
    ]  # fmt: skip


def _commands(group, doc=None):
    found = [c for (name, c), g in RUNNABLE.items() if g == group and (doc is None or name == doc)]
    return list(dict.fromkeys(found))


def _run(argv, timeout=600):
    result = run_command(argv, timeout=timeout)
    assert result.returncode == 0, f"{shlex.join(argv)} failed:\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def paths(demo_run, tmp_path_factory):
    workdir, _ = demo_run
    tmp = tmp_path_factory.mktemp("documented")
    root = os.path.join(workdir, "benchmark")
    descriptors = os.path.join(workdir, "descriptors", "efficientnet_lite0-imagenet")
    # Copies of the demo's stores, so that the documented outputs (desc/, DESCRIPTOR_DIR's
    # knn_results.json) never touch the shared work folder.
    for name in ("desc", "knn_desc"):
        shutil.copytree(descriptors, tmp / name, ignore=shutil.ignore_patterns("knn_*", "log_*"))
    test = json.load(open(os.path.join(root, "info", "testset.json"), encoding="utf-8"))
    photo = next(q for q in test if "MET_id" in q)
    return dict(
        info=os.path.join(root, "info"), root=root, tmp=str(tmp), workdir=workdir,
        photo=os.path.join(root, "images", photo["path"]), photo_met_id=photo["MET_id"],
        more=os.path.join(root, "images", "test_other"),
        names=os.path.join(workdir, "exhibit_names.json"), port=free_port(),
    )  # fmt: skip


@pytest.fixture(scope="module")
def pipeline(paths):
    """README.md's extract -> knn-eval -> export (docs/export.md's same three lines), then
    docs/recognize.md's tfmet-recognize on the export: {program: CompletedProcess}."""
    commands = _commands("pipeline")
    assert [c.split()[0] for c in commands] == [
        "tfmet-extract", "tfmet-knn-eval", "tfmet-export", "tfmet-recognize",
    ]  # fmt: skip
    return {c.split()[0]: _run(on_demo(c, paths)) for c in commands}


@pytest.mark.slow
def test_the_pipeline_extracts_what_the_demo_extracted(pipeline, paths):
    """desc/ starts as the demo's stores: the documented extraction resumes them, so its flags ask
    for exactly the demo's extraction (a different spec would be refused); that those flags give
    the demo's descriptors is test_met_journey.py's test of the printed tfmet-extract."""
    log = pipeline["tfmet-extract"].stderr
    for split in ("train", "val", "test"):
        assert f"{split}: store already complete in {paths['tmp']}/desc; nothing to do" in log


@pytest.mark.slow
def test_the_pipelines_knn_eval_whitens_to_the_databases_rank(pipeline, paths):
    """`tfmet-knn-eval desc/ --info_dir met/ --autotune --output_dir knn/` (-d 512) on the demo's
    22 database images: whitened to their rank, 21, said in the log; its printed line is the
    results file's."""
    knn = os.path.join(paths["tmp"], "knn")
    results = json.load(open(os.path.join(knn, "knn_results.json"), encoding="utf-8"))
    assert (results["dim"], results["counts"]["database"]) == (21, 22)
    test = results["test"]
    assert pipeline["tfmet-knn-eval"].stdout.splitlines()[-1] == (
        f"test: GAP {test['gap']:.4f}, GAP- {test['gap_minus']:.4f}, ACC {test['acc']:.4f} "
        f"(k={results['k']}, t={float(results['t'])}); results in {knn}/knn_results.json"
    )
    log = open(os.path.join(knn, "log_knn.txt"), encoding="utf-8").read()
    assert "PCA-whitening to 21 dimensions, not --dim 512: the covariance of the 22 database" in log


@pytest.mark.slow
def test_the_pipelines_export_carries_the_knn_evals_choice(pipeline, paths):
    out = os.path.join(paths["tmp"], "exports", "met")
    assert pipeline["tfmet-export"].stdout.splitlines()[-1] == (
        f"exported recognizer SavedModel to {out} "
        "(signatures: serving_default, descriptors, images, metadata)"
    )
    metadata = json.load(open(os.path.join(out, "assets", "tfmet_metadata.json"), encoding="utf-8"))
    knn = os.path.join(paths["tmp"], "knn", "knn_results.json")
    results = json.load(open(knn, encoding="utf-8"))
    assert (metadata["backbone"], metadata["dim"], metadata["database_size"]) == (
        "efficientnet_lite0", 21, 22,
    )  # fmt: skip
    assert metadata["k"] == min(results["k"], 22) and metadata["tau"] == results["t"]
    assert metadata["threshold_source"] == knn


@pytest.mark.slow
def test_recognize_answers_the_photo_and_the_folder_in_json_and_html(pipeline, paths):
    """docs/recognize.md's tfmet-recognize with every bracketed option: a Met test photo and the
    demo's test_other/ folder (9 distractor photos), JSON lines with the documented keys."""
    rows = [json.loads(line) for line in pipeline["tfmet-recognize"].stdout.splitlines()]
    folder = sorted(os.listdir(paths["more"]))
    assert [r["path"] for r in rows] == [
        paths["photo"],
        *(os.path.join(paths["more"], n) for n in folder),
    ]
    assert len(rows) == 10
    keys = {"path", "answer", "met_id", "best_met_id", "confidence", "accepted", "valid",
            "threshold", "top_k", "database_image"}  # fmt: skip
    assert all(set(r) == keys and r["valid"] for r in rows)
    photo = rows[0]
    assert (photo["accepted"], photo["met_id"]) == (True, paths["photo_met_id"])
    assert photo["answer"] == f"Met {paths['photo_met_id']}"
    database = json.load(open(os.path.join(paths["info"], "MET_database.json"), encoding="utf-8"))
    first = next(e["path"] for e in database if e["id"] == paths["photo_met_id"])
    assert photo["database_image"] == first  # the ground truth's path of the exhibit's image
    assert all(
        r["met_id"] is None and r["database_image"] is None for r in rows if not r["accepted"]
    )
    assert pipeline["tfmet-recognize"].stderr.endswith(f"report: {paths['tmp']}/report.html\n")
    page = open(os.path.join(paths["tmp"], "report.html"), encoding="utf-8").read()
    # One row per photo, each with its inline thumbnail, and the exhibit among the matches.
    assert page.count('alt="query"') == page.count("<tr><td>") == 10
    assert f'alt="Met {paths["photo_met_id"]}"' in page


@pytest.fixture(scope="module")
def knn(paths):
    """docs/recognition.md's runnable lines, in order, on a copy of the demo's stores."""
    commands = _commands("knn")
    return [(c, _run(on_demo(c, paths))) for c in commands]


@pytest.mark.slow
def test_the_recognition_docs_knn_eval_lines(knn, paths):
    out = os.path.join(paths["tmp"], "knn_desc")
    (autotune, _), (fixed, fixed_run), (scann, scann_run) = knn
    assert autotune.endswith("--autotune") and "-k 15 -t 50" in fixed and "scann" in scann
    results = json.load(open(os.path.join(out, "knn_results.json"), encoding="utf-8"))
    # The -k 15 -t 50 --val_eval line ran last into knn_results.json: val only, k and tau as given.
    assert (results["k"], results["t"], results["test"], results["grid"]) == (15, 50, None, None)
    val = results["val"]
    assert fixed_run.stdout.splitlines()[-1] == (
        f"val: GAP {val['gap']:.4f}, GAP- {val['gap_minus']:.4f}, ACC {val['acc']:.4f} "
        f"(k=15, t=50.0); results in {out}/knn_results.json"
    )
    # --log r50: every output has the suffix; ScaNN on 22 images (--autotune tunes the grid).
    named = json.load(open(os.path.join(out, "knn_results_r50.json"), encoding="utf-8"))
    assert named["backend"] == "scann" and named["grid"] is not None and named["test"] is not None
    for name in ("knn_predictions_r50.npz", "log_knn_r50.txt", "knn_threshold_r50.png"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert scann_run.stdout.splitlines()[-1].endswith(f"results in {out}/knn_results_r50.json")


@pytest.mark.slow
def test_serve_and_the_documented_curl_line(pipeline, paths):
    """docs/recognize.md's tfmet-serve on the pipeline's export with the demo's names, then its
    `curl -F image=@photo.jpg http://127.0.0.1:8080/v1/recognize` (the port is a free one)."""
    (command,) = _commands("serve")
    argv = on_demo(command, paths)
    process = subprocess.Popen(
        argv, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{paths['port']}"
    try:
        wait_until_serving(url, process, lambda: os.killpg(process.pid, signal.SIGKILL), "serve")
        assert json.load(urllib.request.urlopen(url + "/healthz")) == {"status": "ok"}
        if shutil.which("curl"):
            asked = run_command(["curl", "-sS", "-F", f"image=@{paths['photo']}",
                                 url + "/v1/recognize"])  # fmt: skip
            assert asked.returncode == 0, asked.stderr
            answer = json.loads(asked.stdout)
        else:  # the same request without curl
            answer = _post_photo(url + "/v1/recognize", paths["photo"])
        names = json.load(open(paths["names"], encoding="utf-8"))
        met_id = paths["photo_met_id"]
        assert (answer["answer"], answer["met_id"], answer["accepted"]) == (
            f"Met {met_id}", met_id, True,
        )  # fmt: skip
        assert answer["name"] == names[str(met_id)]
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        output = process.communicate(timeout=60)[0]
    assert f"on http://127.0.0.1:{paths['port']}/" in output, output[-2000:]


def _post_photo(url, photo):
    boundary = "tfmet-boundary"
    data = open(photo, "rb").read()
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="p.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    return json.load(urllib.request.urlopen(request))


# Options of tfmet-extract-beam's documented lines that are Beam's pipeline options (passed to
# Beam, not tfmet's flags: docs/beam.md).
BEAM_OPTIONS = {
    "direct_num_workers", "direct_running_mode", "project", "region", "temp_location",
    "job_name", "machine_type", "max_num_workers", "sdk_container_image", "flink_master",
    "flink_version", "parallelism", "environment_type",
}  # fmt: skip


def _flags_of(program):
    """The flag names (and short names) `program --helpfull` lists."""
    module = program.removeprefix("tfmet-").replace("-", "_")
    result = run_command([sys.executable, "-m", f"tfmet.cli.{module}", "--helpfull"], timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    names = set()
    for line in result.stdout.splitlines():
        head = re.match(r"\s+((?:-\w, )?--?(?:\[no\])?\w+)(?:\s\s|:|$)", line)
        if head:
            names |= set(re.findall(r"-(?:\[no\])?(\w+)", head.group(1)))
    return names


@pytest.mark.slow
def test_every_documented_flag_is_a_flag_of_its_program():
    """Also the commands that cannot run here: each --flag (-k) they give is one their program
    defines (`--noX` a boolean X, `--config.a.b` an override of --config)."""
    known, wrong = {}, []
    for name, command in documented_commands():
        tokens = shlex.split(command.replace("[", " ").replace("]", " "))
        program = tokens[0]
        if program not in known:
            known[program] = _flags_of(program)
        for token in tokens[1:]:
            if not token.startswith("-") or token == "...":
                continue
            flag = token.lstrip("-").split("=", 1)[0]
            flag = flag.split(".", 1)[0]  # --config.dataset.root: an override of --config
            ok = flag in known[program] or (flag.startswith("no") and flag[2:] in known[program])
            if not ok and not (program == "tfmet-extract-beam" and flag in BEAM_OPTIONS):
                wrong.append(f"{name}: {program} has no flag {token}")
    assert wrong == []
    assert len(known) == 14
