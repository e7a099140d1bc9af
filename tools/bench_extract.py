"""Benchmark: multi-scale descriptor extraction, tfmet vs the reference-style PyTorch loop.

    .venv/bin/python tools/bench_extract.py --backbones=resnet18,resnet50 --num_images=16
    .venv/bin/python tools/bench_extract.py --backbones= --vits=vits14,vitb14
    .venv/bin/python tools/bench_extract.py --precisions=float32,bfloat16 --demo

For each backbone, the same weights run in both frameworks (a Keras trunk from the tfmet
registry, BatchNorm statistics calibrated on an image batch so that activations have realistic
scales, copied into the compact torchvision-layout model of tests/kit/torch_models.py), on the same
generated JPEGs of Met-like sizes (long side 500, mixed aspect ratios and orientations):

- "tfmet": `extract_split` end to end as `tfmet-extract` runs it (tf.data parallel read +
  decode, the compiled multi-scale extractor over the BatchNorm-folded backbone, chunk files,
  merged store).
- "tfmet compute": the `DescriptorExtractor` on pre-decoded images, one call per image.
- "tfmet bfloat16", "tfmet bfloat16 compute" (and float16, per `--precisions`): the same with
  the backbone computing in reduced precision (`--precision`); for each, the per-image cosine
  between its descriptors and the float32 ones (min and mean) is printed.
- "torch": the reference loop (`extract_ms`): one image at a time, scales 1, 1/sqrt(2), 1/2 with
  `F.interpolate`, GeM + L2 per scale, mean, L2; on pre-decoded, normalised tensors (compute
  only, as the reference's DataLoader workers decode), `torch.set_num_threads(--torch_threads)`.

On a machine shared with other work, torch's OpenMP threads degrade far more than TF's (they
spin and wait for each other): compare there with `--torch_threads=1 --tf_threads=1`, which
measures per-core efficiency and is robust to load; the script warns when the load is high.

Every pass is preceded by a warm-up pass over the same images (both frameworks cache kernels per
input shape; over the Met's ~400k images the few hundred distinct sizes are soon all cached).
Rounds alternate between the frameworks so that load from other processes hits both alike; the
table gives the median images/s of the rounds and the ratio to torch measured in the same run.

`--demo` adds the accuracy cost on a retrieval task: `tfmet-demo`'s benchmark (real photos,
EfficientNet-Lite0 with its ImageNet weights) run in every precision of `--precisions`, with
test GAP / GAP- / ACC and their difference to float32 in points.

Reduced precision pays where the CPU computes it natively (AVX512_BF16 / AMX for bfloat16,
AVX512_FP16 for float16; or a GPU): elsewhere oneDNN converts to float32 around every
convolution and bfloat16 is slower than float32. The script prints which of these flags the CPU
has. `tools/bench_bfloat16.py` (which uses this script's helpers and flags) times bfloat16
against PyTorch in both precisions (autocast) on ResNet-50/18, EfficientNet-Lite0 and ViT-S/14,
with the ways TensorFlow offers of running it; on a CPU without native bfloat16 it says that it
cannot measure and why.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VITS = {  # Hugging Face Dinov2Config sizes of the published ViT-S/14 and ViT-B/14
    "vits14": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
    "vitb14": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
}


FLAGS = flags.FLAGS
flags.DEFINE_list("backbones", ["resnet18", "resnet50"], "torchvision-compatible backbones.")
flags.DEFINE_integer("num_images", 16, "Generated images per pass.")
flags.DEFINE_integer("rounds", 3, "Timed rounds per framework (alternating).")
flags.DEFINE_integer("torch_threads", 2, "torch.set_num_threads for the PyTorch loop.")
flags.DEFINE_integer(
    "tf_threads", 0, "TF intra- and inter-op threads (0: TF's default, all cores)."
)
flags.DEFINE_integer("batch_images", 1, "tfmet: same-size images per model call.")
flags.DEFINE_integer("seed", 0, "Seed of images and weights.")
flags.DEFINE_list("vits", [], f"DINOv2 ViTs (random init, real size): {', '.join(VITS)}.")
flags.DEFINE_list(
    "precisions", ["float32"], "tfmet precisions to time (float32 always runs, as the reference)."
)
flags.DEFINE_bool("demo", False, "Also run tfmet-demo's benchmark in every precision.")


def met_like_sizes(count, rng):
    """(height, width): long side 500, short side 250-500, both orientations, mostly distinct."""
    sizes = []
    for _ in range(count):
        short = int(rng.integers(250, 501))
        sizes.append((500, short) if rng.random() < 0.5 else (short, 500))
    return sizes


def smooth_image(size, rng):
    """A smooth random colour field with some texture, uint8 [H, W, 3]."""
    height, width = size
    coarse = rng.uniform(0, 255, (height // 50 + 2, width // 50 + 2, 3)).astype(np.float32)
    image = Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.BILINEAR)
    noise = rng.normal(0, 12, (height, width, 3))
    return np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8)


def write_images(directory, count, seed):
    rng = np.random.default_rng(seed)
    paths = []
    for i, size in enumerate(met_like_sizes(count, rng)):
        path = os.path.join(directory, f"{i:04d}.jpg")
        Image.fromarray(smooth_image(size, rng)).save(path, quality=90)
        paths.append(path)
    return paths


def torch_trunk_like(keras_model, name):
    """The torchvision-layout trunk of `name` holding `keras_model`'s weights."""
    import keras
    import torch

    from tests.kit import torch_models

    net = torch_models.resnet(name)
    state = net.state_dict()
    with torch.no_grad():
        for layer in keras_model.layers:
            if isinstance(layer, keras.layers.Conv2D):
                kernel = layer.get_weights()[0]
                state[f"{layer.name}.weight"].copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1)))
            elif isinstance(layer, keras.layers.BatchNormalization):
                gamma, beta, mean, var = layer.get_weights()
                for key, value in (
                    ("weight", gamma),
                    ("bias", beta),
                    ("running_mean", mean),
                    ("running_var", var),
                ):
                    state[f"{layer.name}.{key}"].copy_(torch.from_numpy(value))
    net.load_state_dict(state)
    return torch_models.trunk(net).eval()


def torch_descriptor(trunk, image, scales, p=3.0, eps=1e-6):
    """The reference's extract_ms for one normalised [1, 3, H, W] tensor."""
    import torch.nn.functional as F

    total = 0
    for s in scales:
        x = image.clone() if s == 1 else F.interpolate(image, scale_factor=s, mode="bilinear")
        features = trunk(x).clamp(min=eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)
        total = total + F.normalize(features, dim=-1)
    return F.normalize(total / len(scales), dim=-1)[0]


def torch_vit_descriptor(model, image, scales):
    """The multi-scale cls descriptor of a Hugging Face ViT for one normalised [1, 3, H, W]."""
    import torch.nn.functional as F

    total = 0
    for s in scales:
        x = image if s == 1 else F.interpolate(image, scale_factor=s, mode="bilinear")
        total = total + F.normalize(model(pixel_values=x).pooler_output, dim=-1)
    return F.normalize(total / len(scales), dim=-1)[0]


def timed(fn, count):
    """(images/s wall, CPU seconds of this process per image)."""
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    return count / (time.perf_counter() - start), (time.process_time() - cpu) / count


IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # torch's (mean, std) on [0, 1]


def calibrated_trunk(name, decoded):
    """(the Keras trunk of `name`, seeded, its BatchNorm statistics calibrated on `decoded`'s
    first 4 images at 224 px, its preprocessing)."""
    import keras

    from tests.kit.models import calibrate_batchnorm
    from tfmet import backbones

    keras.utils.set_random_seed(FLAGS.seed)
    trunk = backbones.get(name)
    calibration = np.stack([np.asarray(Image.fromarray(d).resize((224, 224))) for d in decoded[:4]])
    preprocessing = backbones.preprocessing(name)
    calibrate_batchnorm(trunk, preprocessing(calibration.astype(np.float32)))
    return trunk, preprocessing


def torch_pixels(decoded, normalisation):
    """(normalised [1, 3, H, W] torch tensors, raw [1, H, W, 3] float32 arrays) of `decoded`;
    `normalisation` is (mean, std) on [0, 1]."""
    import torch

    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in normalisation)
    tensors = [
        (torch.from_numpy(d.copy()).permute(2, 0, 1)[None].float() / 255.0 - mean) / std
        for d in decoded
    ]
    return tensors, [d.astype(np.float32)[None] for d in decoded]


def bench_backbone(name, paths, decoded, workdir):
    import torch

    from tfmet.backbones.precision import set_precision
    from tfmet.descriptors import MET_SCALES, DescriptorExtractor, Embedder
    from tfmet.descriptors import spec as spec_lib

    trunk, spec_pre = calibrated_trunk(name, decoded)
    extractors = {}
    for precision in precisions():
        embedder = spec_lib.folded_embedder(Embedder(trunk, preprocessing=spec_pre))
        set_precision(embedder.backbone, precision)
        spec = spec_lib.ExtractionSpec(
            name, "bench", MET_SCALES, "torch", None, embedder.output_dim, precision=precision
        )
        extractors[precision] = (DescriptorExtractor(embedder, scales=MET_SCALES), spec)

    torch.set_num_threads(FLAGS.torch_threads)
    torch_trunk = torch_trunk_like(trunk, name)
    tensors, float_images = torch_pixels(decoded, IMAGENET)

    def run_torch():
        with torch.no_grad():
            return [torch_descriptor(torch_trunk, t, MET_SCALES).numpy() for t in tensors]

    runs = {}
    for precision, (extractor, spec) in extractors.items():
        label = "tfmet" if precision == "float32" else f"tfmet {precision}"
        runs[label] = lambda e=extractor, s=spec: extract_store(e, s, paths, workdir)
        runs[f"{label} compute"] = lambda e=extractor: [e(x).numpy() for x in float_images]
    runs["torch"] = run_torch
    return compare(runs, len(paths))


def precisions():
    """float32 first (the reference of the cosines), then the others of --precisions."""
    from tfmet.precision import check_precision

    return ["float32"] + [check_precision(p) for p in FLAGS.precisions if p != "float32"]


def cosines(reference, other):
    """Per-image cosine of two lists of L2-normalised descriptors [1, D]."""
    return np.sum(np.concatenate(reference) * np.concatenate(other), axis=1)


def extract_store(extractor, spec, paths, workdir):
    """tfmet's whole extraction (tf.data decode, model, chunked store) of `paths`: descriptors."""
    from tfmet.data import descriptor_store as store
    from tfmet.descriptors import extraction

    out = tempfile.mkdtemp(dir=workdir)
    extraction.extract_split(
        extractor, spec, "bench", paths, out, batch_images=FLAGS.batch_images, progress=False
    )
    return store.read_store(out, "bench").descriptors


def compare(runs, count):
    """Checks that tfmet and torch give the same descriptors, then times alternating rounds.

    `runs` maps a label to a function returning descriptors: "tfmet" (float32, end to end),
    "torch", and any others ("tfmet compute", "tfmet bfloat16 compute", ...). Returns (median
    images/s, median CPU s/image, all rates, max |tfmet - torch|, {label: per-image cosine to
    "tfmet compute"} for the reduced-precision compute runs).
    """
    # Same weights, same numbers (up to float reordering): the comparison is like for like.
    ours, theirs = np.asarray(runs["tfmet"]()), np.stack(runs["torch"]())
    difference = float(np.abs(ours - theirs).max())
    warm = {label: fn() for label, fn in runs.items() if label.endswith("compute")}
    agreement = {
        label: cosines(warm["tfmet compute"], descriptors)
        for label, descriptors in warm.items()
        if label != "tfmet compute"
    }
    for label, fn in runs.items():  # warm-up of the end-to-end reduced-precision runs
        if label not in warm and label not in ("tfmet", "torch"):
            fn()
    rates = {label: [] for label in runs}
    cpu = {k: [] for k in rates}
    for _ in range(FLAGS.rounds):
        for framework, fn in runs.items():
            time.sleep(1.0)  # let the other framework's worker threads go idle first
            rate, seconds = timed(fn, count)
            rates[framework].append(rate)
            cpu[framework].append(seconds)
    medians = {k: statistics.median(v) for k, v in rates.items()}
    cpu = {k: statistics.median(v) for k, v in cpu.items()}
    return medians, cpu, rates, difference, agreement


def bench_vit(name, paths, decoded, workdir):
    """A random-init, real-size DINOv2 (Hugging Face `Dinov2Model`, saved and read back through
    "hf:<dir>"): tfmet's multi-scale cls descriptor vs the same pipeline on the torch model."""
    import keras
    import torch
    import transformers

    from tfmet.descriptors import MET_SCALES, DescriptorExtractor, Embedder
    from tfmet.descriptors import spec as spec_lib

    torch.manual_seed(FLAGS.seed)
    model = transformers.Dinov2Model(transformers.Dinov2Config(**VITS[name], patch_size=14))
    model = model.eval()
    directory = os.path.join(workdir, name)
    model.save_pretrained(directory)
    keras.utils.set_random_seed(FLAGS.seed)
    embedder = Embedder.from_registry("hf:" + directory)
    extractor = DescriptorExtractor(embedder, scales=MET_SCALES)
    spec = spec_lib.ExtractionSpec(name, "bench", MET_SCALES, "torch", None, embedder.output_dim)
    torch.set_num_threads(FLAGS.torch_threads)
    tensors, float_images = torch_pixels(decoded, IMAGENET)

    def run_tfmet():
        return extract_store(extractor, spec, paths, workdir)

    def run_torch():
        with torch.no_grad():
            return [torch_vit_descriptor(model, t, MET_SCALES).numpy() for t in tensors]

    runs = {
        "tfmet": run_tfmet,
        "tfmet compute": lambda: [extractor(x).numpy() for x in float_images],
        "torch": run_torch,
    }
    return compare(runs, len(paths))


def cpu_flags():
    """The CPU's native reduced-precision flags (avx512_bf16, amx_bf16, avx512_fp16), if any."""
    try:
        with open("/proc/cpuinfo") as f:
            words = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    wanted = ("avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16")
    return ", ".join(w for w in wanted if w in words) or "none of avx512f/_bf16/_fp16, amx_bf16"


def bench_demo(workdir):
    """tfmet-demo's benchmark in every precision: {precision: DemoResult}."""
    from tfmet.demo.run import run_demo

    results = {}
    for precision in precisions():
        start = time.perf_counter()
        results[precision] = run_demo(
            os.path.join(workdir, "demo"), precision=precision, progress=False, log=lambda m: None
        )
        print(f"demo       {precision:<24} ran in {time.perf_counter() - start:.0f} s")
    return results


def demo_cosines(result, reference):
    """Per-image cosine of a demo run's descriptors (every split's store) to `reference`'s."""
    from tfmet.data import descriptor_store as store

    cosines = []
    for split in ("train", "val", "test"):
        # The same ground truth in the same order: row i is the same photo in both stores.
        ours, theirs = (store.read_store(r.descriptors, split) for r in (result, reference))
        valid = ours.valid & theirs.valid
        cosines.append(np.sum(ours.descriptors[valid] * theirs.descriptors[valid], axis=1))
    return np.concatenate(cosines)


def print_demo(results):
    print(
        f"{'demo':<10} {'precision':<24} {'GAP':>7} {'GAP-':>7} {'ACC':>7}  vs float32"
        "; per-image cosine to float32 (min / mean, every photo)"
    )
    base = results["float32"]
    for precision, result in results.items():
        test = result.test
        delta = " ".join(
            f"{key} {test[key] - base.test[key]:+.4f}" for key in ("gap", "gap_minus", "acc")
        )
        cosines = demo_cosines(result, base)
        print(
            f"{'demo':<10} {precision:<24} {test['gap']:7.4f} "
            f"{test['gap_minus']:7.4f} {test['acc']:7.4f}  {delta}; "
            f"{cosines.min():.6f} / {cosines.mean():.6f} ({cosines.size} photos)"
        )


def main(argv):
    del argv
    import tensorflow as tf
    import torch

    logging.set_verbosity(logging.WARNING)  # no per-chunk lines from the extraction runs
    if FLAGS.tf_threads:
        tf.config.threading.set_intra_op_parallelism_threads(FLAGS.tf_threads)
        tf.config.threading.set_inter_op_parallelism_threads(FLAGS.tf_threads)
    with tempfile.TemporaryDirectory(prefix="tfmet-bench-") as workdir:
        paths = write_images(workdir, FLAGS.num_images, FLAGS.seed)
        decoded = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
        pixels = np.mean([d.shape[0] * d.shape[1] for d in decoded])
        print(
            f"{len(paths)} JPEGs, long side 500, mean {pixels / 1e3:.0f}k pixels; "
            f"TF {tf.__version__} ({FLAGS.tf_threads or 'default'} threads), "
            f"torch {torch.__version__} "
            f"({FLAGS.torch_threads} threads), {os.cpu_count()} CPUs, multi-scale "
            f"{[round(s, 3) for s in (1, 1 / math.sqrt(2), 0.5)]}; "
            f"CPU reduced-precision flags: {cpu_flags()}"
        )
        print(
            f"{'backbone':<10} {'framework':<24} {'images/s':>9} {'vs torch':>9} "
            f"{'CPU s/img':>10}  rounds (images/s)"
        )
        runs = [(n, bench_backbone) for n in FLAGS.backbones] + [(n, bench_vit) for n in FLAGS.vits]
        for name, bench in runs:
            load_before = os.getloadavg()[0]
            medians, cpu, rates, difference, agreement = bench(name, paths, decoded, workdir)
            load_after = os.getloadavg()[0]
            for framework, rate in medians.items():
                ratio = rate / medians["torch"]
                rounds = " ".join(f"{r:.2f}" for r in rates[framework])
                print(
                    f"{name:<10} {framework:<24} {rate:9.2f} {ratio:8.2f}x "
                    f"{cpu[framework]:10.3f}  {rounds}"
                )
            print(f"{name:<10} max |tfmet - torch| descriptor difference: {difference:.2e}")
            for label, cosine in agreement.items():
                print(
                    f"{name:<10} {label.removesuffix(' compute')} vs float32 per-image cosine: "
                    f"min {cosine.min():.6f}, mean {cosine.mean():.6f}"
                )
            busiest = max(load_before, load_after)
            if busiest > 1.5 * (os.cpu_count() or 1):
                print(
                    f"{name:<10} WARNING: load average {busiest:.1f} on {os.cpu_count()} CPUs: "
                    "other processes competed; torch's OpenMP threads suffer far more from "
                    "that than TF's, so the ratio overstates tfmet. Re-run on an idle machine."
                )
        if FLAGS.demo:
            print_demo(bench_demo(workdir))


if __name__ == "__main__":
    app.run(main)
