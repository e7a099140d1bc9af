"""Benchmark of tfmet-collection's in-place change of a recogniser's index vs a full rebuild.

    PYTHONPATH=. .venv/bin/python tools/bench_collection.py [--scale 1.0] [--added 100]

A synthetic Met-size database (tools/bench_knn.py's clustered generator, --scale 1: 397,121 x 512
unit rows; the rows as the recogniser searches them) gets --added new rows (new exhibits drawn
the same way). Timed, in one process:
- ScaNN, full rebuild: the recogniser's in-graph searcher built over all rows
  (`tfmet.retrieval.graph_search.ScannGraphSearch`, `ScannConfig.for_size`), what tfmet-export
  pays for its index;
- ScaNN, in place: the built index's arrays read, the rows upserted into its tree and the in-graph
  searcher made from the result (`tfmet.retrieval.scann_update`), what tfmet-collection add pays;
- exact search: the rows appended (both ways the same: a concatenation).
Describing the new images with the model and writing the new SavedModel are left out: both ways
pay them alike. Recall@10 against exact search is printed before the change (the index over the
old rows), after the change in place and after the rebuild, on 500 test queries and on noisy
views of the added rows.
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_knn import synthetic_met  # noqa: E402

K = 10


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _recall(search, database, queries):
    from tfmet.retrieval.recall import recall_at_k
    from tfmet.retrieval.searchers import make_searcher

    _, exact = make_searcher("exact").build(database).search(queries, K)
    return recall_at_k(np.asarray(search(queries)[1]), exact, K)


def _timed(what, fn):
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    print(f"{what}: {seconds:.2f} s", flush=True)
    return out, seconds


def run(scale, added, seed=0):
    from tfmet.retrieval import scann_update
    from tfmet.retrieval.graph_search import ScannGraphSearch
    from tfmet.retrieval.scann_build import ScannConfig

    data = synthetic_met(scale=scale, seed=seed)
    rows = _unit(data["train"][0])
    old, new = rows[:-added], rows[-added:]  # the last rows play the new exhibits
    rng = np.random.default_rng(seed + 1)
    views = _unit(new + 0.05 * rng.standard_normal(new.shape, dtype=np.float32))
    queries = _unit(data["test"][0][:500])
    config = ScannConfig.for_size(len(rows))
    print(f"database {old.shape[0]:,} x {old.shape[1]} + {added} rows; config {config}")
    base, _ = _timed("ScaNN build over the old rows", lambda: ScannGraphSearch(old, K, config))
    before = _recall(base, old, queries)

    def in_place():
        arrays = scann_update.upsert_rows(scann_update.state_arrays(base.state), new)
        return scann_update.graph_search(arrays, K, config)

    changed, in_place_s = _timed(f"ScaNN add {added} in place", in_place)
    rebuilt, rebuild_s = _timed("ScaNN full rebuild", lambda: ScannGraphSearch(rows, K, config))
    _, append_s = _timed(f"exact add {added} (append)", lambda: np.concatenate([old, new]))
    print(f"rebuild / in place: {rebuild_s / in_place_s:.1f}x")
    print(f"recall@{K} on 500 test queries: before {before:.4f}, ", end="")
    print(f"after in place {_recall(changed, rows, queries):.4f}, ", end="")
    print(f"after rebuild {_recall(rebuilt, rows, queries):.4f}")
    print(f"recall@{K} on {added} views of the added rows: ", end="")
    print(
        f"in place {_recall(changed, rows, views):.4f}, rebuild {_recall(rebuilt, rows, views):.4f}"
    )
    return dict(in_place_s=in_place_s, rebuild_s=rebuild_s, append_s=append_s)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="1.0: Met size (397,121 rows)")
    parser.add_argument("--added", type=int, default=100, help="rows added")
    args = parser.parse_args()
    run(args.scale, args.added)


if __name__ == "__main__":
    main()
