"""The database images of a Met ground truth, looked up by Met id only (never by a given path)."""

import csv
import functools
import io
import os

from absl import logging
from PIL import Image

from tfmet.data import met
from tfmet.data.images import ImageRefused, read_image_bytes
from tfmet.data.limits import DEFAULT_MAX_PIXELS, check_pil_budget, megapixels

# The columns of The Met's Open Access table (MetObjects.csv) that name an object.
MET_OBJECTS_ID, MET_OBJECTS_TITLE = "Object ID", "Title"
MAX_NAME_CHARS = 200
MAX_NAMES_JSON_BYTES = 64 << 20  # parsed whole; a CSV is streamed (MetObjects.csv is ~300 MB)


def read_exhibit_names(path, ids):
    """{Met id: exhibit name} for the Met ids `ids`, from `path`.

    `path` is a JSON object {"<Met id>": "<name>", ...} (what `tfmet-demo` writes), or a CSV
    table with the columns "Object ID" and "Title" (The Met's Open Access MetObjects.csv).
    Only the ids in `ids` are kept, each name cut to 200 characters, and a CSV is read row by
    row (a JSON file, parsed whole, may have at most 64 MiB), so memory stays bounded by the
    gallery whatever the file holds.

    Raises:
      FileNotFoundError, ValueError: naming `path` and the problem.
    """
    from tfmet.io.json_files import read_json

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: exhibit names file not found")
    ids = set(ids)
    if path.lower().endswith(".json"):
        if os.path.getsize(path) > MAX_NAMES_JSON_BYTES:
            raise ValueError(
                f"{path}: a JSON exhibit names file may have at most {MAX_NAMES_JSON_BYTES:,} "
                "bytes (give a large table as CSV: it is read row by row)"
            )
        table = read_json(path, "exhibit names file")
        if not isinstance(table, dict):
            raise ValueError(f'{path}: exhibit names must be a JSON object {{"<Met id>": "name"}}')
        rows = table.items()
    else:
        rows = _csv_names(path)
    names = {}
    for key, name in rows:
        try:
            met_id = int(str(key).strip())
        except ValueError:
            raise ValueError(f"{path}: {key!r} is not a Met id") from None
        if met_id in ids and isinstance(name, str) and name.strip():
            names[met_id] = name.strip()[:MAX_NAME_CHARS]
    return names


def _csv_names(path):
    with open(path, encoding="utf-8-sig", newline="") as f:
        try:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            if MET_OBJECTS_ID not in columns or MET_OBJECTS_TITLE not in columns:
                raise ValueError(
                    f"{path}: a CSV of exhibit names needs the columns {MET_OBJECTS_ID!r} and "
                    f"{MET_OBJECTS_TITLE!r} (The Met's MetObjects.csv); found {columns[:8]}"
                )
            for row in reader:
                yield row[MET_OBJECTS_ID], row[MET_OBJECTS_TITLE]
        except (csv.Error, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a readable CSV file ({e})") from None


class Gallery:
    """Met id -> its first database image under `image_root`, JPEG thumbnails of it, and the
    exhibit's name when a names file is given (`read_exhibit_names`).

    Only ids listed in the ground truth's database file resolve; paths come from that file and
    `tfmet.data.met.resolve_image_path` keeps them below the image root.
    """

    def __init__(self, info_dir, image_root, mini=False, names=None):
        split = met.load_split(info_dir, "train", mini=mini)
        self._paths = {}
        for label, path in zip(split.labels.tolist(), split.paths, strict=True):
            self._paths.setdefault(int(label), path)
        self.image_root = image_root
        self._names = {} if names is None else read_exhibit_names(names, self._paths)

    def name(self, met_id):
        """The exhibit's name, or None when the names file does not give one."""
        return self._names.get(met_id)

    def __contains__(self, met_id):
        return met_id in self._paths

    def relative_path(self, met_id):
        """The ground truth's path of the Met id's database image, or None."""
        return self._paths.get(met_id)

    def image_path(self, met_id):
        """The file of the Met id's database image, or None when the id is not listed."""
        path = self._paths.get(met_id)
        return None if path is None else met.resolve_image_path(self.image_root, path)

    @functools.lru_cache(maxsize=256)  # noqa: B019 (one gallery per process; bounded)
    def thumbnail(self, met_id, side=160):
        """JPEG bytes of the database image scaled to at most `side` pixels, or None.

        None also when the file cannot serve as one, with a warning naming it: read as
        tfmet-extract reads images (a regular file of at most 64 MiB: a FIFO in the image tree
        would block a server thread forever), and refused when its header declares more than
        `DEFAULT_MAX_PIXELS` pixels or more than `DEFAULT_MAX_DECODED_BYTES` decoded bytes
        (checked before decoding) or it does not decode.
        """
        path = self.image_path(met_id)
        if path is None:
            return None
        try:
            return _jpeg_thumbnail(read_image_bytes(path), side)
        except (OSError, ValueError, ImageRefused, Image.DecompressionBombError) as e:
            reason = e.message if isinstance(e, ImageRefused) else str(e)
            logging.warning("%s: no thumbnail for Met id %d: %s", path, met_id, reason)
            return None


def _jpeg_thumbnail(data, side):
    try:
        opened = Image.open(io.BytesIO(data))  # reads the header only
    except Image.UnidentifiedImageError:
        raise ValueError("not an image file PIL can read") from None
    with opened as image:
        pixels = image.width * image.height
        if pixels > DEFAULT_MAX_PIXELS:
            raise ValueError(
                f"image declares {image.width}x{image.height} = {megapixels(pixels)}, over the "
                f"limit of {megapixels(DEFAULT_MAX_PIXELS)}"
            )
        over = check_pil_budget(image)
        if over:
            raise ValueError(over)
        image.draft("RGB", (side, side))  # a JPEG decodes at 1/2 .. 1/8 scale when that suffices
        image = image.convert("RGB")
        image.thumbnail((side, side))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()
