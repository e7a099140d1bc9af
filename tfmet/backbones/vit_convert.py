"""DINOv2 torch-hub `.pth` files -> the weights of a keras-hub ViT.

An official DINOv2 torch-hub file (dinov2_vits14_pretrain.pth, ..._reg4_pretrain.pth) is read
with tfmet's pickle-free torch reader, its tensor names are mapped to the Hugging Face ones, and
keras-hub's own Hugging Face converter assigns them; every tensor must be used and every weight
filled, as for the ResNets. The ViT family (`tfmet.backbones.huggingface.ViTFamily.convert`)
writes tfmet weights from these files and from checkpoint directories.
"""

import numpy as np

from tfmet.io.torch_checkpoint import load_state_dict


class _TensorLoader:
    """The loader protocol of keras-hub's converters (`port_weight`) over a name -> array dict."""

    def __init__(self, tensors, source):
        self.tensors = tensors
        self.source = source
        self.used = set()

    def port_weight(self, keras_variable, hf_weight_key, hook_fn=None):
        if hf_weight_key not in self.tensors:
            raise ValueError(f"{self.source}: missing tensor {hf_weight_key!r}")
        value = np.asarray(self.tensors[hf_weight_key], np.float32)
        if hook_fn is not None:
            value = hook_fn(value, list(keras_variable.shape))
        if tuple(np.shape(value)) != tuple(keras_variable.shape):
            raise ValueError(
                f"{self.source}: tensor {hf_weight_key!r} has shape {np.shape(value)}, "
                f"expected {tuple(keras_variable.shape)}"
            )
        keras_variable.assign(value)
        self.used.add(hf_weight_key)


_BLOCK_NAMES = {
    "norm1": "norm1",
    "attn.proj": "attention.output.dense",
    "ls1.gamma": "layer_scale1.lambda1",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.w12": "mlp.weights_in",
    "mlp.w3": "mlp.weights_out",
    "ls2.gamma": "layer_scale2.lambda1",
}
_TOP_NAMES = {
    "cls_token": "embeddings.cls_token",
    "mask_token": "embeddings.mask_token",
    "register_tokens": "embeddings.register_tokens",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}


def torch_hub_to_hf(state_dict, source="<checkpoint>"):
    """DINOv2 torch-hub tensor names -> Hugging Face `Dinov2Model` names (qkv split in three)."""
    out = {}
    for name, value in state_dict.items():
        value = np.asarray(value)
        if name in _TOP_NAMES:
            out[_TOP_NAMES[name]] = value.reshape(1, -1) if name == "mask_token" else value
            continue
        parts = name.split(".")
        if parts[0] != "blocks" or len(parts) < 4:
            raise ValueError(f"{source}: unexpected tensor {name!r} for a DINOv2 torch-hub model")
        prefix, rest = f"encoder.layer.{parts[1]}", ".".join(parts[2:])
        if rest.startswith("attn.qkv."):
            chunks = np.split(value, 3, axis=0)
            for which, chunk in zip(("query", "key", "value"), chunks, strict=True):
                out[f"{prefix}.attention.attention.{which}.{parts[-1]}"] = chunk
            continue
        stem = rest.rsplit(".", 1)[0] if not rest.endswith("gamma") else rest
        if stem not in _BLOCK_NAMES:
            raise ValueError(f"{source}: unexpected tensor {name!r} for a DINOv2 torch-hub model")
        suffix = "" if rest.endswith("gamma") else "." + parts[-1]
        out[f"{prefix}.{_BLOCK_NAMES[stem]}{suffix}"] = value
    return out


def assign_torch_hub(model, path, config):
    """Fills `model` (a random `VisionTransformer` of Hugging Face `config`) with the weights of
    DINOv2 torch-hub file `path`; every tensor must be used."""
    from keras_hub.src.utils.transformers import convert_dinov2

    tensors = torch_hub_to_hf(load_state_dict(path), source=path)
    loader = _TensorLoader(tensors, path)
    convert_dinov2.convert_weights(model.backbone, loader, config)
    unused = sorted(set(tensors) - loader.used)
    if unused:
        raise ValueError(f"{path}: {len(unused)} tensors do not map, e.g. {unused[0]!r}")
    return model
