"""A served page in a real browser: a free port, waiting for a server to answer, headless chromium
(Debian's chromium + chromium-driver, driven through selenium)."""

import shutil
import socket
import time
import urllib.request

import pytest

needs_chromium = pytest.mark.skipif(
    not shutil.which("chromedriver"), reason="needs chromium + chromium-driver"
)


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(url, process, stop, what, timeout=300):
    """Polls `url`/healthz until it answers; fails the test with `process`'s output (after
    `stop()`, if it still runs) when the process exits or `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            urllib.request.urlopen(url + "/healthz", timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    if process.poll() is None:
        stop()
    pytest.fail(f"{what} did not start: {process.communicate()[0][-3000:]}")


def headless_chromium(profile_dir, window_size="1000,760"):
    """A selenium driver of headless chromium with a fresh profile and no background traffic."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile_dir}", f"--window-size={window_size}",
    ):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
