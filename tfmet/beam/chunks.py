"""The single-machine extraction's chunk files, on a local disk or any Beam file system.

A Beam run writes exactly the files `tfmet.descriptors.chunk_files` describes (its `run.json` and
`chunk-NNNNNN.npz` files under `<output_dir>/chunks/<split>/`), through that module's own
`ChunkDirectory`, so `tfmet-extract --merge` (`chunk_files.merge_split`) merges them, and Beam
and single-machine runs can even finish each other's work. On a remote file system (gs://, s3://,
hdfs://) each file is written to a local temporary `ChunkDirectory` and uploaded; an object
store makes an upload visible only once it is complete, so a chunk is never half there.
"""

import json
import os
import shutil
import tempfile

from apache_beam.io.filesystems import FileSystems

from tfmet.beam.paths import is_remote, read_bytes, write_bytes
from tfmet.descriptors.chunk_files import CHUNK_PATTERN, RUN_FILE, ChunkDirectory


class ChunkOutput:
    """The chunk folder of one split under `output_dir` (a local path or a remote URI)."""

    def __init__(self, output_dir, split):
        self.output_dir = os.fspath(output_dir)
        self.split = split
        self.remote = is_remote(self.output_dir)
        if self.remote:
            self.directory = FileSystems.join(self.output_dir, "chunks", split)
        else:
            self.local = ChunkDirectory(self.output_dir, split)
            self.directory = self.local.directory

    @property
    def run_path(self):
        return FileSystems.join(self.directory, RUN_FILE) if self.remote else self.local.run_path

    def chunk_path(self, chunk_id):
        if self.remote:
            return FileSystems.join(self.directory, CHUNK_PATTERN.format(chunk_id))
        return self.local.chunk_path(chunk_id)

    def read_run(self):
        if not self.remote:
            return self.local.read_run()
        try:
            return json.loads(read_bytes(self.run_path).decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{self.run_path}: not valid JSON ({e})") from None
        except OSError:
            if not FileSystems.exists(self.run_path):
                raise FileNotFoundError(
                    f"{self.run_path}: no extraction of split {self.split!r} in {self.output_dir}"
                ) from None
            raise

    def prepare(self, run):
        """Records `run`, or checks that the recorded one has the same settings (`ValueError`)."""
        if not self.remote:
            self.local.prepare(run)
            return
        with tempfile.TemporaryDirectory(prefix="tfmet-chunks-") as tmp:
            staged = ChunkDirectory(tmp, self.split)
            exists = FileSystems.exists(self.run_path)
            if exists:
                os.makedirs(staged.directory)
                with open(staged.run_path, "wb") as f:
                    f.write(read_bytes(self.run_path))
            try:
                staged.prepare(run)
            except ValueError as e:
                raise ValueError(str(e).replace(staged.directory, self.directory)) from None
            if not exists:
                with open(staged.run_path, "rb") as f:
                    write_bytes(self.run_path, f.read())

    def finished(self, chunk_ids):
        """The chunk ids among `chunk_ids` whose file exists."""
        if not self.remote:
            return self.local.finished(chunk_ids)
        pattern = FileSystems.join(self.directory, "chunk-*.npz")
        present = {m.path.rsplit("/", 1)[-1] for m in FileSystems.match([pattern])[0].metadata_list}
        return [j for j in chunk_ids if CHUNK_PATTERN.format(j) in present]

    def write_chunk(self, chunk_id, start, descriptors, valid, errors, local=None):
        """Writes one chunk file (atomically); `errors` are (row, reason) pairs; `local`: None or
        the rows' local features, {name: array} (`tfmet.data.descriptor_store.LOCAL_ARRAYS`)."""
        if not self.remote:
            self.local.write_chunk(chunk_id, start, descriptors, valid, errors, local)
            return
        tmp = tempfile.mkdtemp(prefix="tfmet-chunk-")
        try:
            staged = ChunkDirectory(tmp, self.split)
            staged.write_chunk(chunk_id, start, descriptors, valid, errors, local)
            with open(staged.chunk_path(chunk_id), "rb") as f:
                write_bytes(self.chunk_path(chunk_id), f.read())
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
