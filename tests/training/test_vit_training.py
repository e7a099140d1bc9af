"""Training with a ViT backbone: top-block fine-tuning moves exactly its variables and the head."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.kit import vit_models
from tfmet.training.contrastive.trainer import build_embedder
from tfmet.training.style import finetune as style_finetune
from tfmet.training.style import fit as style_train
from tfmet.training.style.model import StyleClassifier

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("dinov2_reg")
    vit_models.make_model("dinov2_with_registers", directory)
    return "hf:" + str(directory)


def _classifier(backbone):
    keras.utils.set_random_seed(0)
    classifier = StyleClassifier.from_registry(backbone, {"style": ["a", "b", "c"]}, name="clf")
    classifier.build((None, 42, 42, 3))
    return classifier


def test_finetuning_the_top_block_moves_exactly_its_variables(checkpoint):
    classifier = _classifier(checkpoint)
    unfrozen = style_finetune.set_trainable(classifier, trainable_blocks=1)
    transformer = classifier.backbone
    top, norm = transformer.blocks[-1], transformer.final_norm
    assert unfrozen == [top.name]
    before = {v.path: v.numpy().copy() for v in classifier.weights}
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (12, 42, 42, 3)).astype(np.float32)
    labels = rng.integers(0, 3, 12)
    data = tf.data.Dataset.from_tensor_slices((images, {"style": labels})).batch(4)
    style_train.compile_for_attributes(classifier, ["style"], keras.optimizers.SGD(0.5))
    classifier.fit(data, epochs=1, verbose=0)
    moved = {v.path for v in classifier.weights if not np.array_equal(v.numpy(), before[v.path])}
    head = {v.path for v in classifier.head.weights}
    expected = {v.path for v in top.weights} | {v.path for v in norm.weights} | head
    # The key bias cannot change attention (softmax ignores a per-query constant): no gradient.
    key_bias = {p for p in expected if "key" in p and p.endswith("bias")}
    assert key_bias and moved == expected - key_bias


def test_trainable_fraction_counts_embeddings_blocks_and_norm(checkpoint):
    classifier = _classifier(checkpoint)
    transformer = classifier.backbone
    names = style_finetune.set_trainable(classifier, trainable_fraction=0.5)
    # 4 units (embeddings, 2 blocks, final norm): the top 2 are the norm and the top block.
    assert names == [transformer.final_norm.name, transformer.blocks[-1].name]
    trainable = {v.path for v in transformer.trainable_variables}
    expected = transformer.blocks[-1].trainable_weights + transformer.final_norm.trainable_weights
    assert trainable == {v.path for v in expected}
    with pytest.raises(ValueError, match=r"trainable_blocks must be in \[1, 2\]"):
        style_finetune.set_trainable(classifier, trainable_blocks=3)


def test_contrastive_embedder_over_a_vit_pools_the_class_token(checkpoint):
    config = {"net": checkpoint, "seed": 0, "gem_p": 3.0, "train_p": True, "emb_proj": True}
    embedder = build_embedder(config)
    assert embedder.pooling == "cls" and embedder.output_dim == 32
    out = embedder(np.zeros((2, 30, 44, 3), np.float32)).numpy()
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
