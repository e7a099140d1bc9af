"""Benchmark of the Met kNN evaluation at Met size: tfmet exact / ScaNN vs the reference's method.

    PYTHONPATH=.:<dir with faiss-cpu> .venv/bin/python tools/bench_knn.py [--scale 1.0] \
        [--distribution clustered|sphere] [--skip_baseline]

Synthetic Met-like descriptors (--scale 1: 397,121 x 512 database of 224,408 classes, half of
them single-image, a Pareto tail of larger classes; 2,165 val + 19,319 test queries, 5.9% / 5.2%
Met) are written as tfmet descriptor stores. Their geometry: every class belongs to one of 2,000
"genres"; an image is L2(sqrt(.5) genre + sqrt(.1) class + sqrt(.4) noise), then stretched by a
decaying spectrum and shifted (so PCA-whitening matters); queries are noisier views, other-art
distractors are new classes of known genres, non-art distractors mix a known and an unseen genre.
With --distribution sphere the descriptors have no genre structure (image = L2(sqrt(.2) class +
sqrt(.8) noise), classes uniform on the sphere): after PCA-whitening they are spread evenly over
the sphere, the hard case for a k-means tree (a tree tuned on the clustered data finds 41% of the
true top 50). Its class weight is set so that exact search is as hard as on the clustered data
(test GAP ~0.5-0.7 at Met size; with weight .3 nearly every query was answered right).

Each pipeline runs in its own process (so its peak RSS is its own), reading the stores:
- tfmet exact and tfmet scann: `tfmet.retrieval.evaluation.knn_eval` with --autotune (PCAw 512,
  the reference's 9 x 12 grid from one val search, then the test set);
- the reference's method: float32 PCAw as the reference computes it, then per grid point a new
  flat inner-product index (faiss IndexFlatIP when importable, else numpy), a search with that K
  and a Python loop per query; it is timed on a subsample of the queries (--baseline_queries)
  for every K and EXTRAPOLATED linearly to all queries and all 12 taus per K, then the test set.
tfmet scann measures its recall@max(k) against exact search on val queries and keeps the cheapest
configuration reaching the library's default min_recall (or exact search); its choice and recall
are printed.
Printed: phase timings, speed-ups against the reference's method measured in the same run, val /
test GAP of both backends and their difference, whether the reference's method gives the same
predictions as the exact backend on the subsample, and peak RSS against the descriptor bytes, also
above the RSS after importing TensorFlow + ScaNN and opening the (memory-mapped) stores.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

MET = {"images": 397_121, "classes": 224_408, "val": 2_165, "test": 19_319}
MET_FRACTION = {"val": 129 / 2165, "test": 1003 / 19319}
GENRES = 2000
# Weights of an image's genre / class / noise directions, and the noise variance of a query view.
DISTRIBUTIONS = {
    "clustered": {"genre": 0.5, "klass": 0.1, "query_noise": 0.5},
    "sphere": {"genre": 0.0, "klass": 0.2, "query_noise": 0.5},
}


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def class_sizes(num_images, num_classes, rng):
    """Half the classes single-image, the rest >= 2 with a Pareto tail; sums to num_images."""
    singles = num_classes // 2
    multi = num_classes - singles
    weights = rng.pareto(1.1, multi) + 1.0
    extra = rng.multinomial(num_images - singles - 2 * multi, weights / weights.sum())
    return np.concatenate([np.ones(singles, np.int64), 2 + extra])


def synthetic_met(scale=1.0, dim=512, seed=0, distribution="clustered", weights=None):
    """{split: (descriptors float32, labels int64)} for train / val / test.

    `weights` overrides the distribution's entry of `DISTRIBUTIONS`.
    """
    w = dict(DISTRIBUTIONS[distribution], **(weights or {}))
    rng = np.random.default_rng(seed)
    n = int(round(MET["images"] * scale))
    c = int(round(MET["classes"] * scale))
    g = max(10, int(round(GENRES * scale)))
    sizes = class_sizes(n, c, rng)
    spectrum = (np.arange(1, dim + 1) ** -0.5).astype(np.float32)
    offset = (np.abs(rng.standard_normal(dim)) * 2 * spectrum).astype(np.float32)
    ids = rng.choice(1_000_000, c, replace=False).astype(np.int64)
    owner = np.repeat(np.arange(c), sizes)
    genre_of = rng.integers(0, g, c)
    genres = _unit(rng.standard_normal((g + g // 2, dim), dtype=np.float32))
    classes = _unit(rng.standard_normal((c, dim), dtype=np.float32))

    def draw(genre, klass, noise):
        e = _unit(rng.standard_normal(genre.shape, dtype=np.float32))
        x = np.sqrt(w["genre"]) * genre + np.sqrt(w["klass"]) * klass + np.sqrt(noise) * e
        return (_unit(x) * spectrum + offset).astype(np.float32)

    train = np.empty((n, dim), np.float32)
    for s in range(0, n, 50_000):
        o = owner[s : s + 50_000]
        train[s : s + 50_000] = draw(genres[genre_of[o]], classes[o], 1 - w["genre"] - w["klass"])
    out = {"train": (train, ids[owner])}
    for split in ("val", "test"):
        count = max(20, int(round(MET[split] * min(scale, 1.0))))
        met = max(2, int(round(count * MET_FRACTION[split])))
        other = (count - met) // 2
        noart = count - met - other
        k = rng.integers(0, c, met)

        def new_classes(m):
            return _unit(rng.standard_normal((m, dim), dtype=np.float32))

        mixed = (
            0.6 * genres[rng.integers(0, g, noart)]
            + 0.8 * genres[g + rng.integers(0, g // 2, noart)]
        )
        queries = np.concatenate(
            [
                draw(genres[genre_of[k]], classes[k], w["query_noise"]),
                draw(genres[rng.integers(0, g, other)], new_classes(other), w["query_noise"]),
                draw(mixed, new_classes(noart), w["query_noise"]),
            ]
        )
        labels = np.concatenate([ids[k], -np.ones(count - met, np.int64)])
        order = rng.permutation(count)
        out[split] = (queries[order], labels[order])
    return out


def memory():
    """(current RSS, peak RSS) of this process in bytes."""
    status = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                status[name] = int(value.split()[0]) * 1024
    return status["VmRSS"], status["VmHWM"]


# ---------------------------------------------------------------------------------------------
# Children: each pipeline in its own process.


def _load(workdir):
    from tfmet.data.descriptor_store import read_store
    from tfmet.retrieval.evaluation import SplitData

    data = {}
    for split in ("train", "val", "test"):
        s = read_store(workdir, split)
        labels = np.load(os.path.join(workdir, f"{split}_labels.npy"))
        data[split] = SplitData(s.descriptors, labels, s.valid, split)
    return data


def child_tfmet(workdir, backend):
    import scann  # noqa: F401  (imports TensorFlow; counted in the RSS after imports)

    from tfmet.retrieval.evaluation import knn_eval
    from tfmet.retrieval.knn import KnnSearch

    data = _load(workdir)
    rss_after_imports, _ = memory()
    rate_before = gemm_rate(int(np.sum(data["train"].valid)), 512)
    start, cpu_start = time.perf_counter(), time.process_time()

    def log(line):  # where the memory goes: RSS and peak RSS so far at each line of the log
        rss, peak = memory()
        at = f"{time.perf_counter() - start:7.1f} s, RSS {rss / 1e9:.2f} peak {peak / 1e9:.2f} GB"
        print(f"[{at}] {line}", flush=True)

    result = knn_eval(data, dim=512, autotune=True, search=KnnSearch(backend), log=log)
    total, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    np.savez(
        os.path.join(workdir, f"predictions_{backend}.npz"),
        **{
            f"{s}_{n}": a
            for s, p in result.predictions.items()
            for n, a in zip(("pred", "conf", "labels"), p, strict=True)
        },
    )
    _, peak = memory()
    bound = gemm_bound(data, result, rate_before)
    return {
        "gemm_bound": bound,
        "k": result.k,
        "tau": result.tau,
        "val": result.val,
        "test": result.test,
        "timings_s": result.timings_s,
        "total_s": total,
        "cpu_s": cpu,
        "rss_after_imports": rss_after_imports,
        "peak_rss": peak,
        "search": result.search,
    }


def gemm_rate(n, d, repeats=3):
    """FLOP/s of the best of `repeats` float32 GEMMs of one exact-search block's shape
    (QUERY_BLOCK queries x min(n, DEFAULT_SHARD_ROWS) rows x d, what ExactSearcher multiplies,
    into one reused output buffer: a fresh output per GEMM pays its page faults)."""
    from tfmet.retrieval.searchers import DEFAULT_SHARD_ROWS, QUERY_BLOCK

    rng = np.random.default_rng(0)
    queries = rng.standard_normal((QUERY_BLOCK, d), dtype=np.float32)
    shard = rng.standard_normal((min(n, DEFAULT_SHARD_ROWS), d), dtype=np.float32)
    scores = np.empty((queries.shape[0], shard.shape[0]), np.float32)  # as ExactSearcher does
    best = np.inf
    for _ in range(repeats):
        begin = time.perf_counter()
        np.matmul(queries, shard.T, out=scores)
        best = min(best, time.perf_counter() - begin)
    return 2.0 * queries.shape[0] * shard.shape[0] * d / best


def gemm_bound(data, result, rate_before):
    """The float32 GEMM bound of knn-eval's searches, in the process that ran them.

    FLOPs = 2 q n d summed over the searches knn-eval makes (val once at max k, test once). The
    block GEMM's rate (`gemm_rate`) is measured just before the run (`rate_before`) and again
    after it; this machine's rate moves by up to 1.6x between processes and moments, so the bound
    takes the faster of the two (the stricter bound) and both are reported. The bound is the
    time those searches would take if selecting, merging and moving data were free.
    """
    n = int(result.counts["database"])
    d = int(result.dim or data["train"].descriptors.shape[1])
    rate_after = gemm_rate(n, d)
    rate = max(rate_before, rate_after)
    searched = sum(int(np.sum(data[s].valid)) for s in result.predictions)
    flops = 2.0 * searched * n * d
    return {
        "gflop_s": rate / 1e9,
        "gflop_s_before": rate_before / 1e9,
        "gflop_s_after": rate_after / 1e9,
        "flops": flops,
        "bound_s": flops / rate,
    }


def reference_pcaw(x, dim):
    """The reference's PCA-whitening arithmetic (float32, whole-matrix, eig), for timing."""
    x = np.asarray(x)
    mean = x.mean(axis=0, keepdims=True)
    centred = x - mean
    cov = centred.T @ centred
    cov = (cov + cov.T) / (2 * x.shape[0])
    eigenvalues, eigenvectors = np.linalg.eig(cov)
    order = eigenvalues.argsort()[::-1][:dim]
    projection = eigenvectors[:, order] / np.sqrt(eigenvalues[order])
    y = (x - mean) @ projection
    return y / np.linalg.norm(y, axis=1, keepdims=True)


class _NumpyFlatIP:
    """numpy stand-in for faiss.IndexFlatIP: add() copies, search() is GEMM + argpartition."""

    def __init__(self, dim):
        self.data = np.zeros((0, dim), np.float32)

    def add(self, x):
        self.data = np.array(x, np.float32)

    def search(self, queries, k):
        scores = queries @ self.data.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        sims = np.take_along_axis(scores, top, 1)
        order = np.argsort(-sims, axis=1)
        return np.take_along_axis(sims, order, 1), np.take_along_axis(top, order, 1)


def reference_method_point(index_class, database, db_labels, num_classes, queries, k, tau):
    """One grid point the reference's way: a new index, a search with k, a loop per query."""
    index = index_class(database.shape[1])
    index.add(database)
    sims, idx = index.search(queries, k)
    neighbour_labels = db_labels[idx]
    preds, confs = [], []
    for i in range(queries.shape[0]):
        present = np.unique(neighbour_labels[i])
        best = np.zeros(present.shape[0])
        for j in range(k):
            where = np.where(present == neighbour_labels[i][j])[0]
            best[where] = max(best[where][0], sims[i][j])
        scores = np.exp(tau * best)
        scores /= scores.sum() + (num_classes - present.shape[0])
        preds.append(present[scores.argmax()])
        confs.append(scores.max())
    return np.array(preds), np.array(confs)


def child_reference(workdir, num_queries):
    from tfmet.retrieval import DEFAULT_KS, DEFAULT_TAUS, PCAWhitening

    try:
        import faiss

        index_class, engine = faiss.IndexFlatIP, f"faiss {faiss.__version__} IndexFlatIP"
    except ImportError:
        index_class, engine = _NumpyFlatIP, "numpy GEMM + argpartition (faiss not importable)"
    data = _load(workdir)
    train = np.asarray(data["train"].descriptors)
    start = time.perf_counter()
    reference_pcaw(train, 512)
    pcaw_s = time.perf_counter() - start
    # The same whitened descriptors as tfmet's, so that predictions can be compared.
    whitening = PCAWhitening(512).fit(train)
    database = whitening.transform(train)
    del train
    labels = data["train"].labels
    num_classes = int(np.unique(labels).size)
    rng = np.random.default_rng(1)
    subsets = {}
    for split in ("val", "test"):
        count = data[split].labels.size
        pick = np.sort(rng.choice(count, min(num_queries, count), replace=False))
        subsets[split] = (pick, whitening.transform(np.asarray(data[split].descriptors)[pick]))
    per_k = {}
    exact = json.load(open(os.path.join(workdir, "result_exact.json")))
    chosen = None
    for k in DEFAULT_KS:
        start = time.perf_counter()
        tau = exact["tau"] if k == exact["k"] else DEFAULT_TAUS[0]
        pred, conf = reference_method_point(
            index_class, database, labels, num_classes, subsets["val"][1], k, tau
        )
        per_k[k] = time.perf_counter() - start
        if k == exact["k"]:
            chosen = (pred, conf)
    start = time.perf_counter()
    test_pred, test_conf = reference_method_point(
        index_class, database, labels, num_classes, subsets["test"][1], exact["k"], exact["tau"]
    )
    test_s = time.perf_counter() - start
    scale = {s: data[s].labels.size / subsets[s][0].size for s in subsets}
    # Extrapolation: each K's time at the full query count, the same for each of the 12 taus.
    grid_s = sum(len(DEFAULT_TAUS) * t * scale["val"] for t in per_k.values())
    exact_pred = np.load(os.path.join(workdir, "predictions_exact.npz"))
    compare = {}
    for split, (pred, conf) in (("val", chosen), ("test", (test_pred, test_conf))):
        pick = subsets[split][0]
        ours_pred, ours_conf = exact_pred[f"{split}_pred"][pick], exact_pred[f"{split}_conf"][pick]
        compare[split] = {
            "queries": int(pick.size),
            "same_predictions": float(np.mean(ours_pred == pred)),
            "max_conf_rel_diff": float(np.max(np.abs(ours_conf - conf) / np.maximum(conf, 1e-300))),
        }
    _, peak = memory()
    return {
        "engine": engine,
        "subsample_queries": num_queries,
        "measured_s": {"pcaw": pcaw_s, "val_per_k": per_k, "test": test_s},
        "extrapolated_s": {
            "pcaw": pcaw_s,
            "grid": grid_s,
            "test": test_s * scale["test"],
            "total": pcaw_s + grid_s + test_s * scale["test"],
        },
        "compare_with_exact": compare,
        "peak_rss": peak,
    }


# ---------------------------------------------------------------------------------------------


def run_child(args, mode):
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        mode,
        "--workdir",
        args.workdir,
    ]
    command += ["--baseline_queries", str(args.baseline_queries)]
    print(f"[bench] running {mode} ...", flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True)
    print(f"[bench] {mode} done in {time.perf_counter() - start:.1f}s", flush=True)
    with open(os.path.join(args.workdir, f"result_{mode}.json")) as f:
        return json.load(f)


def prepare(args):
    from tfmet.data.descriptor_store import write_store

    start = time.perf_counter()
    data = synthetic_met(args.scale, seed=args.seed, distribution=args.distribution)
    descriptor_bytes = 0
    for split, (x, labels) in data.items():
        write_store(args.workdir, split, x)
        np.save(os.path.join(args.workdir, f"{split}_labels.npy"), labels)
        descriptor_bytes += x.nbytes
    sizes = {s: int(x.shape[0]) for s, (x, _) in data.items()}
    classes = np.unique(data["train"][1], return_counts=True)[1]
    print(
        f"[bench] synthetic Met x{args.scale} ({args.distribution}): "
        f"database {sizes['train']} x 512 "
        f"({classes.size} classes, {np.mean(classes == 1):.1%} single-image, largest "
        f"{classes.max()}), val {sizes['val']}, test {sizes['test']}; "
        f"{descriptor_bytes / 1e9:.3f} GB of descriptors; {time.perf_counter() - start:.0f}s",
        flush=True,
    )
    return descriptor_bytes


def report(exact, scann, ref, descriptor_bytes):
    for name, r in (("exact", exact), ("scann", scann)):
        b = r["gemm_bound"]
        searches = sum(r["timings_s"].get(p, 0.0) for p in ("val_search", "test_search"))
        print(
            f"[bench] {name}: GEMM bound {b['bound_s']:.2f} s ({b['flops'] / 1e12:.2f} TFLOP at "
            f"{b['gflop_s']:.0f} GFLOP/s, the faster of {b['gflop_s_before']:.0f} before and "
            f"{b['gflop_s_after']:.0f} after the run, same process), knn-eval "
            f"{r['total_s']:.2f} s, ratio {r['total_s'] / b['bound_s']:.2f}; searches "
            f"{searches:.2f} s, ratio {searches / b['bound_s']:.2f}"
        )
    phases = list(exact["timings_s"])
    print("\nphase (s)            exact     scann")
    for p in phases:
        print(f"  {p:16s} {exact['timings_s'][p]:9.2f} {scann['timings_s'].get(p, 0):9.2f}")
    print(f"  {'total':16s} {exact['total_s']:9.2f} {scann['total_s']:9.2f}")
    print(f"  {'total CPU':16s} {exact['cpu_s']:9.2f} {scann['cpu_s']:9.2f}  (all threads)")
    print(
        f"  chosen (k, tau): exact {exact['k']}, {exact['tau']}; scann {scann['k']}, {scann['tau']}"
    )
    if ref:
        e = ref["extrapolated_s"]
        print(
            f"\nreference method ({ref['engine']}), EXTRAPOLATED from {ref['subsample_queries']} "
            f"queries per split: PCAw {e['pcaw']:.1f}s + grid {e['grid']:.1f}s "
            f"+ test {e['test']:.1f}s = {e['total']:.1f}s"
        )
        print(
            f"speed-up vs reference method: exact {e['total'] / exact['total_s']:.1f}x, "
            f"scann {e['total'] / scann['total_s']:.1f}x"
        )
        for split, c in ref["compare_with_exact"].items():
            print(
                f"  reference method vs exact on {c['queries']} {split} queries: same predictions "
                f"{c['same_predictions']:.2%}, max relative confidence difference "
                f"{c['max_conf_rel_diff']:.2e}"
            )
    search = scann.get("search") or {}
    if search:
        print(
            f"\nscann search: {search['backend']} {search['config']}; recall@{search['k']} "
            f"{search['recall']:.4f} (top-1 {search['top1']:.4f}) on {search['queries']} val "
            f"queries; {search['reason']}"
        )
        builds = search.get("builds", [])
        searched = sum(t["search_s"] for t in search["tried"])
        print(
            f"calibration ({scann['timings_s'].get('index_build', 0):.1f} s in index_build): "
            f"exact search of the sample {search['exact_search_s']:.1f} s, "
            + ", ".join(f"build {b['config']} {b['build_s']:.1f} s" for b in builds)
            + f", {len(search['tried'])} searches {searched:.1f} s"
        )
    print("\nGAP / GAP- / ACC      exact                      scann                      |dGAP|")
    for split in ("val", "test"):
        a, b = exact[split], scann[split]
        print(
            f"  {split:5s} {a['gap']:.4f} {a['gap_minus']:.4f} {a['acc']:.4f}    "
            f"{b['gap']:.4f} {b['gap_minus']:.4f} {b['acc']:.4f}    {abs(a['gap'] - b['gap']):.4f}"
        )
    worst = max(abs(exact[s]["gap"] - scann[s]["gap"]) for s in ("val", "test"))
    print(f"  scann within 0.002 GAP of exact on val and test: {'yes' if worst <= 0.002 else 'NO'}")
    print(f"\npeak RSS (descriptor bytes {descriptor_bytes / 1e9:.3f} GB):")
    for name, r in (("exact", exact), ("scann", scann), ("reference", ref)):
        if r:
            extra = ""
            if "rss_after_imports" in r:
                extra = f", {(r['peak_rss'] - r['rss_after_imports']) / 1e9:.2f} GB above the "
                extra += f"{r['rss_after_imports'] / 1e9:.2f} GB after imports (TensorFlow)"
            ratio = r["peak_rss"] / descriptor_bytes
            print(f"  {name:9s} {r['peak_rss'] / 1e9:.2f} GB = {ratio:.2f}x" + extra)
            if "rss_after_imports" in r:
                above = (r["peak_rss"] - r["rss_after_imports"]) / descriptor_bytes
                print(f"            above the import baseline: {above:.2f}x (target <= 1.5x)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the Met size")
    parser.add_argument("--workdir", default=None, help="where the stores go (default: temp)")
    parser.add_argument("--baseline_queries", type=int, default=512)
    parser.add_argument("--skip_baseline", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--distribution", choices=("clustered", "sphere"), default="clustered")
    parser.add_argument("--child", choices=("exact", "scann", "reference"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if args.child:
        if args.child == "reference":
            result = child_reference(args.workdir, args.baseline_queries)
        else:
            result = child_tfmet(args.workdir, args.child)
        with open(os.path.join(args.workdir, f"result_{args.child}.json"), "w") as f:
            json.dump(result, f, indent=1, default=float)
        return
    with tempfile.TemporaryDirectory(prefix="bench_knn_") as tmp:
        args.workdir = args.workdir or tmp
        os.makedirs(args.workdir, exist_ok=True)
        descriptor_bytes = prepare(args)
        exact = run_child(args, "exact")
        scann = run_child(args, "scann")
        ref = None if args.skip_baseline else run_child(args, "reference")
        report(exact, scann, ref, descriptor_bytes)
        summary = {"exact": exact, "scann": scann, "reference": ref, "bytes": descriptor_bytes}
        with open(os.path.join(args.workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1, default=float)


if __name__ == "__main__":
    main()
