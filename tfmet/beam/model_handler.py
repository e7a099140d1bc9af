"""RunInference over the exported descriptor SavedModel: encoded images -> descriptor or reason.

`DescriptorModelHandler` is Beam's `TFModelHandlerTensor` with two changes: the model is a
`tf.saved_model.load`ed `DescriptorModule` export (Beam's default loader goes through
`tf.keras.models.load_model`, which Keras 3 refuses for SavedModels), copied to the worker's
local disk first when it lives on gs:// or another remote file system; and its inference
function calls the `serving_default` signature on a batch of encoded images.

Each prediction is a `Described(descriptor, reason)`: the float32 descriptor and "" for a good
image, or None and the reason the single-machine extraction (`tfmet.descriptors.extraction`)
records for the same image: the decode error, "ValueError: image has no pixels",
"model failed: ..." or "model gave a non-finite descriptor". Reasons are only worked out for the
rare images the signature marks invalid, so good images are decoded once.
"""

import functools
import os
import tempfile
from typing import NamedTuple

import numpy as np
from absl import logging as absl_logging
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import PredictionResult
from apache_beam.ml.inference.tensorflow_inference import TFModelHandlerTensor

METADATA_ASSET = "tfmet_metadata.json"


class Described(NamedTuple):
    """The outcome for one image: a descriptor (float32 [D]) and "", or None and a reason."""

    descriptor: np.ndarray | None
    reason: str


def is_remote(path):
    """Whether `path` names a non-local Beam file system (gs://, s3://, hdfs://, ...)."""
    return FileSystems.get_scheme(os.fspath(path)) not in (None, "file")


def copy_tree(source, destination):
    """Copies every file below `source` (any Beam file system) into local folder `destination`.

    Returns the number of files copied.

    Raises:
      FileNotFoundError: `source` holds no files.
    """
    source = os.fspath(source).rstrip("/")
    matches = FileSystems.match([FileSystems.join(source, "**")])[0].metadata_list
    if not matches:
        raise FileNotFoundError(f"{source}: no files to copy (is it a SavedModel folder?)")
    for metadata in matches:
        relative = metadata.path[len(source) :].lstrip("/")
        target = os.path.join(destination, *relative.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with FileSystems.open(metadata.path, compression_type="uncompressed") as src:
            with open(target, "wb") as dst:
                while block := src.read(1 << 22):
                    dst.write(block)
    return len(matches)


def localize_model(model_uri):
    """A local folder holding the SavedModel at `model_uri` (copied there when remote)."""
    if not is_remote(model_uri):
        return os.fspath(model_uri)
    local = tempfile.mkdtemp(prefix="tfmet-saved-model-")
    count = copy_tree(model_uri, local)
    absl_logging.info("copied the SavedModel %s (%d files) to %s", model_uri, count, local)
    return local


def failure_reason(model, image_bytes, max_side=None):
    """Why one image has no descriptor, in the words of the single-machine extraction."""
    import tensorflow as tf

    from tfmet.data import images as image_io

    try:
        image = image_io.decode_image(image_bytes)
    except tf.errors.OpError as e:
        return image_io.error_reason(e)
    if image.shape[0] == 0 or image.shape[1] == 0:
        return "ValueError: image has no pixels"
    try:
        if max_side is not None:
            image = image_io.cap_max_side(image, max_side)
        descriptor = model.signatures["images"](images=image[None])["descriptor"].numpy()
    except (tf.errors.OpError, ValueError) as e:
        return "model failed: " + image_io.error_reason(e)
    if not np.all(np.isfinite(descriptor)):
        return "model gave a non-finite descriptor"
    return "model failed: the serving signature marked the image invalid"


def describe_batch(model, batch, inference_args, model_id=None, max_side=None):
    """Beam inference function: encoded images (bytes) -> `PredictionResult`s of `Described`.

    Never raises for bad images: a failing batch is retried one image at a time, and every
    image that gets no descriptor carries its reason.
    """
    import tensorflow as tf

    batch = list(batch)
    serve = model.signatures["serving_default"]
    try:
        outputs = serve(image_bytes=tf.constant(batch, tf.string), **inference_args)
        descriptors, valid = outputs["descriptor"].numpy(), outputs["valid"].numpy()
    except tf.errors.OpError:
        if len(batch) == 1:
            descriptors, valid = None, [False]
        else:
            return [
                result
                for data in batch
                for result in describe_batch(model, [data], inference_args, model_id, max_side)
            ]
    results = []
    for i, data in enumerate(batch):
        if valid[i] and np.all(np.isfinite(descriptors[i])):
            outcome = Described(np.asarray(descriptors[i], np.float32), "")
        elif valid[i]:
            outcome = Described(None, "model gave a non-finite descriptor")
        else:
            outcome = Described(None, failure_reason(model, data, max_side))
        results.append(PredictionResult(example=None, inference=outcome, model_id=model_id))
    return results


class DescriptorModelHandler(TFModelHandlerTensor):
    """`TFModelHandlerTensor` serving an exported descriptor SavedModel on encoded images.

    Args:
      model_uri: the SavedModel folder (local, gs://, ...), as written by `tfmet-export --kind
        descriptor` or `tfmet.beam.pipeline.export_descriptor_model`.
      max_side: the export's cap on the long side (only used to explain failures).
      batch_size: most images per signature call (RunInference batches up to this many).
      intra_op_threads: TensorFlow intra-op threads per worker process; 0 keeps TF's default
        (all cores), which oversubscribes a machine that runs one worker per core.
    """

    def __init__(self, model_uri, max_side=None, batch_size=8, intra_op_threads=0):
        super().__init__(
            model_uri,
            inference_fn=functools.partial(describe_batch, max_side=max_side),
            min_batch_size=1,
            max_batch_size=int(batch_size),
        )
        self.intra_op_threads = int(intra_op_threads)

    def load_model(self):
        import tensorflow as tf

        if self.intra_op_threads > 0:
            try:
                tf.config.threading.set_intra_op_parallelism_threads(self.intra_op_threads)
                tf.config.threading.set_inter_op_parallelism_threads(self.intra_op_threads)
            except RuntimeError:  # TF already initialised in this process: keep its setting
                absl_logging.warning("TensorFlow already initialised; thread settings ignored")
        model = tf.saved_model.load(localize_model(self._model_uri))
        missing = {"serving_default", "images"} - set(model.signatures)
        if missing:
            raise ValueError(
                f"{self._model_uri}: not a tfmet descriptor SavedModel (signatures "
                f"{sorted(missing)} missing; export one with tfmet-export --kind descriptor)"
            )
        return model

    def get_metrics_namespace(self):
        return "tfmet_descriptors"
