"""Spatial verification: do a query's local features and a candidate's agree on one geometry?

The second look at the top global candidates (DELG's re-ranking, the patch-matching gates of
the recent Met results): local features of the query are matched to those of a candidate by
mutual nearest neighbours, and a robust fit of one affine map through the matches counts the
inliers. A photo of the exhibit shares many matches that one map explains; a distractor that
only looks alike globally does not.

    LocalFeatures                   points [n, 2] (x, y as fractions of the image's long side),
                                    L2-normalised descriptors [n, d], keypoint scores [n]
    mutual_matches(q, c)            [k, 2] index pairs, each the other's best match
    fit_affine(src, dst)            RANSAC affine (OpenCV), with its inlier mask
    inliers(query, candidate)       the inlier count of one pair
    verified_confidence(c, i, ...)  the documented rule that folds inliers into a confidence

The geometric fit is OpenCV's RANSAC (`cv2.estimateAffine2D`, refined on its inliers):
measured on this project's 2-core machine it fits a pair's ~60 matches in 0.16 ms, where
scikit-image's `measure.ransac` (already a dependency, but a Python loop over trials) takes
~170 ms; a query verifies up to 100 candidates. OpenCV's RANSAC draws its samples from a fixed
seed, so a verification is deterministic; pydegensac ships no wheels for Python 3.11, and
OpenCV's MAGSAC++ (`USAC_MAGSAC`) reads the threshold as a noise scale and lost the map at the
thresholds used here. An affine map (6 parameters, 3 matches a sample) covers the views the
Met's photos differ by (zoom, crop, in-plane rotation, moderate tilt); a fit that mirrors the
image or scales it by more than `MAX_SCALE` either way is rejected as implausible.
"""

import dataclasses

import numpy as np

MIN_MATCHES = 4  # an affine needs 3; a fourth is the first that can disagree
MAX_SCALE = 8.0
DEFAULT_THRESHOLD = 0.04  # residual, as a fraction of the candidate image's long side
DEFAULT_MAX_TRIALS = 2000  # OpenCV stops early once 99.9% sure


@dataclasses.dataclass(frozen=True)
class LocalFeatures:
    """The local features of one image.

    Attributes:
      points: [n, 2] float32 (x, y) positions, as fractions of the image's long side (so that
        one threshold serves images of any size).
      descriptors: [n, d] L2-normalised rows (float16 or float32).
      scores: [n] keypoint scores (higher is more salient), used to keep the best `n`.
    """

    points: np.ndarray
    descriptors: np.ndarray
    scores: np.ndarray

    def __post_init__(self):
        n = len(self.points)
        if np.shape(self.points) != (n, 2):
            raise ValueError(f"points must be [n, 2]. Received: shape {np.shape(self.points)}")
        if np.ndim(self.descriptors) != 2 or len(self.descriptors) != n:
            raise ValueError(
                f"descriptors must be [{n}, d]. Received: shape {np.shape(self.descriptors)}"
            )
        if np.shape(self.scores) != (n,):
            raise ValueError(f"scores must be [{n}]. Received: shape {np.shape(self.scores)}")

    def __len__(self):
        return len(self.points)


def mutual_matches(query, candidate, min_similarity=0.0):
    """Index pairs (i, j): descriptor i of `query` and j of `candidate` are each other's most
    similar (cosine), with similarity >= `min_similarity`; [k, 2] int64, in query order."""
    query, candidate = np.asarray(query, np.float32), np.asarray(candidate, np.float32)
    if len(query) == 0 or len(candidate) == 0:
        return np.zeros((0, 2), np.int64)
    similarities = query @ candidate.T
    best_candidate = similarities.argmax(axis=1)
    best_query = similarities.argmax(axis=0)
    rows = np.arange(len(query))
    mutual = best_query[best_candidate] == rows
    mutual &= similarities[rows, best_candidate] >= min_similarity
    return np.stack([rows[mutual], best_candidate[mutual]], axis=1).astype(np.int64)


def plausible(params):
    """Whether affine `params` [2 or 3, 3] keep the orientation and scale by at most
    `MAX_SCALE` either way (singular values of the linear part)."""
    linear = np.asarray(params, np.float64)[:2, :2]
    if np.linalg.det(linear) <= 0:
        return False
    singular = np.linalg.svd(linear, compute_uv=False)
    return bool(singular[0] <= MAX_SCALE and singular[1] >= 1.0 / MAX_SCALE)


def fit_affine(src, dst, threshold=DEFAULT_THRESHOLD, max_trials=DEFAULT_MAX_TRIALS):
    """RANSAC fit of one affine map taking `src` [k, 2] onto `dst` [k, 2].

    Returns:
      (params [3, 3] or None, inlier mask [k] bool): the map of the largest consensus set
      (residual < `threshold`), refined on it; (None, all False) with fewer than `MIN_MATCHES`
      points, fewer than `MIN_MATCHES` inliers, or an implausible map (`plausible`).
    """
    import cv2

    src, dst = np.asarray(src, np.float32), np.asarray(dst, np.float32)
    none = np.zeros(len(src), bool)
    if len(src) < MIN_MATCHES:
        return None, none
    params, mask = cv2.estimateAffine2D(
        src,
        dst,
        method=cv2.RANSAC,
        ransacReprojThreshold=float(threshold),
        maxIters=int(max_trials),
        confidence=0.999,
    )
    if params is None or mask is None or not plausible(params):
        return None, none
    mask = mask.ravel().astype(bool)
    if mask.sum() < MIN_MATCHES:
        return None, none
    return np.vstack([params, [0.0, 0.0, 1.0]]), mask


def inliers(query, candidate, threshold=DEFAULT_THRESHOLD, min_similarity=0.0):
    """The number of mutual matches between `query` and `candidate` (`LocalFeatures`) that one
    plausible affine map explains (0 when fewer than `MIN_MATCHES` agree)."""
    pairs = mutual_matches(query.descriptors, candidate.descriptors, min_similarity)
    if len(pairs) < MIN_MATCHES:
        return 0
    _, mask = fit_affine(
        query.points[pairs[:, 0]], candidate.points[pairs[:, 1]], threshold=threshold
    )
    return int(mask.sum())


def verified_confidence(confidence, inlier_counts, weight, saturation):
    """The kNN confidence with the spatial evidence folded in.

        verified = confidence * (1 - weight + weight * min(1, inliers / saturation))

    `inlier_counts` is that of the best-verified candidate of the predicted exhibit. weight = 0
    is the global decision unchanged; weight = 1 scales a prediction without geometric support
    to 0 and leaves one with `saturation` inliers or more as it was. The predicted exhibit never
    changes, so accuracy is the global decision's; what moves is the ranking of the answers,
    which GAP measures: distractors that look alike globally but share no geometry sink. Both
    parameters are tuned on val like k and tau (`tfmet.retrieval.tuning`).
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1]. Received: weight={weight}")
    if saturation <= 0:
        raise ValueError(f"saturation must be > 0. Received: saturation={saturation}")
    support = np.minimum(1.0, np.asarray(inlier_counts, np.float64) / float(saturation))
    return np.asarray(confidence, np.float64) * (1.0 - weight + weight * support)
