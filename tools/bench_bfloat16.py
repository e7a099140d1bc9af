"""Benchmark: bfloat16 where the CPU computes it natively, tfmet and PyTorch in both precisions.

    .venv/bin/python tools/bench_bfloat16.py --threads=1 --num_images=6 --rounds=3
    .venv/bin/python tools/bench_bfloat16.py --models=resnet50 --variants=policy,grappler,xla

For ResNet-50, ResNet-18, EfficientNet-Lite0 and ViT-S/14 (`--models`; random weights, the
ResNets' and Lite0's BatchNorm statistics calibrated on the images as in `bench_extract.py`), on
the same generated JPEGs (long side 500), multi-scale (1, 1/sqrt(2), 1/2), one image per call,
compute only (pre-decoded pixels), `--threads` threads in both frameworks:

- "tfmet float32": the `DescriptorExtractor` over the BatchNorm-folded backbone;
- "tfmet bfloat16": the same with `set_precision(backbone, "bfloat16")`, what `--precision=
  bfloat16` runs (Keras `mixed_bfloat16` on the backbone's layers, the float32 stem and first
  block of `tfmet.backbones.precision`); further ways of running bfloat16 with `--variants`:
  "grappler" (the float32 model under TF's `auto_mixed_precision_onednn_bfloat16` graph
  rewrite), "xla" (the bfloat16 policy, compiled with `jit_compile=True`);
- "torch float32": the reference loop (`extract_ms`: interpolate, trunk, GeM, L2 per scale);
  for ViT-S/14 the Hugging Face `Dinov2Model`'s pooled (cls) output per scale;
- "torch bfloat16": the same loop under `torch.autocast("cpu", dtype=torch.bfloat16)`.

Each round runs every line once, in turn, so that load from other processes hits them alike;
each ratio is computed within a round and the table gives its min and median over the rounds.
The cosine column is the per-image cosine of a run's descriptors to its framework's float32
ones (min over images). Needs `avx512_bf16` or `amx_bf16` in /proc/cpuinfo: elsewhere bfloat16
has no native arithmetic (oneDNN and PyTorch convert to float32 around each operation), the
comparison says nothing about bfloat16 hardware, and the script says so and exits.
`TF_ENABLE_ONEDNN_OPTS` is TensorFlow's (on by default on x86 Linux); the header prints it.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_extract  # noqa: E402

MODELS = ("resnet50", "resnet18", "efficientnet_lite0", "vits14")
VARIANTS = ("policy", "grappler", "xla")
NATIVE = ("amx_bf16", "avx512_bf16")

FLAGS = flags.FLAGS
flags.DEFINE_list("models", list(MODELS), f"Models to time: {', '.join(MODELS)}.")
flags.DEFINE_list("variants", ["policy"], f"tfmet bfloat16 variants: {', '.join(VARIANTS)}.")
flags.DEFINE_integer("threads", 1, "Threads of both frameworks (TF intra/inter-op, torch).")


def native_bfloat16():
    """(flags of /proc/cpuinfo with native bfloat16 arithmetic, every flag word)."""
    try:
        with open("/proc/cpuinfo") as f:
            words = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        words = []
    return [w for w in NATIVE if w in words], words


def torch_lite0():
    """EfficientNet-Lite0's trunk in torch (random weights; timing and torch's own cosines
    only): the stem, the 16 MBConv blocks of `LITE0_STAGES` and the 1280-channel head."""
    from torch import nn

    from tfmet.backbones.efficientnet_lite import LITE0_STAGES

    def conv(cin, cout, k=1, stride=1, groups=1):
        return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                nn.BatchNorm2d(cout, eps=1e-3), nn.ReLU6()]  # fmt: skip

    class Block(nn.Module):
        def __init__(self, cin, cout, k, stride, expand):
            super().__init__()
            mid = cin * expand
            layers = conv(cin, mid) if expand != 1 else []
            layers += conv(mid, mid, k, stride, groups=mid) + conv(mid, cout)[:2]
            self.body, self.skip = nn.Sequential(*layers), stride == 1 and cin == cout

        def forward(self, x):
            return x + self.body(x) if self.skip else self.body(x)

    layers = conv(3, 32, 3, 2)
    for s in LITE0_STAGES:
        for i in range(s.repeats):
            cin, stride = (s.filters_in, s.stride) if i == 0 else (s.filters_out, 1)
            layers.append(Block(cin, s.filters_out, s.kernel_size, stride, s.expand_ratio))
    return nn.Sequential(*layers, *conv(320, 1280)).eval()


def tfmet_cnn(name, decoded):
    """{precision: the tfmet extractor} of CNN `name`, float32 and bfloat16, and the Keras trunk
    (BatchNorm statistics calibrated on the images)."""
    from tfmet.backbones.precision import set_precision
    from tfmet.descriptors import MET_SCALES, DescriptorExtractor, Embedder
    from tfmet.descriptors import spec as spec_lib

    trunk, preprocessing = bench_extract.calibrated_trunk(name, decoded)
    extractors = {}
    for precision in ("float32", "bfloat16"):
        embedder = spec_lib.folded_embedder(Embedder(trunk, preprocessing=preprocessing))
        set_precision(embedder.backbone, precision)
        extractors[precision] = DescriptorExtractor(embedder, scales=MET_SCALES)
    return extractors, trunk


def tfmet_vit(directory):
    """{precision: the tfmet extractor} of the Hugging Face checkpoint `directory`."""
    from tfmet.backbones.precision import set_precision
    from tfmet.descriptors import MET_SCALES, DescriptorExtractor, Embedder

    extractors = {}
    for precision in ("float32", "bfloat16"):
        embedder = Embedder.from_registry("hf:" + directory)
        set_precision(embedder.backbone, precision)
        extractors[precision] = DescriptorExtractor(embedder, scales=MET_SCALES)
    return extractors


def torch_model(name, decoded, workdir):
    """(descriptor function of one normalised [1, 3, H, W] tensor, mean, std, tfmet extractors)."""
    import torch
    import transformers

    from tfmet.descriptors import MET_SCALES

    imagenet = bench_extract.IMAGENET
    if name == "vits14":
        torch.manual_seed(FLAGS.seed)
        config = transformers.Dinov2Config(**bench_extract.VITS[name], patch_size=14)
        model = transformers.Dinov2Model(config).eval()
        directory = os.path.join(workdir, name)
        model.save_pretrained(directory)

        describe = lambda x: bench_extract.torch_vit_descriptor(model, x, MET_SCALES)
        return describe, imagenet, tfmet_vit(directory)
    extractors, trunk = tfmet_cnn(name, decoded)
    if name == "efficientnet_lite0":
        torch.manual_seed(FLAGS.seed)
        net, normalisation = torch_lite0(), ((127 / 255,) * 3, (128 / 255,) * 3)
    else:
        net, normalisation = bench_extract.torch_trunk_like(trunk, name), imagenet
    return lambda x: bench_extract.torch_descriptor(net, x, MET_SCALES), normalisation, extractors


def signature():
    import tensorflow as tf

    return [tf.TensorSpec([None, None, None, 3], tf.float32, name="images")]


def variant_runs(extractors, float_images):
    """{label: descriptors function} of tfmet: float32, then the bfloat16 `--variants`."""
    import tensorflow as tf

    def run(fn):
        return lambda: [fn(x).numpy() for x in float_images]

    runs = {"tfmet float32": run(extractors["float32"].extract)}
    for variant in FLAGS.variants:
        if variant == "policy":
            runs["tfmet bfloat16"] = run(extractors["bfloat16"].extract)
        elif variant == "xla":
            compiled = tf.function(
                extractors["bfloat16"]._extract, input_signature=signature(), jit_compile=True
            )
            runs["tfmet bfloat16 xla"] = run(compiled)
        elif variant == "grappler":
            runs["tfmet bfloat16 grappler"] = grappler_run(extractors["float32"], float_images)
        else:
            raise app.UsageError(f"--variants: unknown {variant!r}; one of {', '.join(VARIANTS)}")
    return runs


def grappler_run(extractor, float_images):
    """The float32 extractor's function, run with TF's oneDNN bfloat16 graph rewrite on. The
    option is part of the key under which TF caches an optimised function: it is set for each
    run and cleared after, so that the other lines run their own graphs unchanged."""
    import tensorflow as tf

    fn = tf.function(extractor._extract, input_signature=signature(), reduce_retracing=True)
    option = "auto_mixed_precision_onednn_bfloat16"

    def run():
        tf.config.optimizer.set_experimental_options({option: True})
        try:
            return [fn(x).numpy() for x in float_images]
        finally:
            tf.config.optimizer.set_experimental_options({option: False})

    return run


def bench_model(name, decoded, workdir):
    """({label: [images/s per round]}, {label: per-image cosine to its framework's float32})."""
    import torch

    describe, normalisation, extractors = torch_model(name, decoded, workdir)
    tensors, float_images = bench_extract.torch_pixels(decoded, normalisation)
    runs = variant_runs(extractors, float_images)

    def torch_run(bfloat16):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
            descriptors = [describe(t).float().numpy()[None] for t in tensors]
        # Normalised again in float32: autocast leaves the bfloat16 L2 of the loop as it is.
        return [d / np.linalg.norm(d) for d in descriptors]

    runs["torch float32"] = lambda: torch_run(False)
    runs["torch bfloat16"] = lambda: torch_run(True)
    warm = {label: fn() for label, fn in runs.items()}  # warm-up: kernels cached per shape
    cosine = {
        label: bench_extract.cosines(warm[label.split()[0] + " float32"], descriptors)
        for label, descriptors in warm.items()
    }
    rates = {label: [] for label in runs}
    for _ in range(FLAGS.rounds):
        for label, fn in runs.items():
            time.sleep(0.5)
            start = time.perf_counter()
            fn()
            rates[label].append(len(decoded) / (time.perf_counter() - start))
    return rates, cosine


def ratio_text(rates, label, baseline):
    """ "min / median" of the per-round ratios of `label` to `baseline`."""
    ratios = [a / b for a, b in zip(rates[label], rates[baseline], strict=True)]
    return f"{min(ratios):5.2f} / {statistics.median(ratios):5.2f}"


def print_model(name, rates, cosine):
    for label, values in rates.items():
        rounds = " ".join(f"{r:.2f}" for r in values)
        print(
            f"{name:<18} {label:<24} {statistics.median(values):8.2f} "
            f"{ratio_text(rates, label, 'torch float32'):>14} "
            f"{ratio_text(rates, label, 'torch bfloat16'):>14} {cosine[label].min():9.6f}  {rounds}"
        )


def main(argv):
    del argv
    import tensorflow as tf
    import torch

    logging.set_verbosity(logging.WARNING)
    native, words = native_bfloat16()
    if not native:
        others = (
            ", ".join(w for w in ("avx2", "avx512f") if w in words) or "neither avx2 nor avx512f"
        )
        print(
            f"Cannot measure native bfloat16 here: the CPU has no {' / '.join(NATIVE)} flag "
            f"(it has {others}). Without them oneDNN and PyTorch convert bfloat16 to float32 "
            "around every operation, so bfloat16 runs at float32's speed or slower and the ratios "
            "would not say what bfloat16 hardware gives. Run this on a CPU with AVX512_BF16 or AMX."
        )
        return
    for model in FLAGS.models:
        if model not in MODELS:
            raise app.UsageError(f"--models: unknown {model!r}; one of {', '.join(MODELS)}")
    tf.config.threading.set_intra_op_parallelism_threads(FLAGS.threads)
    tf.config.threading.set_inter_op_parallelism_threads(FLAGS.threads)
    torch.set_num_threads(FLAGS.threads)
    with tempfile.TemporaryDirectory(prefix="tfmet-bench-bf16-") as workdir:
        paths = bench_extract.write_images(workdir, FLAGS.num_images, FLAGS.seed)
        decoded = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
        print(
            f"{len(paths)} JPEGs, long side 500; TF {tf.__version__}, torch {torch.__version__}, "
            f"{FLAGS.threads} thread(s) each, {os.cpu_count()} CPUs; native bfloat16 flags: "
            f"{', '.join(native)}; CPU flags: {bench_extract.cpu_flags()}; "
            f"TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'unset (on)')}; "
            f"load average {os.getloadavg()[0]:.1f}"
        )
        print(
            f"{'model':<18} {'run':<24} {'images/s':>8} {'vs torch f32':>14} "
            f"{'vs torch bf16':>14} {'min cos':>9}  rounds (images/s); ratios min / median"
        )
        for model in FLAGS.models:
            rates, cosine = bench_model(model, decoded, workdir)
            print_model(model, rates, cosine)
        print(f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    app.run(main)
