"""Benchmark: spatial re-ranking (local features + RANSAC) against the global decision it refines.

    .venv/bin/python tools/bench_rerank.py --root /tmp/rerank_bench --build_demo
    .venv/bin/python tools/bench_rerank.py --root /tmp/rerank_hard --build_hard
    .venv/bin/python tools/bench_rerank.py --root /data/met --local_layer blocks.10.add --top 20

On a Met-format folder (`<root>/info/*.json`, `<root>/images/...`; `--build_demo` writes the
demo's benchmark there first, `--build_hard` the harder one, `tfmet.demo.benchmark.HARD`:
stronger viewpoint / crop / lighting changes and three times the queries), with
EfficientNet-Lite0's packaged ImageNet weights, one pass per image at long side `--max_side`:

- global: GeM (p=3) of the last feature map, L2; kNN over the database (k, tau), the
  confidence of the predicted exhibit (softmax of similarities / tau over the top k);
- local: the `--num_local` positions of `--local_layer`'s feature map with the largest norm,
  L2-normalised, stored as float16 with their (x, y) as fractions of the long side;
- verified: for each query, the database images of the predicted exhibit among its top `--top`
  global neighbours are verified (`tfmet.retrieval.spatial.inliers`: mutual nearest
  neighbours + RANSAC affine); `verified_confidence` folds the best inlier count in, with
  (weight, saturation) chosen on val GAP.

Both decisions come from the same pass and the same run; the table gives test GAP / GAP- / ACC
of each, the inlier counts of exhibit photos vs distractors, the verification time per
candidate pair and the storage per image. This is the feasibility measurement of issue 24: the
extraction, knn-eval and export wiring build on `tfmet.retrieval.spatial`.
"""

import argparse
import json
import os
import time

import numpy as np

K_TAUS = ((3, 0.05), (5, 0.1))
WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
SATURATIONS = (4, 8, 12, 16, 24, 32)


def _arguments():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="Met-format folder (info/, images/).")
    parser.add_argument("--build_demo", action="store_true", help="Write the demo benchmark.")
    parser.add_argument(
        "--build_hard", action="store_true", help="Write the harder benchmark (benchmark.HARD)."
    )
    parser.add_argument("--local_layer", default="blocks.10.add", help="Stride-16 layer.")
    parser.add_argument("--num_local", type=int, default=200, help="Local features per image.")
    parser.add_argument("--max_side", type=int, default=448, help="Long side of each pass.")
    parser.add_argument("--top", type=int, default=10, help="Global candidates verified (M).")
    parser.add_argument("--thresholds", default="0.02,0.04,0.08", help="RANSAC residuals.")
    return parser.parse_args()


class Features:
    """Global descriptor and local features of images, from one backbone pass each."""

    def __init__(self, root, local_layer, num_local, max_side):
        import keras

        from tfmet import backbones

        model = backbones.get("efficientnet_lite0", weights="imagenet")
        self.preprocess = backbones.preprocessing("efficientnet_lite0")
        self.model = keras.Model(model.input, [model.get_layer(local_layer).output, model.output])
        self.root, self.num_local, self.max_side = root, num_local, max_side

    def __call__(self, path):
        from PIL import Image

        from tfmet.retrieval.spatial import LocalFeatures

        with Image.open(os.path.join(self.root, "images", path)) as opened:
            image = opened.convert("RGB")
        scale = self.max_side / max(image.size)
        if scale < 1:
            size = (round(image.width * scale), round(image.height * scale))
            image = image.resize(size, Image.BILINEAR)
        x = self.preprocess(np.asarray(image, np.float32)[None])
        local, last = (t.numpy()[0] for t in self.model(x))
        descriptor = np.mean(np.maximum(last, 1e-6) ** 3, axis=(0, 1)) ** (1 / 3)
        descriptor /= np.linalg.norm(descriptor)
        h, w, c = local.shape
        flat = local.reshape(-1, c)
        norms = np.linalg.norm(flat, axis=1)
        keep = np.argsort(-norms, kind="stable")[: self.num_local]
        ys, xs = np.divmod(keep, w)
        long_side = max(image.size)
        points = np.stack(
            [(xs + 0.5) * image.width / w / long_side, (ys + 0.5) * image.height / h / long_side],
            axis=1,
        )
        rows = (flat[keep] / np.maximum(norms[keep, None], 1e-12)).astype(np.float16)
        return descriptor, LocalFeatures(points.astype(np.float32), rows, norms[keep])


def _split(features, entries, key):
    computed = [features(entry["path"]) for entry in entries]
    labels = np.array([entry.get(key, -1) for entry in entries])
    return np.stack([c[0] for c in computed]), [c[1] for c in computed], labels


def _knn(queries, database, labels, k, tau, top):
    similarities = queries @ database.T
    order = np.argsort(-similarities, axis=1, kind="stable")
    predictions, confidences = [], []
    for i in range(len(queries)):
        neighbours = order[i, :k]
        weights = np.exp(similarities[i, neighbours] / tau)
        scores = {}
        for j, weight in zip(neighbours, weights, strict=True):
            scores[labels[j]] = scores.get(labels[j], 0.0) + weight
        best = max(scores, key=scores.get)
        predictions.append(best)
        confidences.append(scores[best] / weights.sum())
    return np.array(predictions), np.array(confidences), order[:, :top]


def _inliers(spatial, queries, database, labels, predictions, candidates, threshold):
    counts, pairs = [], 0
    for query, predicted, neighbours in zip(queries, predictions, candidates, strict=True):
        best = 0
        for j in neighbours:
            if labels[j] == predicted:
                best = max(best, spatial.inliers(query, database[j], threshold=threshold))
                pairs += 1
        counts.append(best)
    return np.array(counts), pairs


def main():
    args = _arguments()
    from tfmet.metrics import recognition
    from tfmet.retrieval import spatial

    if args.build_demo and args.build_hard:
        raise SystemExit("tools/bench_rerank.py: --build_demo and --build_hard exclude each other")
    if args.build_demo or args.build_hard:
        from tfmet.demo import benchmark

        config = benchmark.HARD if args.build_hard else benchmark.BenchmarkConfig()
        benchmark.build_benchmark(args.root, config, progress=False)
    info = os.path.join(args.root, "info")

    def read(name):
        with open(os.path.join(info, name), encoding="utf-8") as f:
            return json.load(f)

    features = Features(args.root, args.local_layer, args.num_local, args.max_side)
    start = time.perf_counter()
    database, database_local, labels = _split(features, read("MET_database.json"), "id")
    splits = {
        "val": _split(features, read("valset.json"), "MET_id"),
        "test": _split(features, read("testset.json"), "MET_id"),
    }
    print(f"features of {len(database) + sum(len(s[0]) for s in splits.values())} images in "
          f"{time.perf_counter() - start:.1f} s")  # fmt: skip
    local = database_local[0]
    per_image = args.num_local * (local.descriptors.shape[1] * 2 + 2 * 4 + 4)
    print(f"local features: {args.num_local} x {local.descriptors.shape[1]}-d float16 + points "
          f"+ scores = {per_image / 1024:.1f} KiB per image (global: "
          f"{database.shape[1] * 4 / 1024:.1f} KiB float32)")  # fmt: skip
    print(
        "k tau threshold | test GAP global -> verified | GAP- | ACC | median inliers "
        "exhibit / distractor | ms per pair | val-chosen weight, saturation"
    )
    for k, tau in K_TAUS:
        knn = {
            name: _knn(queries, database, labels, k, tau, args.top)
            for name, (queries, _, _) in splits.items()
        }
        for threshold in (float(t) for t in args.thresholds.split(",")):
            start = time.perf_counter()
            counts, pairs = {}, 0
            for name, (_, queries_local, _) in splits.items():
                predictions, _, candidates = knn[name]
                counts[name], n = _inliers(
                    spatial, queries_local, database_local, labels, predictions, candidates,
                    threshold,
                )  # fmt: skip
                pairs += n
            per_pair = (time.perf_counter() - start) / max(pairs, 1) * 1e3
            predictions, confidences, _ = knn["val"]
            val_labels = splits["val"][2]
            chosen = max(
                ((w, s) for w in WEIGHTS for s in SATURATIONS),
                key=lambda ws: recognition.gap(
                    predictions,
                    spatial.verified_confidence(confidences, counts["val"], *ws),
                    val_labels,
                ),
            )
            predictions, confidences, _ = knn["test"]
            test_labels = splits["test"][2]
            verified = spatial.verified_confidence(confidences, counts["test"], *chosen)
            exhibit = test_labels >= 0
            print(
                f"{k} {tau} {threshold} | "
                f"{recognition.gap(predictions, confidences, test_labels):.4f} -> "
                f"{recognition.gap(predictions, verified, test_labels):.4f} | "
                f"{recognition.gap_minus(predictions, confidences, test_labels):.4f} -> "
                f"{recognition.gap_minus(predictions, verified, test_labels):.4f} | "
                f"{recognition.accuracy(predictions, test_labels):.4f} | "
                f"{np.median(counts['test'][exhibit]):.0f} / "
                f"{np.median(counts['test'][~exhibit]):.0f} | {per_pair:.1f} | {chosen}"
            )


if __name__ == "__main__":
    main()
