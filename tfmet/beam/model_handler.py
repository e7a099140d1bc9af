"""RunInference over the exported descriptor SavedModel: encoded images -> descriptor or reason.

`DescriptorModelHandler` is Beam's `TFModelHandlerTensor` with two changes: the model is a
`tf.saved_model.load`ed `DescriptorModule` export (Beam's default loader goes through
`tf.keras.models.load_model`, which Keras 3 refuses for SavedModels), copied to the worker's
local disk first when it lives on gs:// or another remote file system; and its inference
function decodes a batch of encoded images and calls the `images` signature once per group of
same-size images. (The `serving_default` signature takes the bytes itself, but each call pays
a fixed ~0.3 s here for its in-graph tf.data loop, and it says only valid or not, never why.)

Each prediction is a `Described(descriptor, reason, local)`: the float32 descriptor and "" for
a good image, or None and the reason the single-machine extraction (`tfmet.descriptors.extraction`)
records for the same image: the decode error, "ValueError: image has no pixels",
"model failed: ..." or "model gave a non-finite descriptor". A handler made with `local=True`
calls the `local_features` signature instead (a `LocalDescriptorModule` export), so each good
image also carries its local features (points, descriptors, scores), as tfmet-extract keeps them.
"""

import functools
import os
import tempfile
import time
from typing import NamedTuple

import numpy as np
from absl import logging as absl_logging
from apache_beam.ml.inference.base import PredictionResult
from apache_beam.ml.inference.tensorflow_inference import TFModelHandlerTensor

from tfmet.beam.paths import copy_tree, is_remote
from tfmet.data.limits import DEFAULT_MAX_PIXELS

METADATA_ASSET = "tfmet_metadata.json"
NON_FINITE = "model gave a non-finite descriptor"


LOCAL_SIGNATURE = "local_features"


class Described(NamedTuple):
    """The outcome for one image: a descriptor (float32 [D]) and "", or None and a reason; with
    local features, `local` is (points [n, 2], descriptors [n, d], scores [n]) of a good image."""

    descriptor: np.ndarray | None
    reason: str
    local: tuple | None = None


def localize_model(model_uri):
    """A local folder holding the SavedModel at `model_uri` (copied there when remote)."""
    if not is_remote(model_uri):
        return os.fspath(model_uri)
    local = tempfile.mkdtemp(prefix="tfmet-saved-model-")
    count = copy_tree(model_uri, local)
    absl_logging.info("copied the SavedModel %s (%d files) to %s", model_uri, count, local)
    return local


def decode(image_bytes, max_side=None, max_pixels=DEFAULT_MAX_PIXELS):
    """Encoded bytes -> (float32 image [H, W, 3] or None, reason), as `tfmet.data.images` reads
    a file for the single-machine extraction (same decoder, same checks, same cap); an image
    whose header declares more than `max_pixels` pixels is refused before decoding."""
    import tensorflow as tf

    from tfmet.data import images as image_io

    try:
        image = image_io.decode_image(image_bytes, max_pixels)
    except tf.errors.OpError as e:
        return None, image_io.error_reason(e)
    if image.shape[0] == 0 or image.shape[1] == 0:
        return None, "ValueError: image has no pixels"
    if max_side is not None:
        image = image_io.cap_max_side(image, max_side)
    return image, ""


def _describe_group(describe, images):
    """[Described] of same-size images; a failing batch is retried one image at a time."""
    import tensorflow as tf

    from tfmet.data import images as image_io

    try:
        outputs = {k: v.numpy() for k, v in describe(images=tf.stack(images)).items()}
    except (tf.errors.OpError, ValueError) as e:
        if len(images) > 1:
            return [_describe_group(describe, [image])[0] for image in images]
        return [Described(None, "model failed: " + image_io.error_reason(e))]
    descriptors = outputs["descriptor"].astype(np.float32)
    local = [None] * len(images)
    if "local_descriptors" in outputs:
        names = ("points", "local_descriptors", "scores")
        local = list(zip(*(outputs[name] for name in names), strict=True))
    return [
        Described(d, "", features) if np.all(np.isfinite(d)) else Described(None, NON_FINITE)
        for d, features in zip(descriptors, local, strict=True)
    ]


def describe_batch(
    model,
    batch,
    inference_args,
    model_id=None,
    max_side=None,
    max_pixels=DEFAULT_MAX_PIXELS,
    local=False,
):
    """Beam inference function: encoded images (bytes) -> `PredictionResult`s of `Described`.

    Each image is decoded here (so a bad one costs nothing but its reason); images of the same
    size go through the SavedModel's `images` signature together (`local_features` with
    `local`). Never raises for bad images.
    """
    outcomes = [None] * len(batch)
    groups = {}  # (h, w) -> [(position, image)]
    for i, data in enumerate(batch):
        image, reason = decode(data, max_side, max_pixels)
        if image is None:
            outcomes[i] = Described(None, reason)
        else:
            groups.setdefault(tuple(image.shape[:2]), []).append((i, image))
    describe = model.signatures[LOCAL_SIGNATURE if local else "images"]
    for group in groups.values():
        described = _describe_group(describe, [image for _, image in group])
        for (i, _), outcome in zip(group, described, strict=True):
            outcomes[i] = outcome
    return [PredictionResult(None, outcome, model_id) for outcome in outcomes]


class DescriptorModelHandler(TFModelHandlerTensor):
    """`TFModelHandlerTensor` serving an exported descriptor SavedModel on encoded images.

    Args:
      model_uri: the SavedModel folder (local, gs://, ...), as written by `tfmet-export --kind
        descriptor` or `tfmet.beam.pipeline.export_descriptor_model`.
      max_side: cap on the long side of decoded images (the extraction's `max_side`).
      max_pixels: images whose header declares more pixels are failed rows, never decoded.
      batch_size: most images per inference call (RunInference batches up to this many).
      intra_op_threads: TensorFlow intra-op threads per worker process; 0 keeps TF's default
        (all cores), which oversubscribes a machine that runs one worker per core.
      log_every_s: seconds between a worker's progress lines (images, images/s).
      local: also give each image's local features (the model's `local_features` signature).
    """

    def __init__(
        self,
        model_uri,
        max_side=None,
        batch_size=8,
        intra_op_threads=0,
        log_every_s=60.0,
        max_pixels=DEFAULT_MAX_PIXELS,
        local=False,
    ):
        super().__init__(
            model_uri,
            inference_fn=functools.partial(
                describe_batch, max_side=max_side, max_pixels=max_pixels, local=local
            ),
            min_batch_size=1,
            max_batch_size=int(batch_size),
        )
        self.intra_op_threads = int(intra_op_threads)
        self.log_every_s = float(log_every_s)
        self.local = bool(local)
        self._progress = None

    def load_model(self):
        import tensorflow as tf

        if self.intra_op_threads > 0:
            try:
                tf.config.threading.set_intra_op_parallelism_threads(self.intra_op_threads)
                tf.config.threading.set_inter_op_parallelism_threads(self.intra_op_threads)
            except RuntimeError:  # TF already initialised in this process: keep its setting
                absl_logging.warning("TensorFlow already initialised; thread settings ignored")
        model = tf.saved_model.load(localize_model(self._model_uri))
        if "images" not in model.signatures:
            raise ValueError(
                f"{self._model_uri}: not a tfmet descriptor SavedModel (no 'images' signature; "
                "export one with tfmet-export --kind descriptor)"
            )
        if self.local and LOCAL_SIGNATURE not in model.signatures:
            raise ValueError(
                f"{self._model_uri}: the SavedModel gives no local features (no "
                f"'{LOCAL_SIGNATURE}' signature; export one with local features)"
            )
        return model

    def run_inference(self, batch, model, inference_args=None):
        results = super().run_inference(batch, model, inference_args)
        now = time.perf_counter()
        if self._progress is None:
            self._progress = [now, now, 0]  # started, last log, images
        self._progress[2] += len(results)
        started, last, images = self._progress
        if now - last >= self.log_every_s:
            self._progress[1] = now
            absl_logging.info(
                "worker %d: %d images described, %.2f images/s",
                os.getpid(),
                images,
                images / (now - started) if now > started else 0.0,
            )
        return results

    def get_metrics_namespace(self):
        return "tfmet_descriptors"
