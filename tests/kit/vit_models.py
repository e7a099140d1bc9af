"""Tiny random-initialised Hugging Face DINOv2 / DINOv3 models saved with `save_pretrained`.

Used by the ViT tests as the reference implementation (transformers + torch, test extra only).
"""

import numpy as np

KINDS = ("dinov2", "dinov2_with_registers", "dinov3_vit")
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2)


def _config(kind, image_size):
    import transformers

    dinov2 = dict(SMALL, patch_size=7, image_size=image_size, mlp_ratio=2, layerscale_value=0.5)
    if kind == "dinov2":
        return transformers.Dinov2Config(**dinov2)
    if kind == "dinov2_with_registers":
        return transformers.Dinov2WithRegistersConfig(**dinov2, num_register_tokens=2)
    return transformers.DINOv3ViTConfig(
        **SMALL,
        patch_size=8,
        image_size=image_size,
        intermediate_size=64,
        num_register_tokens=2,
        layerscale_value=0.5,
    )


def _randomise(model, seed):
    """Every parameter random (transformers initialises tokens / layer scales to constants)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in sorted(model.named_parameters()):
            parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    return model


def make_model(kind, directory, image_size=56, seed=0):
    """Saves a tiny `kind` model into `directory`; returns the torch model in eval mode."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = _config(kind, image_size)
    classes = {
        "dinov2": transformers.Dinov2Model,
        "dinov2_with_registers": transformers.Dinov2WithRegistersModel,
        "dinov3_vit": transformers.DINOv3ViTModel,
    }
    model = _randomise(classes[kind](config), seed).eval()
    model.save_pretrained(str(directory))
    return model


def torch_tokens(model, normalised_nhwc):
    """The model's final hidden states for normalised NHWC float pixels."""
    import torch

    pixels = torch.from_numpy(np.ascontiguousarray(np.transpose(normalised_nhwc, (0, 3, 1, 2))))
    with torch.no_grad():
        return model(pixel_values=pixels).last_hidden_state.numpy()
