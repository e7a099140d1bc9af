"""Benchmark of how long a program that loaded TensorFlow takes to exit, with and without
`tfmet.cli.common.freeze_for_exit` (gc.collect + gc.freeze before the interpreter shuts down).

    PYTHONPATH=. .venv/bin/python tools/bench_exit.py [--rounds 5] [--no-program]

Each command runs as a whole process (start, work, exit), the two variants interleaved round by
round so that the machine's load falls on both alike; printed: min / median / max wall seconds of
each and the ratio of the medians (baseline / frozen).
- `import tensorflow` alone, exiting as Python does, against the same import followed by
  `gc.collect(); gc.freeze()`;
- a real program, `tfmet-export --kind descriptor` of the embedded EfficientNet-Lite0, as it
  runs (frozen at exit) against the same run with `freeze_for_exit` replaced by a no-op.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

IMPORT_PLAIN = "import tensorflow"
IMPORT_FROZEN = "import gc, tensorflow; gc.collect(); gc.freeze()"

# tfmet-export with freeze_for_exit disabled: the program as it was before it froze at exit.
UNFROZEN_PROGRAM = (
    "import sys\n"
    "import tfmet.cli.common\n"
    "tfmet.cli.common.freeze_for_exit = lambda: None\n"
    "from tfmet.cli.export import run\n"
    "sys.argv[0] = 'tfmet-export'\n"
    "run()\n"
)


def _wall(command):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{command[:3]} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return seconds


def compare(name, baseline, frozen, rounds):
    """Runs both commands `rounds` times, interleaved; prints and returns the median ratio."""
    times = {"baseline": [], "frozen": []}
    for round_ in range(rounds):
        for variant, command in (("baseline", baseline), ("frozen", frozen)):
            times[variant].append(_wall(command(round_)))
        print(f"  {name}: round {round_ + 1}/{rounds} done", flush=True)
    for variant, values in times.items():
        print(
            f"{name}, {variant}: min {min(values):.2f} s, median {statistics.median(values):.2f} s,"
            f" max {max(values):.2f} s"
        )
    ratio = statistics.median(times["baseline"]) / statistics.median(times["frozen"])
    saved = statistics.median(times["baseline"]) - statistics.median(times["frozen"])
    print(f"{name}: baseline / frozen = {ratio:.2f}x (median {saved:+.2f} s per run)\n")
    return ratio


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--no-program", dest="program", action="store_false", help="only `import tensorflow`"
    )
    args = parser.parse_args()
    python = sys.executable
    compare(
        "import tensorflow",
        lambda _: [python, "-c", IMPORT_PLAIN],
        lambda _: [python, "-c", IMPORT_FROZEN],
        args.rounds,
    )
    if args.program:
        with tempfile.TemporaryDirectory() as work:
            flags = ["--kind=descriptor", "--backbone=efficientnet_lite0", "--weights=imagenet"]

            def out(variant):
                return lambda round_: [f"--out={os.path.join(work, f'{variant}{round_}')}"]

            compare(
                "tfmet-export --kind descriptor (EfficientNet-Lite0)",
                lambda r: [python, "-c", UNFROZEN_PROGRAM, *flags, *out("baseline")(r)],
                lambda r: [python, "-m", "tfmet.cli.export", *flags, *out("frozen")(r)],
                args.rounds,
            )


if __name__ == "__main__":
    main()
