"""Style classifier SavedModel: image bytes -> probabilities and top-k labels per attribute."""

import tensorflow as tf

from tfmet.data.limits import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from tfmet.data.style_images import resize_image
from tfmet.export.common import map_image_bytes


class StyleModule(tf.Module):
    """Serves a trained `StyleClassifier` (`tfmet.training.style`).

    Signatures: `serving_default` takes `image_bytes` (string [N]) and returns, per attribute A,
    `A_probabilities` (float32 [N, classes]), `A_top_k_labels` (string [N, k]) and
    `A_top_k_scores` (float32 [N, k]), plus `valid` (bool [N]; undecodable images give zero
    probabilities, empty labels). `images` takes float32 `images` [N, S, S, 3] in [0, 255] (already
    resized) and returns the logits per attribute, A -> [N, classes].

    Args:
      classifier: a `StyleClassifier`.
      image_size: the side S images are resized to (as in training).
      top_k: labels returned per attribute (at most the number of classes).
      max_pixels, max_bytes: images declaring more pixels (before decoding) or of more bytes
        are invalid rows (None: no limit); see `tfmet.data.limits`.
    """

    def __init__(
        self,
        classifier,
        image_size,
        top_k=5,
        name=None,
        max_pixels=DEFAULT_MAX_PIXELS,
        max_bytes=DEFAULT_MAX_BYTES,
    ):
        super().__init__(name=name)
        self.max_pixels = None if max_pixels is None else int(max_pixels)
        self.max_bytes = None if max_bytes is None else int(max_bytes)
        self.classifier = classifier
        if not classifier.built:
            classifier.build((None, int(image_size), int(image_size), 3))
        self.image_size = int(image_size)
        self.class_names = {a: list(v) for a, v in classifier.class_names.items()}
        self.attributes = list(classifier.attributes)
        self.top_k = {a: min(int(top_k), len(v)) for a, v in self.class_names.items()}
        self.names = {a: tf.constant(v) for a, v in self.class_names.items()}
        size = self.image_size
        self.logits_images = tf.function(
            self._logits,
            input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="images")],
        )
        self.classify_bytes = tf.function(
            self._classify_bytes,
            input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")],
        )

    def _logits(self, images):
        logits = self.classifier(images, training=False)
        return {a: tf.cast(logits[a], tf.float32) for a in self.attributes}

    def _classify_bytes(self, image_bytes):
        widths = [len(self.class_names[a]) for a in self.attributes]

        def probabilities(image):
            resized = resize_image(image, self.image_size)
            logits = self._logits(resized)
            return tf.concat([tf.nn.softmax(logits[a])[0] for a in self.attributes], axis=0)

        stacked, valid = map_image_bytes(
            image_bytes,
            probabilities,
            [sum(widths)],
            max_pixels=self.max_pixels,
            max_bytes=self.max_bytes,
        )
        outputs = {"valid": valid}
        for attribute, probs in zip(
            self.attributes, tf.split(stacked, widths, axis=1), strict=True
        ):
            scores, indices = tf.math.top_k(probs, k=self.top_k[attribute], sorted=True)
            labels = tf.gather(self.names[attribute], indices)
            outputs[f"{attribute}_probabilities"] = probs
            outputs[f"{attribute}_top_k_labels"] = tf.where(valid[:, None], labels, "")
            outputs[f"{attribute}_top_k_scores"] = scores
        return outputs

    def signatures(self):
        return {"serving_default": self.classify_bytes, "images": self.logits_images}
