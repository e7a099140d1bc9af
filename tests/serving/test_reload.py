"""tfmet-serve swaps in an export's new version (POST /v1/reload) without dropping a request:
requests in flight finish on the version they started with, later ones get the new one.

A real uvicorn server on 127.0.0.1 in a thread (tests/serving/test_shedding.py's `serving`)
around fake recognisers that answer their version's Met id; what each request gets is decided
by what the server holds, never by timing. Every wait is a bounded loop.
"""

import concurrent.futures
import threading

import pytest

pytest.importorskip("fastapi")

from tests.serving.test_shedding import (  # noqa: E402
    SOCKET_TIMEOUT,
    HeldRecognizer,
    jpeg,
    post,
    serving,
    wait_for,
)
from tfmet.serving.client import Answer  # noqa: E402
from tfmet.serving.web import Shedding, create_app  # noqa: E402

ROUNDS = 3000


class VersionRecognizer:
    """Answers Met `met_id` (its version) to every photo; counts its calls and its warm-up."""

    threshold = 0.5

    def __init__(self, met_id):
        self.met_id = met_id
        self.metadata = {"collection": {"version": met_id}, "database_size": 10 + met_id}
        self.calls = 0
        self.warmed = False

    def warm_up(self):
        self.warmed = True

    def recognize_one(self, data):
        self.calls += 1
        return Answer(met_id=self.met_id, confidence=0.9, accepted=True, valid=True, top=[])


def _reload(port):
    import http.client
    import json

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=SOCKET_TIMEOUT)
    try:
        connection.request("POST", "/v1/reload", b"")
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_a_version_swapped_in_under_load_drops_no_request():
    versions = iter([VersionRecognizer(2), VersionRecognizer(3)])
    first = VersionRecognizer(1)
    shedding = Shedding(concurrency=4, queue=64)
    app = create_app(first, shedding=shedding, reload=lambda: (next(versions), None))
    image = jpeg()
    swapped = threading.Event()
    with serving(app, shedding) as port:

        def client(index):
            answers = []
            for _ in range(ROUNDS):  # bounded: until two answers after the swap
                status, _, body = post(port, image)
                answers.append((status, body.get("met_id")))
                if swapped.is_set() and sum(m == 2 for _, m in answers) >= 2:
                    return answers
            pytest.fail(f"client {index} never saw the new version")

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(client, i) for i in range(6)]
            wait_for(lambda: first.calls >= 12, "load on the first version")
            status, body = _reload(port)
            swapped.set()
            results = [f.result(SOCKET_TIMEOUT) for f in futures]
    assert (status, body["version"], body["database_size"], body["reloads"]) == (200, 2, 12, 1)
    for answers in results:
        assert {s for s, _ in answers} == {200}  # no failed request
        met_ids = [m for _, m in answers]
        assert set(met_ids) <= {1, 2}
        switched = met_ids.index(2)
        assert set(met_ids[switched:]) == {2}  # once switched, the new version only


def test_a_request_in_flight_finishes_on_the_old_version():
    held = HeldRecognizer()  # answers Met 7 once released
    shedding = Shedding(concurrency=2, queue=4)
    new = VersionRecognizer(2)
    app = create_app(held, shedding=shedding, reload=lambda: (new, None))
    with serving(app, shedding) as port:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(post, port, jpeg())
            assert held.entered.acquire(timeout=SOCKET_TIMEOUT)
            status, body = _reload(port)
            assert (status, body["version"]) == (200, 2) and new.warmed
            assert post(port, jpeg())[2]["met_id"] == 2  # new requests: the new version
            held.release.set()
            status, _, old = in_flight.result(SOCKET_TIMEOUT)
    assert (status, old["met_id"]) == (200, 7)


def test_reload_is_refused_without_a_loader_or_from_elsewhere_and_a_failure_keeps_serving():
    from fastapi.testclient import TestClient

    first = VersionRecognizer(1)
    assert TestClient(create_app(first)).post("/v1/reload").status_code == 403  # "testclient"

    def broken():
        raise ValueError("exports/rec: not a tfmet export (no assets/tfmet_metadata.json)")

    shedding = Shedding()
    for reload, expected in ((None, 404), (broken, 409)):
        app = create_app(first, shedding=shedding, reload=reload)
        with serving(app, shedding) as port:
            status, body = _reload(port)
            assert status == expected, body
            assert post(port, jpeg())[2]["met_id"] == 1
    assert "still serving the previous version: exports/rec: not a tfmet export" in body["detail"]
