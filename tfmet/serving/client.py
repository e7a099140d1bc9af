"""A recogniser export (tfmet-export --kind recognizer) loaded for answering photos."""

import dataclasses

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
    """

    met_id: int
    confidence: float
    accepted: bool
    valid: bool
    top: list

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
        self._fn = signature(load_saved_model(path), path, "serving_default")
        self.threshold = float(self.metadata.get("threshold", 0.0))

    def recognize(self, images):
        if not images:
            return []
        out = self._fn(image_bytes=self._tf.constant(list(images), self._tf.string))
        out = {name: value.numpy() for name, value in out.items()}
        valid = out["valid"]
        # Exports made before the threshold existed have no `accepted`: they accept every answer.
        accepted = out["accepted"] if "accepted" in out else valid
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

    def warm_up(self):
        """One call on a small generated JPEG, so that the first visitor does not wait for it."""
        import io

        from PIL import Image

        buffer = io.BytesIO()
        Image.new("RGB", (64, 48), (128, 96, 64)).save(buffer, format="JPEG")
        self.recognize([buffer.getvalue()])

    def recognize_one(self, data):
        return self.recognize([data])[0]
