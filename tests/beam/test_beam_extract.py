"""Beam extraction: DirectRunner (2 worker processes) + `tfmet-extract --merge` == single machine.

The single-machine `tfmet.descriptors.extraction` run on the same tiny Met tree (with broken
files) is the reference: after merging, the Beam run's stores must hold the same descriptors
(max abs diff < 1e-5), the same validity and the same error report, and the dead-letter output
must list the broken files. The CLI runs in a child process (CLI modules define absl flags at
import); a second, in-process run goes through a stand-in remote file system ("tfmettest://").
"""

import os
import posixpath
import shutil
import subprocess
import sys

import numpy as np
import pytest
from apache_beam.io.filesystem import FileMetadata
from apache_beam.io.localfilesystem import LocalFileSystem
from PIL import Image

from tests.kit.cli import REPO
from tests.kit.exports import write_descriptor_metadata
from tests.kit.met_tree import write_image, write_met_tree
from tfmet.beam import paths, pipeline, transforms
from tfmet.beam.chunks import ChunkOutput
from tfmet.beam.model_handler import DescriptorModelHandler, describe_batch
from tfmet.data import descriptor_store as store
from tfmet.data import images as image_io
from tfmet.descriptors import chunk_files, extraction
from tfmet.descriptors import spec as spec_lib

SPLITS = ("train", "val", "test")
CHUNK_SIZE = 3  # train 8 rows -> chunks of 3, 3, 2; val and test 7 rows -> 3, 3, 1


def _break_files(tree):
    """Damages some images in place; returns {(split, row): path} of those that must fail."""
    broken = {}

    def path_of(split, row):
        return tree.image_path(tree.entries(split)[row]["path"])

    with open(path_of("train", 1), "wb") as f:  # not an image at all
        f.write(b"this is not an image")
    broken["train", 1] = path_of("train", 1)
    with open(path_of("val", 0), "rb") as f:
        data = f.read()
    with open(path_of("val", 0), "wb") as f:  # a JPEG cut after 200 bytes
        f.write(data[:200])
    broken["val", 0] = path_of("val", 0)
    os.remove(path_of("test", 2))  # listed in the JSON, missing on disk
    broken["test", 2] = path_of("test", 2)
    open(path_of("test", 4), "wb").close()  # empty file
    broken["test", 4] = path_of("test", 4)
    # Readable oddities that must NOT fail: PNG bytes under .jpg, a grayscale JPEG, a 1x1 image.
    rgb = np.asarray(Image.open(path_of("train", 3)).convert("RGB"))
    write_image(path_of("train", 3), rgb, format="PNG")
    write_image(path_of("train", 5), Image.fromarray(rgb).convert("L"))
    write_image(path_of("test", 0), np.full((1, 1, 3), 200, np.uint8))
    return broken


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The tree, its broken files and the single-machine stores (the reference)."""
    root = tmp_path_factory.mktemp("beam")
    tree = write_met_tree(root / "met")
    broken = _break_files(tree)
    reference = str(root / "single")
    extractor, spec = spec_lib.build_extractor("resnet_tiny", seed=0, chunk_size=CHUNK_SIZE)
    met_splits = extraction.load_met_splits(tree.info_dir, SPLITS)
    extraction.extract_met(extractor, spec, met_splits, tree.image_root, reference, progress=False)
    return root, tree, broken, reference, extractor, spec


def _assert_matches_reference(out, reference, broken):
    for split in SPLITS:
        beam, single = store.read_store(out, split), store.read_store(reference, split)
        diff = np.abs(np.asarray(beam.descriptors) - np.asarray(single.descriptors)).max()
        assert diff < 1e-5, f"{split}: max abs diff {diff}"
        np.testing.assert_array_equal(beam.valid, single.valid)
        assert beam.manifest["errors"] == single.manifest["errors"]
        assert beam.manifest == single.manifest  # same metadata, paths, labels, report
        invalid = {(split, int(i)) for i in np.flatnonzero(~beam.valid)}
        assert invalid == {key for key in broken if key[0] == split}
        assert np.all(np.asarray(beam.descriptors)[~beam.valid] == 0)


@pytest.fixture(scope="module")
def beam_run(corpus):
    """tfmet-extract-beam on DirectRunner, 2 worker processes, chunks left for --merge."""
    root, tree, *_ = corpus
    out = str(root / "beam")
    command = [
        sys.executable,
        "-m",
        "tfmet.cli.extract_beam",
        f"--info_dir={tree.info_dir}",
        f"--image_root={tree.image_root}",
        f"--output_dir={out}",
        "--backbone=resnet_tiny",
        f"--chunk_size={CHUNK_SIZE}",
        "--batch_size=4",
        "--tf_threads=1",
        "--nomerge_when_done",
        "--direct_num_workers=2",
        "--direct_running_mode=multi_processing",
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    return out, done.stderr


@pytest.mark.slow
def test_multiprocess_beam_run_merges_to_the_single_machine_store(corpus, beam_run):
    _, tree, broken, reference, extractor, _ = corpus
    out, log = beam_run
    assert "Beam run DONE: 9 chunks, 22 images (4 failed)" in log
    assert log.count("INFO:__main__:Python sdk harness starting") == 2  # two worker processes
    merge = [sys.executable, "-m", "tfmet.cli.extract", "--merge", f"--output_dir={out}"]
    done = subprocess.run([*merge, "--keep_chunks"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-4000:]
    _assert_matches_reference(out, reference, broken)
    # The reference itself, checked against the model on one image (independent of both paths).
    image = Image.open(tree.image_path(tree.val[2]["path"])).convert("RGB")
    expected = extractor(np.asarray(image, np.float32)[None]).numpy()[0]
    np.testing.assert_allclose(store.read_store(out, "val").descriptors[2], expected, atol=1e-5)


@pytest.mark.slow
def test_dead_letter_output_lists_the_broken_files(corpus, beam_run):
    _, tree, broken, reference, *_ = corpus
    out, _ = beam_run
    records = pipeline.read_dead_letters(out)
    assert {(r["split"], r["index"]): r["file"] for r in records} == broken
    for r in records:
        errors = store.read_store(reference, r["split"]).manifest["errors"]
        expected = [e for e in errors if e["index"] == r["index"]]
        assert expected == [{"index": r["index"], "path": r["path"], "reason": r["reason"]}]
    (prefix,) = {
        os.path.join(out, "dead_letter", f.rsplit("-", 3)[0])
        for f in os.listdir(os.path.join(out, "dead_letter"))
    }
    assert f"{len(broken)} failed images are listed in {prefix}-*.jsonl" in beam_run[1]
    reasons = {(r["split"], r["index"]): r["reason"] for r in records}
    assert reasons["test", 2] == "FileNotFoundError: No such file or directory"
    assert reasons["val", 0].startswith("InvalidArgumentError: ")


@pytest.mark.slow
def test_a_run_without_failures_writes_and_mentions_no_dead_letter_file(tmp_path):
    tree = write_met_tree(tmp_path / "met", num_exhibits=2, images_per_exhibit=1)
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "tfmet.cli.extract_beam", f"--info_dir={tree.info_dir}",
        f"--image_root={tree.image_root}", f"--output_dir={out}", "--backbone=resnet_tiny",
        "--splits=train", "--direct_running_mode=in_memory",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "(0 failed)" in done.stderr
    assert "dead_letter" not in done.stderr and "failed images are listed" not in done.stderr
    assert not os.path.exists(out / "dead_letter") or os.listdir(out / "dead_letter") == []
    assert store.read_store(out, "train").valid.tolist() == [True, True]


@pytest.mark.slow
def test_rerun_plans_only_missing_chunks(corpus, beam_run, tmp_path):
    _, tree, _, reference, _, spec = corpus
    out, _ = beam_run
    copy = str(tmp_path / "copy")  # the chunks as the pipeline left them, whatever ran before
    shutil.copytree(os.path.join(out, "chunks"), os.path.join(copy, "chunks"))
    met_splits = extraction.load_met_splits(tree.info_dir, SPLITS)
    plan = pipeline.plan_extraction(spec, met_splits, tree.image_root, copy)
    assert plan.tasks == [] and plan.finished == {"train": 3, "val": 3, "test": 3}
    os.remove(ChunkOutput(copy, "val").chunk_path(1))
    plan = pipeline.plan_extraction(spec, met_splits[1:2], tree.image_root, copy)
    assert [tuple(t) for t in plan.tasks] == [("val", 1, 3, 6)] and plan.images == 3
    other = spec_lib.ExtractionSpec(**{**vars(spec), "resize_method": "tf"})
    with pytest.raises(ValueError, match="other settings"):
        pipeline.plan_extraction(other, met_splits[1:2], tree.image_root, copy)
    # Finished stores (here the single-machine ones) are left alone.
    plan = pipeline.plan_extraction(spec, met_splits, tree.image_root, reference)
    assert plan.complete == list(SPLITS) and plan.tasks == []


@pytest.mark.slow
def test_inference_function_reasons_match_single_machine(corpus, beam_run):
    root, tree, _, _, extractor, spec = corpus
    out, _ = beam_run
    model = DescriptorModelHandler(os.path.join(out, "model")).load_model()
    assert pipeline.saved_model_spec(os.path.join(out, "model"), CHUNK_SIZE) == spec
    good = tree.image_path(tree.val[2]["path"])
    with open(good, "rb") as f:
        good_bytes = f.read()
    bad = [b"", b"GIF89a", good_bytes[:300]]
    results = describe_batch(model, [good_bytes, *bad], {})
    image = image_io.decode_image(good_bytes)[None]
    np.testing.assert_allclose(results[0].inference.descriptor, extractor(image)[0], atol=1e-5)
    assert results[0].inference.reason == ""
    for data, result in zip(bad, results[1:], strict=True):
        path = root / "probe.jpg"
        path.write_bytes(data)
        assert result.inference.descriptor is None
        assert result.inference.reason == image_io.read_image(str(path))[1] != ""


@pytest.mark.slow  # beam_run starts tfmet-extract-beam
def test_input_limits_are_applied_by_the_workers(corpus, beam_run, tmp_path):
    """--max_pixels refuses in the inference function, --max_bytes in the reader, local files
    and object-store ones alike (an object is never read past the limit)."""
    root, tree, _, _, _, _ = corpus
    out, _ = beam_run
    model = DescriptorModelHandler(os.path.join(out, "model")).load_model()
    good = tree.image_path(tree.val[2]["path"])
    with open(good, "rb") as f:
        good_bytes = f.read()
    height, width = image_io.decode_image(good_bytes).shape[:2]
    fits = describe_batch(model, [good_bytes], {}, max_pixels=height * width)[0]
    over = describe_batch(model, [good_bytes], {}, max_pixels=height * width - 1)[0]
    assert fits.inference.reason == "" and over.inference.descriptor is None
    assert over.inference.reason.startswith(f"image declares {width}x{height}")

    _MappedFileSystem.ROOT = str(tmp_path)
    shutil.copyfile(good, tmp_path / "x.jpg")
    size = len(good_bytes)
    for file in (str(tmp_path / "x.jpg"), "tfmettest://x.jpg"):
        key = transforms.RowKey("val", 0, 0, 1, 0, "x.jpg", file)
        [(_, data)] = transforms.ReadImageBytes(max_bytes=size).process(key)
        assert data == good_bytes
        [refused] = transforms.ReadImageBytes(max_bytes=size - 1).process(key)
        assert refused.tag == transforms.UNREADABLE
        assert refused.value[1].descriptor is None
        assert f"{size - 1:,} bytes" in refused.value[1].reason


# --- A stand-in remote file system: "tfmettest://<key>" is <ROOT>/<key> on the local disk -------


class _MappedFileSystem(LocalFileSystem):
    """Object-store-like (no directories, "/"-joined keys), registered with Beam by subclassing."""

    ROOT = None
    PREFIX = "tfmettest://"

    @classmethod
    def scheme(cls):
        return "tfmettest"

    def _local(self, path):
        return os.path.join(self.ROOT, *path[len(self.PREFIX) :].split("/"))

    def _remote(self, local):
        return self.PREFIX + os.path.relpath(local, self.ROOT).replace(os.sep, "/")

    def join(self, base, *paths):
        return posixpath.join(base, *paths)

    def split(self, path):
        return posixpath.split(path)

    def has_dirs(self):
        return False

    def mkdirs(self, path):
        pass

    def _list(self, prefix):
        for folder, _, files in os.walk(self.ROOT, followlinks=True):
            for name in files:
                local = os.path.join(folder, name)
                remote = self._remote(local)
                if remote.startswith(prefix):
                    yield FileMetadata(remote, os.path.getsize(local), os.path.getmtime(local))

    def metadata(self, path):
        local = super().metadata(self._local(path))
        return FileMetadata(path, local.size_in_bytes, local.last_updated_in_seconds)

    def create(self, path, *args, **kwargs):
        return super().create(self._local(path), *args, **kwargs)

    def open(self, path, *args, **kwargs):
        return super().open(self._local(path), *args, **kwargs)

    def exists(self, path):
        return super().exists(self._local(path))

    def size(self, path):
        return super().size(self._local(path))

    def delete(self, paths):
        super().delete([self._local(p) for p in paths])

    def rename(self, sources, destinations):
        super().rename([self._local(p) for p in sources], [self._local(p) for p in destinations])

    def copy(self, sources, destinations):
        super().copy([self._local(p) for p in sources], [self._local(p) for p in destinations])


@pytest.mark.slow
def test_remote_paths_in_process_runner(corpus, beam_run, tmp_path):
    """Images, model and chunks behind a non-local scheme (as gs:// on Dataflow), then merged."""
    _, tree, broken, reference, extractor, spec = corpus
    out, _ = beam_run
    _MappedFileSystem.ROOT = str(tmp_path)
    os.symlink(tree.image_root, tmp_path / "met")
    remote = "tfmettest://out"
    # The launcher's upload and a worker's download of the model (the export itself is reused).
    assert paths.upload_tree(os.path.join(out, "model"), remote + "/model") >= 3
    assert os.path.exists(tmp_path / "out" / "model" / "saved_model.pb")
    local_copy = str(tmp_path / "copy")
    count = paths.copy_tree(remote + "/model", local_copy)
    assert sorted(os.listdir(local_copy)) == sorted(os.listdir(os.path.join(out, "model")))
    assert count == sum(len(files) for _, _, files in os.walk(os.path.join(out, "model")))
    model = pipeline.export_descriptor_model(extractor, spec, remote + "/model")  # same spec
    other = spec_lib.ExtractionSpec(**{**vars(spec), "max_side": 32})
    with pytest.raises(ValueError, match="other settings"):
        pipeline.export_descriptor_model(extractor, other, model)
    met_splits = extraction.load_met_splits(tree.info_dir, SPLITS)
    plan = pipeline.plan_extraction(spec, met_splits, "tfmettest://met", remote)
    assert len(plan.tasks) == 9
    report = pipeline.run_extraction(plan, model, ["--direct_running_mode=in_memory"])
    assert (report.state, report.images, report.failed) == ("DONE", 22, 4)
    assert {(r["split"], r["index"]) for r in pipeline.read_dead_letters(remote)} == set(broken)
    assert pipeline.plan_extraction(spec, met_splits, "tfmettest://met", remote).tasks == []
    # "Copy the chunks down and run tfmet-extract --merge": the local folder is that copy.
    local = str(tmp_path / "out")
    for split in SPLITS:
        chunk_files.merge_split(local, split)
    _assert_matches_reference(local, reference, broken)


@pytest.mark.slow
def test_cli_rejects_bad_input(corpus, tmp_path):
    _, tree, *_ = corpus
    base = [sys.executable, "-m", "tfmet.cli.extract_beam", f"--output_dir={tmp_path}"]
    cases = [
        ([], "missing --info_dir, --image_root"),
        (
            [f"--info_dir={tree.info_dir}", f"--image_root={tree.image_root}", "--info_dri=x"],
            "unknown flags (neither tfmet nor Beam): --info_dri",
        ),
        (
            [
                f"--info_dir={tree.info_dir}",
                f"--image_root={tree.image_root}",
                "--beam_runner=DataflowRunner",
            ],
            "Dataflow workers cannot read",
        ),
        (
            [
                f"--info_dir={tree.info_dir}",
                f"--image_root={tree.image_root}",
                "--local_features=-5",
            ],
            "--local_features must be 0 (none) or positive. Received: -5",
        ),  # fmt: skip
    ]
    for flags, message in cases:
        done = subprocess.run([*base, *flags], capture_output=True, text=True, cwd=REPO)
        assert done.returncode == 2, done.stderr[-2000:]
        assert message in done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith("tfmet-extract-beam: error: ")


def test_whitened_saved_model_is_refused(tmp_path):
    model = tmp_path / "model"
    write_descriptor_metadata(model, pca_whitening=True)
    with pytest.raises(ValueError, match="PCA-whitening"):
        pipeline.saved_model_spec(str(model))
    write_descriptor_metadata(model, drop=("dim",))
    with pytest.raises(ValueError, match="lacks dim"):
        pipeline.saved_model_spec(str(model))
    with pytest.raises(FileNotFoundError, match="tfmet-export --kind descriptor"):
        pipeline.saved_model_spec(str(tmp_path / "nowhere"))
