"""The metadata file of a descriptor export, written without exporting a model."""

import json

DESCRIPTOR_METADATA = {
    "kind": "descriptor",
    "backbone": "resnet18",
    "weights_sha256": "sha256:00",
    "scales": [1.0],
    "resize_method": "torch",
    "max_side": None,
    "dim": 512,
    "pca_whitening": False,
}


def write_descriptor_metadata(model, drop=(), **fields):
    """Writes `model`/assets/tfmet_metadata.json as a float32 ResNet-18 descriptor export has it,
    with `fields` changed and the names in `drop` left out; returns what it wrote."""
    (model / "assets").mkdir(parents=True, exist_ok=True)
    metadata = {k: v for k, v in (DESCRIPTOR_METADATA | fields).items() if k not in drop}
    (model / "assets" / "tfmet_metadata.json").write_text(json.dumps(metadata))
    return metadata
