"""tfmet-recognize's HTML report: each photo beside its answer and its top matches as thumbnails."""

import base64
import html
import io

from PIL import Image

from tfmet.io.atomic import atomic_path


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


def _row(name, data, answer, gallery):
    photo = f'<img src="{_data_uri(_photo_thumbnail(data))}" alt="query">'
    matches = "".join(_match_cell(m, s, gallery) for m, s in answer.top)
    return (
        f"<tr><td><figure>{photo}<figcaption>{html.escape(name)}</figcaption></figure></td>"
        f"<td><b>{html.escape(answer.label)}</b><br>confidence {answer.confidence:.3f}</td>"
        f"<td>{matches}</td></tr>"
    )


def write_html(path, rows, gallery=None, threshold=None):
    """Writes the report; `rows` are (name, image bytes, Answer)."""
    body = "\n".join(_row(name, data, answer, gallery) for name, data, answer in rows)
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>tfmet-recognize</title>"
        "<style>body{font-family:sans-serif}td{vertical-align:top;padding:6px}"
        "figure{display:inline-block;margin:4px;text-align:center}img{max-height:160px}</style>"
        "</head><body><h1>tfmet-recognize</h1>"
        f"<p>Operating threshold: {threshold if threshold is not None else 'none'}</p>"
        "<table><tr><th>photo</th><th>answer</th><th>top matches</th></tr>"
        f"{body}</table></body></html>"
    )
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(page)
