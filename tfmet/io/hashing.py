"""SHA-256 fingerprints of files: weights files, checkpoints, images, imported descriptors."""

import hashlib


def file_sha256(path, block_size=1 << 20):
    """Hex SHA-256 of a file's bytes, read in `block_size` blocks (bounded memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(block_size), b""):
            digest.update(block)
    return digest.hexdigest()
