"""Real photographs installed with tfmet's dependencies, the raw material of the demo benchmark.

scikit-image bundles a dozen photographs (`skimage.data`), scikit-learn two (the Chinese temple
and the flower of `sklearn.datasets.load_sample_images`, CC BY 2.0, which tfmet ships in
`tfmet/demo/data/` with their attribution: with scikit-learn installed, Keras imports it with
every TensorFlow, 0.5-1.1 s of each program's start) and matplotlib one portrait
(`grace_hopper.jpg`) plus a few illustrations. Each is used in one role:

- "exhibit": an object on display; its photo goes into the database (the stereo motorcycle pair
  gives one exhibit with two database views, as many Met objects have);
- "distractor": a photo a visitor might take of something that is not in the collection
  (queries without a Met id). Photos go to `test_noart/`, illustrations to `test_other/`.

Some pictures are cut into halves or quadrants (`CATALOG`): one part is an exhibit, another a
distractor, so that a look-alike that is not in the database must be told apart.

Photos that a package version does not ship (scikit-image downloads some on demand) are skipped
with a warning; the benchmark only needs most of them.
"""

import dataclasses
import os
import warnings

import numpy as np
from PIL import Image

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")  # scikit-learn's two
EXHIBIT = "exhibit"
DISTRACTOR = "distractor"


@dataclasses.dataclass(frozen=True)
class Photo:
    """One source picture.

    Attributes:
      name: short name (also the file stem in provenance records).
      package: where it comes from ("scikit-image", "scikit-learn", "matplotlib").
      role: EXHIBIT or DISTRACTOR.
      kind: "photo" or "illustration" (distractor illustrations count as other art).
      views: uint8 RGB arrays [H, W, 3]: the database views of an exhibit (usually one), or the
        picture of a distractor.
    """

    name: str
    package: str
    role: str
    kind: str
    views: tuple


def _rgb(array):
    """uint8 RGB [H, W, 3] from gray, boolean, float or RGBA (composited on white) arrays."""
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        array = np.clip(np.asarray(array, np.float64) * (255.0 if array.max() <= 1 else 1), 0, 255)
        array = array.astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.shape[2] == 4:
        rgba = Image.fromarray(array, "RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        array = np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.ascontiguousarray(array[:, :, :3])


def _skimage(name):
    import skimage.data

    def load():
        data = getattr(skimage.data, name)()
        if name == "stereo_motorcycle":
            left, right, _ = data
            return (_rgb(left), _rgb(right))
        return (_rgb(data),)

    return load


def _sklearn(filename):
    def load():
        with Image.open(os.path.join(DATA, filename)) as image:
            return (_rgb(np.asarray(image)),)

    return load


def _matplotlib(filename):
    def load():
        from matplotlib import cbook

        with cbook.get_sample_data(filename) as f:
            return (_rgb(np.asarray(Image.open(f))),)

    return load


# Regions of a source picture (left, top, right, bottom as fractions). Halves and quadrants of
# one photo are different objects that look alike: one is an exhibit, the other a distractor a
# visitor photographed elsewhere in the room, the hard negatives that make GAP informative.
WHOLE = (0.0, 0.0, 1.0, 1.0)
LEFT, RIGHT = (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)
TOP, BOTTOM = (0.0, 0.0, 1.0, 0.5), (0.0, 0.5, 1.0, 1.0)
QUADRANTS = ((0.0, 0.0, 0.5, 0.5), (0.5, 0.0, 1.0, 0.5), (0.0, 0.5, 0.5, 1.0), (0.5, 0.5, 1.0, 1.0))


def _whole_skimage(name, source=None, kind="photo", role=EXHIBIT):
    """A CATALOG entry: one whole scikit-image picture, one object."""
    return (name, "scikit-image", kind, _skimage(source or name), [("", WHOLE, role)])


# (name, package, kind, loader, [(region name, box, role)]). The order fixes the Met ids.
CATALOG = (
    _whole_skimage("astronaut"),
    _whole_skimage("coffee"),
    _whole_skimage("chelsea"),
    _whole_skimage("rocket"),
    _whole_skimage("camera"),
    (
        "coins",
        "scikit-image",
        "photo",
        _skimage("coins"),
        [("left", LEFT, EXHIBIT), ("right", RIGHT, DISTRACTOR)],
    ),
    _whole_skimage("moon"),
    _whole_skimage("page"),
    _whole_skimage("text"),
    _whole_skimage("brick"),
    (
        "immunohistochemistry",
        "scikit-image",
        "photo",
        _skimage("immunohistochemistry"),
        [("top", TOP, EXHIBIT), ("bottom", BOTTOM, DISTRACTOR)],
    ),
    (
        "retina",
        "scikit-image",
        "photo",
        _skimage("retina"),
        [("left", LEFT, EXHIBIT), ("right", RIGHT, DISTRACTOR)],
    ),
    (
        "hubble_deep_field",
        "scikit-image",
        "photo",
        _skimage("hubble_deep_field"),
        [
            ("nw", QUADRANTS[0], EXHIBIT),
            ("ne", QUADRANTS[1], EXHIBIT),
            ("sw", QUADRANTS[2], EXHIBIT),
            ("se", QUADRANTS[3], DISTRACTOR),
        ],
    ),
    _whole_skimage("motorcycle", source="stereo_motorcycle"),
    _whole_skimage("logo", kind="illustration"),
    _whole_skimage("horse", kind="illustration"),
    (
        "china",
        "scikit-learn",
        "photo",
        _sklearn("china.jpg"),
        [("left", LEFT, EXHIBIT), ("right", RIGHT, DISTRACTOR)],
    ),
    ("flower", "scikit-learn", "photo", _sklearn("flower.jpg"), [("", WHOLE, EXHIBIT)]),
    (
        "grace_hopper",
        "matplotlib",
        "photo",
        _matplotlib("grace_hopper.jpg"),
        [("", WHOLE, EXHIBIT)],
    ),
    _whole_skimage("grass", role=DISTRACTOR),
    _whole_skimage("gravel", role=DISTRACTOR),
    _whole_skimage("cell", role=DISTRACTOR),
    _whole_skimage("clock", role=DISTRACTOR),
    (
        "colorwheel",
        "scikit-image",
        "illustration",
        _skimage("colorwheel"),
        [("", WHOLE, DISTRACTOR)],
    ),
    (
        "present",
        "matplotlib",
        "illustration",
        _matplotlib("Minduka_Present_Blue_Pack.png"),
        [("", WHOLE, DISTRACTOR)],
    ),
    (
        "matplotlib_logo",
        "matplotlib",
        "illustration",
        _matplotlib("logo2.png"),
        [("", WHOLE, DISTRACTOR)],
    ),
)


def crop_region(image, box):
    """The `box` (fractions left, top, right, bottom) of a uint8 [H, W, 3] array."""
    height, width = image.shape[:2]
    left, top, right, bottom = box
    return np.ascontiguousarray(
        image[
            round(top * height) : round(bottom * height), round(left * width) : round(right * width)
        ]
    )


def load_photos(catalog=CATALOG):
    """The regions of the available pictures of `catalog`, in order, as `Photo`s.

    A picture that cannot be loaded is skipped with a warning.
    """
    photos = []
    for name, package, kind, loader, regions in catalog:
        try:
            views = loader()
        except (ImportError, OSError, ValueError, AttributeError) as e:
            warnings.warn(
                f"demo photo {name!r} from {package} unavailable, skipped: {e}", stacklevel=2
            )
            continue
        for region, box, role in regions:
            cropped = tuple(crop_region(view, box) for view in views)
            label = f"{name}_{region}" if region else name
            photos.append(Photo(label, package, role, kind, cropped))
    return photos
