"""Inner-product nearest-neighbour search with ScaNN: exact brute force or tree + AH + reorder.

Backends:
- "exact": ScaNN brute force (float32 dot products), run shard by shard over the database and
  merged, so the search never holds a second full copy of the database (ScaNN copies what it
  indexes). Equal to numpy brute force up to the order of exact ties.
- "scann": ScaNN's approximate search, configured by `ScannConfig`; `ScannConfig.for_size(n)`
  follows ScaNN's rules of thumb (docs/algorithms.md): brute force below 20k points, asymmetric
  hashing (2 dimensions per block) + exact reordering below 100k, and above that a spherical
  k-means tree of ~sqrt(n) leaves in front of it, a quarter of them searched per query.
  An index with a tree is built from chunks (`build_tree_by_chunks`): the tree and the AH
  codebooks are trained on an evenly spaced sample, then the rows are upserted chunk by chunk
  in order, so ScaNN never holds a second copy of the database beside its own and the database
  may be a memory-mapped file read chunk by chunk.

`search(queries, k)` returns (similarities float32 [q, k], indices int64 [q, k]), best first,
ties broken by the smaller database index. An approximate search that finds fewer than k
candidates pads with index -1 and similarity -inf.
"""

import ctypes
import ctypes.util
import dataclasses
import functools
import math
import os
import shutil

import numpy as np

from tfmet.io.arrays import load_npy
from tfmet.io.atomic import (
    clean_stale_temporaries,
    replace_directory,
    save_json,
    staging_directory,
)
from tfmet.io.json_files import read_manifest
from tfmet.retrieval.pca import row_chunks

BACKENDS = ("exact", "scann")
FORMAT = "tfmet-knn-index"
MANIFEST = "tfmet_index.json"
DATABASE_FILE = "database.npy"
DEFAULT_SHARD_ROWS = 32768
# ScaNN's rules of thumb (docs/algorithms.md).
BRUTE_FORCE_BELOW = 20_000
TREE_FROM = 100_000
UPSERT_ROWS = 8192  # rows read and handed to ScaNN at a time by a chunked build


def _scann():
    # Imported on first use: ScaNN's package imports TensorFlow.
    from scann.scann_ops.py import scann_ops_pybind

    return scann_ops_pybind


@dataclasses.dataclass
class ScannConfig:
    """ScaNN approximate-search settings (see ScaNN's docs/algorithms.md).

    Attributes:
      num_leaves: k-means partitions; 0 disables the tree.
      num_leaves_to_search: partitions scored per query.
      spherical: spherical k-means for the tree (unit-norm descriptors under dot product).
      use_ah: score with asymmetric hashing; False scores by brute force.
      dimensions_per_block: AH block size (ScaNN recommends 2).
      anisotropic_quantization_threshold: AH's anisotropic loss threshold (0.2 for unit vectors).
      reorder: candidates rescored exactly before the final top k (at least k is used).
      training_sample_size: points sampled to train the tree and the AH codebooks.
    """

    num_leaves: int = 0
    num_leaves_to_search: int = 0
    spherical: bool = False
    use_ah: bool = False
    dimensions_per_block: int = 2
    anisotropic_quantization_threshold: float = 0.2
    reorder: int = 0
    training_sample_size: int = 100_000

    @classmethod
    def for_size(cls, n):
        """Defaults for a database of `n` points."""
        n = int(n)
        if n < BRUTE_FORCE_BELOW:
            return cls()
        config = cls(use_ah=True, reorder=250, training_sample_size=min(n, 100_000))
        if n >= TREE_FROM:
            config.num_leaves = int(round(math.sqrt(n)))
            config.num_leaves_to_search = max(1, int(math.ceil(0.25 * config.num_leaves)))
            config.spherical = True
            pass
        return config

    def to_dict(self):
        return dataclasses.asdict(self)


def return_freed_memory():
    """Asks the C allocator to give freed heap memory back to the OS (glibc's malloc_trim).

    A freed ScaNN index (a float32 copy of the database and its build buffers) otherwise stays
    in the process's heap, and the next index is built on top of it: in a Met-size calibration
    that raised the peak RSS by about one database. A no-op where there is no glibc.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    # find_library runs ldconfig in a subprocess: once per process, not once per call.
    name = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None


def _as_matrix(name, x, dim=None):
    if not isinstance(x, np.ndarray):  # np.asarray would turn a np.memmap into a plain view
        x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"`{name}` must be a 2-D array [n, d]. Received: shape={x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(
            f"`{name}` have dimension {x.shape[1]}, the index holds dimension {dim} vectors"
        )
    return x


def _contiguous32(x):
    return np.ascontiguousarray(x, dtype=np.float32)


def sort_neighbors(similarities, indices, k):
    """The best `k` of each row, by descending similarity then ascending index."""
    order = np.lexsort((indices, -similarities), axis=1)[:, :k]
    return np.take_along_axis(similarities, order, 1), np.take_along_axis(indices, order, 1)


def _clean(indices, similarities, k):
    indices = np.asarray(indices).astype(np.int64).reshape(-1, k)
    similarities = np.asarray(similarities, np.float32).reshape(-1, k)
    missing = ~np.isfinite(similarities)
    indices[missing] = -1
    similarities[missing] = -np.inf
    return similarities, indices


def configure_builder(builder, config, n):
    """Applies a `ScannConfig` to a ScaNN builder (pybind or TF ops) for a database of n rows."""
    sample = min(config.training_sample_size, int(n))
    if config.num_leaves:
        builder = builder.tree(
            num_leaves=config.num_leaves,
            num_leaves_to_search=config.num_leaves_to_search,
            training_sample_size=sample,
            spherical=config.spherical,
        )
    if not config.use_ah:
        return builder.score_brute_force()
    builder = builder.score_ah(
        config.dimensions_per_block,
        anisotropic_quantization_threshold=config.anisotropic_quantization_threshold,
        training_sample_size=sample,
    )
    return builder.reorder(max(config.reorder, 1))


def evenly_spaced_rows(database, count, chunk_rows=UPSERT_ROWS):
    """`count` rows of `database` at evenly spaced positions (all rows if count >= n), float32,
    read chunk by chunk (a memory-mapped store is read with file reads, see `row_chunks`)."""
    n = database.shape[0]
    picks = np.unique(np.linspace(0, n - 1, min(int(count), n)).round().astype(np.int64))
    parts = []
    for rows, chunk in row_chunks(database, chunk_rows):
        inside = picks[(picks >= rows.start) & (picks < rows.stop)]
        parts.append(_contiguous32(chunk[inside - rows.start]))
    return np.concatenate(parts)


def build_tree_by_chunks(database, config, chunk_rows=UPSERT_ROWS):
    """A ScaNN searcher over the rows of `database` whose ids are the row numbers, built without
    a second full copy of the database (tree configurations only).

    ScaNN's own build copies the whole database into ScaNN and, with brute-force scoring, once
    more into the tree's leaves before dropping the first copy (at Met size 3x the database
    bytes at the peak). Here the tree (and the AH codebooks) are trained on an evenly spaced
    sample of `config.training_sample_size` rows, the sample's rows are deleted again (the
    trained partitioner and quantizer stay), room for n rows is reserved, and the rows are
    upserted in order, `chunk_rows` at a time, so that row i gets id i; the heap memory the
    growing leaves free is given back to the OS after each chunk (`return_freed_memory`).
    Upserted rows are assigned to their nearest leaf and (with AH) encoded like those of a full
    build; ScaNN's training is not bit-reproducible either way, which is why
    `tfmet.retrieval.recall` measures the recall of the index it returns.
    """
    if not config.num_leaves:
        raise ValueError(f"a chunked build needs a tree (num_leaves > 0). Received: {config}")
    n = database.shape[0]
    sample = evenly_spaced_rows(database, min(config.training_sample_size, n), chunk_rows)
    builder = configure_builder(_scann().builder(sample, 10, "dot_product"), config, len(sample))
    searcher = builder.build()
    # The pybind object itself: the Python wrapper's upsert/delete insist on string docids,
    # and searches would then return docids instead of row numbers.
    mutable = searcher.searcher
    mutable.delete(list(range(len(sample) - 1, -1, -1)))  # from the end: no id is moved
    del sample
    return_freed_memory()
    mutable.reserve(n)
    for _, chunk in row_chunks(database, chunk_rows):
        mutable.upsert([None] * chunk.shape[0], _contiguous32(chunk), 256)
        # The leaves grow by reallocation; the freed buffers would otherwise stay in the heap
        # (at Met size, 32k-row chunks without this peaked 0.27 GB higher; 8k rows with it).
        return_freed_memory()
    if searcher.size() != n:
        raise RuntimeError(f"ScaNN holds {searcher.size()} rows after upserting {n}")
    return searcher


class NeighborIndex:
    """Maximum-inner-product index over the rows of a database.

    Args:
      backend: "exact" or "scann".
      config: a `ScannConfig` for "scann"; None sizes one from the database at `build`.
      shard_rows: rows per brute-force shard ("exact").
      num_threads: ScaNN search threads; 0 lets ScaNN decide.
      batch_size: queries per ScaNN batch in parallel search.
    """

    def __init__(
        self,
        backend="exact",
        config=None,
        shard_rows=DEFAULT_SHARD_ROWS,
        num_threads=0,
        batch_size=256,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"`backend` must be one of {BACKENDS}. Received: backend={backend!r}")
        if config is not None and not isinstance(config, ScannConfig):
            config = ScannConfig(**dict(config))
        self.backend = backend
        self.config = config
        self.shard_rows = int(shard_rows)
        self.num_threads = int(num_threads)
        self.batch_size = int(batch_size)
        self.size = 0
        self.dim = 0
        self._database = None
        self._searcher = None

    @property
    def built(self):
        return self._database is not None or self._searcher is not None

    def build(self, database):
        """Indexes the rows of `database` [n, d] (float32; kept by reference for "exact", read
        chunk by chunk for a "scann" tree: a memory-mapped file is never read whole)."""
        database = _as_matrix("database", database)
        if database.shape[0] == 0:
            raise ValueError("cannot build a neighbour index over an empty database")
        self.size, self.dim = database.shape
        if self.backend == "exact":
            self._database = database if database.dtype == np.float32 else _contiguous32(database)
            return self
        if self.config is None:
            self.config = ScannConfig.for_size(self.size)
        self._searcher = self._build_scann(database, self.config)
        return self

    def _build_scann(self, database, config):
        if config.num_leaves:
            searcher = build_tree_by_chunks(database, config)
        else:
            database = _contiguous32(database)
            builder = configure_builder(
                _scann().builder(database, 10, "dot_product"), config, len(database)
            )
            searcher = builder.build()
        if self.num_threads:
            searcher.set_num_threads(self.num_threads)
        return searcher

    def search(self, queries, k):
        """The `k` most similar database rows of each query: (similarities, indices) [q, k]."""
        if not self.built:
            raise ValueError("the index is not built: call build(database) or load(directory)")
        queries = _contiguous32(_as_matrix("queries", queries, self.dim))
        k = int(k)
        if not 1 <= k <= self.size:
            raise ValueError(
                f"`k` must be between 1 and the database size {self.size}. Received: {k}"
            )
        if queries.shape[0] == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        if self.backend == "exact":
            return self._search_exact(queries, k)
        config = self.config
        indices, similarities = self._searcher.search_batched_parallel(
            queries,
            final_num_neighbors=k,
            pre_reorder_num_neighbors=max(config.reorder, k) if config.use_ah else None,
            leaves_to_search=config.num_leaves_to_search if config.num_leaves else None,
            batch_size=self.batch_size,
        )
        return sort_neighbors(*_clean(indices, similarities, k), k)

    def _search_exact(self, queries, k):
        # A running top-k merged after each shard keeps the extra memory at two [q, k] lists.
        best_similarities = np.full((queries.shape[0], 0), -np.inf, np.float32)
        best_indices = np.zeros((queries.shape[0], 0), np.int64)
        # row_chunks reads a memory-mapped database with file reads: its pages never pile up
        # in this process's resident memory.
        for rows, shard in row_chunks(self._database, self.shard_rows):
            start = rows.start
            shard = _contiguous32(shard)
            shard_k = min(k, shard.shape[0])
            searcher = _scann().builder(shard, shard_k, "dot_product").score_brute_force().build()
            if self.num_threads:
                searcher.set_num_threads(self.num_threads)
            indices, similarities = searcher.search_batched_parallel(
                queries, final_num_neighbors=shard_k, batch_size=self.batch_size
            )
            del searcher, shard
            similarities, indices = _clean(indices, similarities, shard_k)
            best_similarities, best_indices = sort_neighbors(
                np.concatenate([best_similarities, similarities], axis=1),
                np.concatenate([best_indices, np.where(indices >= 0, indices + start, -1)], axis=1),
                k,
            )
        return best_similarities, best_indices

    def save(self, directory):
        """Writes the index to a new `directory` (replaced atomically if it exists)."""
        if not self.built:
            raise ValueError("the index is not built: nothing to save")
        directory = os.path.abspath(os.fspath(directory))
        parent = os.path.dirname(directory)
        os.makedirs(parent, exist_ok=True)
        clean_stale_temporaries(parent)
        tmp = staging_directory(parent, "index")
        try:
            if self.backend == "exact":
                with open(os.path.join(tmp, DATABASE_FILE), "wb") as f:
                    np.save(f, _contiguous32(self._database), allow_pickle=False)
            else:
                self._searcher.serialize(tmp, relative_path=True)
            save_json(
                os.path.join(tmp, MANIFEST),
                {
                    "format": FORMAT,
                    "backend": self.backend,
                    "size": self.size,
                    "dim": self.dim,
                    "config": None if self.config is None else self.config.to_dict(),
                    "shard_rows": self.shard_rows,
                },
            )
            replace_directory(tmp, directory)
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp)

    @classmethod
    def load(cls, directory, num_threads=0, batch_size=256):
        """Reads an index written by `save`; errors name the directory and the problem."""
        directory = os.fspath(directory)
        path = os.path.join(directory, MANIFEST)
        manifest = read_manifest(path, FORMAT, "tfmet index manifest")
        index = cls(
            backend=manifest["backend"],
            config=manifest.get("config"),
            shard_rows=manifest.get("shard_rows", DEFAULT_SHARD_ROWS),
            num_threads=num_threads,
            batch_size=batch_size,
        )
        index.size, index.dim = int(manifest["size"]), int(manifest["dim"])
        if index.backend == "exact":
            array_path = os.path.join(directory, DATABASE_FILE)
            database = load_npy(array_path, "index database", mmap=True)
            if database.shape != (index.size, index.dim) or database.dtype != np.float32:
                raise ValueError(f"{array_path}: expected float32 {(index.size, index.dim)}")
            index._database = database
        else:
            # ScaNN's loader unpickles an optional docids file; tfmet never writes one.
            if os.path.exists(os.path.join(directory, "scann_docids.pkl")):
                raise ValueError(f"{directory}: refusing to load a pickled scann_docids.pkl")
            index._searcher = _scann().load_searcher(directory)
            if num_threads:
                index._searcher.set_num_threads(num_threads)
        return index
