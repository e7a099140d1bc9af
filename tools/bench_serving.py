"""Serving latency of the exported recogniser at Met size: exact vs ScaNN searcher.

    PYTHONPATH=. .venv/bin/python tools/bench_serving.py [--database 397121] [--k 15]

A `RecognizerModule` over a synthetic database (--database x 512, spread evenly over the sphere:
the hard case for a k-means tree) and a small two-convolution backbone with 512 output channels
(the timings of the descriptor part are of that backbone, not of a ResNet: the search part is what
is compared). For each searcher ("exact": one matrix product over the whole database; "scann":
the configuration the "scann" searcher's calibrated build chooses on held-out queries for
recall@k >= --min_recall), one query at a time and in batches of 8 and 64:
- the search part: the module's `neighbors` on descriptors, as a tf.function;
- the whole call: `recognize_bytes` on JPEG bytes (decode + multi-scale descriptor + search).
Printed: p50 / p99 latency per call (ms), the speed-up of scann over exact, and the recall@k of the
exported ScaNN searcher (its TF op, not the Python searcher) against exact search.
"""

import argparse
import io
import time

import numpy as np


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _jpegs(count, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        buffer = io.BytesIO()
        pixels = rng.integers(0, 256, (224, 192, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buffer, format="JPEG")
        out.append(buffer.getvalue())
    return out


def _backbone(channels):
    import keras

    keras.utils.set_random_seed(0)
    x = keras.Input((None, None, 3))
    y = keras.layers.Conv2D(32, 3, strides=4, padding="same", activation="relu")(x)
    y = keras.layers.Conv2D(channels, 3, strides=4, padding="same", activation="relu")(y)
    return keras.Model(x, y, name="bench_backbone")


def _latencies(function, inputs, repeats):
    """Per-call seconds over `repeats` calls cycling through `inputs` (after one warm-up)."""
    function(inputs[0])
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        out = function(inputs[i % len(inputs)])
        [t.numpy() for t in (out.values() if isinstance(out, dict) else out)]
        times.append(time.perf_counter() - start)
    return np.array(times)


def _percentiles(seconds):
    return {"p50_ms": 1e3 * np.percentile(seconds, 50), "p99_ms": 1e3 * np.percentile(seconds, 99)}


def measure(module, queries, images, repeats):
    import tensorflow as tf

    spec = tf.TensorSpec([None, module.dim], tf.float32)
    search = tf.function(module.neighbors, input_signature=[spec])
    out = {}
    for batch in (1, 8, 64):
        q = [tf.constant(queries[i : i + batch]) for i in range(0, 64 * 8, batch)][:16]
        b = [tf.constant(images[i : i + batch]) for i in range(0, len(images) - batch + 1, batch)]
        count = max(5, repeats // batch)
        out[batch] = {
            "search": _percentiles(_latencies(search, q, count)),
            "whole": _percentiles(_latencies(module.recognize_bytes, b, max(3, count // 2))),
        }
    return out, search


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", type=int, default=397_121)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=15)
    parser.add_argument("--min_recall", type=float, default=0.99)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()

    from tfmet.descriptors import Embedder
    from tfmet.export import RecognizerModule
    from tfmet.retrieval import ScannSearcher

    rng = np.random.default_rng(0)
    database = _unit(rng.standard_normal((args.database, args.dim), dtype=np.float32))
    labels = rng.integers(0, args.database // 2, args.database)

    def views(count):
        rows = rng.integers(0, args.database, count)
        return _unit(database[rows] + 0.8 * _unit(rng.standard_normal((count, args.dim))))

    queries, held_out = views(512), views(500)
    images = _jpegs(128, 1)
    embedder = Embedder(_backbone(args.dim))
    choice, _ = ScannSearcher().build_calibrated(
        database, held_out, args.k, min_recall=args.min_recall
    )
    print(f"[serving] calibration: {choice.reason}", flush=True)
    results, found = {}, {}
    for searcher in ("exact", "scann"):
        config = choice.config if searcher == "scann" else None
        if searcher == "scann" and config is None:
            print("[serving] no ScaNN configuration beats exact search: scann = exact", flush=True)
            break
        module = RecognizerModule(
            embedder, database, labels, k=args.k, tau=25.0, searcher=searcher, scann_config=config
        )
        results[searcher], search = measure(module, queries, images, args.repeats)
        found[searcher] = search(queries)[1].numpy()
        del module, search
    report(args, choice, results, found)


def report(args, choice, results, found):
    from tfmet.retrieval import recall

    print(f"\ndatabase {args.database} x {args.dim}, k {args.k}; latency per call (ms)")
    print("searcher batch  search p50   p99     whole p50   p99")
    for searcher, rows in results.items():
        for batch, r in rows.items():
            s, w = r["search"], r["whole"]
            print(
                f"{searcher:8s} {batch:5d} {s['p50_ms']:9.2f} {s['p99_ms']:7.2f} "
                f"{w['p50_ms']:10.2f} {w['p99_ms']:7.2f}"
            )
    if "scann" in results:
        e, s = results["exact"], results["scann"]
        for batch in e:
            print(
                f"scann speed-up, batch {batch}: search p50 "
                f"{e[batch]['search']['p50_ms'] / s[batch]['search']['p50_ms']:.1f}x, "
                f"whole p50 {e[batch]['whole']['p50_ms'] / s[batch]['whole']['p50_ms']:.1f}x"
            )
        value = recall.recall_at_k(found["scann"], found["exact"], args.k)
        print(f"exported scann searcher recall@{args.k} vs exact on 512 queries: {value:.4f}")
    print(f"scann configuration: {choice.config}")


if __name__ == "__main__":
    main()
