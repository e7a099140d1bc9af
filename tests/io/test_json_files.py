"""JSON files that are empty, cut short, not UTF-8, nested too deeply or missing: one error that
names the file (docs/reliability.md, "Files that cannot make tfmet run code or exhaust memory")."""

import pytest

from tfmet.io.json_files import read_json, read_manifest


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"", "not valid JSON (Expecting value: line 1 column 1 (char 0))"),
        (b'{"k": 5, "t":', "not valid JSON (Expecting value: line 1 column 14 (char 13))"),
        (
            b'[{"path": "a.jpg"}',
            "not valid JSON (Expecting ',' delimiter: line 1 column 19 (char 18))",
        ),
        (b"[" * 200_000 + b"]" * 200_000, "JSON nested too deeply to read"),
    ],
    ids=["empty", "truncated object", "truncated list", "nested"],
)
def test_unreadable_json_is_one_error_naming_the_file(tmp_path, content, problem):
    path = tmp_path / "valset.json"
    path.write_bytes(content)
    with pytest.raises(ValueError) as raised:
        read_json(path)
    assert str(raised.value) == f"{path}: {problem}"


def test_json_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "testset.json"
    path.write_bytes(b'[{"path": "\xff"}]')
    with pytest.raises(ValueError, match=r"testset.json: not valid JSON \('utf-8' codec"):
        read_json(path)


def test_a_missing_file_and_a_manifest_of_another_format(tmp_path):
    with pytest.raises(FileNotFoundError) as raised:
        read_json(tmp_path / "MET_database.json", "Met ground truth file")
    assert str(raised.value) == f"{tmp_path}/MET_database.json: Met ground truth file not found"
    path = tmp_path / "train_manifest.json"
    path.write_text('{"format": "something-else", "valid": [true]}')
    with pytest.raises(ValueError) as raised:
        read_manifest(path, "tfmet-descriptors-1", "descriptor manifest")
    assert str(raised.value) == f"{path}: not a descriptor manifest"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="train_manifest.json: not a descriptor manifest"):
        read_manifest(path, "tfmet-descriptors-1", "descriptor manifest")
