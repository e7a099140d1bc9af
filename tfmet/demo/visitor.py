"""Simulated visitor photos of an exhibit: what a phone picture in a gallery does to an artwork.

`visitor_photo(image, rng)` applies, with parameters drawn from `rng` (and returned, so every
query documents how it was made):

1. a partial view: a crop keeping 60-100% of each side;
2. sometimes a picture frame (dark wood, gilt or black) around it;
3. a perspective view on a gallery wall: the exhibit's corners are mapped to a jittered
   (+-12% of its size), rotated (+-12 degrees) quadrilateral that fills 70-95% of a
   wall-coloured canvas;
4. lighting: exposure (x0.5-1.4), contrast, gamma, a colour cast (white balance) and a
   vignette;
5. optics and sensor: Gaussian blur and noise;
6. the phone's resolution (long side 320-448 px) and JPEG compression (quality 35-85).

The result differs from the database photo the way Met queries differ from Met catalogue photos,
which is what instance recognition must see through.

The ranges above are the `DEFAULT` `VisitorStrength`; `HARD` widens every one of them (a crop
down to 40%, rotation +-25 degrees, corner jitter +-22%, the exhibit filling 50-90% of the
canvas, exposure x0.35-1.6, stronger casts and vignettes, more blur and noise, long side down to
256 px, JPEG quality down to 25): the harder benchmark spatial re-ranking is measured on.
"""

import dataclasses
import io

import numpy as np
from PIL import Image, ImageFilter, ImageOps

WORKING_SIDE = 768
FRAME_COLOURS = ((62, 39, 22), (176, 141, 66), (25, 25, 25), (120, 84, 50))


@dataclasses.dataclass(frozen=True)
class VisitorStrength:
    """The ranges the visitor-photo parameters are drawn from (each a (low, high) pair).

    Attributes:
      crop: fraction of each side kept.
      no_frame: chance of no picture frame.
      fill: fraction of the canvas the exhibit fills.
      rotation: degrees, drawn in [-rotation, rotation].
      jitter: corner jitter, as a fraction of the exhibit's shorter side.
      exposure, contrast, gamma, cast, vignette: lighting.
      blur: Gaussian blur radius; applied above 0.3.
      long_side: the phone photo's long side in pixels (high exclusive).
      noise: sensor noise standard deviation.
      jpeg_quality: JPEG quality (high exclusive).
    """

    crop: tuple = (0.6, 1.0)
    no_frame: float = 0.4
    fill: tuple = (0.70, 0.95)
    rotation: float = 12.0
    jitter: float = 0.12
    exposure: tuple = (0.5, 1.4)
    contrast: tuple = (0.6, 1.15)
    gamma: tuple = (0.8, 1.25)
    cast: tuple = (0.85, 1.15)
    vignette: tuple = (0.0, 0.5)
    blur: tuple = (0.0, 2.0)
    long_side: tuple = (320, 449)
    noise: tuple = (1.0, 8.0)
    jpeg_quality: tuple = (35, 86)


DEFAULT = VisitorStrength()
HARD = VisitorStrength(
    crop=(0.4, 1.0),
    no_frame=0.3,
    fill=(0.50, 0.90),
    rotation=25.0,
    jitter=0.22,
    exposure=(0.35, 1.6),
    contrast=(0.45, 1.2),
    gamma=(0.7, 1.4),
    cast=(0.75, 1.25),
    vignette=(0.0, 0.8),
    blur=(0.0, 2.8),
    long_side=(256, 449),
    noise=(2.0, 12.0),
    jpeg_quality=(25, 86),
)
STRENGTHS = {"default": DEFAULT, "hard": HARD}


def perspective_coefficients(source, target):
    """PIL `Image.PERSPECTIVE` coefficients mapping `target` points back to `source` points.

    Args:
      source, target: four (x, y) corners each; output pixel (x, y) of the warped image samples
        the input at the source point that corresponds to it.
    """
    rows, values = [], []
    for (u, v), (x, y) in zip(source, target, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        values.extend([u, v])
    return tuple(np.linalg.solve(np.asarray(rows, np.float64), np.asarray(values, np.float64)))


def _crop(image, rng, strength):
    width, height = image.size
    keep_w, keep_h = rng.uniform(*strength.crop, size=2)
    w, h = max(8, round(width * keep_w)), max(8, round(height * keep_h))
    left = int(rng.integers(0, width - w + 1))
    top = int(rng.integers(0, height - h + 1))
    return image.crop((left, top, left + w, top + h)), {"crop": [float(keep_w), float(keep_h)]}


def _frame(image, rng, strength):
    if rng.uniform() < strength.no_frame:
        return image, {"frame": 0}
    width = max(2, round(min(image.size) * rng.uniform(0.02, 0.06)))
    colour = FRAME_COLOURS[int(rng.integers(len(FRAME_COLOURS)))]
    return ImageOps.expand(image, border=width, fill=colour), {"frame": width}


def _on_wall(image, rng, strength):
    width, height = image.size
    fill = float(rng.uniform(*strength.fill))
    margin = 1.0 / fill
    canvas = (round(width * margin), round(height * margin))
    wall = np.clip(rng.uniform(150, 235) + rng.normal(0, 10, size=3), 0, 255)
    angle = float(rng.uniform(-strength.rotation, strength.rotation))
    jitter = strength.jitter * min(width, height)
    centre = np.array(canvas, np.float64) / 2
    corners = np.array([[0, 0], [width, 0], [width, height], [0, height]], np.float64)
    radians = np.deg2rad(angle)
    rotation = np.array(
        [[np.cos(radians), -np.sin(radians)], [np.sin(radians), np.cos(radians)]], np.float64
    )
    target = (corners - [width / 2, height / 2]) @ rotation.T + centre
    target += rng.uniform(-jitter, jitter, size=target.shape)
    coefficients = perspective_coefficients(corners, target)
    warped = image.convert("RGBA").transform(
        canvas, Image.PERSPECTIVE, coefficients, Image.BICUBIC, fillcolor=(0, 0, 0, 0)
    )
    background = Image.new("RGBA", canvas, tuple(int(c) for c in wall) + (255,))
    photo = Image.alpha_composite(background, warped).convert("RGB")
    return photo, {"fill": fill, "rotation": angle}


def _lighting(array, rng, strength):
    exposure = float(rng.uniform(*strength.exposure))
    contrast = float(rng.uniform(*strength.contrast))
    gamma = float(rng.uniform(*strength.gamma))
    cast = rng.uniform(*strength.cast, size=3)
    vignette = float(rng.uniform(*strength.vignette))
    x = (array / 255.0) ** gamma
    x = (x - x.mean()) * contrast + x.mean()
    x = x * exposure * cast
    height, width = x.shape[:2]
    yy, xx = np.mgrid[0:height, 0:width]
    radius2 = ((yy - height / 2) / (height / 2)) ** 2 + ((xx - width / 2) / (width / 2)) ** 2
    x = x * (1.0 - vignette * radius2 / 2)[:, :, None]
    params = {
        "exposure": exposure,
        "contrast": contrast,
        "gamma": gamma,
        "colour_cast": [float(c) for c in cast],
        "vignette": vignette,
    }
    return np.clip(x * 255.0, 0, 255), params


def visitor_photo(image, rng, strength=DEFAULT):
    """A simulated visitor photo of `image` (uint8 RGB array or PIL image).

    Args:
      image: the exhibit (or distractor) picture.
      rng: a `numpy.random.Generator`; the same seed gives the same photo.
      strength: a `VisitorStrength` (the ranges of every parameter), `DEFAULT` or `HARD`.

    Returns:
      (JPEG bytes, dict of the parameters used).
    """
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image, np.uint8))
    image = image.convert("RGB")
    if max(image.size) > WORKING_SIDE:  # the photo ends up <= 448 px: work at a modest size
        scale = WORKING_SIDE / max(image.size)
        image = image.resize(
            (round(image.width * scale), round(image.height * scale)), Image.LANCZOS
        )
    params = {}
    image, p = _crop(image, rng, strength)
    params.update(p)
    image, p = _frame(image, rng, strength)
    params.update(p)
    image, p = _on_wall(image, rng, strength)
    params.update(p)
    array, p = _lighting(np.asarray(image, np.float64), rng, strength)
    params.update(p)
    image = Image.fromarray(array.astype(np.uint8))
    blur = float(rng.uniform(*strength.blur))
    if blur > 0.3:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    long_side = int(rng.integers(*strength.long_side))
    scale = long_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(size, Image.BILINEAR if scale > 1 else Image.LANCZOS)
    noise = float(rng.uniform(*strength.noise))
    array = np.asarray(image, np.float64) + rng.normal(0.0, noise, size=(size[1], size[0], 3))
    image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
    quality = int(rng.integers(*strength.jpeg_quality))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    params.update(blur=blur, noise=noise, long_side=long_side, jpeg_quality=quality)
    return buffer.getvalue(), params


def catalogue_photo(image, long_side=384, quality=92):
    """The database ("catalogue") version of an exhibit photo: long side capped, good JPEG."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image, np.uint8))
    image = image.convert("RGB")
    scale = min(1.0, long_side / max(image.size))
    if scale < 1.0:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
