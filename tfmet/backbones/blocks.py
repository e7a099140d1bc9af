"""Unfreezing the top blocks of a backbone, given how that family lists its blocks."""

import keras


def set_trainable_blocks(model: keras.Model, num_blocks: int, blocks, block_layers) -> list[str]:
    """Makes the top `num_blocks` blocks trainable and freezes the rest; returns their names.

    Args:
      model: the backbone.
      num_blocks: how many blocks, from the top, train.
      blocks: `blocks(model)` -> block names, top first.
      block_layers: `block_layers(model, block)` -> the layers of one block.

    Frozen BatchNormalization layers run in inference mode (Keras 3 semantics of
    `trainable=False`), as fine-tuning the top of a pretrained trunk needs.
    """
    all_blocks = blocks(model)
    if not 0 <= num_blocks <= len(all_blocks):
        raise ValueError(
            f"num_blocks must be in [0, {len(all_blocks)}] for {model.name!r}. "
            f"Received: num_blocks={num_blocks}"
        )
    chosen = all_blocks[:num_blocks]
    selected = {id(layer) for block in chosen for layer in block_layers(model, block)}
    model.trainable = True
    for layer in model.layers:
        layer.trainable = id(layer) in selected
    return chosen


def blocks_by_prefix(model: keras.Model, prefix) -> list[str]:
    """Block names, top first, then "stem": the distinct group(1) of the compiled regex `prefix`
    over the layer names, in layer order (e.g. "conv2_block1" or "layer1.0")."""
    found = []
    for layer in model.layers:
        match = prefix.match(layer.name)
        if match and match.group(1) not in found:
            found.append(match.group(1))
    return found[::-1] + ["stem"]
