"""The demo: a small Met-format benchmark from real photos, and an end-to-end run on it.

`tfmet.demo.benchmark.build_benchmark` writes the benchmark (exhibit photos as the database,
simulated visitor photos and distractors as queries); `tfmet.demo.run` extracts descriptors,
tunes the kNN classifier on val, scores test and reports (console, TensorBoard, a PNG of
queries with their top matches). `tfmet-demo` is the command; see docs/demo.md.
"""
