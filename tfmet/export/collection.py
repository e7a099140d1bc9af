"""A living collection: add and remove exhibits of a recogniser export without rebuilding it.

    collection = open_collection("exports/met", info_dir="met/")   # the rows it serves
    check_model(collection, spec)                                  # the export's own model
    with writer_lock("exports/met"):
        changed = add_images(collection, extractor, 1234, ["new/1234_a.jpg"])
        changed = remove_rows(changed, met_id=5678)
        save_collection(changed, extractor, "exports/met")          # atomic swap in place

The new images are described by the export's own pipeline (its model, scales, resize, max side,
input limits and PCA-whitening, the `DescriptorModule` the export is made of) and appended to the
database: the exact search's rows are appended (or dropped) as they are, so an export that had
the images added answers as one built from the whole database would. The PCA-whitening stays the
one the export was built with (refitting it would change every row: that is a rebuild with
tfmet-export); a collection that drifts far from the images it was fitted on should be exported
again.

An export written here keeps, beside its model, the rows' ground-truth paths
(`assets/collection_paths.npy`), the ground truth of its rows in the Met format
(`assets/MET_database.json`, [{"id", "path"}]) and, in its metadata, the collection's version and
the changes that made it ("collection"). A ScaNN export's tree is changed in place
(`tfmet.retrieval.scann_update`: rows upserted into it or dropped from it, nothing retrained),
and its recall@k against exact search is measured again on a sample of rows
(`tfmet.retrieval.recall`'s rule and target); `save_collection` records it and, below the
target, can build the tree anew with the same configuration (`rebuild_below_target`).
"""

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import tempfile

import numpy as np

from tfmet.io.saved_models import load_saved_model, read_export_metadata

PATHS_ASSET = "collection_paths.npy"
GROUND_TRUTH_ASSET = "MET_database.json"
# What the model and its settings are recorded as (ExtractionSpec.metadata); all must agree.
MODEL_KEYS = ("backbone", "weights_sha256", "scales", "resize_method", "max_side", "precision")
RECALL_SAMPLE = 500
# The searchers whose exported state this module changes: the exact one's database rows, and a
# ScaNN tree's arrays (`tfmet.retrieval.scann_update`). Another backend's exports are refused.
CHANGEABLE_SEARCHERS = ("exact", "scann")


class CollectionError(ValueError):
    """Bad input to a collection change: one line naming the file or id and the problem."""


@dataclasses.dataclass
class Collection:
    """The rows a recogniser export serves and what it was built with.

    Attributes:
      path: the export folder.
      metadata: its metadata (assets/tfmet_metadata.json).
      database: [M, dim] float32, the rows as searched (whitened, L2-normalised).
      labels: [M] int64 Met ids.
      paths: [M] the rows' ground-truth paths ("MET/<id>/<file>"; "row/<i>" when the export
        was built elsewhere without `info_dir`).
      pca: the export's PCA-whitening, (mean [D], projection [D, dim]); None for raw
        descriptors.
      top_k: candidates the export returns per image.
      scann: for a ScaNN export, its index's arrays (`tfmet.retrieval.scann_update`), changed
        in place with the rows; None for exact search.
    """

    path: str
    metadata: dict
    database: np.ndarray
    labels: np.ndarray
    paths: np.ndarray
    pca: tuple = None
    top_k: int = 5
    scann: dict = None

    @property
    def version(self):
        return int((self.metadata.get("collection") or {}).get("version", 0))

    def ground_truth(self):
        """The rows as Met ground-truth entries, in row order."""
        return [
            {"id": int(i), "path": str(p)} for i, p in zip(self.labels, self.paths, strict=True)
        ]

    def exhibits(self):
        """{Met id: number of rows}, by id."""
        ids, counts = np.unique(self.labels, return_counts=True)
        return {int(i): int(c) for i, c in zip(ids, counts, strict=True)}


def _database_rows(loaded, path, searcher):
    """(rows [M, dim] float32, the ScaNN index's arrays or None) of a loaded export."""
    search = loaded.neighbor_search
    if searcher == "exact":
        return np.asarray(search.database.numpy(), np.float32), None
    from tfmet.retrieval import scann_update

    arrays = scann_update.state_arrays(search.state)
    rows = np.asarray(arrays["dataset"])
    if rows.ndim != 2 or rows.shape[0] != int(loaded.labels.shape[0]):
        raise CollectionError(f"{path}: the ScaNN searcher keeps no float rows to change")
    return np.asarray(arrays["dataset"], np.float32), arrays


def _top_k(loaded, dim):
    """The candidates an export returns per image (its answers are padded to that many)."""
    top_k = loaded.signatures["serving_default"].structured_outputs["top_k_ids"].shape[1]
    if top_k is None:  # a ScaNN search has no static width: ask the descriptors signature
        import tensorflow as tf

        answer = loaded.signatures["descriptors"](descriptor=tf.zeros([1, dim]))
        top_k = answer["top_k_ids"].shape[1]
    return int(top_k)


def _initial_paths(path, labels, info_dir, mini):
    """The rows' ground-truth paths of an export tfmet-export wrote (not recorded in it)."""
    if info_dir is None:
        return np.asarray([f"row/{i}" for i in range(len(labels))])
    from tfmet.data.met import load_split

    truth = load_split(info_dir, "train", mini=mini)
    if len(truth.labels) != len(labels) or not np.array_equal(truth.labels, labels):
        raise CollectionError(
            f"{info_dir}: its {len(truth.labels)} database entries are not the export's "
            f"{len(labels)} rows (give the ground truth {path} was exported from)"
        )
    return np.asarray(list(truth.paths))


def open_collection(path, info_dir=None, mini=False):
    """The `Collection` of the recogniser export at `path` (see the module docstring).

    `info_dir` (`mini`): the Met ground truth the export was built from, for the rows' paths
    when the export does not record them yet (one tfmet-export wrote).

    Raises:
      CollectionError: not a recogniser export, or one this module cannot change.
    """
    path = os.path.abspath(os.fspath(path))
    try:
        metadata = read_export_metadata(path)
    except (FileNotFoundError, ValueError) as e:
        raise CollectionError(str(e)) from None
    if metadata.get("kind") != "recognizer":
        raise CollectionError(f"{path}: a {metadata.get('kind')!r} export, not a recogniser")
    if metadata.get("rerank"):
        raise CollectionError(f"{path}: exports with spatial re-ranking cannot be changed yet")
    searcher = metadata.get("searcher", "exact")
    if searcher not in CHANGEABLE_SEARCHERS:
        raise CollectionError(
            f"{path}: a recogniser searching with {searcher!r} cannot be changed in place (only "
            f"{' and '.join(CHANGEABLE_SEARCHERS)} searchers can); export it again instead"
        )
    if searcher != "exact":
        from tfmet.retrieval.scann_update import scann_ops  # its op library, before the load

        scann_ops()
    loaded = load_saved_model(path)
    labels = np.asarray(loaded.labels.numpy(), np.int64)
    database, scann = _database_rows(loaded, path, searcher)
    paths_file = os.path.join(path, "assets", PATHS_ASSET)
    if os.path.exists(paths_file):
        paths = np.load(paths_file, allow_pickle=False)
        if paths.shape != labels.shape:
            raise CollectionError(
                f"{paths_file}: {paths.shape} paths for the export's {labels.shape[0]} rows"
            )
    else:
        paths = _initial_paths(path, labels, info_dir, mini)
    whitened = bool(metadata.get("pca_whitening"))
    top_k = _top_k(loaded, database.shape[1])
    return Collection(
        path=path,
        metadata=metadata,
        database=database,
        labels=labels,
        paths=np.asarray(paths),
        pca=(loaded.pca_mean.numpy(), loaded.pca_projection.numpy()) if whitened else None,
        top_k=top_k,
        scann=scann,
    )


def check_model(collection, spec):
    """Raises CollectionError unless `spec` (an `ExtractionSpec`) is the export's model."""
    given = spec.metadata()
    differ = [
        key
        for key in MODEL_KEYS
        if key in given and json.dumps(given[key]) != json.dumps(collection.metadata.get(key))
    ]
    if differ:
        key = differ[0]
        raise CollectionError(
            f"{collection.path}: the export was built with another model ({key} "
            f"{collection.metadata.get(key)!r}, the given model has {given[key]!r})"
        )


def descriptor_module(collection, extractor):
    """The export's descriptor pipeline (its model, settings, limits and PCA-whitening)."""
    from tfmet.export.descriptor import DescriptorModule

    return DescriptorModule(extractor.embedder, **_pipeline(collection))


def _pipeline(collection):
    """The export's descriptor pipeline as the modules' keywords: its extraction settings,
    input limits and PCA-whitening."""
    meta = collection.metadata
    return dict(
        scales=tuple(meta["scales"]),
        resize_method=meta["resize_method"],
        pca=collection.pca,
        max_side=meta.get("max_side"),
        max_pixels=meta.get("max_pixels"),
        max_bytes=meta.get("max_bytes"),
    )


def describe_files(module, files):
    """[n, dim] descriptors of image files through `module.describe_bytes`, one at a time.

    Raises:
      CollectionError: a file cannot be read or does not decode (named).
    """
    import tensorflow as tf

    from tfmet.data.images import ImageRefused, read_image_bytes

    rows = []
    for file in files:
        try:  # a regular file of at most the export's max_bytes: never read whole when larger
            data = read_image_bytes(file, module.max_bytes)
        except ImageRefused as e:
            raise CollectionError(f"{file}: {e.message}") from None
        except OSError as e:
            raise CollectionError(f"{file}: cannot read ({e.strerror or e})") from None
        out = module.describe_bytes(tf.constant([data]))
        if not bool(out["valid"].numpy()[0]):
            raise CollectionError(f"{file}: does not decode as an image (or is over the limits)")
        rows.append(out["descriptor"].numpy()[0])
    return np.asarray(rows, np.float32).reshape(len(rows), module.dim)


def add_images(collection, extractor, met_id, files):
    """A new `Collection` with the image `files` added as rows of `met_id` (new or existing)."""
    if not files:
        raise CollectionError("no images to add")
    met_id = int(met_id)
    paths = [f"MET/{met_id}/{os.path.basename(os.fspath(f))}" for f in files]
    taken = set(collection.paths.tolist())
    clash = next((p for p in paths if p in taken or paths.count(p) > 1), None)
    if clash is not None:
        raise CollectionError(f"{clash}: already in the collection (rename the image file)")
    rows = describe_files(descriptor_module(collection, extractor), files)
    scann = None
    if collection.scann is not None:
        from tfmet.retrieval import scann_update

        scann = scann_update.upsert_rows(collection.scann, rows)
        rows = np.asarray(scann["dataset"][len(collection.labels) :], np.float32)
    return dataclasses.replace(
        collection,
        scann=scann,
        database=np.concatenate([collection.database, rows]),
        labels=np.concatenate([collection.labels, np.full(len(files), met_id, np.int64)]),
        paths=np.concatenate([collection.paths, np.asarray(paths)]),
    )


def remove_rows(collection, met_id=None, image=None):
    """A new `Collection` without the rows of `met_id`, or without the row of `image` (its
    ground-truth path, "MET/<id>/<file>")."""
    if (met_id is None) == (image is None):
        raise CollectionError("remove takes a Met id or an image path")
    if met_id is not None:
        keep = collection.labels != int(met_id)
        if keep.all():
            raise CollectionError(f"Met id {met_id}: not in the collection {collection.path}")
    else:
        keep = collection.paths != image
        if keep.all():
            raise CollectionError(f"{image}: no such image in the collection {collection.path}")
    if not keep.any():
        raise CollectionError(f"{collection.path}: cannot remove every row of the collection")
    scann = None
    if collection.scann is not None:
        from tfmet.retrieval import scann_update

        scann = scann_update.drop_rows(collection.scann, keep)
    return dataclasses.replace(
        collection,
        scann=scann,
        database=collection.database[keep],
        labels=collection.labels[keep],
        paths=collection.paths[keep],
    )


def recognizer_module(collection, extractor, rebuild=False):
    """The `RecognizerModule` serving `collection`'s rows with the export's settings: a ScaNN
    export's index as changed in place, or built anew with its configuration if `rebuild`."""
    from tfmet.export.recognizer import RecognizerModule

    meta = collection.metadata
    search = None
    if collection.scann is not None and not rebuild:
        from tfmet.retrieval.scann_build import ScannConfig
        from tfmet.retrieval.scann_update import graph_search

        k = min(int(meta["k"]), len(collection.labels))
        search = graph_search(collection.scann, k, ScannConfig(**meta["scann_config"]))
    return RecognizerModule(
        extractor.embedder,
        collection.database,
        collection.labels,
        k=meta["k"],
        tau=meta["tau"],
        searcher=meta.get("searcher", "exact"),
        top_k=collection.top_k,
        threshold=meta.get("threshold", 0.0),
        scann_config=meta.get("scann_config"),
        neighbor_search=search,
        **_pipeline(collection),
    )


def measured_recall(module, database, k, sample=RECALL_SAMPLE, seed=0):
    """recall@k of the module's in-graph search against exact search, queried with `sample`
    database rows (seeded), by `tfmet.retrieval.recall.recall_at_k`; None for exact search."""
    if module.scann_config is None:
        return None
    from tfmet.retrieval import recall
    from tfmet.retrieval.searchers import make_searcher

    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(len(database), min(sample, len(database)), replace=False))
    queries = database[picks]
    _, exact = make_searcher("exact").build(database).search(queries, k)
    _, found = module.neighbors(queries)
    return float(recall.recall_at_k(np.asarray(found), exact, k))


def _checked_module(collection, extractor, record, min_recall, rebuild_below_target):
    """(module, record with the measured recall): the index changed in place, or rebuilt when
    its recall is below `min_recall` and `rebuild_below_target`."""
    from tfmet.retrieval.recall import DEFAULT_MIN_RECALL

    module = recognizer_module(collection, extractor)
    found = measured_recall(module, collection.database, module.k)
    if found is None:
        return module, record
    target = DEFAULT_MIN_RECALL if min_recall is None else float(min_recall)
    record.update(recall=found, min_recall=target, rebuilt=False)
    if found < target and rebuild_below_target:
        module = recognizer_module(collection, extractor, rebuild=True)
        rebuilt = measured_recall(module, collection.database, module.k)
        record.update(recall=rebuilt, recall_in_place=found, rebuilt=True)
    return module, record


def save_collection(
    collection, extractor, out, change, min_recall=None, rebuild_below_target=False
):
    """Writes `collection` as a recogniser export at `out` (the same folder: an atomic swap;
    another: a new version beside the old) recording `change` (a dict); returns the metadata.

    The metadata's "collection" holds the version, the changes so far and, for an approximate
    searcher, the recall@k measured on a sample of rows ("recall") with the target
    (`min_recall`, default the calibration's); below it, `rebuild_below_target` builds the
    index anew with its configuration ("rebuilt").
    """
    from tfmet.export.common import metadata_signature, save_module

    meta = dict(collection.metadata)
    history = list((meta.get("collection") or {}).get("changes", []))
    record = {"version": collection.version + 1, "changes": [*history, change]}
    module, record = _checked_module(
        collection, extractor, record, min_recall, rebuild_below_target
    )
    meta.update(
        collection=record,
        database_size=module.database_size,
        num_classes=module.num_classes,
        k=module.k,
    )
    module.asset_arrays = {PATHS_ASSET: collection.paths}
    scratch = tempfile.mkdtemp(prefix=".tfmet-collection-")
    try:
        truth = os.path.join(scratch, GROUND_TRUTH_ASSET)
        with open(truth, "w", encoding="utf-8") as f:
            json.dump(collection.ground_truth(), f, indent=1)
        signatures = module.signatures()
        scalar = {k: v for k, v in meta.items() if isinstance(v, str | int | float | bool)}
        signatures["metadata"] = metadata_signature(scalar)
        save_module(module, out, signatures, meta, force=True, asset_files=[truth])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return meta


@contextlib.contextmanager
def writer_lock(path):
    """Holds `<path>.lock` (beside the export, which is swapped whole) while changing it.

    Raises:
      CollectionError: another writer holds it.
    """
    lock_file = os.path.abspath(os.fspath(path)).rstrip(os.sep) + ".lock"
    with open(lock_file, "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CollectionError(
                f"{path}: another tfmet-collection is changing it (lock {lock_file} is held)"
            ) from None
        try:
            yield lock_file
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
