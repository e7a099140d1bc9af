"""PCA-whitening against an independent SVD computation (sign-invariant: Gram matrices)."""

import numpy as np
import pytest

from tfmet.retrieval import PCAWhitening, pca_whitening


def _data(seed=0, n=400, d=12, offset=0.0):
    rng = np.random.default_rng(seed)
    scales = np.linspace(3.0, 0.3, d)
    mixing = np.linalg.qr(rng.normal(size=(d, d)))[0]
    return (rng.normal(size=(n, d)) * scales @ mixing + offset).astype(np.float32)


def _reference(x, dim, shrinkage):
    """Independent: SVD of the centred float64 data; lambda = s^2 / n."""
    x = np.asarray(x, np.float64)
    centred = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    eigenvalues = s[:dim] ** 2 / x.shape[0]
    projected = centred @ vt[:dim].T * eigenvalues ** (-shrinkage / 2)
    return projected, eigenvalues


def _unit_rows(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("dim,shrinkage", [(12, 1.0), (5, 1.0), (5, 0.0), (8, 0.5)])
def test_matches_svd_up_to_signs(dim, shrinkage):
    x = _data()
    whitening = PCAWhitening(dim, shrinkage).fit(x)
    expected, eigenvalues = _reference(x, dim, shrinkage)
    np.testing.assert_allclose(whitening.eigenvalues, eigenvalues, rtol=1e-9)
    ours = whitening.transform(x)
    assert ours.dtype == np.float32 and ours.shape == (400, dim)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)
    reference = _unit_rows(expected)
    np.testing.assert_allclose(ours @ ours.T, reference @ reference.T, atol=2e-5)


def test_whitened_covariance_is_identity_before_normalisation():
    x = _data(1)
    mean, projection, _ = pca_whitening(x, dim=6)
    y = (x.astype(np.float64) - mean) @ projection
    np.testing.assert_allclose(y.T @ y / x.shape[0], np.eye(6), atol=1e-9)


def test_chunked_float64_accumulation_is_accurate_with_a_large_offset():
    # float32 data far from the origin: a float32 covariance loses the spread entirely.
    x = _data(2, n=3000, d=6, offset=1000.0)
    _, eigenvalues = _reference(x, 6, 1.0)
    small_chunks = PCAWhitening(6, chunk_rows=7).fit(x)
    one_chunk = PCAWhitening(6, chunk_rows=10**6).fit(x)
    np.testing.assert_allclose(small_chunks.eigenvalues, eigenvalues, rtol=1e-8)
    np.testing.assert_allclose(one_chunk.eigenvalues, small_chunks.eigenvalues, rtol=1e-10)


def test_memmap_input_save_and_load(tmp_path):
    x = _data(3)
    np.save(tmp_path / "x.npy", x)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    whitening = PCAWhitening(4, chunk_rows=64).fit(mapped)
    in_memory = PCAWhitening(4).fit(x)
    np.testing.assert_allclose(whitening.projection, in_memory.projection, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(whitening.transform(mapped), in_memory.transform(x), atol=1e-6)
    whitening.save(tmp_path / "pcaw.npz")
    loaded = PCAWhitening.load(tmp_path / "pcaw.npz")
    assert loaded.dim == 4 and loaded.shrinkage == 1.0
    np.testing.assert_array_equal(loaded.transform(x), whitening.transform(x))


def test_bad_input(tmp_path):
    x = _data()
    with pytest.raises(ValueError, match="dim"):
        PCAWhitening(13).fit(x)
    with pytest.raises(ValueError, match="not fitted"):
        PCAWhitening(4).transform(x)
    # 5 points span at most 4 dimensions: whitening to 6 would divide by zero.
    with pytest.raises(ValueError, match="non-zero eigenvalues"):
        PCAWhitening(6).fit(x[:5])
    with pytest.raises(ValueError, match="expects 12"):
        PCAWhitening(4).fit(x).transform(x[:, :5])
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="bad.npz"):
        PCAWhitening.load(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        PCAWhitening.load(tmp_path / "missing.npz")


def test_whitening_to_a_file_equals_whitening_in_memory(tmp_path):
    x = _data(4, n=300)
    whitening = PCAWhitening(5, chunk_rows=64).fit(x)
    mapped = whitening.transform_to_file(x, tmp_path / "whitened.npy")  # 5 chunks written
    assert isinstance(mapped, np.memmap) and mapped.dtype == np.float32
    # Bit for bit what transform returns, and (independently) L2((x - mean) P) rounded to float32.
    np.testing.assert_array_equal(mapped, whitening.transform(x))
    expected = (x.astype(np.float64) - whitening.mean) @ whitening.projection
    np.testing.assert_allclose(mapped, _unit_rows(expected), atol=2e-6)


def test_clip_to_rank_keeps_the_non_zero_eigenvalues():
    # 5 points span 4 dimensions: asked for 6, clip_to_rank whitens to those 4 (as dim=4 does).
    x = _data()[:5]
    clipped = PCAWhitening(6, clip_to_rank=True).fit(x)
    four = PCAWhitening(4).fit(x)
    assert clipped.dim == 4 and clipped.projection.shape == (12, 4)
    np.testing.assert_array_equal(clipped.eigenvalues, four.eigenvalues)
    np.testing.assert_allclose(np.abs(clipped.transform(x)), np.abs(four.transform(x)), atol=1e-6)
