"""PCA-whitening learned on the database descriptors (the reference's post-processing).

m = column mean; C = Xc^T Xc / n (biased, symmetrised) accumulated in float64 over row chunks, so
that a memory-mapped 397k x 2048 float32 array never needs a float64 copy; eigen-decompose, keep
the `dim` largest eigenvalues; P = V diag(lambda^(-shrinkage / 2)). shrinkage 1 whitens, 0 is
plain PCA. transform(X) = L2((X - m) P). `tfmet.layers.Projector.from_pca(mean, projection)`
turns the result into a Dense layer.
"""

import mmap

import numpy as np

from tfmet.io.atomic import atomic_path

FORMAT = "tfmet-pca-whitening"
DEFAULT_CHUNK_ROWS = 8192
# Eigenvalues below this fraction of the largest are treated as zero (rank deficiency).
RELATIVE_EIGENVALUE_FLOOR = 1e-12


def _check_matrix(x, name="x"):
    if getattr(x, "ndim", None) != 2:
        x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"`{name}` must be a 2-D array [n, d]. Received: shape={np.shape(x)}")
    return x


def _chunks(n, rows):
    for start in range(0, n, rows):
        yield slice(start, min(start + rows, n))


def _is_whole_file_memmap(x):
    return (
        isinstance(x, np.memmap)
        and isinstance(x.base, mmap.mmap)
        and bool(x.filename)
        and x.flags.c_contiguous
        and x.ndim == 2
    )


def row_chunks(x, chunk_rows=DEFAULT_CHUNK_ROWS):
    """Yields (row slice, rows as an ndarray) over a 2-D array.

    A memory-mapped descriptor file (`read_store`'s arrays) is read with plain file reads, so its
    pages stay in the page cache and do not add up in this process's resident memory.
    """
    n, d = x.shape
    if not _is_whole_file_memmap(x):
        for rows in _chunks(n, chunk_rows):
            yield rows, np.asarray(x[rows])
        return
    row_bytes = d * x.itemsize
    with open(x.filename, "rb") as f:
        for rows in _chunks(n, chunk_rows):
            f.seek(x.offset + rows.start * row_bytes)
            count = (rows.stop - rows.start) * d
            yield rows, np.fromfile(f, dtype=x.dtype, count=count).reshape(-1, d)


def l2_normalize_rows(x, out=None):
    """Rows of a numpy matrix divided by their L2 norm; all-zero rows stay zero (as in the
    reference). The numpy counterpart of the TensorFlow `tfmet.layers.l2_normalize`. With `out`
    (which may be `x`) the rows are written there."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    norms[norms == 0] = 1
    return np.divide(x, norms, out=out)


def covariance(x, chunk_rows=DEFAULT_CHUNK_ROWS):
    """(mean [d], biased covariance [d, d]) of the rows of `x`, both float64, two chunked passes."""
    x = _check_matrix(x)
    n, d = x.shape
    if n == 0:
        raise ValueError("cannot estimate a covariance from 0 descriptors")
    total = np.zeros(d, np.float64)
    for _, chunk in row_chunks(x, chunk_rows):
        total += chunk.sum(axis=0, dtype=np.float64)
    mean = total / n
    cov = np.zeros((d, d), np.float64)
    for _, chunk in row_chunks(x, chunk_rows):
        centred = chunk.astype(np.float64) - mean
        cov += centred.T @ centred
    cov = (cov + cov.T) / (2 * n)
    return mean, cov


def pca_whitening(x, dim=512, shrinkage=1.0, chunk_rows=DEFAULT_CHUNK_ROWS, clip_to_rank=False):
    """Learns PCA-whitening from the rows of `x`.

    Args:
      x: [n, d] descriptors (any float dtype, may be a memmap).
      dim: number of components kept (<= d); None keeps d.
      shrinkage: exponent scale: P = V diag(lambda^(-shrinkage / 2)).
      chunk_rows: rows converted to float64 at a time.
      clip_to_rank: (shrinkage > 0) keep min(dim, rank) components, where rank is the number of
        positive eigenvalues (at most n - 1), instead of raising: n descriptors cannot be whitened
        to more than n - 1 dimensions.

    Returns:
      (mean [d], projection [d, dim'], eigenvalues [dim']), float64, eigenvalues descending;
      dim' = dim, or min(dim, rank) with `clip_to_rank`.

    Raises:
      ValueError: `dim` > d, or (shrinkage > 0, not `clip_to_rank`) fewer than `dim` positive
        eigenvalues.
    """
    x = _check_matrix(x)
    d = x.shape[1]
    dim = d if dim is None else int(dim)
    if not 1 <= dim <= d:
        raise ValueError(
            f"`dim` must be between 1 and the descriptor dimension {d}. Received: dim={dim}"
        )
    mean, cov = covariance(x, chunk_rows)
    eigenvalues, eigenvectors = np.linalg.eigh(cov)
    order = np.argsort(eigenvalues)[::-1][:dim]
    eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
    if shrinkage:
        floor = RELATIVE_EIGENVALUE_FLOOR * max(float(eigenvalues[0]), 0.0)
        rank = int(np.sum(eigenvalues > floor))
        if rank < dim and clip_to_rank and rank > 0:
            eigenvalues, eigenvectors = eigenvalues[:rank], eigenvectors[:, :rank]
        elif rank < dim:
            raise ValueError(
                f"the covariance of {x.shape[0]} descriptors has only {rank} non-zero eigenvalues; "
                f"cannot whiten to dim={dim} (lower `dim` or use shrinkage=0)"
            )
    projection = eigenvectors * eigenvalues ** (-0.5 * float(shrinkage))
    return mean, projection, eigenvalues


def _whitened_chunks(x, mean, projection, chunk_rows, out_rows=None):
    """(rows, L2((x[rows] - mean) projection)) chunk by chunk, each chunk written into
    `out_rows(rows)` (a C-contiguous float32 [rows, dim] view) or, without it, into one buffer
    reused for every chunk (consume each before the next)."""
    x = _check_matrix(x)
    if x.shape[1] != projection.shape[0]:
        raise ValueError(
            f"descriptors have dimension {x.shape[1]}, the PCA-whitening expects "
            f"{projection.shape[0]}"
        )
    mean32 = np.asarray(mean, np.float32)
    projection32 = np.asarray(projection, np.float32)
    # One centring buffer for every chunk; the chunk is centred into it with its cast to float32
    # (one pass, where astype then subtract made two arrays), and the whitened rows are written
    # where the caller wants them (the result's rows, or one reused chunk buffer).
    centred = np.empty((min(int(chunk_rows), x.shape[0]), x.shape[1]), np.float32)
    if out_rows is None:
        whitened = np.empty((centred.shape[0], projection32.shape[1]), np.float32)

        def out_rows(rows):
            return whitened[: rows.stop - rows.start]

    for rows, chunk in row_chunks(x, chunk_rows):
        block = np.subtract(chunk, mean32, out=centred[: rows.stop - rows.start], dtype=np.float32)
        out = np.matmul(block, projection32, out=out_rows(rows))
        yield rows, l2_normalize_rows(out, out=out)


def apply_pca_whitening(x, mean, projection, chunk_rows=DEFAULT_CHUNK_ROWS):
    """L2((x - mean) projection) as float32 [n, dim], computed in float32 chunk by chunk."""
    out = np.empty((np.shape(x)[0], projection.shape[1]), np.float32)
    for _ in _whitened_chunks(x, mean, projection, chunk_rows, out_rows=out.__getitem__):
        pass
    return out


def whiten_to_file(x, mean, projection, path, chunk_rows=DEFAULT_CHUNK_ROWS):
    """`apply_pca_whitening` written chunk by chunk to the .npy file `path`; returns it
    memory-mapped read-only (its values equal `apply_pca_whitening`'s bit for bit).

    The whitened database never sits whole in this process's memory: the chunks are written with
    plain file writes and `row_chunks` reads the memmap back with plain file reads.
    """
    n, dim = np.shape(x)[0], projection.shape[1]
    with open(path, "wb") as f:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32))}
        header.update(fortran_order=False, shape=(n, dim))
        np.lib.format.write_array_header_1_0(f, header)
        for _, chunk in _whitened_chunks(x, mean, projection, chunk_rows):
            f.write(np.ascontiguousarray(chunk, np.float32).tobytes())
    return np.load(path, mmap_mode="r")


class PCAWhitening:
    """PCA-whitening with shrinkage, then L2 normalisation.

    Args:
      dim: components kept (default 512, the reference's); None keeps all.
      shrinkage: 1.0 whitens, 0.0 is plain PCA (reference: 1.0).
      chunk_rows: rows processed at a time when fitting and transforming.
      clip_to_rank: fit keeps min(dim, rank of the data) components instead of raising (see
        `pca_whitening`); `dim` is then the number kept.

    Attributes after `fit`: mean [d], projection [d, dim], eigenvalues [dim] (float64).
    """

    def __init__(self, dim=512, shrinkage=1.0, chunk_rows=DEFAULT_CHUNK_ROWS, clip_to_rank=False):
        if dim is not None and int(dim) < 1:
            raise ValueError(f"`dim` must be a positive integer or None. Received: dim={dim}")
        if int(chunk_rows) < 1:
            raise ValueError(f"`chunk_rows` must be positive. Received: chunk_rows={chunk_rows}")
        self.dim = None if dim is None else int(dim)
        self.shrinkage = float(shrinkage)
        self.chunk_rows = int(chunk_rows)
        self.clip_to_rank = bool(clip_to_rank)
        self.mean = None
        self.projection = None
        self.eigenvalues = None

    @property
    def fitted(self):
        return self.projection is not None

    def fit(self, x):
        """Learns mean and projection from the rows of `x`; returns self."""
        self.mean, self.projection, self.eigenvalues = pca_whitening(
            x, self.dim, self.shrinkage, self.chunk_rows, clip_to_rank=self.clip_to_rank
        )
        self.dim = self.projection.shape[1]
        return self

    def transform(self, x):
        """L2((x - mean) P), float32 [n, dim]."""
        if not self.fitted:
            raise ValueError("PCAWhitening is not fitted: call fit(x) or load(path) first")
        return apply_pca_whitening(x, self.mean, self.projection, self.chunk_rows)

    def transform_to_file(self, x, path):
        """`transform(x)` written to the .npy file `path` and returned memory-mapped read-only
        (see `whiten_to_file`)."""
        if not self.fitted:
            raise ValueError("PCAWhitening is not fitted: call fit(x) or load(path) first")
        return whiten_to_file(x, self.mean, self.projection, path, self.chunk_rows)

    def save(self, path):
        """Writes mean, projection, eigenvalues and shrinkage to an .npz file, atomically."""
        if not self.fitted:
            raise ValueError("PCAWhitening is not fitted: nothing to save")
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(
                    f,
                    format=np.array(FORMAT),
                    mean=self.mean,
                    projection=self.projection,
                    eigenvalues=self.eigenvalues,
                    shrinkage=np.array(self.shrinkage),
                )

    @classmethod
    def load(cls, path):
        """Reads a file written by `save`; ValueError/FileNotFoundError name the file."""
        path = str(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: PCA-whitening file not found") from None
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a readable .npz file ({e})") from None
        missing = {"format", "mean", "projection", "eigenvalues", "shrinkage"} - set(arrays)
        if missing or str(arrays["format"]) != FORMAT:
            raise ValueError(f"{path}: not a tfmet PCA-whitening file (missing {sorted(missing)})")
        mean, projection = arrays["mean"], arrays["projection"]
        if mean.ndim != 1 or projection.ndim != 2 or projection.shape[0] != mean.shape[0]:
            raise ValueError(
                f"{path}: inconsistent shapes mean {mean.shape}, projection {projection.shape}"
            )
        whitening = cls(dim=projection.shape[1], shrinkage=float(arrays["shrinkage"]))
        whitening.mean = mean.astype(np.float64)
        whitening.projection = projection.astype(np.float64)
        whitening.eigenvalues = arrays["eigenvalues"].astype(np.float64)
        return whitening
