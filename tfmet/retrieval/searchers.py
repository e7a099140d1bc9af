"""Maximum-inner-product search behind one interface: `Searcher`, "exact" and "scann".

Every neighbour search of tfmet (the kNN classifier and knn-eval, contrastive mining, the
embedding tools, the recogniser export) asks this registry for a searcher by its backend name:

    searcher = make_searcher("scann", config).build(database)   # or load_searcher(directory)
    similarities, indices = searcher.search(queries, k)
    searcher.save(directory)
    module = searcher.in_graph(database, k)   # a tf.Module for SavedModels: module(queries)

A `Searcher` offers
- `build(database)` / `search(queries, k)`: (similarities float32 [q, k], indices int64 [q, k]),
  best first, ties broken by the smaller database index; an approximate search that finds fewer
  than k candidates pads with index -1 and similarity -inf;
- `build_calibrated(database, queries, k, min_recall)`: the build of a knn-eval run, which may
  measure the recall of an approximate search on sample queries and choose its configuration
  (`tfmet.retrieval.recall`); returns (`recall.SearchChoice` or None, the searcher to use);
- `save(directory)` / `load_searcher(directory)`: the on-disk index (a `tfmet_index.json`
  manifest naming the backend beside the backend's files; never a pickle);
- `in_graph(database, k)`: the same search as TensorFlow ops (`tfmet.retrieval.graph_search`)
  for the one-piece recogniser SavedModel.

Backends:
- "exact" (`ExactSearcher`): float32 GEMM (numpy's BLAS) shard by shard over the database and
  block by block over the queries, each block's top k selected as it is produced and merged, so
  the search never holds a second full copy of the database nor a full similarity matrix. Equal
  to numpy brute force, ties broken by the smaller index. In the graph:
  a matmul + top-k (plain TensorFlow ops).
- "scann" (`ScannSearcher`): ScaNN's approximate search, configured by
  `tfmet.retrieval.scann_build.ScannConfig` (None: `ScannConfig.for_size(n)`); its calibrated
  build chooses the configuration by measured recall. In the graph: ScaNN's TensorFlow searcher.

A new backend is a `Searcher` subclass with a new `backend` name, decorated with `@register`
(its in-graph form, if it has one, beside the others in `tfmet.retrieval.graph_search`); the
programs' `--backend` / `--searcher` choices and the config checks read `SEARCHERS`.
"""

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
from tfmet.retrieval import recall
from tfmet.retrieval.pca import row_chunks
from tfmet.retrieval.scann_build import (
    ScannConfig,
    build_tree_by_chunks,
    configure_builder,
    contiguous32,
    scann_pybind,
)

FORMAT = "tfmet-knn-index"
MANIFEST = "tfmet_index.json"
DATABASE_FILE = "database.npy"
DEFAULT_SHARD_ROWS = 32768
QUERY_BLOCK = 512  # queries per GEMM block: [512, shard_rows] float32 similarities

SEARCHERS = {}  # backend name -> Searcher subclass, in registration order


def register(cls):
    """Class decorator: makes a `Searcher` subclass available under its `backend` name."""
    if not cls.backend or cls.backend in SEARCHERS:
        raise ValueError(f"a searcher needs a new backend name. Received: {cls.backend!r}")
    SEARCHERS[cls.backend] = cls
    return cls


def searcher_class(backend):
    """The `Searcher` subclass registered as `backend`; ValueError names the known ones."""
    try:
        return SEARCHERS[backend]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown search backend {backend!r}: the known backends are "
            f"{', '.join(repr(name) for name in SEARCHERS)}"
        ) from None


def make_searcher(backend, config=None, **options):
    """An unbuilt searcher of `backend` with its `config` (see the class) and `options`
    (`shard_rows`, `num_threads`, `batch_size`)."""
    return searcher_class(backend)(config, **options)


def load_searcher(directory, num_threads=0, batch_size=256):
    """Reads a searcher written by `Searcher.save`; errors name the directory and the problem."""
    directory = os.fspath(directory)
    manifest = read_manifest(os.path.join(directory, MANIFEST), FORMAT, "tfmet index manifest")
    searcher = make_searcher(
        manifest["backend"],
        manifest.get("config"),
        shard_rows=manifest.get("shard_rows", DEFAULT_SHARD_ROWS),
        num_threads=num_threads,
        batch_size=batch_size,
    )
    searcher.size, searcher.dim = int(manifest["size"]), int(manifest["dim"])
    searcher._load(directory)
    return searcher


def sort_neighbors(similarities, indices, k):
    """The best `k` of each row, by descending similarity then ascending index."""
    order = np.lexsort((indices, -similarities), axis=1)[:, :k]
    return np.take_along_axis(similarities, order, 1), np.take_along_axis(indices, order, 1)


def merge_top_k(scores, offset, best_similarities, best_indices, mask=None):
    """The running top k ([b, k], best first) merged with a block of `scores` [b, s] of the
    database rows `offset` .. `offset + s` (all after the rows already merged).

    Only the scores above a row's current k-th best can enter (an equal one has a larger index
    and loses the tie); where many do (the first block), those below the block's own k-th best
    are dropped first. The survivors are gathered into a padded [b, m] list and merged by
    `sort_neighbors`, so ties keep going to the smaller index. `mask`, a C-contiguous bool array
    of `scores`' shape, is used as the buffer of the comparison (one per search, not per block).

    The survivors are found by one pass over the flattened mask (`np.flatnonzero`, ~10x faster
    than a 2-D `np.nonzero` over a [512, 32768] block), so past the first shards, where few
    scores beat the running k-th best, a block costs little beyond its GEMM.
    """
    b, s = scores.shape
    k = best_indices.shape[1]
    mask = np.greater(scores, best_similarities[:, -1:], out=mask)
    total = np.count_nonzero(mask)
    if not total:
        return best_similarities, best_indices
    # Up to 4 k survivors a row on average the flat positions are few: count the rows from them;
    # beyond (the first shard) count the mask's rows directly.
    flat = np.flatnonzero(mask) if total <= 4 * k * b else None
    counts = np.count_nonzero(mask, axis=1) if flat is None else np.bincount(flat // s, minlength=b)
    if counts.max() > 4 * k:
        heavy = counts > k
        kth = np.full(b, -np.inf, np.float32)
        if heavy.all():
            kth = np.partition(scores, s - k, axis=1)[:, -k]
        else:
            kth[heavy] = np.partition(scores[heavy], s - k, axis=1)[:, -k]
        mask &= scores >= kth[:, None]
        flat = np.flatnonzero(mask)
        counts = np.bincount(flat // s, minlength=b)
    rows = flat // s
    columns = flat - rows * s
    position = np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts)
    width = int(counts.max())
    similarities = np.full((b, width), -np.inf, np.float32)
    indices = np.full((b, width), -1, np.int64)
    similarities[rows, position] = scores[rows, columns]
    indices[rows, position] = columns + offset
    return sort_neighbors(
        np.concatenate([best_similarities, similarities], axis=1),
        np.concatenate([best_indices, indices], axis=1),
        k,
    )


def _block_buffer(shape, dtype):
    """A C-contiguous array of `shape` viewed on the front of a flat `dtype` buffer, so blocks
    smaller than the first (the last shard, the last query block) reuse its memory."""
    buffer = np.empty(int(np.prod(shape)), dtype)
    return lambda rows, columns: buffer[: rows * columns].reshape(rows, columns)


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


def _clean(indices, similarities, k):
    indices = np.asarray(indices).astype(np.int64).reshape(-1, k)
    similarities = np.asarray(similarities, np.float32).reshape(-1, k)
    missing = ~np.isfinite(similarities)
    indices[missing] = -1
    similarities[missing] = -np.inf
    return similarities, indices


class Searcher:
    """Maximum-inner-product search over the rows of a database (see the module docstring).

    Args:
      config: the backend's configuration (None for a backend without one).
      shard_rows: rows per brute-force shard (kept in the manifest of every backend).
      num_threads: ScaNN search threads; 0 lets ScaNN decide.
      batch_size: queries per ScaNN batch in parallel search.

    Class attributes: `backend`, the registry name; `approximate`, whether its answers may
    differ from exact search (its calibrated build then measures its recall).
    """

    backend = None
    approximate = False

    def __init__(self, config=None, shard_rows=DEFAULT_SHARD_ROWS, num_threads=0, batch_size=256):
        self.config = self.parse_config(config)
        self.shard_rows = int(shard_rows)
        self.num_threads = int(num_threads)
        self.batch_size = int(batch_size)
        self.size = 0
        self.dim = 0

    @classmethod
    def parse_config(cls, config):
        """`config` in the backend's own type; the base class takes none."""
        if config is not None:
            raise ValueError(f"the {cls.backend!r} searcher takes no config. Received: {config}")
        return None

    @property
    def built(self):
        raise NotImplementedError

    def build(self, database):
        """Indexes the rows of `database` [n, d]; returns self."""
        database = _as_matrix("database", database)
        if database.shape[0] == 0:
            raise ValueError("cannot build a neighbour index over an empty database")
        self.size, self.dim = database.shape
        self._build(database)
        return self

    def build_calibrated(
        self, database, queries, k, min_recall=recall.DEFAULT_MIN_RECALL, log=None,
        total_queries=None,
    ):  # fmt: skip
        """(SearchChoice or None, searcher built over `database`) for searches up to `k`
        neighbours of queries like `queries` (`total_queries` of them in all, if known); an
        exact backend just builds itself."""
        return None, self.build(database)

    def search(self, queries, k):
        """The `k` most similar database rows of each query: (similarities, indices) [q, k]."""
        if not self.built:
            raise ValueError("the index is not built: call build(database) or load_searcher")
        queries = contiguous32(_as_matrix("queries", queries, self.dim))
        k = int(k)
        if not 1 <= k <= self.size:
            raise ValueError(
                f"`k` must be between 1 and the database size {self.size}. Received: {k}"
            )
        if queries.shape[0] == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        return self._search(queries, k)

    def in_graph(self, database, k):
        """A tf.Module whose call maps descriptors [B, d] to (similarities [B, k], indices
        [B, k]) over `database`, for SavedModels (independent of `build`)."""
        raise NotImplementedError(f"the {self.backend!r} searcher has no in-graph form")

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
            self._save(tmp)
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

    # What a backend implements: _build, _search, _save, _load (and `built`).


@register
class ExactSearcher(Searcher):
    """Exact search: float32 GEMM shard by shard (`shard_rows`), top k merged per block."""

    backend = "exact"

    def __init__(self, config=None, **options):
        super().__init__(config, **options)
        self._database = None

    @property
    def built(self):
        return self._database is not None

    def _build(self, database):
        # Kept by reference (a memory-mapped file is read shard by shard, never whole).
        self._database = database if database.dtype == np.float32 else contiguous32(database)

    def _search(self, queries, k):
        # One float32 GEMM per (shard, query block); each block's top k is selected as it is
        # produced and merged into a running [q, k] list, so the extra memory is one block of
        # similarities and the running lists.
        best_similarities = np.full((queries.shape[0], k), -np.inf, np.float32)
        best_indices = np.full((queries.shape[0], k), -1, np.int64)
        queries = contiguous32(queries)
        # The similarities and their mask are written into buffers made once: a fresh 64 MB
        # array per block is a fresh mapping whose pages fault in on every block (measured:
        # the GEMMs alone 1.2x faster into a reused buffer).
        shape = (min(QUERY_BLOCK, queries.shape[0]), min(self.shard_rows, self.size))
        score_block, mask_block = _block_buffer(shape, np.float32), _block_buffer(shape, bool)
        # row_chunks reads a memory-mapped database with file reads: its pages never pile up
        # in this process's resident memory.
        for rows, shard in row_chunks(self._database, self.shard_rows):
            shard = contiguous32(shard)
            for start in range(0, queries.shape[0], QUERY_BLOCK):
                block = slice(start, start + QUERY_BLOCK)
                query_block = queries[block]
                scores = score_block(query_block.shape[0], shard.shape[0])
                np.matmul(query_block, shard.T, out=scores)
                best_similarities[block], best_indices[block] = merge_top_k(
                    scores,
                    rows.start,
                    best_similarities[block],
                    best_indices[block],
                    mask=mask_block(*scores.shape),
                )
        return best_similarities, best_indices

    def _save(self, directory):
        with open(os.path.join(directory, DATABASE_FILE), "wb") as f:
            np.save(f, contiguous32(self._database), allow_pickle=False)

    def _load(self, directory):
        array_path = os.path.join(directory, DATABASE_FILE)
        database = load_npy(array_path, "index database", mmap=True)
        if database.shape != (self.size, self.dim) or database.dtype != np.float32:
            raise ValueError(f"{array_path}: expected float32 {(self.size, self.dim)}")
        self._database = database

    def in_graph(self, database, k):
        from tfmet.retrieval.graph_search import ExactGraphSearch

        return ExactGraphSearch(database, k)


@register
class ScannSearcher(Searcher):
    """ScaNN's approximate search with a `ScannConfig` (or dict); None sizes one from the
    database at `build` (`ScannConfig.for_size`, recall not measured)."""

    backend = "scann"
    approximate = True

    def __init__(self, config=None, **options):
        super().__init__(config, **options)
        self._searcher = None

    @classmethod
    def parse_config(cls, config):
        if config is None or isinstance(config, ScannConfig):
            return config
        return ScannConfig(**dict(config))

    @property
    def built(self):
        return self._searcher is not None

    def _build(self, database):
        # A tree is built from chunks: a memory-mapped file is never read whole.
        if self.config is None:
            self.config = ScannConfig.for_size(self.size)
        if self.config.num_leaves:
            searcher = build_tree_by_chunks(database, self.config)
        else:
            database = contiguous32(database)
            builder = scann_pybind().builder(database, 10, "dot_product")
            searcher = configure_builder(builder, self.config, len(database)).build()
        if self.num_threads:
            searcher.set_num_threads(self.num_threads)
        self._searcher = searcher

    def build_calibrated(
        self, database, queries, k, min_recall=recall.DEFAULT_MIN_RECALL, log=None,
        total_queries=None,
    ):  # fmt: skip
        """`recall.calibrate`: chooses the configuration by its recall@k on `queries` (or checks
        an explicit one); the searcher returned may be an `ExactSearcher` when no configuration
        reaches `min_recall` faster than exact search."""
        options = dict(num_threads=self.num_threads, batch_size=self.batch_size)
        return recall.calibrate(
            database,
            queries,
            k,
            exact=ExactSearcher(shard_rows=self.shard_rows, **options),
            approximate=lambda config: ScannSearcher(config, **options),
            config=self.config,
            min_recall=min_recall,
            log=log,
            total_queries=total_queries,
        )

    def _search(self, queries, k):
        config = self.config
        indices, similarities = self._searcher.search_batched_parallel(
            queries,
            final_num_neighbors=k,
            pre_reorder_num_neighbors=max(config.reorder, k) if config.use_ah else None,
            leaves_to_search=config.num_leaves_to_search if config.num_leaves else None,
            batch_size=self.batch_size,
        )
        return sort_neighbors(*_clean(indices, similarities, k), k)

    def _save(self, directory):
        self._searcher.serialize(directory, relative_path=True)

    def _load(self, directory):
        # ScaNN's loader unpickles an optional docids file; tfmet never writes one.
        if os.path.exists(os.path.join(directory, "scann_docids.pkl")):
            raise ValueError(f"{directory}: refusing to load a pickled scann_docids.pkl")
        self._searcher = scann_pybind().load_searcher(directory)
        if self.num_threads:
            self._searcher.set_num_threads(self.num_threads)

    def in_graph(self, database, k):
        """ScaNN's TF searcher built with this config (None: `ScannConfig.for_size`, recall not
        measured), leaves searched and reorder depth included."""
        from tfmet.retrieval.graph_search import ScannGraphSearch

        config = ScannConfig.for_size(len(database)) if self.config is None else self.config
        return ScannGraphSearch(database, k, config)
