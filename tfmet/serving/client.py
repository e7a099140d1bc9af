"""A recogniser export (tfmet-export --kind recognizer) loaded for answering photos.

An export built with `--rerank=spatial` (its metadata's "rerank" entry) is answered through its
`local_features` signature: the database images of the predicted exhibit among the photo's
`top` nearest rows are verified against it (`tfmet.retrieval.spatial.inliers`, on the database
local features saved in the export's assets), the best inlier count folds into the confidence
(`spatial.verified_confidence` with the tuned weight and saturation), and the re-ranking's own
threshold decides, as tfmet-knn-eval --rerank=spatial measured it.
"""

import dataclasses
import os

import numpy as np

from tfmet.io.saved_models import read_export_metadata

NOT_IN_COLLECTION = "not in the collection"
LEAST_DECIMALS = 3
MOST_DECIMALS = 12


def decimals(value, threshold):
    """Decimals that show `value` against `threshold` as they compare: 3, or more while a value
    below the threshold would print as high as it (0.1107 below 0.1108, not 0.111 and 0.111).
    The page of tfmet-serve uses the same rule (tfmet.serving.page)."""
    digits = LEAST_DECIMALS
    while (
        value < threshold
        and digits < MOST_DECIMALS
        and float(f"{value:.{digits}f}") >= float(f"{threshold:.{digits}f}")
    ):
        digits += 1
    return digits


@dataclasses.dataclass
class Answer:
    """The recogniser's answer to one photo.

    Attributes:
      met_id: the best Met id (-1 for an undecodable image).
      confidence: the kNN confidence of `met_id`.
      accepted: confidence >= the export's threshold (and the image decoded).
      valid: the image decoded.
      top: [(met_id, score)] alternatives, best first (padding dropped).
      inliers: with a re-ranking export, the best inlier count of the spatial verification
        (0 when no database image of `met_id` was among the verified candidates); else None.
    """

    met_id: int
    confidence: float
    accepted: bool
    valid: bool
    top: list
    inliers: int | None = None

    @property
    def label(self):
        """ "Met <id>" when accepted, else "not in the collection"."""
        return f"Met {self.met_id}" if self.accepted else NOT_IN_COLLECTION

    def describe(self, threshold):
        """One line of words: the answer, then `details`, e.g. "not in the collection
        (confidence 0.1107, below the threshold 0.1108; closest: Met 42)"."""
        return f"{self.label} ({self.details(threshold)})"

    def details(self, threshold):
        """The confidence against `threshold` and, for a rejected photo, its closest exhibit."""
        if not self.valid:
            return "the image could not be decoded"
        d = decimals(self.confidence, threshold)
        confidence = f"confidence {self.confidence:.{d}f}"
        if self.inliers is not None:
            confidence += f" ({self.inliers} inliers)"
        if threshold <= 0:
            return f"{confidence}; no operating threshold: every photo is answered"
        if self.accepted:
            return f"{confidence}, at or above the threshold {threshold:.{d}f}"
        return f"{confidence}, below the threshold {threshold:.{d}f}; closest: Met {self.met_id}"

    def to_json(self):
        return {
            "answer": self.label,
            "met_id": self.met_id if self.accepted else None,
            "best_met_id": self.met_id,
            "confidence": self.confidence,
            "accepted": self.accepted,
            "valid": self.valid,
            "top_k": [{"met_id": i, "score": s} for i, s in self.top],
            **({} if self.inliers is None else {"inliers": self.inliers}),
        }


def read_metadata(path):
    """The export's metadata (assets/tfmet_metadata.json)."""
    return read_export_metadata(path)


class Recognizer:
    """Loads a recogniser SavedModel; `recognize(list of bytes)` -> list of `Answer`."""

    def __init__(self, path):
        self.metadata = read_metadata(path)
        if self.metadata.get("kind") != "recognizer":
            raise ValueError(
                f"{path}: a {self.metadata.get('kind')!r} export, not a recogniser "
                "(tfmet-export --kind recognizer)"
            )
        import tensorflow as tf

        from tfmet.io.saved_models import load_saved_model, signature

        self._tf = tf
        loaded = load_saved_model(path)
        self.rerank = self.metadata.get("rerank")
        if self.rerank:
            self._fn = signature(loaded, path, "local_features")
            self.threshold = float(self.rerank["threshold"])
            self._database = _database_local(path)
        else:
            self._fn = signature(loaded, path, "serving_default")
            self.threshold = float(self.metadata.get("threshold", 0.0))

    def recognize(self, images):
        if not images:
            return []
        out = self._fn(image_bytes=self._tf.constant(list(images), self._tf.string))
        out = {name: value.numpy() for name, value in out.items()}
        valid = out["valid"]
        # Exports made before the threshold existed have no `accepted`: they accept every answer.
        accepted = out["accepted"] if "accepted" in out else valid
        if self.rerank:
            return self._verified(out, len(images))
        return [
            Answer(
                met_id=int(out["met_id"][i]),
                confidence=float(out["confidence"][i]),
                accepted=bool(accepted[i]),
                valid=bool(valid[i]),
                top=[
                    (int(m), float(s))
                    for m, s in zip(out["top_k_ids"][i], out["top_k_scores"][i], strict=True)
                    if m >= 0
                ],
            )
            for i in range(len(images))
        ]

    def _verified(self, out, n):
        from tfmet.retrieval import spatial

        rerank, (labels, points, descriptors, scores, counts) = self.rerank, self._database
        answers = []
        for i in range(n):
            met_id, valid = int(out["met_id"][i]), bool(out["valid"][i])
            best = 0
            if valid:
                c = int(out["local_counts"][i])
                # Rounded as the stores keep them (float16), so that the verification sees what
                # tfmet-knn-eval --rerank=spatial saw for the same photo.
                query = spatial.LocalFeatures(
                    _float16(out["local_points"][i, :c]),
                    _float16(out["local_descriptors"][i, :c]),
                    np.asarray(out["local_scores"][i, :c], np.float32),
                )
                for row in out["neighbor_rows"][i]:
                    if row < 0 or labels[row] != met_id:
                        continue
                    m = int(counts[row])
                    candidate = spatial.LocalFeatures(
                        np.asarray(points[row, :m], np.float32),
                        np.asarray(descriptors[row, :m], np.float32),
                        np.asarray(scores[row, :m], np.float32),
                    )
                    found = spatial.inliers(query, candidate, rerank["residual_threshold"])
                    best = max(best, found)
            confidence = float(out["confidence"][i])
            if valid:
                confidence = float(
                    spatial.verified_confidence(
                        np.array([confidence]), np.array([best]), rerank["weight"],
                        rerank["saturation"],
                    )[0]
                )  # fmt: skip
            answers.append(
                Answer(
                    met_id=met_id,
                    confidence=confidence,
                    accepted=bool(valid and np.float32(confidence) >= np.float32(self.threshold)),
                    valid=valid,
                    top=[
                        (int(m), float(s))
                        for m, s in zip(out["top_k_ids"][i], out["top_k_scores"][i], strict=True)
                        if m >= 0
                    ],
                    inliers=best if valid else None,
                )
            )
        return answers

    def warm_up(self):
        """One call on a small generated JPEG, so that the first visitor does not wait for it."""
        import io

        from PIL import Image

        buffer = io.BytesIO()
        Image.new("RGB", (64, 48), (128, 96, 64)).save(buffer, format="JPEG")
        self.recognize([buffer.getvalue()])

    def recognize_one(self, data):
        return self.recognize([data])[0]


def _float16(array):
    return np.asarray(np.asarray(array, np.float16), np.float32)


def _database_local(path):
    """(labels, points, descriptors, scores, counts) of the database rows, memory-mapped from
    the export's assets; errors name the missing file."""
    arrays = []
    for name in ("labels", "local_points", "local_descriptors", "local_scores", "local_counts"):
        file = os.path.join(os.fspath(path), "assets", f"rerank_{name}.npy")
        try:
            arrays.append(np.load(file, mmap_mode="r", allow_pickle=False))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{file}: missing from a --rerank=spatial export (export it again)"
            ) from None
    return tuple(arrays)
