"""A small Met-format benchmark built from real photos, in the official on-disk layout.

    <root>/info/MET_database.json        [{"id": <Met id>, "path": "MET/<id>/<n>.jpg"}, ...]
    <root>/info/mini_MET_database.json   the same list (the demo database is already mini)
    <root>/info/valset.json              [{"path": "test_met/<n>.jpg", "MET_id": <id>},
    <root>/info/testset.json              {"path": "test_noart/<n>.jpg"}, ...]  (distractors:
                                          no MET_id; illustrations go to test_other/)
    <root>/images/<path>                 the JPEGs
    <root>/demo_benchmark.json           provenance: settings, source photo of each exhibit and
                                          the parameters of every simulated visitor photo

so `--info_dir <root>/info --image_root <root>` works with every tfmet program, exactly as with the
real Met. Exhibit photos (`tfmet.demo.photos`) become database images (long side 384 px);
visitor queries are simulated phone photos of them (`tfmet.demo.visitor`), split between val
(tuning) and test (reporting); distractor photos, not in the database, give queries without a
Met id.
"""

import dataclasses
import json
import os
import shutil
import tempfile

import numpy as np

from tfmet.demo import photos as photos_lib
from tfmet.demo import visitor
from tfmet.io.atomic import replace_directory, save_json

FORMAT_VERSION = 1
PROVENANCE_FILE = "demo_benchmark.json"


@dataclasses.dataclass(frozen=True)
class BenchmarkConfig:
    """How the demo benchmark is drawn.

    Attributes:
      seed: seed of every random choice (same seed, same benchmark).
      val_per_exhibit, test_per_exhibit: visitor photos of each exhibit in val / test.
      val_per_distractor, test_per_distractor: queries made from each distractor photo.
      database_side: long side of the database images, in pixels.
      first_id: Met id of the first exhibit (ids are consecutive in catalogue order).
      photos: names of the `tfmet.demo.photos` regions to use (e.g. "chelsea", "coins_left"),
        None for all of them.
      visitor: the visitor-photo strength, a key of `tfmet.demo.visitor.STRENGTHS`
        ("default", or "hard": stronger viewpoint, crop and lighting changes; see `HARD`).
    """

    seed: int = 0
    val_per_exhibit: int = 1
    test_per_exhibit: int = 2
    val_per_distractor: int = 1
    test_per_distractor: int = 2
    database_side: int = 384
    first_id: int = 1000
    photos: tuple | None = None
    visitor: str = "default"

    def __post_init__(self):
        if self.photos is not None:
            object.__setattr__(self, "photos", tuple(str(p) for p in self.photos))
        if self.visitor not in visitor.STRENGTHS:
            raise ValueError(
                f"`visitor` must be one of {sorted(visitor.STRENGTHS)}. Received: {self.visitor!r}"
            )
        for field in dataclasses.fields(self):
            if field.name in ("photos", "visitor"):
                continue
            value = getattr(self, field.name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"`{field.name}` must be a non-negative integer. Received: {value!r}"
                )
        if self.database_side < 32:
            raise ValueError(f"`database_side` must be >= 32. Received: {self.database_side}")


# The harder benchmark spatial re-ranking is measured on (issue 24): stronger visitor photos and
# three times the queries, distractor queries included; another seed than the default's.
HARD = BenchmarkConfig(
    seed=24,
    val_per_exhibit=3,
    test_per_exhibit=6,
    val_per_distractor=3,
    test_per_distractor=6,
    visitor="hard",
)
PRESETS = {"default": BenchmarkConfig(), "hard": HARD}


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """A benchmark on disk: `info_dir` and `image_root` as every tfmet program takes them."""

    root: str
    info_dir: str
    image_root: str
    provenance: dict

    @property
    def exhibits(self):
        """{Met id: source photo name}."""
        return {int(k): v["name"] for k, v in self.provenance.get("exhibits", {}).items()}


def _write(root, path, data):
    full = os.path.join(root, "images", *path.split("/"))
    os.makedirs(os.path.dirname(full), exist_ok=True)
    with open(full, "wb") as f:
        f.write(data)


def _plan(photos, config):
    """(database entries, {split: query entries}, provenance, [(path, source, rng or None)])."""
    database, queries = [], {"val": [], "test": []}
    exhibits, records, jobs = {}, [], []
    met_count = {"test_met": 0, "test_noart": 0, "test_other": 0}
    exhibit_index = 0
    for photo_index, photo in enumerate(photos):
        if photo.role == photos_lib.EXHIBIT:
            met_id = config.first_id + exhibit_index
            exhibit_index += 1
            exhibits[str(met_id)] = {"name": photo.name, "package": photo.package}
            for view_index, view in enumerate(photo.views):
                path = f"MET/{met_id}/{view_index}.jpg"
                database.append({"id": met_id, "path": path})
                jobs.append((path, view, None))
            folder, counts = "test_met", (config.val_per_exhibit, config.test_per_exhibit)
        else:
            met_id = None
            folder = "test_other" if photo.kind == "illustration" else "test_noart"
            counts = (config.val_per_distractor, config.test_per_distractor)
        for split, count in zip(("val", "test"), counts, strict=True):
            for j in range(count):
                path = f"{folder}/{met_count[folder]}.jpg"
                met_count[folder] += 1
                entry = {"path": path} if met_id is None else {"path": path, "MET_id": met_id}
                queries[split].append(entry)
                rng = np.random.default_rng([config.seed, photo_index, split == "test", j])
                jobs.append((path, photo.views[0], rng))
                records.append({"split": split, "path": path, "source": photo.name, **entry})
    provenance = {
        "format_version": FORMAT_VERSION,
        "config": _config_record(config),
        "exhibits": exhibits,
        "distractors": [
            {"name": p.name, "package": p.package, "kind": p.kind}
            for p in photos
            if p.role == photos_lib.DISTRACTOR
        ],
        "queries": records,
    }
    return database, queries, provenance, jobs


def _config_record(config):
    record = dataclasses.asdict(config)
    record["photos"] = None if config.photos is None else list(config.photos)
    if config.visitor == "default":  # benchmarks written before `visitor` existed stay built
        del record["visitor"]
    return record


def _matches(root, config):
    path = os.path.join(root, PROVENANCE_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            provenance = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    same = (
        provenance.get("format_version") == FORMAT_VERSION
        and provenance.get("config") == _config_record(config)
        and all(os.path.isfile(os.path.join(root, "info", n)) for n in _INFO_FILES)
    )
    return provenance if same else None


def is_built(root, config=None):
    """Whether `root` already holds the benchmark `config` describes (then it is reused)."""
    return _matches(os.path.abspath(os.fspath(root)), config or BenchmarkConfig()) is not None


_INFO_FILES = ("MET_database.json", "mini_MET_database.json", "valset.json", "testset.json")


def build_benchmark(root, config=None, progress=True, photos=None):
    """Writes the demo benchmark under `root` (or reuses it when already built the same way).

    The tree is written into a temporary folder next to `root` and renamed into place, so an
    interrupted build never leaves a half-written benchmark. An existing `root` is replaced only
    if it holds a demo benchmark (its `demo_benchmark.json`); any other existing folder is an
    error.

    Args:
      root: the benchmark folder.
      config: a `BenchmarkConfig` (default settings when None).
      progress: show a progress bar while writing images.
      photos: the source photos (default `tfmet.demo.photos.load_photos()`).

    Returns:
      a `Benchmark`.
    """
    config = config or BenchmarkConfig()
    root = os.path.abspath(os.fspath(root))
    provenance = _matches(root, config)
    if provenance is not None:
        return Benchmark(root, os.path.join(root, "info"), root, provenance)
    if os.path.exists(root) and not os.path.isfile(os.path.join(root, PROVENANCE_FILE)):
        raise ValueError(
            f"{root} exists and is not a tfmet demo benchmark; choose another --workdir"
        )
    if photos is None:
        catalog = photos_lib.CATALOG
        if config.photos is not None:  # load only the pictures the chosen regions come from
            wanted = lambda name: any(p == name or p.startswith(name + "_") for p in config.photos)
            catalog = [entry for entry in catalog if wanted(entry[0])]
        photos = photos_lib.load_photos(catalog)
    if config.photos is not None:
        unknown = sorted(set(config.photos) - {p.name for p in photos})
        if unknown:
            raise ValueError(f"unknown or unavailable demo photos: {', '.join(unknown)}")
        photos = [p for p in photos if p.name in config.photos]
    roles = {p.role for p in photos}
    if roles != {photos_lib.EXHIBIT, photos_lib.DISTRACTOR}:
        raise ValueError("the demo needs at least one exhibit photo and one distractor photo")
    database, queries, provenance, jobs = _plan(photos, config)

    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tmp-benchmark-", dir=parent)
    try:
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(jobs), unit="img", desc="benchmark", dynamic_ncols=True)
        parameters = {}
        for path, image, rng in jobs:
            if rng is None:
                data = visitor.catalogue_photo(image, long_side=config.database_side)
            else:
                data, parameters[path] = visitor.visitor_photo(
                    image, rng, visitor.STRENGTHS[config.visitor]
                )
            _write(staging, path, data)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        for record in provenance["queries"]:
            record["visitor_photo"] = parameters[record["path"]]
        info = os.path.join(staging, "info")
        save_json(os.path.join(info, "MET_database.json"), database)
        save_json(os.path.join(info, "mini_MET_database.json"), database)
        save_json(os.path.join(info, "valset.json"), queries["val"])
        save_json(os.path.join(info, "testset.json"), queries["test"])
        save_json(os.path.join(staging, PROVENANCE_FILE), provenance)
        replace_directory(staging, root)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging)
    return Benchmark(root, os.path.join(root, "info"), root, provenance)
