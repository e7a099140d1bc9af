"""tfmet-serve's web application (FastAPI): an upload page and a JSON endpoint.

    GET  /                    the page: choose or drop a photo, see the answer and top matches
    POST /v1/recognize        multipart field "image", or JSON {"image_base64": "..."}
    GET  /v1/thumbnail/{id}   JPEG thumbnail of a Met id's database image (ground-truth ids only;
                              ?size=large for the 360-pixel one the page shows with an answer)
    GET  /v1                  what the JSON API takes and answers (linked from the page)
    GET  /healthz             {"status": "ok"}

Uploads above `max_upload_bytes` get 413, non-images 415, absurd declared dimensions 422. Needs
the `[web]` extra (fastapi, uvicorn, python-multipart).
"""

import base64
import binascii

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response

from tfmet.serving.page import PAGE
from tfmet.serving.uploads import BadImage, check_image

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
# Room for the multipart envelope or the base64 expansion around an upload of the maximal size.
_ENVELOPE = 64 * 1024


async def _image_bytes(request, limit):
    """The uploaded image's bytes from a multipart form or a base64 JSON body."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form(max_files=1, max_fields=4)
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise HTTPException(400, "multipart upload needs a file field named 'image'")
        data = await upload.read(limit + 1)
    elif content_type.startswith("application/json"):
        try:
            payload = await request.json()
            data = base64.b64decode(payload["image_base64"], validate=True)
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise HTTPException(
                400, 'JSON body must be {"image_base64": "<base64 image bytes>"}'
            ) from None
    else:
        raise HTTPException(415, "send multipart/form-data (field 'image') or application/json")
    if len(data) > limit:
        raise HTTPException(413, f"upload larger than {limit} bytes")
    return data


THUMBNAIL_SIDES = {"small": 160, "large": 360}

API = {
    "POST /v1/recognize": {
        "body": "multipart/form-data with a file field 'image', or application/json "
        '{"image_base64": "<base64 image bytes>"}',
        "answer": {
            "answer": "'Met <id>' or 'not in the collection'",
            "met_id": "the recognised Met id, null when not in the collection",
            "best_met_id": "the closest exhibit, also when rejected",
            "name": "best_met_id's name (tfmet-serve --names), or null",
            "confidence": "kNN confidence of best_met_id, 0-1",
            "threshold": "accepted means confidence >= threshold",
            "accepted": "bool",
            "valid": "false when the image did not decode",
            "top_k": "[{met_id, score, name, thumbnail, database_path}], best first",
        },
        "errors": "400 malformed, 413 too large, 415 not an image, 422 absurd dimensions",
    },
    "GET /v1/thumbnail/<Met id>[?size=large]": "JPEG of the exhibit's database image",
    "GET /healthz": '{"status": "ok"}',
}


def _with_thumbnails(answer, gallery):
    result = answer.to_json()
    result["name"] = None if gallery is None else gallery.name(answer.met_id)
    for match in result["top_k"]:
        known = gallery is not None and match["met_id"] in gallery
        match["name"] = gallery.name(match["met_id"]) if known else None
        match["thumbnail"] = f"/v1/thumbnail/{match['met_id']}" if known else None
        match["database_path"] = gallery.relative_path(match["met_id"]) if known else None
    return result


def create_app(recognizer, gallery=None, max_upload_bytes=MAX_UPLOAD_BYTES):
    """The FastAPI application around a `tfmet.serving.Recognizer` and an optional `Gallery`."""
    app = FastAPI(title="tfmet recogniser", docs_url=None, redoc_url=None)
    body_limit = max_upload_bytes * 4 // 3 + _ENVELOPE  # base64 JSON is 4/3 of the image

    @app.middleware("http")
    async def refuse_large_bodies(request, call_next):
        length = request.headers.get("content-length")
        too_large = length is not None and (not length.isdigit() or int(length) > body_limit)
        if too_large:
            return JSONResponse({"detail": f"upload larger than {max_upload_bytes} bytes"}, 413)
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse)
    def page():
        return PAGE

    @app.get("/v1")
    def api():
        return API

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.post("/v1/recognize")
    async def recognize(request: Request):
        data = await _image_bytes(request, max_upload_bytes)
        try:
            check_image(data)
        except BadImage as e:
            raise HTTPException(e.status, str(e)) from None
        answer = await run_in_threadpool(recognizer.recognize_one, data)
        result = _with_thumbnails(answer, gallery)
        result["threshold"] = recognizer.threshold
        return result

    @app.get("/v1/thumbnail/{met_id}")
    def thumbnail(met_id: int, size: str = "small"):
        if size not in THUMBNAIL_SIDES:
            raise HTTPException(422, f"size must be one of {', '.join(THUMBNAIL_SIDES)}")
        try:
            jpeg = None if gallery is None else gallery.thumbnail(met_id, THUMBNAIL_SIDES[size])
        except OSError:
            jpeg = None
        if jpeg is None:
            raise HTTPException(404, f"no database image for Met id {met_id}")
        return Response(jpeg, media_type="image/jpeg")

    return app
