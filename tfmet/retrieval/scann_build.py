"""ScaNN's building blocks: the configuration of an approximate index and the builds that use it.

`ScannConfig.for_size(n)` follows ScaNN's rules of thumb (docs/algorithms.md): brute force below
20k points, asymmetric hashing (2 dimensions per block) + exact reordering below 100k, and above
that a spherical k-means tree of ~sqrt(n) leaves in front of it, a quarter of them searched per
query. An index with a tree is built from chunks (`build_tree_by_chunks`): the tree and the AH
codebooks are trained on an evenly spaced sample, then the rows are upserted chunk by chunk in
order, so ScaNN never holds a second copy of the database beside its own and the database may be
a memory-mapped file read chunk by chunk.

Used by the "scann" searcher (`tfmet.retrieval.searchers.ScannSearcher`, its in-graph form in
`tfmet.retrieval.graph_search`) and by the calibration that chooses a configuration by measured
recall (`tfmet.retrieval.recall`).
"""

import ctypes
import ctypes.util
import dataclasses
import functools
import math

import numpy as np

from tfmet.retrieval.pca import row_chunks

# ScaNN's rules of thumb (docs/algorithms.md).
BRUTE_FORCE_BELOW = 20_000
TREE_FROM = 100_000
UPSERT_ROWS = 8192  # rows read and handed to ScaNN at a time by a chunked build


def contiguous32(x):
    """`x` as a C-contiguous float32 array (what ScaNN takes)."""
    return np.ascontiguousarray(x, dtype=np.float32)


def scann_pybind():
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
        parts.append(contiguous32(chunk[inside - rows.start]))
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
    builder = configure_builder(
        scann_pybind().builder(sample, 10, "dot_product"), config, len(sample)
    )
    searcher = builder.build()
    # The pybind object itself: the Python wrapper's upsert/delete insist on string docids,
    # and searches would then return docids instead of row numbers.
    mutable = searcher.searcher
    mutable.delete(list(range(len(sample) - 1, -1, -1)))  # from the end: no id is moved
    del sample
    return_freed_memory()
    mutable.reserve(n)
    for _, chunk in row_chunks(database, chunk_rows):
        mutable.upsert([None] * chunk.shape[0], contiguous32(chunk), 256)
        # The leaves grow by reallocation; the freed buffers would otherwise stay in the heap
        # (at Met size, 32k-row chunks without this peaked 0.27 GB higher; 8k rows with it).
        return_freed_memory()
    if searcher.size() != n:
        raise RuntimeError(f"ScaNN holds {searcher.size()} rows after upserting {n}")
    return searcher
