"""tfmet-serve's web application (FastAPI): an upload page and a JSON endpoint.

    GET  /                    the page: choose or drop a photo, see the answer and top matches
    POST /v1/recognize        multipart field "image", or JSON {"image_base64": "..."}
    GET  /v1/thumbnail/{id}   JPEG thumbnail of a Met id's database image (ground-truth ids only;
                              ?size=large for the 360-pixel one the page shows with an answer)
    GET  /v1                  what the JSON API takes and answers (linked from the page)
    GET  /healthz             {"status": "ok"}
    POST /v1/reload           from 127.0.0.1 only: load the export's new version (tfmet-collection)
                              and answer with it; requests in flight finish on the old one

Uploads above `max_upload_bytes` get 413 (a body without Content-Length is counted while it
streams and cut off at the limit), non-images 415, absurd declared dimensions or decoded bytes over
`max_decoded_bytes` 422 (`tfmet.serving.uploads.check_image`, the header only).

The server sheds load instead of growing (`Shedding`): at most `concurrency` requests decode and
infer at once, at most `queue` more wait for them (their bodies read and checked); a request
beyond that, or one that waited `queue_timeout` seconds, gets 503 with Retry-After. A body that
takes more than `body_timeout` seconds gets 408, and a connection that has not sent a request's
headers `header_timeout` seconds after it opened (or after its last answer) is closed
(`TimedH11Protocol`). After each inference the memory the decoder freed is handed back to the
system (`release_freed_memory`); with glibc's mmap threshold fixed (`fix_mmap_threshold`, which
tfmet-serve calls) the server's RSS returns to within about 10% of its warm baseline.

Needs the `[web]` extra (fastapi, uvicorn, python-multipart).
"""

import base64
import binascii
import ctypes
import dataclasses
import json

import anyio
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from tfmet.data.limits import DEFAULT_MAX_DECODED_BYTES
from tfmet.serving.page import PAGE
from tfmet.serving.uploads import BadImage, check_image

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
# Room for the multipart envelope or the base64 expansion around an upload of the maximal size.
_ENVELOPE = 64 * 1024


@dataclasses.dataclass(frozen=True)
class Shedding:
    """How much work tfmet-serve takes on at once; what is beyond it is refused, not queued.

    Attributes:
      concurrency: requests decoding and inferring at once (each holds up to ~18x its decoded
        bytes at its peak, docs/reliability.md).
      queue: requests admitted beyond those, waiting (their bodies read: at most `queue` x the
        upload limit in memory); a request beyond `concurrency + queue` gets 503 unread.
      queue_timeout: seconds a request waits for a decoding slot before 503.
      body_timeout: seconds a request's body may take to arrive before 408.
      header_timeout: seconds a connection may take to send a request's headers before it is
        closed (`TimedH11Protocol`).
      retry_after: the Retry-After (seconds) of a 503.
    """

    concurrency: int = 2
    queue: int = 16
    queue_timeout: float = 60.0
    body_timeout: float = 30.0
    header_timeout: float = 10.0
    retry_after: int = 2

    def __post_init__(self):
        for name in ("concurrency", "retry_after"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"`{name}` must be at least 1. Received: {getattr(self, name)}")
        if int(self.queue) < 0:
            raise ValueError(f"`queue` must be at least 0. Received: {self.queue}")
        for name in ("queue_timeout", "body_timeout", "header_timeout"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"`{name}` must be positive. Received: {getattr(self, name)}")


@dataclasses.dataclass
class Load:
    """The recognition requests in progress (one event loop updates it): `admitted` of them,
    `inferring` of those holding a decoding slot, and the 503s answered so far."""

    admitted: int = 0
    inferring: int = 0
    shed: int = 0


class _Refused(Exception):
    """A request answered with `status` before it reached the model."""

    def __init__(self, status, detail, headers=None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


async def _read_body(request, limit, timeout):
    """The request's body, counted while it streams: 413 as soon as it passes `limit` bytes
    (with or without a Content-Length), 408 when it takes more than `timeout` seconds."""
    chunks, size = [], 0
    try:
        with anyio.fail_after(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _Refused(413, f"upload larger than {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise _Refused(408, f"the upload took more than {timeout:g} s to arrive") from None
    except ClientDisconnect:
        raise _Refused(400, "the client disconnected during the upload") from None
    return b"".join(chunks)


async def _image_bytes(request, body, limit):
    """The uploaded image's bytes from a multipart form or a base64 JSON `body`."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        sent = False

        async def replay():  # the body already read, for Starlette's form parser
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        form = await Request(request.scope, replay).form(max_files=1, max_fields=4)
        try:
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise _Refused(400, "multipart upload needs a file field named 'image'")
            data = await upload.read(limit + 1)
        finally:
            await form.close()
    elif content_type.startswith("application/json"):
        try:
            data = base64.b64decode(json.loads(body)["image_base64"], validate=True)
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise _Refused(
                400, 'JSON body must be {"image_base64": "<base64 image bytes>"}'
            ) from None
    else:
        raise _Refused(415, "send multipart/form-data (field 'image') or application/json")
    if len(data) > limit:
        raise _Refused(413, f"upload larger than {limit} bytes")
    return data


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune or trim
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


_LIBC = _libc()
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (glibc's malloc.h)
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest dynamic one on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)


def fix_mmap_threshold(size=MMAP_THRESHOLD):
    """Fixes glibc's mmap threshold at `size` bytes for the whole process (`mallopt`); returns
    whether it could (False when the C library is not glibc).

    glibc raises the threshold to the size of each large block freed, up to 32 MiB, and its
    trim threshold to twice that: after the first large image, free() keeps up to 64 MiB of freed
    heap at the top of every thread's arena, and `release_freed_memory` after each request did not
    give all of it back (measured). A threshold fixed at that same maximum serves blocks as glibc
    would after the first large image, and keeps the trim threshold at its default.
    """
    return _LIBC is not None and _LIBC.mallopt(_M_MMAP_THRESHOLD, int(size)) == 1


def release_freed_memory():
    """Hands the heap memory freed since the last call back to the system (glibc's
    `malloc_trim(0)`, over every thread's arena); a no-op elsewhere.

    A decoded image and its float copies are freed when a request ends, but glibc keeps the freed
    pages of its per-thread arenas: without this a server that once decoded a large image keeps
    gigabytes it no longer uses (0.84 GB -> 4.3 GB after one upload, issue #27).
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _recognize(recognizer, data):
    try:
        return recognizer.recognize_one(data)
    finally:
        release_freed_memory()


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection that has not sent a request's headers
    `header_timeout` seconds after it opened or after its last answer (uvicorn itself waits
    forever for a client that sends its headers a byte at a time).

    Subclass it with `header_timeout` set (`timed_protocol`).
    """

    header_timeout = 10.0

    def connection_made(self, transport):
        super().connection_made(transport)
        self._arm_header_timer()

    def on_response_complete(self):
        super().on_response_complete()
        self._arm_header_timer()

    def connection_lost(self, exc):
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
        super().connection_lost(exc)

    def _arm_header_timer(self):
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
        waiting_after = self.cycle  # a new request replaces it once its headers are read
        self._header_timer = self.loop.call_later(
            self.header_timeout, self._headers_overdue, waiting_after
        )

    def _headers_overdue(self, waiting_after):
        if self.cycle is waiting_after and not self.transport.is_closing():
            self.transport.close()


def timed_protocol(header_timeout):
    """A `TimedH11Protocol` class closing connections after `header_timeout` seconds."""
    return type("TimedH11Protocol", (TimedH11Protocol,), {"header_timeout": float(header_timeout)})


def server_config(app, host, port, shedding=None, **kwargs):
    """The uvicorn.Config serving `app` with `shedding`'s header timeout (h11)."""
    import uvicorn

    shedding = shedding or Shedding()
    return uvicorn.Config(
        app, host=host, port=port, http=timed_protocol(shedding.header_timeout), **kwargs
    )


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
        "errors": "400 malformed, 408 body too slow, 413 too large, 415 not an image, 422 absurd "
        "dimensions or decoded size, 503 busy (retry after the Retry-After seconds)",
    },
    "GET /v1/thumbnail/<Met id>[?size=large]": "JPEG of the exhibit's database image",
    "GET /healthz": '{"status": "ok"}',
    "POST /v1/reload": "from 127.0.0.1: serve the export's new version (tfmet-collection); "
    "requests in flight finish on the previous one",
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


@dataclasses.dataclass(frozen=True)
class Version:
    """What the server answers with now: a recogniser and its gallery (or None). A request
    takes the version current when it starts and finishes on it; a reload swaps in a new one."""

    recognizer: object
    gallery: object = None


LOCAL_CLIENTS = ("127.0.0.1", "::1")


class Serving:
    """The version being served and how to load the next one (`reload`, a callable returning
    (recognizer, gallery), e.g. `tfmet.serving.open_recognizer` of the same export path).

    `swap()` loads and warms the new version aside, then replaces the current one: requests in
    flight keep the version they started with (the old one is freed once they finish). One
    reload runs at a time; a failed load keeps the current version.
    """

    def __init__(self, recognizer, gallery=None, reload=None):
        self.current = Version(recognizer, gallery)
        self.reload = reload
        self.reloads = 0
        self._lock = anyio.Lock()

    async def swap(self):
        async with self._lock:
            recognizer, gallery = await run_in_threadpool(self._load)
            self.current = Version(recognizer, gallery)
            self.reloads += 1
        return self.current

    def _load(self):
        recognizer, gallery = self.reload()
        warm_up = getattr(recognizer, "warm_up", None)
        if warm_up is not None:
            warm_up()
        return recognizer, gallery


def _version_json(version, reloads):
    metadata = getattr(version.recognizer, "metadata", None) or {}
    record = metadata.get("collection") or {}
    return {
        "status": "reloaded",
        "reloads": reloads,
        "version": record.get("version", 0),
        "database_size": metadata.get("database_size"),
    }


def _add_pages(app):
    @app.get("/", response_class=HTMLResponse)
    def page():
        return PAGE

    @app.get("/v1")
    def api():
        return API

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}


def _add_reload(app, serving):
    @app.post("/v1/reload")
    async def reload(request: Request):
        host = request.client.host if request.client else None
        if host not in LOCAL_CLIENTS:
            return JSONResponse({"detail": "reload is only answered to 127.0.0.1"}, 403)
        if serving.reload is None:
            return JSONResponse({"detail": "this server was started without a reload"}, 404)
        try:
            version = await serving.swap()
        except (OSError, ValueError) as e:
            detail = f"reload failed, still serving the previous version: {e}"
            return JSONResponse({"detail": " ".join(detail.split())[:500]}, 409)
        return _version_json(version, serving.reloads)


def _add_thumbnail(app, serving):
    @app.get("/v1/thumbnail/{met_id}")
    def thumbnail(met_id: int, size: str = "small"):
        if size not in THUMBNAIL_SIDES:
            raise HTTPException(422, f"size must be one of {', '.join(THUMBNAIL_SIDES)}")
        gallery = serving.current.gallery
        try:
            jpeg = None if gallery is None else gallery.thumbnail(met_id, THUMBNAIL_SIDES[size])
        except OSError:
            jpeg = None
        if jpeg is None:
            raise HTTPException(404, f"no database image for Met id {met_id}")
        return Response(jpeg, media_type="image/jpeg")


def _add_recognize(app, serving, shedding, max_upload_bytes, body_limit, max_decoded_bytes):
    slots = anyio.Semaphore(shedding.concurrency)
    load = app.state.load = Load()
    busy = {"Retry-After": str(shedding.retry_after)}

    @app.post("/v1/recognize")
    async def recognize(request: Request):
        if load.admitted >= shedding.concurrency + shedding.queue:
            load.shed += 1
            return JSONResponse({"detail": "busy: too many requests in progress"}, 503, busy)
        load.admitted += 1
        version = serving.current  # the request finishes on this version, whatever swaps in
        try:
            answer = await _admitted(request, version.recognizer)
        except _Refused as e:
            if e.status == 503:
                load.shed += 1
            return JSONResponse({"detail": e.detail}, e.status, e.headers)
        finally:
            load.admitted -= 1
        result = _with_thumbnails(answer, version.gallery)
        result["threshold"] = version.recognizer.threshold
        return result

    async def _admitted(request, recognizer):
        body = await _read_body(request, body_limit, shedding.body_timeout)
        data = await _image_bytes(request, body, max_upload_bytes)
        del body
        try:
            check_image(data, max_decoded_bytes=max_decoded_bytes)
        except BadImage as e:
            raise _Refused(e.status, str(e)) from None
        try:
            with anyio.fail_after(shedding.queue_timeout):
                await slots.acquire()
        except TimeoutError:
            detail = f"busy: no decoding slot within {shedding.queue_timeout:g} s"
            raise _Refused(503, detail, busy) from None
        load.inferring += 1
        try:
            return await run_in_threadpool(_recognize, recognizer, data)
        finally:
            load.inferring -= 1
            slots.release()


def create_app(
    recognizer,
    gallery=None,
    max_upload_bytes=MAX_UPLOAD_BYTES,
    shedding=None,
    max_decoded_bytes=DEFAULT_MAX_DECODED_BYTES,
    reload=None,
):
    """The FastAPI application around a `tfmet.serving.Recognizer` and an optional `Gallery`.

    `shedding` (a `Shedding`, default its defaults) bounds the recognition work in progress;
    `app.state.load` (a `Load`) counts it. `reload` (a callable returning (recognizer, gallery)
    of the export's new version) enables POST /v1/reload from 127.0.0.1; `app.state.serving`
    (a `Serving`) holds the version being answered with.
    """
    app = FastAPI(title="tfmet recogniser", docs_url=None, redoc_url=None)
    body_limit = max_upload_bytes * 4 // 3 + _ENVELOPE  # base64 JSON is 4/3 of the image
    shedding = shedding or Shedding()
    serving = app.state.serving = Serving(recognizer, gallery, reload)

    @app.middleware("http")
    async def refuse_large_bodies(request, call_next):
        length = request.headers.get("content-length")
        too_large = length is not None and (not length.isdigit() or int(length) > body_limit)
        if too_large:
            return JSONResponse({"detail": f"upload larger than {max_upload_bytes} bytes"}, 413)
        return await call_next(request)

    _add_pages(app)
    _add_recognize(app, serving, shedding, max_upload_bytes, body_limit, max_decoded_bytes)
    _add_reload(app, serving)
    _add_thumbnail(app, serving)
    return app
