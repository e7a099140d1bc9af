"""tfmet-serve sheds load instead of growing (issue #27): a bounded number of requests infer at
once, a bounded number wait, the rest get 503 with Retry-After; slow bodies get 408, bodies
without Content-Length are cut off at the limit while they stream, connections that never finish
their headers are closed, images over the decoded-bytes budget get 422 unread.

A real uvicorn server (the protocol tfmet-serve runs) on 127.0.0.1 in a thread, around a fake
recogniser that holds each request until the test releases it: every outcome is decided by what
the server holds, never by how fast it runs. Every wait is a bounded loop.
"""

import base64
import concurrent.futures
import contextlib
import http.client
import io
import json
import socket
import struct
import threading
import time
import zlib

import pytest
from PIL import Image

pytest.importorskip("fastapi")

from tests.kit.web import free_port  # noqa: E402
from tfmet.serving.client import Answer  # noqa: E402
from tfmet.serving.web import Shedding, create_app, server_config  # noqa: E402

ROUNDS = 3000  # bounded waits: at most ROUNDS x 0.01 s
SOCKET_TIMEOUT = 60  # a server that never answers fails the test instead of hanging it


class HeldRecognizer:
    """Answers Met 7 to each photo once `release` is set; `entered` counts the calls begun."""

    threshold = 0.5

    def __init__(self):
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)
        self.calls = 0

    def recognize_one(self, data):
        self.calls += 1
        self.entered.release()
        assert self.release.wait(SOCKET_TIMEOUT)
        return Answer(met_id=7, confidence=0.9, accepted=True, valid=True, top=[(7, 0.9)])


@contextlib.contextmanager
def serving(app, shedding):
    import uvicorn

    port = free_port()
    server = uvicorn.Server(server_config(app, "127.0.0.1", port, shedding, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, "the server to start")
        yield port
    finally:
        server.should_exit = True
        thread.join(SOCKET_TIMEOUT)


def wait_for(condition, what):
    for _ in range(ROUNDS):
        if condition():
            return
        time.sleep(0.01)
    pytest.fail(f"gave up waiting for {what}")


def jpeg():
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 100, 50)).save(buffer, format="JPEG")
    return buffer.getvalue()


def post(port, data=None, body=None):
    """(status, headers, JSON answer) of POST /v1/recognize with `data` as base64 JSON."""
    if body is None:
        body = json.dumps({"image_base64": base64.b64encode(data).decode()}).encode()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=SOCKET_TIMEOUT)
    try:
        connection.request(
            "POST", "/v1/recognize", body, headers={"content-type": "application/json"}
        )
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), json.loads(response.read())
    finally:
        connection.close()


def get(port, path):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=SOCKET_TIMEOUT)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def raw_request(port, head, parts=(), until_answered=False):
    """Sends `head` then each of `parts` on a raw socket; the bytes the server answers (b"" when
    it closes without an answer). `until_answered`: stop sending once the server has answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT) as s:
        s.sendall(head)
        sent = 0
        for part in parts:
            if until_answered and _readable(s):
                break
            try:
                s.sendall(part)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 1
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                answer += chunk
                if not until_answered and _complete(answer):
                    break
        return answer, sent


def _complete(answer):
    """Whether `answer` holds the headers and the whole body they announce (the body may come
    in a later packet than the headers)."""
    head, found, body = answer.partition(b"\r\n\r\n")
    if not found:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value.strip())
    return True


def _readable(s):
    import select

    return bool(select.select([s], [], [], 0)[0])


def test_beyond_concurrency_and_queue_requests_get_503_with_retry_after():
    recognizer = HeldRecognizer()
    shedding = Shedding(concurrency=2, queue=3, retry_after=7, queue_timeout=600)
    app = create_app(recognizer, shedding=shedding)
    load = app.state.load
    with serving(app, shedding) as port, concurrent.futures.ThreadPoolExecutor(5) as pool:
        held = [pool.submit(post, port, jpeg()) for _ in range(5)]
        for _ in range(2):
            assert recognizer.entered.acquire(timeout=SOCKET_TIMEOUT)
        wait_for(lambda: load.admitted == 5, "five requests admitted")
        assert (load.inferring, recognizer.calls) == (2, 2)  # three wait for a slot

        status, headers, answer = post(port, jpeg())
        assert (status, headers["retry-after"]) == (503, "7")
        assert answer == {"detail": "busy: too many requests in progress"}
        assert get(port, "/healthz") == (200, {"status": "ok"})  # busy is not down
        assert recognizer.calls == 2 and load.shed == 1

        recognizer.release.set()
        answers = [future.result(SOCKET_TIMEOUT) for future in held]
    assert [(status, answer["answer"]) for status, _, answer in answers] == [(200, "Met 7")] * 5
    assert (recognizer.calls, load.admitted, load.inferring, load.shed) == (5, 0, 0, 1)


def test_a_request_that_waits_past_the_queue_timeout_gets_503():
    recognizer = HeldRecognizer()
    shedding = Shedding(concurrency=1, queue=4, queue_timeout=0.05, retry_after=3)
    app = create_app(recognizer, shedding=shedding)
    with serving(app, shedding) as port, concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(post, port, jpeg())
        assert recognizer.entered.acquire(timeout=SOCKET_TIMEOUT)  # holds the only slot
        status, headers, answer = post(port, jpeg())
        assert (status, headers["retry-after"]) == (503, "3")
        assert answer == {"detail": "busy: no decoding slot within 0.05 s"}
        recognizer.release.set()
        assert first.result(SOCKET_TIMEOUT)[0] == 200
    assert recognizer.calls == 1 and app.state.load.shed == 1


def test_a_body_slower_than_the_body_timeout_gets_408():
    recognizer = HeldRecognizer()
    shedding = Shedding(body_timeout=0.2)
    app = create_app(recognizer, shedding=shedding)
    head = (
        b"POST /v1/recognize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n" + b'{"image_base64": "'
    )  # then nothing: the other 982 bytes never come
    with serving(app, shedding) as port:
        answer, _ = raw_request(port, head)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b"the upload took more than 0.2 s to arrive" in answer
    assert recognizer.calls == 0 and app.state.load.admitted == 0


def test_a_body_without_content_length_is_cut_off_at_the_limit_while_it_streams():
    recognizer = HeldRecognizer()
    shedding = Shedding()
    app = create_app(recognizer, max_upload_bytes=1000, shedding=shedding)  # body limit 66869
    head = (
        b"POST /v1/recognize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"2000\r\n" + b"A" * 0x2000 + b"\r\n"
    parts = [chunk] * 2000  # 16 MiB if the server took it all; it never sees the last chunk
    with serving(app, shedding) as port:
        answer, sent = raw_request(port, head, parts, until_answered=True)
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"upload larger than 66869 bytes" in answer
    assert sent < len(parts)  # answered before the body ended (no terminating chunk was sent)
    assert recognizer.calls == 0


def test_a_connection_that_never_finishes_its_headers_is_closed():
    shedding = Shedding(header_timeout=0.2)
    app = create_app(HeldRecognizer(), shedding=shedding)
    with serving(app, shedding) as port:
        answer, _ = raw_request(port, b"POST /v1/recognize HTTP/1.1\r\nHost: x\r\n")
        assert answer == b""  # closed, no answer
        assert get(port, "/healthz") == (200, {"status": "ok"})  # a prompt client still served


def png_header(width, height, bit_depth, colour_type):
    """A PNG with only its IHDR and IEND chunks: any declared layout in a few bytes."""

    def chunk(kind, data):
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_images_over_the_decoded_bytes_budget_get_422_unread():
    recognizer = HeldRecognizer()
    shedding = Shedding()
    app = create_app(recognizer, shedding=shedding, max_decoded_bytes=1_000_000)
    with serving(app, shedding) as port:
        # 7999 x 7999 RGBA 16-bit: under the 64 Mpx upload limit, 488 MiB decoded
        status, _, answer = post(port, png_header(7999, 7999, 16, 6))
        assert status == 422
        assert answer["detail"] == (
            "image declares 7999x7999 x 4 channels x 2 bytes = 488.2 MiB decoded, over the "
            "budget of 1,000,000 bytes"
        )
        # 600 x 600: 8-bit grey fits (1,080,000 counted as RGB: over), 500 x 500 RGB fits
        assert post(port, png_header(600, 600, 8, 0))[0] == 422
        recognizer.release.set()
        buffer = io.BytesIO()
        Image.new("RGB", (500, 500)).save(buffer, format="PNG")
        assert post(port, buffer.getvalue())[0] == 200
    assert recognizer.calls == 1


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(concurrency=0), "`concurrency` must be at least 1. Received: 0"),
        (dict(queue=-1), "`queue` must be at least 0. Received: -1"),
        (dict(body_timeout=0), "`body_timeout` must be positive. Received: 0"),
    ],
)
def test_shedding_settings_are_checked(settings, message):
    with pytest.raises(ValueError) as raised:
        Shedding(**settings)
    assert str(raised.value) == message
