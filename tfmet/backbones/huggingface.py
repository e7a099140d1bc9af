"""DINOv2 / DINOv3 from local checkpoint directories: "hf:<dir>" and the published models' names.

A directory is either what Hugging Face transformers' `save_pretrained` writes (config.json with
`model_type` dinov2, dinov2_with_registers or dinov3_vit, plus model.safetensors) or a keras-hub
preset directory (config.json naming a DINOV2Backbone / DINOV3Backbone, model.weights.h5).
keras-hub reads both (`keras_hub.models.Backbone.from_preset`, its Hugging Face converters);
tfmet wraps the result in `VisionTransformer` for any-size inputs. Nothing is downloaded.

    hf:/ckpt/dinov2-base                     architecture from the directory's config.json
    dinov2_vitb14 + weights=/ckpt/dinov2-base the directory's config must be ViT-B/14 DINOv2
    dinov2_vitb14 + weights=None             random initialisation of that architecture
    dinov2_vitb14 + weights=x.weights.h5     tfmet weights (e.g. from tfmet-convert-weights)
"""

import dataclasses
import math
import os

import keras
import tensorflow as tf

from tfmet.backbones import family, registry, vit_convert
from tfmet.backbones.vit import VisionTransformer
from tfmet.backbones.weights import load_weights
from tfmet.io.json_files import read_json

PREFIX = "hf:"
CONFIG_FILE = "config.json"
MODEL_TYPES = ("dinov2", "dinov2_with_registers", "dinov3_vit")
WEIGHT_FILES = ("model.safetensors", "model.weights.h5")


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What identifies a published model in its config.json (Hugging Face names)."""

    model_type: str
    patch_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    num_register_tokens: int = 0
    gated_mlp: bool = False

    def matches(self, config):
        """The fields of `config` (a Hugging Face config dict) that differ, as 'key=value'."""
        found = {
            "model_type": config.get("model_type"),
            "patch_size": config.get("patch_size"),
            "hidden_size": config.get("hidden_size"),
            "num_hidden_layers": config.get("num_hidden_layers"),
            "num_attention_heads": config.get("num_attention_heads"),
            "num_register_tokens": config.get("num_register_tokens", 0),
        }
        return [f"{k}={v!r} (expected {getattr(self, k)!r})" for k, v in found.items()
                if v != getattr(self, k)]  # fmt: skip


def _dinov2(hidden, layers, heads, registers=False, swiglu=False):
    model_type = "dinov2_with_registers" if registers else "dinov2"
    return Architecture(model_type, 14, hidden, layers, heads, 4 * hidden, 4 * registers, swiglu)


def _dinov3(hidden, layers, heads, intermediate, gated=False):
    return Architecture("dinov3_vit", 16, hidden, layers, heads, intermediate, 4, gated)


# The DINOv2 torch-hub models (and their Hugging Face copies), the DINOv3 LVD-1689M models.
SHORTCUTS = {
    "dinov2_vits14": _dinov2(384, 12, 6),
    "dinov2_vitb14": _dinov2(768, 12, 12),
    "dinov2_vitl14": _dinov2(1024, 24, 16),
    "dinov2_vitg14": _dinov2(1536, 40, 24, swiglu=True),
    "dinov2_vits14_reg": _dinov2(384, 12, 6, registers=True),
    "dinov2_vitb14_reg": _dinov2(768, 12, 12, registers=True),
    "dinov2_vitl14_reg": _dinov2(1024, 24, 16, registers=True),
    "dinov2_vitg14_reg": _dinov2(1536, 40, 24, registers=True, swiglu=True),
    "dinov3_vits16": _dinov3(384, 12, 6, 1536),
    "dinov3_vits16plus": _dinov3(384, 12, 6, 1536, gated=True),
    "dinov3_vitb16": _dinov3(768, 12, 12, 3072),
    "dinov3_vitl16": _dinov3(1024, 24, 16, 4096),
    "dinov3_vith16plus": _dinov3(1280, 32, 20, 5120, gated=True),
    "dinov3_vit7b16": _dinov3(4096, 40, 32, 8192, gated=True),
}


def read_config(directory):
    """The directory's config.json; ValueError naming the file if it is missing or not a ViT."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: checkpoint directory not found")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found (expected a save_pretrained directory)")
    config = read_json(path)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a JSON object")
    if "registered_name" in config:  # a keras-hub preset
        if config.get("class_name") not in ("DINOV2Backbone", "DINOV3Backbone"):
            raise ValueError(
                f"{path}: keras-hub preset of {config.get('class_name')!r}; "
                "expected DINOV2Backbone or DINOV3Backbone"
            )
        return config
    if config.get("model_type") not in MODEL_TYPES:
        raise ValueError(
            f"{path}: model_type {config.get('model_type')!r} is not supported; "
            f"expected one of {', '.join(MODEL_TYPES)}"
        )
    return config


def weights_file(directory):
    """The weights file of a checkpoint directory (what identifies its weights)."""
    for name in WEIGHT_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{directory}: no {' or '.join(WEIGHT_FILES)} in the directory")


def _interpolation(config, backbone):
    if config.get("model_type") == "dinov2_with_registers":
        return "bicubic_antialias"
    if "registered_name" in config and getattr(backbone, "antialias_in_interpolation", False):
        return "bicubic_antialias"
    return "bicubic"


def load_directory(directory, name=None):
    """A `VisionTransformer` with the architecture and weights of checkpoint `directory`."""
    import keras_hub
    from safetensors import SafetensorError

    config = read_config(directory)
    weights_file(directory)
    try:
        backbone = keras_hub.models.Backbone.from_preset(directory)
    except (KeyError, ValueError, OSError, SafetensorError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{directory}: cannot load the checkpoint: {message}") from None
    return VisionTransformer(backbone, _interpolation(config, backbone), name=name)


def _hf_style_config(arch):
    """A Hugging Face style config of `arch` (the published models' defaults) for keras-hub."""
    if arch.model_type == "dinov3_vit":
        return {
            "model_type": arch.model_type,
            "image_size": 224,
            "patch_size": arch.patch_size,
            "num_hidden_layers": arch.num_hidden_layers,
            "hidden_size": arch.hidden_size,
            "num_attention_heads": arch.num_attention_heads,
            "intermediate_size": arch.intermediate_size,
            "layerscale_value": 1.0,
            "num_register_tokens": arch.num_register_tokens,
            "hidden_act": "silu" if arch.gated_mlp else "gelu",
            "use_gated_mlp": arch.gated_mlp,
            "query_bias": True,
            "key_bias": False,
            "value_bias": True,
            "proj_bias": True,
            "mlp_bias": True,
            "attention_dropout": 0.0,
            "drop_path_rate": 0.0,
            "layer_norm_eps": 1e-5,
            "rope_theta": 100.0,
        }
    return {
        "model_type": arch.model_type,
        "image_size": 518,
        "patch_size": arch.patch_size,
        "num_hidden_layers": arch.num_hidden_layers,
        "hidden_size": arch.hidden_size,
        "num_attention_heads": arch.num_attention_heads,
        "mlp_ratio": 4,
        "layerscale_value": 1.0,
        "num_register_tokens": arch.num_register_tokens,
        "use_swiglu_ffn": arch.gated_mlp,
        "hidden_dropout_prob": 0.0,
        "drop_path_rate": 0.0,
    }


def random_backbone(config, name=None):
    """A randomly initialised `VisionTransformer` for a Hugging Face style `config` dict."""
    from keras_hub.src.utils.transformers import convert_dinov2, convert_dinov3

    converter = convert_dinov3 if config["model_type"] == "dinov3_vit" else convert_dinov2
    backbone = converter.backbone_cls(**converter.convert_backbone_config(config))
    return VisionTransformer(backbone, _interpolation(config, backbone), name=name)


def build_shortcut(shortcut, weights=None):
    """Published model `shortcut`: random (None), a checkpoint directory or a tfmet weights file."""
    arch = SHORTCUTS[shortcut]
    if weights is not None and os.path.isdir(weights):
        config = read_config(weights)
        if "registered_name" not in config:
            wrong = arch.matches(config)
            if wrong:
                raise ValueError(
                    f"{os.path.join(weights, CONFIG_FILE)}: not a {shortcut} checkpoint: "
                    + ", ".join(wrong)
                )
        return load_directory(weights, name=shortcut)
    model = random_backbone(_hf_style_config(arch), name=shortcut)
    if weights is not None:
        load_weights(model, weights)
    return model


def build_directory(directory, weights=None):
    """`hf:<dir>`: the directory's model, or its architecture with a tfmet weights file."""
    if weights is None:
        return load_directory(directory, name="vit")
    config = read_config(directory)
    if "registered_name" in config:
        import keras_hub  # noqa: F401  (registers the keras-hub classes)

        backbone = keras.saving.deserialize_keras_object(config)
        model = VisionTransformer(backbone, _interpolation(config, backbone), name="vit")
    else:
        model = random_backbone(config, name="vit")
    load_weights(model, weights)
    return model


class ViTFamily(family.Family):
    """Vision transformers (`VisionTransformer`): the blocks are the encoder's, top first;
    `trainable_blocks` N trains the top N and the final norm, `trainable_fraction` f the top
    ceil(f * U) of the U units (embeddings, each block, final norm, in model order). Checkpoint
    directories and DINOv2 torch-hub files convert (`convert`)."""

    name = "vit"

    def matches(self, model):
        return isinstance(model, VisionTransformer)

    def blocks(self, model):
        return [block.name for block in model.blocks][::-1]

    def train_top(self, model, blocks, fraction, patterns, batchnorm, name):
        if blocks:
            self.top_blocks(model, blocks, name)  # checks the range
        units = [model.backbone.embeddings, *model.blocks, model.final_norm]
        if fraction:
            chosen = units[len(units) - math.ceil(fraction * len(units)) :]
        else:
            top = model.blocks[len(model.blocks) - blocks :]
            chosen = [*top, model.final_norm] if top else []
        model.trainable = True
        model.backbone.trainable = True
        for layer in model.backbone.layers:
            layer.trainable = False
        model.backbone.encoder.trainable = any(block in chosen for block in model.blocks)
        for unit in units:  # the encoder's flag reaches every block: set them again
            unit.trainable = unit in chosen
        if fraction:
            return [unit.name for unit in chosen][::-1]
        return [block.name for block in chosen if block is not model.final_norm][::-1]

    def local_probe(self, model):
        """The patch tokens as a [B, H / patch, W / patch, C] map (cells of `patch_size` input
        pixels); the output is the whole token sequence."""

        def probe(images):
            tokens = model(images, training=False)
            patch = model.patch_size
            grid = tf.shape(images)[1:3] // patch
            shape = tf.concat([tf.shape(tokens)[:1], grid, tf.shape(tokens)[2:]], axis=0)
            local = tf.reshape(tokens[:, model.num_prefix_tokens :], shape)
            return local, tf.constant([patch, patch], tf.float32), tokens

        return probe

    def convert(self, checkpoint, arch, out):
        """A checkpoint directory or a DINOv2 torch-hub `.pth` -> tfmet weights `out` of `arch`
        (a shortcut such as dinov2_vitb14, or "hf:<dir>"); returns the metadata written."""
        from tfmet.backbones.torch_convert import save_weights

        checkpoint = os.fspath(checkpoint)
        if os.path.isdir(checkpoint):
            if arch.startswith(PREFIX):
                model = load_directory(checkpoint, name="vit")
            else:
                model = registry.spec(arch).builder(weights=checkpoint)
            source = weights_file(checkpoint)
        else:
            model, source = load_torch_hub(checkpoint, arch), checkpoint
        metadata = {"arch": arch, "kind": "backbone", "source": os.path.basename(source)}
        save_weights(model, out, **metadata)
        return metadata


FAMILY = registry.register_family(ViTFamily())


def load_torch_hub(path, arch):
    """A `VisionTransformer` of `arch` (a DINOv2 shortcut, or "hf:<dir>" for that directory's
    architecture) with the weights of torch-hub file `path`."""
    if arch.startswith(PREFIX):  # the architecture of a checkpoint directory
        config = read_config(arch[len(PREFIX) :])
    elif arch in SHORTCUTS:
        config = _hf_style_config(SHORTCUTS[arch])
    else:
        config = {}
    if config.get("model_type") not in ("dinov2", "dinov2_with_registers"):
        raise ValueError(f"{path}: torch-hub files are DINOv2 models; arch {arch!r} is not one")
    return vit_convert.assign_torch_hub(random_backbone(config, name="vit"), path, config)


def _resolve(name):
    directory = name[len(PREFIX) :]
    if not directory:
        raise ValueError(f"Backbone {name!r}: give a checkpoint directory after {PREFIX!r}")
    return registry.BackboneSpec(
        name=name,
        builder=lambda weights=None: build_directory(directory, weights),
        preprocessing=registry.IMAGENET_TORCH,
        description=f"vision transformer from checkpoint directory {directory}",
        pooling="cls",
        weights_file=lambda: weights_file(directory),
        family=FAMILY,
    )


def _register_shortcuts():
    for shortcut, arch in SHORTCUTS.items():
        registry.register(
            registry.BackboneSpec(
                name=shortcut,
                builder=lambda weights=None, _s=shortcut: build_shortcut(_s, weights),
                preprocessing=registry.IMAGENET_TORCH,
                description=f"{arch.model_type} ViT/{arch.patch_size}, {arch.hidden_size}-d",
                pooling="cls",
                family=FAMILY,
            )
        )


registry.register_prefix(PREFIX, _resolve)
_register_shortcuts()
