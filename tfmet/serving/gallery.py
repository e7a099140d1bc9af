"""The database images of a Met ground truth, looked up by Met id only (never by a given path)."""

import functools
import io

from absl import logging
from PIL import Image

from tfmet.data import met
from tfmet.data.images import ImageRefused, read_image_bytes
from tfmet.data.limits import DEFAULT_MAX_PIXELS, megapixels


class Gallery:
    """Met id -> its first database image under `image_root`, and JPEG thumbnails of it.

    Only ids listed in the ground truth's database file resolve; paths come from that file and
    `tfmet.data.met.resolve_image_path` keeps them below the image root.
    """

    def __init__(self, info_dir, image_root, mini=False):
        split = met.load_split(info_dir, "train", mini=mini)
        self._paths = {}
        for label, path in zip(split.labels.tolist(), split.paths, strict=True):
            self._paths.setdefault(int(label), path)
        self.image_root = image_root

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
        `DEFAULT_MAX_PIXELS` pixels (checked before decoding) or it does not decode.
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
        image = image.convert("RGB")
        image.thumbnail((side, side))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()
