"""`--config` of tfmet-export, tfmet-predict and tfmet-demo: a config file's settings are used,
flags given override them, and an entry that cannot be used is one line naming it (exit 2); config
files that do not load: tests/cli/test_bad_input_cli.py (`CONFIG_PROGRAMS`).

Every case stops at a check made before TensorFlow loads, whose message shows the value used.
"""

import pytest

from tests.kit.cli import run_cli

pytestmark = pytest.mark.slow  # every test runs a program in a subprocess


def _config(tmp_path, body, name="config.py"):
    path = tmp_path / name
    path.write_text(
        "import ml_collections\n\n\ndef get_config():\n"
        f"    return ml_collections.ConfigDict({body})\n"
    )
    return path


def _error(done, program):
    """The program's one stderr line, without the `<program>: error: ` prefix."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(lines) == 1, done.stderr[-3000:]
    prefix = f"{program}: error: "
    assert lines[0].startswith(prefix), lines[0]
    return lines[0].removeprefix(prefix)


def test_export_uses_the_config_file_and_the_flags_given_override_it(tmp_path):
    taken, other = tmp_path / "taken", tmp_path / "other"
    taken.write_text("a file")
    other.write_text("a file")
    config = _config(tmp_path, f"{{'kind': 'descriptor', 'out': {str(taken)!r}}}")
    done = run_cli("export", f"--config={config}")
    assert _error(done, "tfmet-export") == f"--out={taken}: exists and is not a folder"
    done = run_cli("export", f"--config={config}", f"--out={other}")
    assert _error(done, "tfmet-export") == f"--out={other}: exists and is not a folder"
    # The config's precision is given, as a flag would be: the style export refuses it.
    body = f"{{'kind': 'style', 'out': {str(tmp_path / 'x')!r}, 'precision': 'bfloat16', "
    style = _config(tmp_path, body + "'max_pixels': 0}", "style.py")
    done = run_cli("export", f"--config={style}")
    refused = "--precision is for the descriptor and recognizer exports"
    assert _error(done, "tfmet-export") == refused
    done = run_cli("export", f"--config={style}", "--kind=descriptor")
    assert _error(done, "tfmet-export") == "--max_pixels must be a positive integer. Received: 0"
    done = run_cli("export", f"--config={style}", "--kind=descriptor", "--config.max_pixels=-1")
    assert _error(done, "tfmet-export") == "--max_pixels must be a positive integer. Received: -1"


def test_predict_uses_the_config_file_and_the_flags_given_override_it(tmp_path):
    config = _config(tmp_path, "{'model': 'run', 'top_k': 0, 'max_bytes': 0}")
    done = run_cli("predict", f"--config={config}", "a.jpg")
    assert _error(done, "tfmet-predict") == "--top_k must be positive, got 0"
    done = run_cli("predict", f"--config={config}", "--top_k=3", "a.jpg")
    assert _error(done, "tfmet-predict") == "--max_bytes must be a positive integer. Received: 0"


def test_demo_uses_the_config_file_and_the_flags_given_override_it(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("a file")
    config = _config(tmp_path, f"{{'workdir': {str(taken)!r}, 'precision': 'fp8'}}")
    done = run_cli("demo", f"--config={config}")
    assert _error(done, "tfmet-demo") == f"--workdir={taken}: exists and is not a folder"
    done = run_cli("demo", f"--config={config}", f"--workdir={tmp_path / 'work'}")
    message = _error(done, "tfmet-demo")
    assert message == "--precision must be one of float32, bfloat16, float16. Received: 'fp8'"
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("{'model': 'm.keras'}", "config key 'model' is not a setting of tfmet-demo"),
        ("{'examples': 'eight'}", "--examples must be an integer. Received: 'eight'"),
        ("{'weights': 3}", "--weights must be a string. Received: 3"),
    ],
)
def test_demo_refuses_config_entries_it_cannot_use(tmp_path, body, message):
    done = run_cli("demo", f"--config={_config(tmp_path, body)}", f"--workdir={tmp_path / 'w'}")
    assert _error(done, "tfmet-demo") == message


def test_export_refuses_a_choice_its_config_file_gives_wrongly(tmp_path):
    config = _config(tmp_path, "{'kind': 'recognizer', 'out': 'x', 'searcher': 'faiss'}")
    done = run_cli("export", f"--config={config}")
    assert (
        _error(done, "tfmet-export") == "--searcher must be one of exact, scann. Received: 'faiss'"
    )
