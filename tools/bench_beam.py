r"""Beam DirectRunner (N worker processes) vs the single-process extraction, on the same images.

    TF_CPP_MIN_LOG_LEVEL=3 .venv/bin/python tools/bench_beam.py --images=32 --backbone=resnet18

Writes `--images` Met-like JPEGs (long side 500 px, mixed aspect ratios, as the Met images are
used at native resolution) and describes them multi-scale with a seeded random backbone (speed
does not depend on the weights) three ways:

  single     tfmet.descriptors.extraction in this process (TF's default threads: all cores)
  beam x1    the Beam pipeline, FnApiRunner in_memory (one worker, in this process)
  beam xN    the Beam pipeline, FnApiRunner multi_processing, N worker processes of
             --tf_threads TF threads each (the local DirectRunner set-up of docs/beam.md)

For each it prints images/s end to end (Beam: worker start-up and model loading included) and,
for Beam, the steady rate from RunInference's own model-call latency, all as ratios to the single
process measured in the same run. It then projects the wall time of the full Met (418,605
images: database + val + test) on M machines, from the reference's measured per-image cost
(/work/shared/PERFORMANCE_NOTES.md: ResNet-18 2.81 images/s, ResNet-50 1.32 images/s on a
2-core machine) and from this run's, times the Beam efficiency measured here.
"""

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np
from PIL import Image

FULL_MET = 397_121 + 2_165 + 19_319
REFERENCE_RATES = {"resnet18 (reference)": 2.81, "resnet50 (reference)": 1.32}
SIZES = ((500, 375), (375, 500), (500, 333), (400, 500))


def write_images(root, count, seed=0):
    """`count` smooth random JPEGs under root/images/MET/<id>/0.jpg + MET_database.json."""
    rng = np.random.default_rng(seed)
    entries = []
    for i in range(count):
        width, height = SIZES[i % len(SIZES)]
        coarse = rng.uniform(0, 255, (height // 25 + 1, width // 25 + 1, 3)).astype(np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.BILINEAR)
        path = f"MET/{1000 + i}/0.jpg"
        os.makedirs(os.path.join(root, "images", "MET", str(1000 + i)), exist_ok=True)
        image.save(os.path.join(root, "images", *path.split("/")), quality=90)
        entries.append({"id": 1000 + i, "path": path})
    os.makedirs(os.path.join(root, "info"), exist_ok=True)
    with open(os.path.join(root, "info", "MET_database.json"), "w") as f:
        json.dump(entries, f)
    return os.path.join(root, "info")


def run_single(extractor, spec, split, root, out):
    from tfmet.descriptors import extraction

    extractor(np.zeros((1, 64, 64, 3), np.float32))  # trace once, outside the timing
    report = extraction.extract_met(extractor, spec, [split], root, out, progress=False)[0]
    return report.images / report.seconds


def run_beam(spec, split, root, out, model, args, batch_size, tf_threads):
    from tfmet.beam import pipeline

    plan = pipeline.plan_extraction(spec, [split], root, out)
    report = pipeline.run_extraction(
        plan, model, args, batch_size=batch_size, intra_op_threads=tf_threads
    )
    assert report.images == len(split) and report.failed == 0, report
    return report


def hours(seconds):
    return f"{seconds / 3600:7.1f} h"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tf_threads", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--chunk_size", type=int, default=8)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()

    from tfmet.beam import pipeline
    from tfmet.data import met
    from tfmet.descriptors import spec as spec_lib

    root = tempfile.mkdtemp(prefix="bench-beam-")
    try:
        info = write_images(root, args.images)
        split = met.load_split(info, "train")
        extractor, spec = spec_lib.build_extractor(
            args.backbone, seed=0, chunk_size=args.chunk_size
        )
        model = pipeline.export_descriptor_model(extractor, spec, os.path.join(root, "model"))
        cores = os.cpu_count()
        print(
            f"{args.images} images, long side 500 px, {args.backbone} multi-scale, {cores} cores, "
            f"load average {os.getloadavg()[0]:.1f} (other work on the machine skews the ratios)"
        )

        single = run_single(extractor, spec, split, root, os.path.join(root, "single"))
        print(f"{'single process':26s} {single:7.2f} images/s  1.00x")
        results = {}
        configs = [
            ("beam x1 (in_memory)", ["--direct_running_mode=in_memory"], 0),
            (
                f"beam x{args.workers} (multi_processing)",
                [
                    f"--direct_num_workers={args.workers}",
                    "--direct_running_mode=multi_processing",
                ],
                args.tf_threads,
            ),
        ]
        for name, beam_args, threads in configs:
            out = os.path.join(root, name.split()[1])
            started = time.perf_counter()
            report = run_beam(spec, split, root, out, model, beam_args, args.batch_size, threads)
            wall = time.perf_counter() - started
            workers = 1 if "in_memory" in name else args.workers
            steady = workers * report.images / report.inference_seconds
            results[name] = steady / single
            rate = report.images / wall
            print(
                f"{name:26s} {rate:7.2f} images/s {rate / single:5.2f}x end to end "
                f"({wall:.1f} s; model loading {report.model_load_seconds:.1f} s summed over "
                f"workers); steady {steady:.2f} images/s {steady / single:.2f}x"
            )

        efficiency = results[configs[-1][0]]
        print(
            f"\nFull Met ({FULL_MET:,} images) on M machines like this one (2 cores each), "
            f"one Beam worker per core, at the steady Beam/single ratio measured here "
            f"({efficiency:.2f}); add a few minutes of worker start-up:"
        )
        rates = dict(REFERENCE_RATES)
        rates[f"{args.backbone} (this run)"] = single
        print(f"{'per-machine rate':32s}" + "".join(f"{f'M={m}':>10s}" for m in (1, 10, 50, 100)))
        for label, rate in rates.items():
            cells = "".join(
                f"{hours(FULL_MET / (m * rate * efficiency)):>10s}" for m in (1, 10, 50, 100)
            )
            print(f"{label:22s}{rate:5.2f} im/s  {cells}")
    finally:
        if args.keep:
            print("kept", root)
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
