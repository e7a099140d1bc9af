"""Checks on untrusted image bytes before they reach the model: a known format, sane dimensions,
decoded bytes within the budget.

Only the header is read (PIL opens lazily), so a small file declaring a huge canvas, or a canvas
whose 16-bit samples, alpha, CMYK or frames multiply it past `DEFAULT_MAX_DECODED_BYTES`, is
refused before anything is decoded.
"""

import io

from PIL import Image

from tfmet.data.limits import DEFAULT_MAX_DECODED_BYTES, check_pil_budget

FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP")  # what the export's decode_image reads
MAX_PIXELS = 64_000_000
MAX_SIDE = 20_000


class BadImage(ValueError):
    """The bytes are not an image the recogniser takes; `status` is the HTTP answer for it."""

    def __init__(self, message, status=415):
        super().__init__(message)
        self.status = status


def check_image(
    data, max_pixels=MAX_PIXELS, max_side=MAX_SIDE, max_decoded_bytes=DEFAULT_MAX_DECODED_BYTES
):
    """(format, width, height) of `data`, or BadImage naming the problem (422 for a declared size
    out of range or over `max_decoded_bytes` decoded bytes, `tfmet.data.limits.over_budget`)."""
    if not data:
        raise BadImage("empty file", status=400)
    try:
        with Image.open(io.BytesIO(data)) as image:
            image_format, (width, height) = image.format, image.size
            over = check_pil_budget(image, max_decoded_bytes)
    except Image.DecompressionBombError as e:
        raise BadImage(f"declared size out of range: {e}", status=422) from None
    except (OSError, ValueError):
        formats = ", ".join(FORMATS)
        raise BadImage(f"not an image: not a {formats} file that can be read") from None
    if image_format not in FORMATS:
        raise BadImage(f"unsupported image format {image_format}; use one of {', '.join(FORMATS)}")
    if width < 1 or height < 1 or max(width, height) > max_side or width * height > max_pixels:
        raise BadImage(
            f"declared size out of range: {width}x{height} (at most {max_side} per side and "
            f"{max_pixels} pixels)",
            status=422,
        )
    if over:
        raise BadImage(over, status=422)
    return image_format, width, height
