"""Inner-product nearest-neighbour search with ScaNN: exact brute force or tree + AH + reorder.

Backends:
- "exact": ScaNN brute force (float32 dot products), run shard by shard over the database and
  merged, so the search never holds a second full copy of the database (ScaNN copies what it
  indexes). Equal to numpy brute force up to the order of exact ties.
- "scann": ScaNN's approximate search, configured by `ScannConfig`; `ScannConfig.for_size(n)`
  follows ScaNN's rules of thumb (docs/algorithms.md): brute force below 20k points, asymmetric
  hashing (2 dimensions per block) + exact reordering below 100k, and above that a spherical
  k-means tree of ~sqrt(n) leaves in front of it, a quarter of them searched per query.

`search(queries, k)` returns (similarities float32 [q, k], indices int64 [q, k]), best first,
ties broken by the smaller database index. An approximate search that finds fewer than k
candidates pads with index -1 and similarity -inf.
"""

import ctypes
import ctypes.util
import dataclasses
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

BACKENDS = ("exact", "scann")
FORMAT = "tfmet-knn-index"
MANIFEST = "tfmet_index.json"
DATABASE_FILE = "database.npy"
DEFAULT_SHARD_ROWS = 32768
# ScaNN's rules of thumb (docs/algorithms.md).
BRUTE_FORCE_BELOW = 20_000
TREE_FROM = 100_000


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
    name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    if trim is not None:
        trim(0)


def _as_matrix(name, x, dim=None):
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
        """Indexes the rows of `database` [n, d] (float32; kept by reference for "exact")."""
        database = _as_matrix("database", database)
        if database.shape[0] == 0:
            raise ValueError("cannot build a neighbour index over an empty database")
        self.size, self.dim = database.shape
        if self.backend == "exact":
            self._database = database if database.dtype == np.float32 else _contiguous32(database)
            return self
        if self.config is None:
            self.config = ScannConfig.for_size(self.size)
        self._searcher = self._build_scann(_contiguous32(database), self.config)
        return self

    def _build_scann(self, database, config):
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
        for start in range(0, self.size, self.shard_rows):
            shard = _contiguous32(self._database[start : start + self.shard_rows])
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
