"""Procedural "style" datasets on disk, in the layouts tfmet's style loaders read.

Each class is a style defined by colour and texture statistics: a base colour, a stripe
orientation and frequency, and a noise level. Images of one class vary in phase, jitter and
noise, so a classifier has to learn the statistics, not memorise pixels.

Layouts (the real datasets' formats, at toy scale):

- `make_pandora18k(root)`: `<root>/<NN_Movement>/<artist>/<image>.jpg`; two artists of a
  movement share file names, and one movement also has images directly in its folder (no artist).
- `make_wikipaintings(root)`: images in `<root>/images/<Style>/<image>.jpg` and the list files
  `<root>/{train,val,test}.txt` of `relative/path label_index` lines, with `<root>/classes.txt`
  (`index name` lines).
- `make_folders(root)`: plain `<root>/<Style>/<image>.jpg`.
- `make_csv(root)`: `<root>/images/<image>.jpg` and `<root>/labels.csv` with columns
  `path,style,artist,genre` (some genres left empty).

Run as a program to make one for the smoke configs:

    python -m tests.style_data pandora18k /tmp/pandora_smoke
"""

import csv
import os
import sys

import numpy as np
from PIL import Image

MOVEMENTS = (
    "01_Byzantin_Iconography",
    "02_Early_Renaissance",
    "03_Northern_Renaissance",
    "04_High_Renaissance",
    "05_Baroque",
    "06_Rococo",
    "07_Romanticism",
    "08_Realism",
)
STYLES = (
    "Abstract_Art",
    "Baroque",
    "Cubism",
    "Impressionism",
    "Pop_Art",
    "Realism",
    "Rococo",
    "Ukiyo-e",
)
GENRES = ("portrait", "landscape", "still_life")


def style_parameters(class_index, num_classes):
    """The statistics of style `class_index`: colour, stripe angle and frequency, noise."""
    hue = class_index / num_classes
    colour = 255.0 * (0.5 + 0.4 * np.cos(2 * np.pi * (hue + np.array([0.0, 1 / 3, 2 / 3]))))
    angle = np.pi * ((class_index * 3) % num_classes) / num_classes
    frequency = 2.0 + 2.0 * (class_index % 3)
    noise = 8.0 + 8.0 * (class_index % 2)
    return colour, angle, frequency, noise


def style_image(class_index, num_classes, rng, size=48):
    """One uint8 [size, size, 3] image of style `class_index`."""
    colour, angle, frequency, noise = style_parameters(class_index, num_classes)
    y, x = np.mgrid[0:size, 0:size] / size
    angle = angle + rng.normal(0.0, 0.1)
    phase = rng.uniform(0.0, 2 * np.pi)
    stripes = np.sin(2 * np.pi * frequency * (x * np.cos(angle) + y * np.sin(angle)) + phase)
    image = colour + rng.normal(0.0, 12.0, size=3) + 40.0 * stripes[..., None]
    image = image + rng.normal(0.0, noise, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _write(path, array, fmt="JPEG"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, fmt, **({"quality": 95} if fmt == "JPEG" else {}))


def write_corrupt(path):
    """A file with an image extension whose bytes are not an image."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"this is not a JPEG file\x00\x01")


def make_pandora18k(
    root, num_classes=4, artists=2, images_per_artist=8, loose_images=2, size=48, seed=0
):
    """Pandora18k layout. Returns {"paths": [...], "style": [...], "artist": [...]} (relative)."""
    rng = np.random.default_rng(seed)
    out = {"paths": [], "style": [], "artist": []}
    for c in range(num_classes):
        movement = MOVEMENTS[c]
        for a in range(artists):
            artist = f"artist_{c}_{a}"
            for i in range(images_per_artist):
                # Every artist of a movement uses the same file names: the flattening bug.
                rel = f"{movement}/{artist}/painting_{i:02d}.jpg"
                _write(os.path.join(root, rel), style_image(c, num_classes, rng, size))
                out["paths"].append(rel)
                out["style"].append(movement)
                out["artist"].append(artist)
        if c == 0:
            for i in range(loose_images):
                rel = f"{movement}/loose_{i:02d}.jpg"
                _write(os.path.join(root, rel), style_image(c, num_classes, rng, size))
                out["paths"].append(rel)
                out["style"].append(movement)
                out["artist"].append("")
    return out


def make_folders(root, num_classes=4, images_per_class=12, size=48, seed=0, fmt="JPEG"):
    """Plain `<style>/<image>` layout. Returns {"paths": [...], "style": [...]}."""
    rng = np.random.default_rng(seed)
    ext = {"JPEG": "jpg", "PNG": "png"}[fmt]
    out = {"paths": [], "style": []}
    for c in range(num_classes):
        for i in range(images_per_class):
            rel = f"{STYLES[c]}/{STYLES[c].lower()}_{i:03d}.{ext}"
            _write(os.path.join(root, rel), style_image(c, num_classes, rng, size), fmt)
            out["paths"].append(rel)
            out["style"].append(STYLES[c])
    return out


def make_wikipaintings(root, num_classes=4, per_split=(10, 3, 3), size=48, seed=0):
    """RASTA-style list files. Returns {split: {"paths": [...], "style": [...]}}."""
    rng = np.random.default_rng(seed)
    with open(os.path.join(_mkdir(root), "classes.txt"), "w") as f:
        for c in range(num_classes):
            f.write(f"{c} {STYLES[c]}\n")
    out = {}
    for split, count in zip(("train", "val", "test"), per_split, strict=True):
        out[split] = {"paths": [], "style": []}
        lines = []
        for c in range(num_classes):
            for i in range(count):
                rel = f"images/{STYLES[c]}/{split}-{STYLES[c].lower()} painting {i:02d}.jpg"
                _write(os.path.join(root, rel), style_image(c, num_classes, rng, size))
                lines.append(f"{rel} {c}\n")
                out[split]["paths"].append(rel)
                out[split]["style"].append(STYLES[c])
        with open(os.path.join(root, f"{split}.txt"), "w") as f:
            f.writelines(lines)
    return out


def make_csv(root, num_classes=3, images_per_class=10, size=48, seed=0):
    """Multi-attribute CSV. Returns {"paths", "style", "artist", "genre"} (genre "" = missing)."""
    rng = np.random.default_rng(seed)
    out = {"paths": [], "style": [], "artist": [], "genre": []}
    for c in range(num_classes):
        for i in range(images_per_class):
            rel = f"images/{c}_{i:03d}.jpg"
            _write(os.path.join(root, rel), style_image(c, num_classes, rng, size))
            out["paths"].append(rel)
            out["style"].append(STYLES[c])
            out["artist"].append(f"artist_{(c + i) % 4}")
            out["genre"].append("" if i % 5 == 4 else GENRES[i % 3])
    with open(os.path.join(root, "labels.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "style", "artist", "genre"])
        for row in zip(out["paths"], out["style"], out["artist"], out["genre"], strict=True):
            writer.writerow(row)
    return out


def _mkdir(path):
    os.makedirs(path, exist_ok=True)
    return path


LAYOUTS = {
    "pandora18k": make_pandora18k,
    "wikipaintings": make_wikipaintings,
    "folders": make_folders,
    "csv": make_csv,
}


def main(argv):
    if len(argv) != 3 or argv[1] not in LAYOUTS:
        print(f"usage: python -m tests.style_data {{{','.join(LAYOUTS)}}} OUTPUT_DIR")
        return 2
    LAYOUTS[argv[1]](argv[2])
    print(f"wrote a procedural {argv[1]} dataset to {argv[2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))


# The small Pandora18k-like dataset the style training tests share (tests/training/conftest.py).
NUM_CLASSES = 6


def make_small_pandora18k(root):
    """NUM_CLASSES styles x 2 artists x 12 images of 32 px (plus the loose images) under `root`."""
    make_pandora18k(root, num_classes=NUM_CLASSES, artists=2, images_per_artist=12, size=32, seed=0)
    return root
