import os
import subprocess
import sys

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # deterministic float results for golden tests

# Tests that start a Python subprocess (a tfmet program, saved_model_cli, a fresh interpreter)
# are most of the suite's time: they must be marked `slow`, so that `make test-fast`
# (`pytest -m "not slow"`) skips them. The guard below makes an unmarked one fail, also when the
# subprocess starts in a fixture the test uses.
_running = {"item": None}
_popen_init = subprocess.Popen.__init__
_PYTHON_BIN = os.path.dirname(sys.executable)


def _guarded_popen_init(self, args, *rest, **kwargs):
    item = _running["item"]
    program = args[0] if isinstance(args, (list, tuple)) and args else args
    ours = isinstance(program, (str, os.PathLike)) and os.path.dirname(str(program)) == _PYTHON_BIN
    if ours and item is not None and item.get_closest_marker("slow") is None:
        raise RuntimeError(
            f"{item.nodeid} starts a subprocess ({os.path.basename(str(program))}): "
            "mark it @pytest.mark.slow (docs/testing.md)"
        )
    _popen_init(self, args, *rest, **kwargs)


subprocess.Popen.__init__ = _guarded_popen_init


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _running["item"] = item


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    _running["item"] = nextitem


# The journeys that take the session fixture `demo_run` (tests/journeys/conftest.py: the demo's
# run, about 90 s) go to one pytest-xdist worker together, so that the demo runs once rather than
# once per worker; every other file is a unit of its own, as with plain `--dist loadfile`.
DEMO_RUN_FILES = (
    "tests/journeys/test_collection_journey.py",
    "tests/journeys/test_documented_commands.py",
    "tests/journeys/test_met_journey.py",
)


def scheduling_scope(nodeid):
    """The unit of work a test goes to a worker with: its file, or "demo_run" for the journeys
    of `DEMO_RUN_FILES`."""
    path = nodeid.split("::", 1)[0]
    return "demo_run" if path in DEMO_RUN_FILES else path


def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class DemoRunTogether(LoadFileScheduling):
        def _split_scope(self, nodeid):
            return scheduling_scope(nodeid)

    return DemoRunTogether(config, log)


# Tests marked `gpu` compare the GPU with the CPU (tests/gpu, run by tools/gpu_check.sh). Where
# TensorFlow sees no GPU (CI, the usual development machine) they are skipped with reason
# "no GPU"; TensorFlow is only asked when such a test was collected.
def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return
    for item in gpu_items:
        item.add_marker(pytest.mark.skip(reason="no GPU"))
