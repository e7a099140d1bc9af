"""tfmet-recognize's HTML report: each photo beside its answer and its top matches as thumbnails."""

import base64
import html
import io

from PIL import Image

from tfmet.io.atomic import atomic_path
from tfmet.serving.client import LEAST_DECIMALS, decimals


def _data_uri(jpeg):
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def _photo_thumbnail(data, side=200):
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        image.thumbnail((side, side))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def _match_cell(met_id, score, gallery):
    thumb = gallery.thumbnail(met_id) if gallery is not None and met_id in gallery else None
    image = f'<img src="{_data_uri(thumb)}" alt="Met {met_id}">' if thumb else ""
    return f"<figure>{image}<figcaption>Met {met_id}<br>{score:.3f}</figcaption></figure>"


def _row(name, data, answer, gallery, threshold):
    photo = f'<img src="{_data_uri(_photo_thumbnail(data))}" alt="query">'
    matches = "".join(_match_cell(m, s, gallery) for m, s in answer.top)
    return (
        f"<tr><td><figure>{photo}<figcaption>{html.escape(name)}</figcaption></figure></td>"
        f"<td><b>{html.escape(answer.label)}</b><br>{html.escape(answer.details(threshold))}</td>"
        f"<td>{matches}</td></tr>"
    )


def write_html(path, rows, gallery=None, threshold=None):
    """Writes the report; `rows` are (name, image bytes, Answer). Each answer says its confidence
    against `threshold` with the decimals that tell them apart (`tfmet.serving.client.decimals`);
    the threshold at the top has the most any row needed."""
    threshold = float(threshold or 0.0)
    body = "\n".join(_row(name, data, answer, gallery, threshold) for name, data, answer in rows)
    digits = max([decimals(a.confidence, threshold) for _, _, a in rows], default=LEAST_DECIMALS)
    shown = f"{threshold:.{digits}f}" if threshold > 0 else "none (every photo is answered)"
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>tfmet-recognize</title>"
        "<style>body{font-family:sans-serif}td{vertical-align:top;padding:6px}"
        "figure{display:inline-block;margin:4px;text-align:center}img{max-height:160px}</style>"
        "</head><body><h1>tfmet-recognize</h1>"
        f"<p>Operating threshold: {shown}</p>"
        "<table><tr><th>photo</th><th>answer</th><th>top matches</th></tr>"
        f"{body}</table></body></html>"
    )
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(page)
