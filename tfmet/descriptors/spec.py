"""What determines a split's descriptors, and the extractor built from it.

`ExtractionSpec` is recorded in every chunk folder and store (`tfmet.descriptors.chunk_files`,
`tfmet.data.descriptor_store`), so that descriptors computed with other settings are never mixed;
`build_extractor` makes the `DescriptorExtractor` and its spec from a backbone name and weights
(or a saved `Embedder`), `weights="imagenet"` naming the packaged weights.
"""

import dataclasses
import os

import keras
from absl import logging as absl_logging

from tfmet import backbones
from tfmet.backbones.batchnorm import fold_batchnorm
from tfmet.backbones.precision import set_precision
from tfmet.descriptors.embedder import MET_SCALES, DescriptorExtractor, Embedder
from tfmet.descriptors.local import LocalSpec
from tfmet.io.hashing import file_sha256
from tfmet.io.saved_models import load_keras_file
from tfmet.precision import check_precision, precision_version

DEFAULT_CHUNK_SIZE = 512
# `weights="imagenet"` (`--weights imagenet` in every program): the weights tfmet ships, those of
# the backbones named here (converted from the packaged checkpoint and cached on first use).
PACKAGED_WEIGHTS = "imagenet"
PACKAGED_BACKBONES = ("efficientnet_lite0",)


def weights_fingerprint(weights=None, seed=None):
    """What identifies a model's weights in a manifest: "sha256:<hex>" of the file, or
    "random:seed=<seed>" for a seeded random initialisation."""
    if weights is None:
        return f"random:seed={seed}"
    if os.path.isdir(weights):  # a checkpoint directory: its weights file identifies it
        from tfmet.backbones.huggingface import weights_file

        weights = weights_file(weights)
    return "sha256:" + file_sha256(weights)


@dataclasses.dataclass(frozen=True)
class ExtractionSpec:
    """Everything that determines the descriptors of a split, recorded in every output.

    Attributes:
      backbone: registry name of the backbone (or a saved model's name).
      weights: `weights_fingerprint` of the weights.
      scales: the extraction scales.
      resize_method: multi-scale resize method ("torch" or "tf").
      max_side: cap on the image's long side before extraction, or None for native size.
      dim: descriptor dimension.
      chunk_size: rows per chunk file.
      local: None, or the local features kept per image (`tfmet.descriptors.local.LocalSpec`:
        how many, their dimension and projection seed); stores without the field have none.
      precision: what the backbone computed in ("float32", "bfloat16", "float16";
        `tfmet.backbones.precision`). Stores written before this field read as "float32".
        Where what a precision computes changed (`precision_version` > 1: bfloat16), the
        manifest also records "precision_version"; stores without it read as version 1.
    """

    backbone: str
    weights: str
    scales: tuple[float, ...]
    resize_method: str
    max_side: int | None
    dim: int
    chunk_size: int = DEFAULT_CHUNK_SIZE
    precision: str = "float32"
    local: LocalSpec | None = None

    def __post_init__(self):
        if int(self.chunk_size) <= 0:
            raise ValueError(f"`chunk_size` must be positive. Received: {self.chunk_size}")
        if self.max_side is not None and int(self.max_side) <= 0:
            raise ValueError(f"`max_side` must be positive or None. Received: {self.max_side}")
        if not self.scales or any(not 0 < float(s) <= 4 for s in self.scales):
            raise ValueError(f"`scales` must be in (0, 4]. Received: {self.scales}")
        check_precision(self.precision)
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))

    def metadata(self):
        """The manifest fields of this spec."""
        metadata = {
            "backbone": self.backbone,
            "weights_sha256": self.weights,
            "scales": list(self.scales),
            "resize_method": self.resize_method,
            "max_side": self.max_side,
            "chunk_size": self.chunk_size,
            "precision": self.precision,
        }
        if self.local is not None:  # manifests without local features stay as they were
            metadata["local_features"] = self.local.metadata()
        version = precision_version(self.precision)
        if version != 1:  # float32 and float16 manifests stay as they were
            metadata["precision_version"] = version
        return metadata


def recorded_precision(metadata):
    """The precision a manifest or run record says its descriptors were computed in (stores
    written before precision was recorded are float32)."""
    return metadata.get("precision", "float32")


def recorded_precision_version(metadata):
    """The `precision_version` a manifest or run record gives (stores without it: 1)."""
    return int(metadata.get("precision_version", 1))


def check_same_precision(where, metadata, precision):
    """Raises ValueError (one line naming `where` and both precisions) unless `metadata` (a
    manifest or a run record's spec) records `precision`, in the version this tfmet computes."""
    recorded = recorded_precision(metadata)
    if recorded != precision:
        raise ValueError(
            f"{where} holds descriptors computed in {recorded}; refusing to add {precision} ones "
            f"(use --precision={recorded} or another --output_dir)"
        )
    version, current = recorded_precision_version(metadata), precision_version(precision)
    if version != current:
        raise ValueError(
            f"{where} holds {recorded} descriptors of precision_version {version} (an older "
            f"tfmet's {recorded}, computed differently); refusing to add version {current} ones "
            "(use another --output_dir)"
        )


def folded_embedder(embedder):
    """A copy of `embedder` over `fold_batchnorm(embedder.backbone)` (itself if nothing folds).

    The GeM power and the projector's weights are copied; `embedder` is not changed.
    """

    if not embedder.built:
        embedder.build((None, None, None, 3))
    backbone, folded = fold_batchnorm(embedder.backbone)
    if not folded:
        return embedder
    copy = Embedder(
        backbone,
        p=embedder.p,
        eps=embedder.eps,
        train_p=embedder.train_p,
        projector_dim=embedder.projector_dim,
        preprocessing=embedder.preprocessing,
        name=embedder.name,
    )
    copy.build((None, None, None, 3))
    copy.pool.set_weights(embedder.pool.get_weights())  # a trained GeM p
    if embedder.projector is not None:
        copy.projector.set_weights(embedder.projector.get_weights())
    absl_logging.info("folded %d BatchNorms into their convolutions for inference", folded)
    return copy


def packaged_weights(backbone):
    """The local file of the packaged `PACKAGED_WEIGHTS` ("imagenet") weights of `backbone`.

    Raises:
      ValueError: `backbone` ships without weights (only `PACKAGED_BACKBONES` have them).
    """
    if backbone not in PACKAGED_BACKBONES:
        raise ValueError(
            f"no packaged ImageNet weights for backbone {backbone!r}: convert a PyTorch "
            "checkpoint with tfmet-convert-weights and pass --weights FILE.weights.h5 (only "
            f"{', '.join(PACKAGED_BACKBONES)} ships with weights: --weights {PACKAGED_WEIGHTS})"
        )
    from tfmet.backbones import efficientnet_lite

    return efficientnet_lite.pretrained_weights()


def build_extractor(
    backbone=None,
    weights=None,
    model=None,
    seed=0,
    scales=None,
    resize_method="torch",
    max_side=None,
    chunk_size=DEFAULT_CHUNK_SIZE,
    fold_bn=False,
    precision="float32",
    local=None,
):
    """A `DescriptorExtractor` and the `ExtractionSpec` describing it.

    Args:
      backbone: registry name (`tfmet.backbones.names()`), used with `weights`.
      weights: local weights file for the backbone (a plain backbone file, or a converted
        "embedder" file that also holds GeM p and a projector: `tfmet.descriptors.conversion`),
        "imagenet" for the packaged weights (`packaged_weights`; recorded as their file's
        hash), or None for a random initialisation seeded with `seed` (recorded as
        "random:seed=<seed>").
      model: alternatively, a saved `Embedder` (.keras file), e.g. after contrastive training.
      seed: seed of a random initialisation.
      scales: extraction scales; None for the Met multi-scale `MET_SCALES`.
      resize_method, max_side, chunk_size: see `ExtractionSpec`.
      fold_bn: extract with a copy of the backbone whose BatchNorms are folded into the convs
        (`fold_batchnorm`): the same descriptors up to float rounding (~1e-7), a few % faster
        on CPU. The extractor's `embedder` is then that copy.
      precision: "float32" (default), "bfloat16" or "float16": the backbone's computation dtype
        (`tfmet.backbones.precision.set_precision`); GeM, L2 and the projector stay float32.
        Set on the embedder loaded or built here (a saved model's own policy is replaced).
      local: None, or a `LocalSpec`: the extractor also gives each image's local features
        (`DescriptorExtractor.extract_local`), recorded in the spec.

    Raises:
      FileNotFoundError: `weights` or `model` does not exist.
      ValueError: neither or both of `backbone` and `model`, an unknown backbone or precision,
        "imagenet" for a backbone without packaged weights.
    """

    check_precision(precision)
    if (backbone is None) == (model is None):
        raise ValueError("Give exactly one of `backbone` (with `weights`) and `model`.")
    if weights == PACKAGED_WEIGHTS and model is None:
        weights = packaged_weights(backbone)
    for path in (weights, model):
        if path is not None and not os.path.exists(path):  # a file, or a checkpoint directory
            raise FileNotFoundError(f"{path}: weights file not found")
    if model is not None:
        embedder = load_keras_file(model, "tfmet Embedder")
        if not isinstance(embedder, Embedder):
            raise ValueError(f"{model}: not a saved tfmet Embedder ({type(embedder).__name__})")
        name, fingerprint = embedder.backbone.name, weights_fingerprint(model)
    else:
        embedder = _registry_embedder(backbone, weights, seed)
        own_weights = backbones.spec(backbone).weights_file  # e.g. hf:<dir> loads its own
        if weights is None and own_weights is not None:
            weights = own_weights()
        name, fingerprint = backbone, weights_fingerprint(weights, seed)
    scales = MET_SCALES if scales is None else tuple(scales)
    if fold_bn:
        embedder = folded_embedder(embedder)
    set_precision(embedder.backbone, precision)
    extractor = DescriptorExtractor(
        embedder, scales=scales, resize_method=resize_method, local=local
    )
    spec = ExtractionSpec(
        backbone=name,
        weights=fingerprint,
        scales=scales,
        resize_method=resize_method,
        max_side=None if max_side is None else int(max_side),
        dim=embedder.output_dim,
        chunk_size=int(chunk_size),
        precision=precision,
        local=local,
    )
    return extractor, spec


def _is_converted_file(weights):
    return os.path.isfile(weights) and os.fspath(weights).endswith(".weights.h5")


def _registry_embedder(backbone, weights, seed):
    """The `Embedder` of registered `backbone` with `weights` (backbone or embedder file)."""
    from tfmet.backbones.torch_convert import read_metadata
    from tfmet.descriptors.conversion import load_embedder

    if weights is None:
        keras.utils.set_random_seed(seed)
    elif _is_converted_file(weights) and read_metadata(weights).get("kind") == "embedder":
        return load_embedder(weights, arch=backbone)
    return Embedder.from_registry(backbone, weights=weights)
