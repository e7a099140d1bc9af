"""Files on any Beam file system (local disk, gs://, s3://, hdfs://, ...), without TensorFlow.

Beam's `FileSystems` picks the implementation from the path's scheme; gs:// needs
`apache-beam[gcp]`, s3:// `apache-beam[aws]`. Reads are never decompressed (Beam would otherwise
guess from the file name).
"""

import os

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems


def is_remote(path):
    """Whether `path` names a non-local Beam file system (gs://, s3://, hdfs://, ...)."""
    return FileSystems.get_scheme(os.fspath(path)) not in (None, "file")


def join(base, *parts):
    """`base/part/...` on `base`'s file system."""
    return FileSystems.join(os.fspath(base), *parts)


def read_bytes(path, limit=None):
    """The bytes of a file; with `limit`, at most that many (the file's first bytes)."""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return f.read() if limit is None else f.read(int(limit))


def write_bytes(path, data):
    """Writes a file (an object store publishes it only once complete)."""
    with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        f.write(data)


def copy_tree(source, destination):
    """Copies every file below `source` (any file system) into local folder `destination`.

    Returns the number of files copied.

    Raises:
      FileNotFoundError: `source` holds no files.
    """
    source = os.fspath(source).rstrip("/")
    matches = FileSystems.match([join(source, "**")])[0].metadata_list
    if not matches:
        raise FileNotFoundError(f"{source}: no files to copy (is it a SavedModel folder?)")
    for metadata in matches:
        relative = metadata.path[len(source) :].lstrip("/")
        target = os.path.join(destination, *relative.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with FileSystems.open(metadata.path, compression_type=CompressionTypes.UNCOMPRESSED) as src:
            with open(target, "wb") as dst:
                while block := src.read(1 << 22):
                    dst.write(block)
    return len(matches)


def upload_tree(source, destination):
    """Copies every file below local folder `source` to `destination` (any file system)."""
    count = 0
    for folder, _, files in os.walk(source):
        for name in files:
            local = os.path.join(folder, name)
            relative = os.path.relpath(local, source).split(os.sep)
            with open(local, "rb") as f:
                write_bytes(join(destination, *relative), f.read())
            count += 1
    return count
