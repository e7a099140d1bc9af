"""GPU throughput: multi-scale extraction (float32 and mixed precision) and contrastive training.

    .venv/bin/python tools/gpu_bench.py                        # on the GPU (tools/gpu_check.sh)
    .venv/bin/python tools/gpu_bench.py --device=cpu --smoke   # a quick run anywhere

Extraction: for each backbone (torchvision-compatible, random init seeded, BatchNorm statistics
calibrated on one image batch so that activations have realistic scales, then folded into the
convolutions as `tfmet-extract` does) and each precision, tfmet's `DescriptorExtractor` (scales
1, 2^-0.5, 1/2) over generated uint8 images of Met size (500 x 375, both orientations), `batch`
same-size images per call, each call's descriptors brought back to the host as the extraction
does. Images/s is the median of `--rounds` timed passes, after a warm-up pass that compiles
every shape; a mixed precision's row also gives its ratio to float32's, measured in the same
run. "min cos" is the smallest cosine between a precision's descriptors and float32's
(same weights, same images): what mixed precision changes in the descriptors.

Precisions: "float32" (TensorFloat-32 products as TF's default on Ampere and newer GPUs: the
header says whether it is on), "mixed_bfloat16", "mixed_float16": the Keras dtype policy of that
name for the backbone (float32 variables, computation in 16 bits); the GeM pooling, L2 and
everything after the backbone stay float32. This file builds the extractor itself and sets the
policy; it needs nothing from tfmet beyond the library.

Training: `ContrastiveTrainer` steps (float32) of a ResNet-18 Embedder on `--train_pairs` pairs
of `--train_size` square images (both images of a pair in one batch, as the trainer runs them),
steps/s after warm-up steps.

Prints one line per measurement, then a summary table; `--summary_file` also writes the table,
rewritten after every measurement (a run stopped by a time limit leaves what it measured).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")

FLAGS = flags.FLAGS
flags.DEFINE_enum("device", "gpu", ["gpu", "cpu"], "Where to run (cpu hides every GPU).")
flags.DEFINE_list("backbones", ["resnet18", "resnet50"], "Registry backbones to extract with.")
flags.DEFINE_list(
    "precisions", list(PRECISIONS), f"Extraction precisions: {', '.join(PRECISIONS)}."
)
flags.DEFINE_list("batches", ["1", "8"], "Same-size images per extractor call.")
flags.DEFINE_integer("num_images", 64, "Images per timed pass (half of each orientation).")
flags.DEFINE_integer("height", 375, "Image height (the other half of the images is transposed).")
flags.DEFINE_integer("width", 500, "Image width.")
flags.DEFINE_integer("rounds", 3, "Timed passes per measurement (the median is reported).")
flags.DEFINE_integer("train_pairs", 8, "Contrastive training: pairs per step.")
flags.DEFINE_integer("train_size", 500, "Contrastive training: side of the square images.")
flags.DEFINE_integer("train_steps", 20, "Contrastive training: timed steps (after 3 warm-up).")
flags.DEFINE_bool("smoke", False, "Tiny sizes (64 x 48 images, 4 per pass, 1 round, 2 steps).")
flags.DEFINE_string("summary_file", None, "Also write the summary table to this file.")
flags.DEFINE_integer("seed", 0, "Seed of images and weights.")


def noise_images(count, height, width, seed):
    """`count` random uint8 images as float32 [1, H, W, 3]; every other one W x H."""
    rng = np.random.default_rng(seed)
    shapes = [(height, width) if i % 2 == 0 else (width, height) for i in range(count)]
    return [
        rng.integers(0, 256, (1, h, w, 3), dtype=np.uint8).astype(np.float32) for h, w in shapes
    ]


def batched(images, batch):
    """Same-shape images stacked `batch` at a time (shape by shape, in order)."""
    by_shape = {}
    for image in images:
        by_shape.setdefault(image.shape, []).append(image)
    groups = []
    for same in by_shape.values():
        groups += [np.concatenate(same[i : i + batch]) for i in range(0, len(same), batch)]
    return groups


def calibrated_trunk(name, images):
    """The seeded random-init backbone `name`, BatchNorm statistics of `images`."""
    import keras
    import tensorflow as tf

    from tests.kit.models import calibrate_batchnorm
    from tfmet import backbones

    keras.utils.set_random_seed(FLAGS.seed)
    trunk = backbones.get(name)
    side = min(224, FLAGS.height, FLAGS.width)
    batch = tf.concat([tf.image.resize(x, (side, side)) for x in images[:4]], axis=0)
    calibrate_batchnorm(trunk, backbones.preprocessing(name)(batch))
    return trunk


def extractor_for(name, trunk, precision):
    """tfmet's multi-scale extractor over `trunk`'s weights, the backbone in `precision`."""
    import keras

    from tfmet import backbones
    from tfmet.backbones.batchnorm import fold_batchnorm
    from tfmet.descriptors import MET_SCALES, DescriptorExtractor, Embedder

    keras.mixed_precision.set_global_policy(precision)
    try:
        backbone = backbones.get(name)
        backbone.set_weights(trunk.get_weights())  # variables are float32 under every policy
        backbone, _ = fold_batchnorm(backbone)  # as tfmet-extract (fold_bn, its default)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    # GeM, L2 and the rest are float32: Keras casts the 16-bit feature map on the way in.
    embedder = Embedder(backbone, preprocessing=backbones.preprocessing(name))
    return DescriptorExtractor(embedder, scales=MET_SCALES)


def time_extraction(extractor, groups, count):
    """(median images/s over the rounds, descriptors of the warm-up pass)."""
    descriptors = [extractor(x).numpy() for x in groups]  # warm-up: every shape compiled
    rates = []
    for _ in range(FLAGS.rounds):
        start = time.perf_counter()
        for x in groups:
            extractor(x).numpy()
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates), np.concatenate(descriptors)


def bench_extraction(device, progress):
    import tensorflow as tf

    images = noise_images(FLAGS.num_images, FLAGS.height, FLAGS.width, FLAGS.seed)
    batches = [int(b) for b in FLAGS.batches]
    rows = []
    for name in FLAGS.backbones:
        with tf.device(device):
            trunk = calibrated_trunk(name, images)
        reference = None
        for precision in FLAGS.precisions:
            row = {"backbone": name, "precision": precision, "rates": {}, "cos": None}
            try:
                with tf.device(device):
                    extractor = extractor_for(name, trunk, precision)
                    for batch in batches:
                        rate, found = time_extraction(
                            extractor, batched(images, batch), len(images)
                        )
                        row["rates"][batch] = rate
                        print(f"extract {name} {precision} batch {batch}: {rate:.1f} images/s")
                        if not np.all(np.isfinite(found)):
                            row["error"] = "non-finite descriptors"
                if precision == "float32":
                    reference = found
                elif reference is not None:
                    row["cos"] = float(np.min(np.sum(reference * found, axis=1)))
            except Exception as error:  # one precision's failure must not hide the others
                row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"
                print(f"extract {name} {precision}: FAILED {row['error']}")
            rows.append(row)
            progress(rows)
    return rows


def bench_training(device):
    import keras
    import tensorflow as tf

    from tfmet.descriptors import Embedder
    from tfmet.training.contrastive.trainer import ContrastiveTrainer

    rng = np.random.default_rng(FLAGS.seed)
    shape = (FLAGS.train_pairs, FLAGS.train_size, FLAGS.train_size, 3)
    first = tf.constant(rng.integers(0, 256, shape, dtype=np.uint8).astype(np.float32))
    second = tf.constant(rng.integers(0, 256, shape, dtype=np.uint8).astype(np.float32))
    labels = tf.constant(np.arange(FLAGS.train_pairs) % 2, tf.int32)
    with tf.device(device):
        keras.utils.set_random_seed(FLAGS.seed)
        trainer = ContrastiveTrainer(Embedder.from_registry("resnet18"), learning_rate=1e-5)
        for _ in range(3):
            trainer.train_step([(first, second, labels)])
        start = time.perf_counter()
        for _ in range(FLAGS.train_steps):
            loss = trainer.train_step([(first, second, labels)])
        seconds = time.perf_counter() - start
    rate = FLAGS.train_steps / seconds
    print(f"train resnet18 float32 {FLAGS.train_pairs} pairs: {rate:.2f} steps/s (loss {loss:.4f})")
    return rate


def summary(header, rows, train_rate):
    batches = [int(b) for b in FLAGS.batches]
    lines = [header, ""]
    lines.append(
        f"{'extraction':<10} {'precision':<15}"
        + "".join(f"{f'batch {b} img/s':>16}" for b in batches)
        + f"{'min cos':>10}"
    )
    base = {r["backbone"]: r["rates"] for r in rows if r["precision"] == "float32"}

    def cell(row, batch):
        if batch not in row["rates"]:
            return f"{'-':>16}"
        rate, reference = row["rates"][batch], base.get(row["backbone"], {}).get(batch)
        if row["precision"] == "float32" or not reference:
            return f"{rate:16.1f}"
        return f"{f'{rate:.1f} ({rate / reference:.2f}x)':>16}"

    for row in rows:
        rates = "".join(cell(row, b) for b in batches)
        cos = "" if row["cos"] is None else f"{row['cos']:10.5f}"
        error = f"  {row['error']}" if "error" in row else ""
        lines.append(f"{row['backbone']:<10} {row['precision']:<15}{rates}{cos:>10}{error}")
    lines.append("")
    pairs = FLAGS.train_pairs
    lines.append(
        f"training   resnet18 float32, {pairs} pairs of {FLAGS.train_size}x{FLAGS.train_size}: "
        + (
            f"{train_rate:.2f} steps/s = {train_rate * 2 * pairs:.1f} images/s"
            if isinstance(train_rate, float)
            else str(train_rate)
        )
    )
    return "\n".join(lines)


def main(argv):
    del argv
    if FLAGS.smoke:
        FLAGS.height, FLAGS.width, FLAGS.num_images, FLAGS.rounds = 48, 64, 4, 1
        FLAGS.train_pairs, FLAGS.train_size, FLAGS.train_steps = 2, 64, 2
    import tensorflow as tf

    if FLAGS.device == "cpu":
        tf.config.set_visible_devices([], "GPU")
        device, where = "/CPU:0", f"CPU ({os.cpu_count()} cores)"
    else:
        gpus = tf.config.list_physical_devices("GPU")
        if not gpus:
            print("no GPU: TensorFlow sees none (use --device=cpu for a CPU run)")
            return 2
        details = tf.config.experimental.get_device_details(gpus[0])
        device = "/GPU:0"
        where = (
            f"{details.get('device_name', 'GPU')} (compute capability "
            f"{details.get('compute_capability')}), TF32 "
            f"{'on' if tf.config.experimental.tensor_float_32_execution_enabled() else 'off'}"
        )
    header = (
        f"tfmet GPU bench: TF {tf.__version__}, {where}; extraction at scales 1, 0.707, 0.5 of "
        f"{FLAGS.num_images} uint8 noise images {FLAGS.width}x{FLAGS.height} (both "
        f"orientations), median of {FLAGS.rounds} rounds; random-init weights"
    )
    print(header, flush=True)

    def write(rows, train_rate="not run (yet)"):
        # After every measurement: a run stopped by a time limit still leaves its table.
        if FLAGS.summary_file:
            with open(FLAGS.summary_file, "w") as f:
                f.write(summary(header, rows, train_rate) + "\n")

    rows = bench_extraction(device, write)
    try:
        train_rate = bench_training(device)
    except Exception as error:
        train_rate = f"FAILED {type(error).__name__}: {str(error).splitlines()[0][:80]}"
        print(f"train: {train_rate}")
    write(rows, train_rate)
    print("\n" + summary(header, rows, train_rate))
    failed = any("error" in row for row in rows) or not isinstance(train_rate, float)
    return 1 if failed else 0


if __name__ == "__main__":
    app.run(main)
