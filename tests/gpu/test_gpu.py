"""The GPU computes what the CPU computes: multi-scale extraction and contrastive training steps.

Marked `gpu`: skipped ("no GPU") where TensorFlow sees no GPU (tests/conftest.py); run on a GPU
machine by `bash tools/gpu_check.sh`. Both models are random-init but seeded ResNet-18s (no
downloads); the same weights run once under `tf.device("/CPU:0")` and once under
`tf.device("/GPU:0")`, and each test checks that the work really ran where it was sent.

TensorFloat-32 (on by default in TF on Ampere and newer GPUs, H100 included) rounds float32
matmul and convolution inputs to a 10-bit mantissa, ~1e-3 relative per product: it is turned off
here, so that the comparison is float32 against float32 and the bounds below can be tight.
"""

import keras
import numpy as np
import pytest
import skimage.data
import tensorflow as tf

from tfmet.descriptors import DescriptorExtractor, Embedder, build_extractor
from tfmet.training.contrastive.trainer import ContrastiveTrainer

pytestmark = pytest.mark.gpu

# Real photographs bundled with scikit-image, of different sizes (H x W): 512x512, 400x600,
# 300x451, 427x640; four sizes, so four sets of kernels per device.
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


@pytest.fixture
def float32_matmuls():
    enabled = tf.config.experimental.tensor_float_32_execution_enabled()
    tf.config.experimental.enable_tensor_float_32_execution(False)
    yield
    tf.config.experimental.enable_tensor_float_32_execution(enabled)


def photo(name):
    return getattr(skimage.data, name)()[..., :3]


def test_multiscale_extraction_on_gpu_gives_the_cpu_descriptors(float32_matmuls):
    # As tfmet-extract builds it: registry backbone, BatchNorms folded, scales 1, 2^-0.5, 1/2.
    cpu_extractor, spec = build_extractor("resnet18", seed=0, fold_bn=True)
    assert spec.dim == 512
    # The same model, but its own compiled function: each is traced under its own device.
    gpu_extractor = DescriptorExtractor(cpu_extractor.embedder, scales=spec.scales)
    for name in PHOTOS:
        image = photo(name)[None].astype(np.float32)
        with tf.device("/CPU:0"):
            on_cpu = cpu_extractor(image)
        with tf.device("/GPU:0"):
            on_gpu = gpu_extractor(image)
        assert "CPU" in on_cpu.device and "GPU" in on_gpu.device, (on_cpu.device, on_gpu.device)
        on_cpu, on_gpu = on_cpu.numpy()[0], on_gpu.numpy()[0]
        # Unit rows of 512 entries, ~0.044 each: the two devices differ only by the order of
        # float32 sums and the convolution algorithms (CPU with oneDNN against CPU without:
        # 3e-8). 1e-4 absolute is ~0.2% of a typical entry and leaves room for cuDNN's
        # Winograd; a wrong kernel, or TF32 products (~1e-3 relative each), land far outside.
        np.testing.assert_allclose(np.linalg.norm(on_gpu), 1.0, atol=1e-5)
        cosine = float(np.dot(on_cpu, on_gpu))
        assert cosine >= 0.9999, (name, cosine)
        assert np.abs(on_cpu - on_gpu).max() <= 1e-4, (name, np.abs(on_cpu - on_gpu).max())


def pair_batches(steps, pairs=4, size=96, seed=0):
    """`steps` sub-batches of `pairs` (first, second, labels): random size x size crops of the
    photos, a positive pair being two crops of the same photo."""
    rng = np.random.default_rng(seed)
    photos = [photo(name).astype(np.float32) for name in PHOTOS]

    def crop(image):
        top = rng.integers(0, image.shape[0] - size + 1)
        left = rng.integers(0, image.shape[1] - size + 1)
        return image[top : top + size, left : left + size]

    batches = []
    for _ in range(steps):
        first, second, labels = [], [], []
        for index in range(pairs):
            a = int(rng.integers(len(photos)))
            positive = index % 2 == 0
            b = a if positive else (a + 1 + int(rng.integers(len(photos) - 1))) % len(photos)
            first.append(crop(photos[a]))
            second.append(crop(photos[b]))
            labels.append(int(positive))
        batches.append((np.stack(first), np.stack(second), np.asarray(labels, np.int32)))
    return batches


def train_on(device, weights, batches, learning_rate, adam_epsilon):
    """Losses and trained weights of `len(batches)` steps on `device`, from `weights`."""
    with tf.device(device):
        embedder = Embedder.from_registry("resnet18")
        embedder.build((None, None, None, 3))
        embedder.set_weights(weights)
        trainer = ContrastiveTrainer(
            embedder, learning_rate=learning_rate, adam_epsilon=adam_epsilon
        )
        assert all(device[1:4] in v.value.device for v in trainer.variables), device
        losses = [trainer.train_step([batch]) for batch in batches]
    return np.asarray(losses), [v.numpy() for v in trainer.variables]


def test_contrastive_training_steps_on_gpu_give_the_cpu_weights(float32_matmuls):
    keras.utils.set_random_seed(0)
    start = Embedder.from_registry("resnet18")
    start.build((None, None, None, 3))
    initial = start.get_weights()
    trainable = [v.numpy() for v in start.trainable_variables]
    batches = pair_batches(steps=3)
    # Adam with its default epsilon (1e-8) steps each weight by ~learning_rate * sign(gradient)
    # at first: a weight whose gradient is at rounding level steps either way, so two devices
    # differ by 2 lr there, whatever their precision. With epsilon 1 (>> the gradients, ~1e-3)
    # the step is ~learning_rate * gradient, and the weights show the gradients' difference.
    # Learning rate 0.1: the updates (~1e-4) stay well above the rounding of the weights (~4e-9).
    kwargs = dict(learning_rate=0.1, adam_epsilon=1.0)
    cpu_losses, cpu_weights = train_on("/CPU:0", initial, batches, **kwargs)
    gpu_losses, gpu_weights = train_on("/GPU:0", initial, batches, **kwargs)
    np.testing.assert_allclose(gpu_losses, cpu_losses, rtol=1e-4)
    cpu_updates = [w - w0 for w, w0 in zip(cpu_weights, trainable, strict=True)]
    gpu_updates = [w - w0 for w, w0 in zip(gpu_weights, trainable, strict=True)]
    # Bounds: CPU with oneDNN against CPU without (other convolution algorithms, same float32)
    # gave 2.4e-5 for the whole update and at most 1.3e-4 for one variable. cuDNN's algorithms
    # (Winograd among them) round more: 1e-3 and 1e-2 leave 40x and 75x of room, and a wrong
    # gradient (a kernel, a layer) is off by a large fraction of its variable's update.
    for index, (cpu, gpu) in enumerate(zip(cpu_updates, gpu_updates, strict=True)):
        assert np.linalg.norm(cpu) > 0, index
        relative = np.linalg.norm(gpu - cpu) / np.linalg.norm(cpu)
        assert relative <= 1e-2, (index, cpu.shape, relative)
    cpu_update = np.concatenate([u.ravel() for u in cpu_updates])
    gpu_update = np.concatenate([u.ravel() for u in gpu_updates])
    relative = np.linalg.norm(gpu_update - cpu_update) / np.linalg.norm(cpu_update)
    assert relative <= 1e-3, relative
