"""docs/reliability.md's table of probe classes names tests that exist (issue #27 item 5)."""

import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _table():
    text = open(os.path.join(REPO, "docs", "reliability.md"), encoding="utf-8").read()
    section = text.split("## Which test covers each probe class", 1)[1]
    return [line for line in section.splitlines() if line.startswith("| ") and "`tests/" in line]


def test_every_probe_class_names_test_files_and_tests_that_exist():
    rows = _table()
    assert len(rows) == 21
    for row in rows:
        cell = row.rstrip(" |").rsplit(" | ", 1)[1]
        path = None
        for name in re.findall(r"`([^`]+)`", cell):
            if name.startswith("tests/"):
                path, _, test = name.partition("::")
                source = open(os.path.join(REPO, path), encoding="utf-8").read()
            else:  # `::test_x` (the file before it) or `test_x` / `test_x_*` (a family) in it
                assert path is not None, row
                test = name.removeprefix("::")
            if test:
                pattern = re.escape(test.removesuffix("*")) + ("" if test.endswith("*") else r"\(")
                assert re.search(r"^def " + pattern, source, re.M), f"{path}: no {test}"
