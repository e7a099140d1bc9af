"""One-piece recogniser SavedModel: image bytes -> Met id, confidence and top-k candidates.

decode -> (multi-scale) descriptor -> PCA-whitening -> kNN over the database -> the reference's
confidence rule with the tuned k and tau (`tfmet.retrieval.knn.knn_confidence`).

The neighbour search is the in-graph form of a registered searcher
(`tfmet.retrieval.searchers`, `Searcher.in_graph`): "exact" (a matmul + top-k in the graph:
plain TensorFlow ops, servable by stock TF Serving; right for databases up to a few hundred
thousand rows) or "scann" (ScaNN's TensorFlow searcher, stored through its module
serialisation; the serving process must load ScaNN's op library first, e.g. `import scann`).

Built with `local` (a `LocalSpec`, `tfmet-export --rerank=spatial`), the module also has the
signature `local_features`: the same answer as `serving_default` plus the query's local features
(from the same backbone passes as its descriptor) and its `rerank_top` exact nearest database
rows, for the spatial verification the Python client runs (`tfmet.serving.client`,
`tfmet.retrieval.spatial`) against the database's local features, saved next to the model as
.npy assets (`asset_arrays`).
"""

import json

import numpy as np
import tensorflow as tf

from tfmet.export.common import map_image_bytes
from tfmet.export.descriptor import IMAGE_BYTES_SPEC, DescriptorModule
from tfmet.retrieval.knn import knn_confidence
from tfmet.retrieval.searchers import make_searcher


class RecognizerModule(DescriptorModule):
    """The recognition pipeline as a tf.Module; see `signatures()`.

    Args:
      embedder, scales, resize_method, pca, max_side, max_pixels: as
        `DescriptorModule` (an image declaring more than `max_pixels` pixels is an invalid row).
      database: database descriptors [M, D] in the output space of the descriptor (whitened, L2).
      labels: Met ids [M] of the database rows.
      k, tau: the kNN classifier's parameters.
      searcher: a searcher name of `tfmet.retrieval.searchers.SEARCHERS` ("exact", "scann").
      scann_config: the searcher's config: for "scann" the `ScannConfig` (or dict), e.g. the
        one tfmet-knn-eval chose by measured recall (its results JSON's "search" entry); None
        sizes one from the database without measuring its recall. Kept in the SavedModel as
        the JSON string variable `scann_config_json` ("null" for "exact").
      top_k: number of candidate ids returned per image.
      threshold: operating threshold; `accepted` = valid and confidence >= threshold (compared in
        float32, as the returned confidence). 0.0 accepts every valid image.
      local: None, or the `tfmet.descriptors.local.LocalSpec` of the database's local features:
        adds the `local_features` signature (see the module doc).
      rerank_top: with `local`, the exact nearest database rows returned per image (M).
      neighbor_search: None, or the searcher's in-graph form already built over `database` with
        k = min(k, M) (tfmet-collection's ScaNN tree changed in place); None builds it.
    """

    def __init__(
        self,
        embedder,
        database,
        labels,
        k,
        tau,
        searcher="exact",
        top_k=5,
        threshold=0.0,
        name=None,
        scann_config=None,
        local=None,
        rerank_top=20,
        neighbor_search=None,
        **descriptor_kwargs,
    ):
        super().__init__(embedder, name=name, local=local, **descriptor_kwargs)
        database = np.ascontiguousarray(database, np.float32)
        labels = np.asarray(labels, np.int64)
        if database.ndim != 2 or database.shape[1] != self.dim:
            raise ValueError(
                f"`database` must have shape [M, {self.dim}]. Received: shape={database.shape}"
            )
        if labels.shape != (database.shape[0],):
            raise ValueError(
                f"`labels` must have {database.shape[0]} entries. Received: shape={labels.shape}"
            )
        search = make_searcher(searcher, scann_config)  # unknown names fail before any work
        if int(k) < 1 or int(top_k) < 1:
            raise ValueError(f"`k` and `top_k` must be >= 1. Received: k={k}, top_k={top_k}")
        self.k = min(int(k), database.shape[0])
        self.tau = float(tau)
        self.top_k = int(top_k)
        self.threshold = float(np.float32(threshold))
        self.searcher = searcher
        self.num_classes = int(np.unique(labels).size)
        self.database_size = int(database.shape[0])
        self.labels = tf.Variable(labels, trainable=False, name="database_labels")
        self.neighbor_search = neighbor_search or search.in_graph(database, self.k)
        self.scann_config = self.neighbor_search.config
        config_json = json.dumps(None if self.scann_config is None else self.scann_config.to_dict())
        self.scann_config_json = tf.Variable(config_json, trainable=False, name="scann_config")
        descriptor_spec = tf.TensorSpec([None, self.dim], tf.float32, name="descriptor")
        self.recognize_descriptors = tf.function(
            self._recognize_descriptors, input_signature=[descriptor_spec]
        )
        self.recognize_bytes = tf.function(
            self._recognize_bytes, input_signature=[tf.TensorSpec([None], tf.string, "image_bytes")]
        )
        if local is not None:
            self.rerank_top = min(int(rerank_top), self.database_size)
            if self.rerank_top < 1:
                raise ValueError(f"`rerank_top` must be >= 1. Received: {rerank_top}")
            self.rerank_search = make_searcher("exact").in_graph(database, self.rerank_top)
            self.recognize_local = tf.function(
                self._recognize_local, input_signature=[IMAGE_BYTES_SPEC]
            )

    def neighbors(self, descriptors):
        """(similarities [B, k], database row indices [B, k]) by descending similarity."""
        return self.neighbor_search(descriptors)

    def _recognize_descriptors(self, descriptor):
        sims, indices = self.neighbors(descriptor)
        neighbor_labels = tf.gather(self.labels, indices)
        pred, conf, top_ids, top_scores = knn_confidence(
            sims, neighbor_labels, self.num_classes, self.tau, top_k=self.top_k
        )
        pad = tf.maximum(self.top_k - tf.shape(top_ids)[1], 0)
        return {
            "met_id": pred,
            "confidence": tf.cast(conf, tf.float32),
            "top_k_ids": tf.pad(top_ids, [[0, 0], [0, pad]], constant_values=-1),
            "top_k_scores": tf.pad(top_scores, [[0, 0], [0, pad]]),
            "accepted": tf.cast(conf, tf.float32) >= tf.constant(self.threshold, tf.float32),
        }

    def _recognize_bytes(self, image_bytes):
        descriptor, valid = self._bytes_descriptors(image_bytes)
        return self._answers(descriptor, valid)

    def _answers(self, descriptor, valid):
        out = self._recognize_descriptors(descriptor)
        column = valid[:, None]
        return {
            "met_id": tf.where(valid, out["met_id"], tf.constant(-1, tf.int64)),
            "confidence": tf.where(valid, out["confidence"], 0.0),
            "top_k_ids": tf.where(column, out["top_k_ids"], tf.constant(-1, tf.int64)),
            "top_k_scores": tf.where(column, out["top_k_scores"], 0.0),
            "accepted": valid & out["accepted"],
            "valid": valid,
        }

    def _recognize_local(self, image_bytes):
        """`serving_default`'s answer, plus `neighbor_rows` [N, M] (exact, -1 for invalid rows),
        `local_points` [N, n, 2], `local_descriptors` [N, n, d], `local_scores` [N, n] (zero
        padded) and `local_counts` [N] int32 of each image."""
        num, dim = self.local.num, self.local_dim
        width = self.dim + num * (3 + dim) + 1

        def packed(images):  # one image -> one float32 row, as map_image_bytes takes
            descriptor, points, descriptors, scores = self.extractor._extract_local(images)
            count = tf.shape(scores)[1]
            pad = [[0, num - count], [0, 0]]
            return tf.concat(
                [
                    self.whiten(descriptor)[0],
                    tf.reshape(tf.pad(points[0], pad), [-1]),
                    tf.reshape(tf.pad(descriptors[0], pad), [-1]),
                    tf.pad(scores[0], [[0, num - count]]),
                    tf.cast(count, tf.float32)[None],
                ],
                axis=0,
            )

        rows, valid = map_image_bytes(
            image_bytes,
            packed,
            [width],
            max_side=self.max_side,
            max_pixels=self.max_pixels,
            max_bytes=self.max_bytes,
        )
        descriptor = rows[:, : self.dim]
        out = self._answers(descriptor, valid)
        _, neighbors = self.rerank_search(descriptor)
        start = self.dim
        points = tf.reshape(rows[:, start : start + 2 * num], [-1, num, 2])
        start += 2 * num
        descriptors = tf.reshape(rows[:, start : start + num * dim], [-1, num, dim])
        start += num * dim
        return {
            **out,
            "neighbor_rows": tf.where(valid[:, None], tf.cast(neighbors, tf.int64), -1),
            "local_points": points,
            "local_descriptors": descriptors,
            "local_scores": rows[:, start : start + num],
            "local_counts": tf.cast(rows[:, -1], tf.int32),
        }

    def saved_state(self):
        """`DescriptorModule.saved_state` and the database: its labels, the searcher (the exact
        rows or the ScaNN tree's arrays, which `tfmet.export.collection` changes) and its
        configuration."""
        return {
            **super().saved_state(),
            "labels": self.labels,
            "neighbor_search": self.neighbor_search,
            "scann_config_json": self.scann_config_json,
        }

    def signatures(self):
        signatures = {
            "serving_default": self.recognize_bytes,
            "descriptors": self.recognize_descriptors,
            "images": self.describe_images,
        }
        if self.local is not None:
            signatures["local_features"] = self.recognize_local
        return signatures
