"""The demo's run, made once per test session and shared by the journeys that read it."""

import pytest

from tests.kit import run_cli


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """`tfmet-demo --workdir WORK --noprogress` (what `make demo` runs): (WORK, its stdout).

    Tests read its outputs and write their own elsewhere: the work folder is shared."""
    workdir = tmp_path_factory.mktemp("demo_work")
    result = run_cli("demo", "--workdir", workdir, "--noprogress", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return str(workdir), result.stdout
