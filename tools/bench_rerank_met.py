"""Benchmark: the memory and time of spatial re-ranking on a Met-size, memory-mapped store.

    .venv/bin/python tools/bench_rerank_met.py --source /tmp/hard_desc --work /tmp/met_local

Writes a synthetic database of `--count` images (397,121: the Met's database) of local features
in the layout of `tfmet.data.descriptor_store` (`train_local_*.npy`, float16 descriptors and
points), tiled from the real local features of `--source` (a tfmet-extract --local_features
output; its train rows, cut to `--num` features and the first `--dim` dimensions, renormalised:
smaller than the extraction's 200 x 112 so that 397k images fit the disk), then in a fresh
process verifies real queries of `--source`'s test split against `--top` candidates each (M =
20 and 100; random database rows, all counted as the predicted exhibit's: the worst case, every
candidate verified), reading the store memory-mapped as tfmet-knn-eval and the recogniser
client do. Prints the store size, wall time per query and per pair (and the CPU time per pair:
on a shared machine the wall time mostly measures the other jobs), and the memory.
"""

import argparse
import mmap
import os
import resource
import subprocess
import sys
import time

import numpy as np

MET_DATABASE = 397_121


def _arguments():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, help="tfmet-extract output with local features.")
    parser.add_argument("--work", required=True, help="Where the synthetic store goes.")
    parser.add_argument("--count", type=int, default=MET_DATABASE, help="Database images.")
    parser.add_argument("--num", type=int, default=100, help="Local features per image.")
    parser.add_argument("--dim", type=int, default=64, help="Local feature dimension.")
    parser.add_argument("--top", default="20,100", help="Candidates verified per query (M).")
    parser.add_argument("--queries", type=int, default=30, help="Queries timed per M.")
    parser.add_argument(
        "--random_access",
        action="store_true",
        help="madvise(MADV_RANDOM) the memory-mapped store: no readahead around each row read.",
    )
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def _cut(store, row, num, dim):
    points, descriptors, scores = store.image(row)
    descriptors = descriptors[:num, :dim]
    descriptors = descriptors / np.maximum(
        np.linalg.norm(descriptors, axis=1, keepdims=True), 1e-12
    )
    return points[:num], descriptors, scores[:num]


def _build(args):
    from tfmet.data.descriptor_store import read_local, write_local_rows

    source = read_local(args.source, "train")
    rows = [_cut(source, i, args.num, args.dim) for i in range(len(source.counts))]
    block = 8192

    def blocks():
        for start in range(0, args.count, block):
            n = min(block, args.count - start)
            picks = [rows[(start + i) % len(rows)] for i in range(n)]
            counts = np.array([len(p[0]) for p in picks], np.int16)
            pad = lambda a, width: np.pad(a, [(0, args.num - len(a))] + [(0, 0)] * (a.ndim - 1))  # noqa: E731
            yield (
                start,
                {
                    "points": np.stack([pad(p[0], 2) for p in picks]),
                    "descriptors": np.stack([pad(p[1], args.dim) for p in picks]),
                    "scores": np.stack([pad(p[2], 1) for p in picks]),
                    "counts": counts,
                },
            )

    os.makedirs(args.work, exist_ok=True)
    start = time.perf_counter()
    write_local_rows(args.work, "train", args.count, args.num, args.dim, blocks())
    return time.perf_counter() - start


def _status_mib(field):
    """A /proc/self/status memory field in MiB (Linux), else the peak RSS from getrusage."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _memory():
    """Peak RSS (VmHWM: reset by exec, unlike ru_maxrss, which a child inherits from the
    process that forked it), and the current RSS split into anonymous memory and mapped file
    pages (the store's pages: page cache the kernel reclaims under pressure)."""
    peak, anon, mapped = (_status_mib(f) for f in ("VmHWM", "RssAnon", "RssFile"))
    return f"peak RSS {peak:.0f} MiB (now {anon:.0f} MiB anonymous + {mapped:.0f} MiB file pages)"


def _measure(args):
    from tfmet.data.descriptor_store import local_path, read_local
    from tfmet.retrieval import spatial

    arrays = {
        name: np.load(local_path(args.work, "train", name), mmap_mode="r")
        for name in ("points", "descriptors", "scores", "counts")
    }
    if args.random_access:
        for array in arrays.values():
            array._mmap.madvise(mmap.MADV_RANDOM)
    queries = read_local(args.source, "test")
    rng = np.random.default_rng(0)
    print(f"before verifying: {_memory()}")
    for top in (int(t) for t in args.top.split(",")):
        seconds, cpu, pairs, found = 0.0, 0.0, 0, []
        for q in range(args.queries):
            query = spatial.LocalFeatures(
                *_cut(queries, q % len(queries.counts), args.num, args.dim)
            )
            start, start_cpu = time.perf_counter(), time.process_time()
            for row in rng.choice(args.count, size=top, replace=False):
                n = int(arrays["counts"][row])
                candidate = spatial.LocalFeatures(
                    np.asarray(arrays["points"][row, :n], np.float32),
                    np.asarray(arrays["descriptors"][row, :n], np.float32),
                    np.asarray(arrays["scores"][row, :n], np.float32),
                )
                found.append(spatial.inliers(query, candidate))
            seconds += time.perf_counter() - start
            cpu += time.process_time() - start_cpu
            pairs += top
        print(
            f"M={top}: {1e3 * seconds / args.queries:.1f} ms per query, "
            f"{1e3 * seconds / pairs:.2f} ms per pair (CPU {1e3 * cpu / pairs:.2f} ms; "
            f"{pairs} pairs, mean inliers {np.mean(found):.1f}); {_memory()}"
        )


def main():
    args = _arguments()
    if args.measure:
        _measure(args)
        return
    counts = os.path.join(args.work, "train_local_counts.npy")
    if os.path.isfile(counts) and len(np.load(counts, mmap_mode="r")) == args.count:
        seconds = 0.0  # written by an earlier run: reused
    else:
        seconds = _build(args)
    size = sum(
        os.path.getsize(os.path.join(args.work, f))
        for f in os.listdir(args.work)
        if f.endswith(".npy")
    )
    print(
        f"store: {args.count} images x {args.num} x {args.dim}: {size / 2**30:.2f} GiB "
        f"({size / args.count / 1e3:.1f} kB per image), written in {seconds:.0f} s"
    )
    subprocess.run([sys.executable, *sys.argv, "--measure"], check=True)


if __name__ == "__main__":
    main()
