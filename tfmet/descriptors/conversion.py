"""Torch checkpoints -> the Met `Embedder` (backbone + GeM p [+ projector]) and back.

The backbone-only part of the conversion (name mapping, `assign`, `save_weights`,
`read_metadata`) lives with the backbones in `tfmet.backbones.torch_convert`; what needs the
`Embedder` lives here, one layer up, so that backbones never import descriptors.
"""

import os

import keras
import numpy as np

from tfmet.backbones import registry
from tfmet.backbones.torch_convert import (
    DEFAULT_IGNORE,
    POOL,
    PROJECTOR,
    assign,
    canonical_names,
    read_metadata,
    save_weights,
    weight_layers,
)
from tfmet.descriptors.embedder import Embedder
from tfmet.io.atomic import atomic_path
from tfmet.io.hashing import file_sha256
from tfmet.io.torch_checkpoint import load_state_dict


def embedder_targets(embedder, torch_path=None):
    """[(torch path, layer)] of an `Embedder`: backbone layers (named by `torch_path`, see
    `weight_layers`), "pool", and "projector"."""
    targets = weight_layers(embedder.backbone, torch_path)
    targets.append((POOL, embedder.pool))
    if embedder.projector is not None:
        targets.append((PROJECTOR, embedder.projector))
    return targets


def convert_checkpoint(checkpoint, arch, out, key=None, ignore=DEFAULT_IGNORE, keras_model=None):
    """Converts a torch checkpoint for registered backbone `arch` into a Keras `.weights.h5`.

    A checkpoint with only trunk tensors gives a kind "backbone" file; one that also holds the
    Met Embedder's GeM `p` and/or projector gives a kind "embedder" file (see `load_embedder`).

    Args:
      checkpoint: the torch file.
      arch: registered backbone name.
      out: the `.weights.h5` to write.
      key: entry holding the state dict ('/'-separated), None to find it.
      ignore: name prefixes that may stay unconverted.
      keras_model: optionally, a `.keras` file to also save the whole `Embedder` to (what
        `tfmet-extract --model` takes); a backbone checkpoint gets GeM p = 3, no projector.

    Returns:
      (ConversionReport, metadata dict written into the file).
    """
    if keras_model is not None and not os.fspath(keras_model).endswith(".keras"):
        raise ValueError(f"`keras_model` must end with '.keras'. Received: {keras_model!r}")
    report, metadata = _convert(checkpoint, arch, out, key, ignore)
    if keras_model is not None:
        embedder = load_embedder(out, arch=arch)
        with atomic_path(keras_model) as tmp:
            embedder.save(tmp)
    return report, metadata


def _convert(checkpoint, arch, out, key, ignore):
    checkpoint = os.fspath(checkpoint)
    spec = registry.spec(arch)
    state_dict = canonical_names(load_state_dict(checkpoint, key=key))
    has_pool = f"{POOL}.p" in state_dict
    projector = state_dict.get(f"{PROJECTOR}.weight")
    metadata = {"arch": arch, "source": os.path.basename(checkpoint)}
    metadata["source_sha256"] = file_sha256(checkpoint)
    if not has_pool and projector is None:
        model = spec.builder(weights=None)
        if not model.built:
            model.build((None, None, None, 3))
        targets = weight_layers(model, spec.family.torch_path)
        report = assign(targets, state_dict, source=checkpoint, ignore=ignore)
        metadata["kind"] = "backbone"
        save_weights(model, out, **metadata)
        return report, metadata
    if projector is not None and np.ndim(projector) != 2:
        raise ValueError(f"{checkpoint}: projector.weight must be 2-D, got {np.shape(projector)}")
    projector_dim = None if projector is None else int(np.shape(projector)[0])
    embedder = Embedder(
        spec.builder(weights=None), projector_dim=projector_dim, preprocessing=spec.preprocessing
    )
    embedder.build((None, None, None, 3))
    if not has_pool:
        state_dict[f"{POOL}.p"] = np.asarray([embedder.p], np.float32)
    targets = embedder_targets(embedder, spec.family.torch_path)
    report = assign(targets, state_dict, source=checkpoint, ignore=ignore)
    metadata.update(
        kind="embedder",
        projector_dim=-1 if projector_dim is None else projector_dim,
        p=float(keras.ops.convert_to_numpy(embedder.pool.power)),
    )
    save_weights(embedder, out, **metadata)
    return report, metadata


def load_embedder(path, arch=None, **kwargs):
    """An `Embedder` from a converted weights file of either kind.

    Args:
      path: a `.weights.h5` written by `convert_checkpoint` (or a plain backbone weights file,
        then `arch` is required).
      arch: the registered backbone; must match the file's when the file records one.
      **kwargs: more `Embedder` arguments (e.g. `train_p`).
    """
    path = os.fspath(path)
    metadata = read_metadata(path)
    file_arch = metadata.get("arch")
    if arch is None and file_arch is None:
        raise ValueError(f"{path}: the file does not record its backbone; pass `arch`")
    if arch is not None and file_arch is not None and arch != file_arch:
        raise ValueError(f"{path}: converted for backbone {file_arch!r}, not {arch!r}")
    arch = arch or file_arch
    if metadata.get("kind") != "embedder":
        return Embedder.from_registry(arch, weights=path, **kwargs)
    spec = registry.spec(arch)
    projector_dim = metadata.get("projector_dim", -1)
    embedder = Embedder(
        spec.builder(weights=None),
        projector_dim=None if projector_dim < 0 else int(projector_dim),
        preprocessing=spec.preprocessing,
        **kwargs,
    )
    embedder.build((None, None, None, 3))
    try:
        embedder.load_weights(path)
    except (ValueError, OSError) as e:
        raise ValueError(f"{path}: could not be loaded as a {arch} embedder: {e}") from None
    return embedder
