"""Writes a tiny Met-format tree for tests: ground-truth JSON + JPEGs, in the real on-disk layout.

    <root>/info/MET_database.json, mini_MET_database.json, valset.json, testset.json
    <root>/images/MET/<id>/<n>.jpg, test_met/<n>.jpg, test_other/<n>.jpg, test_noart/<n>.jpg

Each exhibit has its own synthetic look (a seeded low-frequency colour pattern); its database
images and its Met queries are views of it (shifted, brightness-jittered, mildly noisy), so a
sensible descriptor retrieves the right exhibit. Distractor queries are unrelated patterns
without `MET_id`. Image sizes cycle through a few mixed aspect ratios.

Usage:

    tree = write_met_tree(tmp_path)          # MetTree(info_dir, image_root, train, mini, val, test)
    split = tfmet.data.met.load_split(tree.info_dir, "val")

`write_photo_tree` writes the same layout from real photos instead, for the journeys with the real
embedded model (tests/journeys/).
"""

import dataclasses
import json
import os

import numpy as np
from PIL import Image

# (height, width) of generated images, cycled; several repeat so equal sizes can be batched.
DEFAULT_SIZES = ((48, 64), (64, 48), (48, 64), (40, 40))


@dataclasses.dataclass(frozen=True)
class MetTree:
    """Where a written tree lives and the JSON entries it holds (lists of dicts, JSON order)."""

    root: str
    info_dir: str
    image_root: str
    train: list
    mini: list
    val: list
    test: list

    def entries(self, split, mini=False):
        if split == "train":
            return self.mini if mini else self.train
        return {"val": self.val, "test": self.test}[split]

    def image_path(self, entry_path):
        return os.path.join(self.image_root, "images", *entry_path.split("/"))


def exhibit_pattern(exhibit_seed, size=(48, 64)):
    """The base look of one exhibit: uint8 [H, W, 3], smooth colour blobs from `exhibit_seed`."""
    rng = np.random.default_rng(exhibit_seed)
    height, width = size
    coarse = rng.uniform(0, 255, size=(4, 4, 3))
    rows = np.linspace(0, 3, height)
    cols = np.linspace(0, 3, width)
    r0 = np.floor(rows).astype(int).clip(0, 2)
    c0 = np.floor(cols).astype(int).clip(0, 2)
    fr = (rows - r0)[:, None, None]
    fc = (cols - c0)[None, :, None]
    top = coarse[r0][:, c0] * (1 - fc) + coarse[r0][:, c0 + 1] * fc
    bottom = coarse[r0 + 1][:, c0] * (1 - fc) + coarse[r0 + 1][:, c0 + 1] * fc
    image = top * (1 - fr) + bottom * fr
    stripes = 40.0 * np.sin(
        np.arange(width)[None, :, None] * rng.uniform(0.2, 0.8) + rng.uniform(0, 6)
    )
    return np.clip(image + stripes, 0, 255).astype(np.uint8)


def exhibit_view(exhibit_seed, view, size=(48, 64)):
    """View `view` of an exhibit: its pattern shifted, brightness-jittered and lightly noisy."""
    base = exhibit_pattern(exhibit_seed, size).astype(np.float64)
    rng = np.random.default_rng([exhibit_seed, view])
    shifted = np.roll(base, shift=(int(rng.integers(-3, 4)), int(rng.integers(-3, 4))), axis=(0, 1))
    image = shifted * rng.uniform(0.9, 1.1) + rng.normal(0, 4.0, size=base.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_image(path, array, format="JPEG", **save_kwargs):
    """Saves uint8 `array` ([H, W, 3] or a PIL image) to `path`, creating folders."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = array if isinstance(array, Image.Image) else Image.fromarray(np.asarray(array))
    if format == "JPEG":
        save_kwargs.setdefault("quality", 90)
    image.save(path, format=format, **save_kwargs)
    return path


def _write_json(path, entries):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(entries, f)


def write_met_tree(
    root,
    num_exhibits=4,
    images_per_exhibit=2,
    met_queries=3,
    other_queries=2,
    noart_queries=2,
    sizes=DEFAULT_SIZES,
    seed=0,
):
    """Writes a Met-format tree under `root` and returns its `MetTree`.

    Args:
      root: folder to write into (created).
      num_exhibits: number of Met classes in the database.
      images_per_exhibit: database images per class.
      met_queries: Met queries in each of val and test (views of exhibits, cycling through them).
      other_queries, noart_queries: distractor queries (no `MET_id`) in each of val and test.
      sizes: (height, width) pairs cycled over all images written.
      seed: base seed; the same arguments always write the same bytes.

    The mini database holds the first half (at least one) of the exhibits.
    """
    root = os.fspath(root)
    tree = MetTree(
        root=root,
        info_dir=os.path.join(root, "info"),
        image_root=root,
        train=[],
        mini=[],
        val=[],
        test=[],
    )
    counter = iter(range(10**9))
    next_size = lambda: sizes[next(counter) % len(sizes)]
    met_ids = [1000 + 37 * k for k in range(num_exhibits)]
    exhibit_seed = lambda k: seed * 100_003 + 17 + k

    for k, met_id in enumerate(met_ids):
        for n in range(images_per_exhibit):
            path = f"MET/{met_id}/{n}.jpg"
            write_image(tree.image_path(path), exhibit_view(exhibit_seed(k), n, next_size()))
            tree.train.append({"id": met_id, "path": path})
    mini_ids = set(met_ids[: max(1, num_exhibits // 2)])
    tree.mini.extend(e for e in tree.train if e["id"] in mini_ids)

    for split_index, (split, entries) in enumerate((("val", tree.val), ("test", tree.test))):
        for q in range(met_queries):
            k = (q + split_index) % num_exhibits
            path = f"test_met/{split}_{q}.jpg"
            view = images_per_exhibit + 10 * split_index + q
            write_image(tree.image_path(path), exhibit_view(exhibit_seed(k), view, next_size()))
            entries.append({"path": path, "MET_id": met_ids[k]})
        for kind, count in (("test_other", other_queries), ("test_noart", noart_queries)):
            for q in range(count):
                path = f"{kind}/{split}_{q}.jpg"
                distractor_seed = seed * 100_003 + 50_000 + 1000 * split_index + 100 * len(kind) + q
                write_image(tree.image_path(path), exhibit_view(distractor_seed, 0, next_size()))
                entries.append({"path": path})

    _write_json(os.path.join(tree.info_dir, "MET_database.json"), tree.train)
    _write_json(os.path.join(tree.info_dir, "mini_MET_database.json"), tree.mini)
    _write_json(os.path.join(tree.info_dir, "valset.json"), tree.val)
    _write_json(os.path.join(tree.info_dir, "testset.json"), tree.test)
    return tree


# Four exhibits (the stereo motorcycle with two database views, as many Met objects have) and two
# distractors: seventeen images keep EfficientNet-Lite0 within seconds on two cores.
PHOTO_TREE_PHOTOS = ("astronaut", "chelsea", "coffee", "motorcycle", "clock", "china_right")
# Its visitor photos have a long side of 320-448 px; the journeys cap them at this.
PHOTO_TREE_MAX_SIDE = 160


def write_photo_tree(root):
    """A tiny Met tree of real photos under `root`, by the demo's own builder
    (`tfmet.demo.benchmark`): one simulated visitor photo of each exhibit and distractor in val
    and in test. Real photos, unlike `write_met_tree`'s patterns, are what ImageNet features
    were trained on, so a real model's descriptors tell them apart. Returns the
    `tfmet.demo.benchmark.Benchmark`."""
    from tfmet.demo.benchmark import BenchmarkConfig, build_benchmark

    config = BenchmarkConfig(
        photos=PHOTO_TREE_PHOTOS,
        val_per_exhibit=1,
        test_per_exhibit=1,
        val_per_distractor=1,
        test_per_distractor=1,
        database_side=128,
    )
    return build_benchmark(root, config, progress=False)


def small_benchmark_config(seed, photos, test_per_exhibit=1):
    """A `tfmet.demo.benchmark.BenchmarkConfig` built in seconds: the exhibits of `photos`
    (skimage.data names) with 96-pixel database images, one val query per exhibit and per
    distractor, `test_per_exhibit` test queries per exhibit and one per distractor."""
    from tfmet.demo import benchmark

    return benchmark.BenchmarkConfig(
        seed=seed,
        val_per_exhibit=1,
        test_per_exhibit=test_per_exhibit,
        val_per_distractor=1,
        test_per_distractor=1,
        database_side=96,
        photos=tuple(photos),
    )
