"""Approximate search that knows its own recall: measure it, and choose a ScaNN configuration by it.

ScaNN defaults tuned on one distribution do not carry to another: on descriptors spread evenly
over the sphere (what PCA-whitening leans towards) a k-means tree searching a quarter of its
leaves found 41% of the true 50 nearest neighbours. So tfmet never trusts a configuration
blindly: `calibrate` searches a sample of queries it already has (the val queries) exactly and
approximately, and

- with no explicit configuration, tries a small family of configurations (a tree with
  brute-force scoring and the tree with AH, or AH alone for small databases; leaves searched and
  reorder depth varied at search time, so each family is built once) and keeps the cheapest
  whose recall@k reaches `min_recall` and whose search is `MIN_SAMPLE_SPEEDUP` times faster
  than exact search; if none is, it says so and keeps exact search; given the number of queries
  to come, it builds only what can make their search `REQUIRED_SPEEDUP` times faster;
- with an explicit configuration, keeps it, reports its recall and warns below `min_recall`.

recall@k = mean over queries of |approximate top k & exact top k| / k (ties at the k-th
similarity make a few exact lists ambiguous; such differences count as misses).
"""

import dataclasses
import logging
import math
import time

import numpy as np

from tfmet.retrieval.scann_build import ScannConfig, return_freed_memory

# 0.99 at k = 50 lost 0.0059 test GAP on the clustered Met-size bench (top-1 agreement 0.994).
DEFAULT_MIN_RECALL = 0.999
MAX_QUERIES = 500
LEAF_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 1.0)
REORDERS = (100, 250, 500, 1000, 2000)
TREE_FROM = 2_000  # smaller databases: AH alone (a tree has too few points per leaf)
TRAINING_SAMPLE = 50_000
PLATEAU = 0.001  # a deeper reorder gaining less recall than this ends a group's sweep
# AH groups are skipped where brute-force scoring of as many leaves fell this far short.
BRUTE_FORCE_SLACK = 0.005
# Calibrating and building must make the searches of all the queries at least this much faster
# than exact search, or exact search is kept (`search_pays`).
REQUIRED_SPEEDUP = 2.0
# A variant is kept only if it searches the sample at least this much faster than exact search:
# a Met-size knn-eval once kept one "1.0x faster" on the sample, and it then searched the test
# queries slower than exact search did (54.3 s against 47.7 s).
MIN_SAMPLE_SPEEDUP = 1.25
# The price of the tree + AH build before it is made, as a multiple of the tree + brute-force
# build just made (Met size, 397k x 512: 53.5 / 13.8 s and 62.0 / 16.1 s in two sessions).
AH_BUILD_RATIO = 3.5


def recall_at_k(approximate, exact, k=None):
    """Mean fraction of each row's exact top `k` indices found in its approximate top `k`."""
    approximate, exact = np.asarray(approximate), np.asarray(exact)
    k = exact.shape[1] if k is None else int(k)
    if approximate.shape[0] != exact.shape[0] or min(approximate.shape[1], exact.shape[1]) < k:
        raise ValueError(f"recall@{k}: shapes {approximate.shape} and {exact.shape} do not fit")
    if exact.shape[0] == 0:
        return 1.0
    a, e = np.sort(approximate[:, :k], axis=1), exact[:, :k]
    found = 0
    for row in range(e.shape[0]):  # [q, k] with k <= a few hundred: cheap
        found += np.isin(e[row], a[row], assume_unique=True).sum()
    return float(found) / (e.shape[0] * k)


def top1_agreement(approximate, exact):
    """Fraction of queries whose best approximate neighbour is the exact best."""
    return float(np.mean(np.asarray(approximate)[:, 0] == np.asarray(exact)[:, 0]))


@dataclasses.dataclass
class SearchChoice:
    """What `calibrate` decided; `to_json()` goes into results files.

    Attributes:
      backend: the backend searches use ("exact" after a fallback).
      config: the ScaNN configuration used (None for exact).
      recall, top1: measured recall@k and top-1 agreement against exact search (1.0 for exact).
      k, min_recall, queries: what was measured.
      search_s, exact_search_s: seconds to search the sample with the choice / exactly.
      reason: one line saying why.
      tried: [{config summary, recall, search_s}] of every configuration measured.
      builds: [{config summary, build_s}] of every index built (where calibration time goes).
    """

    backend: str
    config: ScannConfig | None
    recall: float
    top1: float
    k: int
    min_recall: float
    queries: int
    search_s: float
    exact_search_s: float
    reason: str
    tried: list = dataclasses.field(default_factory=list)
    builds: list = dataclasses.field(default_factory=list)

    def to_json(self):
        out = dataclasses.asdict(self)
        out["config"] = None if self.config is None else self.config.to_dict()
        return out


def _timed_search(index, queries, k):
    start = time.perf_counter()
    _, indices = index.search(queries, k)
    return indices, time.perf_counter() - start


def candidate_families(n, k):
    """[(ScannConfig built once, [[search-time variants]])]: groups by leaves searched
    (ascending), each group by reorder depth (ascending); so within a family cost grows along
    both axes and a sweep can stop at the first variant reaching the target.

    Below `TREE_FROM` rows: AH alone. From it: a spherical tree with brute-force scoring, then
    the same tree with AH. AH alone is not tried there: the tree + AH family searching all
    leaves covers it, and an AH build (anisotropic encoding of every row) is the dearest step
    of a calibration (at Met size it took longer than the tree + brute-force build and all the
    searches together). Brute-force scoring comes first because its build is the cheap one: a
    best from it that must be rebuilt at the end costs little.
    """
    sample = min(int(n), TRAINING_SAMPLE)
    reorders = [r for r in REORDERS if r >= k] or [k]
    if n < TREE_FROM:
        ah = ScannConfig(use_ah=True, reorder=max(reorders), training_sample_size=sample)
        return [(ah, [[dataclasses.replace(ah, reorder=r) for r in reorders]])]
    leaves = max(2, int(round(math.sqrt(n))))
    searched = sorted({max(1, int(math.ceil(f * leaves))) for f in LEAF_FRACTIONS})
    tree = dict(num_leaves=leaves, spherical=True, training_sample_size=sample)
    families = []
    for use_ah in (False, True):
        base = ScannConfig(
            num_leaves_to_search=leaves, use_ah=use_ah, reorder=max(reorders), **tree
        )
        groups = [
            [
                dataclasses.replace(base, num_leaves_to_search=s, reorder=r)
                for r in (reorders if use_ah else [0])
            ]
            for s in searched
        ]
        families.append((base, groups))
    return families


def search_pays(
    exact_s, sample_queries, total_queries, cost_s, approximate_s=0.0, speedup=REQUIRED_SPEEDUP
):
    """Whether an approximate search can still pay for itself: the exact search of all
    `total_queries` (projected from `exact_s` for `sample_queries`) must cost more than `speedup`
    times `cost_s` (builds still to pay for) plus the approximate search of them
    (`approximate_s` for the sample). Unknown `total_queries` (None): assumed to pay."""
    if total_queries is None:
        return True
    scale = float(total_queries) / max(int(sample_queries), 1)
    return exact_s * scale > speedup * (cost_s + approximate_s * scale)


def build_lower_bound_s(n, k, exact_s, sample_queries):
    """A lower bound on building the cheapest family of `candidate_families`: assigning each of
    the `n` rows to the tree's leaves costs as many dot products as an exact search of that many
    queries (priced at the sample's exact rate); 0 below `TREE_FROM`, where no tree is built."""
    if n < TREE_FROM:
        return 0.0
    leaves = candidate_families(n, k)[0][0].num_leaves
    return exact_s * leaves / max(int(sample_queries), 1)


def _summary(config):
    parts = [f"tree {config.num_leaves_to_search}/{config.num_leaves}"] if config.num_leaves else []
    parts.append(f"AH reorder {config.reorder}" if config.use_ah else "brute-force scoring")
    return ", ".join(parts)


def _measure(index, config, queries, exact, k):
    """(recall, top1, search seconds) of `index` searched with `config`'s search-time settings."""
    index.config = config
    indices, seconds = _timed_search(index, queries, k)
    return recall_at_k(indices, exact, k), top1_agreement(indices, exact), seconds


@dataclasses.dataclass
class _Measured:
    config: ScannConfig
    recall: float
    top1: float
    seconds: float
    family: int  # which of `candidate_families` it belongs to


class _Calibration:
    """One calibration's inputs and its record: every configuration tried, every index built."""

    def __init__(self, database, queries, exact, k, min_recall, approximate, log, total=None):
        self.database, self.queries, self.exact, self.k = database, queries, exact, k
        self.total = total
        self.min_recall, self.approximate, self.log = min_recall, approximate, log
        self.tried, self.builds = [], []
        self.brute_force = {}  # leaves searched -> recall with brute-force scoring

    def build(self, config):
        start = time.perf_counter()
        index = self.approximate(config).build(self.database)
        self.builds.append({"config": _summary(config), "build_s": time.perf_counter() - start})
        return index

    def measure(self, index, config):
        recall, top1, seconds = _measure(index, config, self.queries, self.exact, self.k)
        if config.num_leaves and not config.use_ah:
            self.brute_force[config.num_leaves_to_search] = recall
        self.tried.append(
            {"config": _summary(config), "recall": round(recall, 5), "search_s": seconds}
        )
        return recall, top1, seconds

    def sweep(self, index, family, groups, bound_s):
        """The fastest variant of one built family reaching `min_recall` (or None).

        Within a group (fixed leaves) a deeper reorder is only slower, and more leaves at the
        same reorder are only slower: a group stops at its first variant reaching the target or
        no faster than `bound_s` (exact search, then the best so far), or when a deeper reorder
        gained less than `PLATEAU` recall (the leaves searched limit it: in a Met-size run every
        reorder past 250 gained at most 0.0002), and the family stops when a group stops at its
        shallowest reorder.
        """
        best = None
        for group in groups:
            if self._hopeless(group[0]):
                continue
            previous = -1.0
            for config in group:
                recall, top1, seconds = self.measure(index, config)
                if recall >= self.min_recall and seconds < bound_s:
                    best = _Measured(config, recall, top1, seconds, family)
                    bound_s = seconds
                if recall >= self.min_recall or seconds >= bound_s or recall < previous + PLATEAU:
                    break  # reached, too slow, or the leaves searched, not the reorder, limit it
                previous = recall
            if config is group[0] and seconds >= bound_s:
                break  # reached (or too slow) at the fewest reorders: more leaves are slower
        return best

    def _hopeless(self, config):
        """Whether AH over these leaves cannot reach the target: it rescores a subset of what
        brute-force scoring of as many leaves scores, and that fell short (by more than
        `BRUTE_FORCE_SLACK`, for the other build's tree). On the sphere bench data this skipped
        groups of 7 to 315 of 630 leaves (brute force: recall 0.04 to 0.72)."""
        recall = self.brute_force.get(config.num_leaves_to_search) if config.use_ah else None
        return recall is not None and recall < self.min_recall - BRUTE_FORCE_SLACK

    def choice(self, backend, config, measured, exact_s, reason, common, warn=False):
        """Logs `reason` (as a warning with `warn`) and returns the `SearchChoice`."""
        recall, top1, seconds = measured
        (logging.warning if warn else self.log)(f"scann: {reason}")
        return SearchChoice(
            backend,
            config,
            recall,
            top1,
            search_s=seconds,
            exact_search_s=exact_s,
            reason=reason,
            tried=self.tried,
            builds=self.builds,
            **common,
        )

    def exact_choice(self, exact_index, exact_s, reason, common):
        """(SearchChoice, `exact_index`): exact search kept, `reason` + ": using exact search"."""
        reason = f"{reason}: using exact search"
        measured = (1.0, 1.0, exact_s)
        return self.choice(
            exact_index.backend, None, measured, exact_s, reason, common
        ), exact_index

    def search_families(self, exact_s):
        """(index, _Measured) of the fastest configuration reaching `min_recall` at least
        `MIN_SAMPLE_SPEEDUP` times faster than `exact_s`, or (None, None).

        One ScaNN index is alive at a time (each holds its own float32 copy of the database for
        scoring or reordering): a family's index is freed once measured, unless it holds the best
        so far and is the last family, or the last family built (when the next build cannot pay
        for itself, `search_pays`, priced at the last build's time). ScaNN's training is not
        bit-reproducible across builds, so a best rebuilt at the end is measured again, and
        swept further if the rebuild falls short.
        """
        families = candidate_families(self.database.shape[0], self.k)
        best, best_index = None, None
        needed_s = exact_s / MIN_SAMPLE_SPEEDUP  # the sample's search time a variant must beat
        for number, (base, groups) in enumerate(families):
            index = self.build(base)
            found = self.sweep(index, number, groups, needed_s if best is None else best.seconds)
            outcome = "no faster configuration reached the target"
            if found is not None:
                best, best_index = found, index
                outcome = (
                    f"{_summary(found.config)}: recall {found.recall:.4f} in {found.seconds:.3f} s"
                )
            self.log(
                f"scann: calibration family {_summary(base)} built in "
                f"{self.builds[-1]['build_s']:.1f} s; {outcome}"
            )
            del index
            if number + 1 < len(families):
                nxt = families[number + 1][0]
                price, priced_as = _build_price(self.builds[-1]["build_s"], base, nxt)
                if not search_pays(exact_s, self.queries.shape[0], self.total, price):
                    self.log(
                        f"scann: calibration stops before {_summary(nxt)}: building it (about "
                        f"{price:.1f} s, {priced_as}) would not make the search of all "
                        f"{self.total} queries {REQUIRED_SPEEDUP:g}x faster than exact search"
                    )
                    break
                best_index = None  # freed before the next family is built
                return_freed_memory()
        if best is not None and best_index is None:
            best_index, best = self.rebuild(families[best.family], best, needed_s)
        return best_index, best

    def rebuild(self, family, best, needed_s):
        """The best's family rebuilt and swept from the best variant on; (None, None) if no
        variant reaches the target faster than `needed_s` (exact search's time on the sample
        over `MIN_SAMPLE_SPEEDUP`) on the rebuilt index:
        the rebuild is measured again against exact search, not only against the target (a
        Met-size serving bench once chose a rebuilt full scan "0.8x faster than exact")."""
        base, groups = family
        index = self.build(base)
        later = [[c for c in g if _is_at_least(c, best.config)] for g in groups]
        found = self.sweep(index, best.family, [g for g in later if g], needed_s)
        outcome = f"no variant reached the target {MIN_SAMPLE_SPEEDUP:g}x faster than exact search"
        if found is not None:
            outcome = f"{_summary(found.config)}: recall {found.recall:.4f}"
        self.log(f"scann: rebuilt {_summary(base)}; {outcome}")
        return (None, None) if found is None else (index, found)


def _build_price(last_s, last, following):
    """(seconds, how priced) of building the family `following` after `last` took `last_s`."""
    if following.use_ah and not last.use_ah:
        return last_s * AH_BUILD_RATIO, f"{AH_BUILD_RATIO:g}x the last build, for AH"
    return last_s, "as the last build"


def _is_at_least(config, best):
    """Whether `config` searches at least as many leaves and reorders at least as deep."""
    return (
        config.num_leaves_to_search >= best.num_leaves_to_search and config.reorder >= best.reorder
    )


def calibrate(
    database,
    queries,
    k,
    exact,
    approximate,
    config=None,
    min_recall=DEFAULT_MIN_RECALL,
    max_queries=MAX_QUERIES,
    log=None,
    total_queries=None,
):
    """Chooses (or checks) a ScaNN configuration for `database` by its recall on `queries`.

    The builder concern of the "scann" searcher (`ScannSearcher.build_calibrated` calls it with
    its own classes), which is why the searchers are given, not imported.

    Args:
      database: [n, d] float32 (may be a memmap).
      queries: [q, d] sample queries (e.g. val); at most `max_queries` evenly spaced are used.
      k: the largest k searches will use; recall is measured at it.
      exact: an unbuilt exact `Searcher` (the ground truth, and the fallback).
      approximate: `approximate(ScannConfig)` -> an unbuilt approximate `Searcher` whose
        `config` may be replaced between searches (search-time settings).
      config: an explicit `ScannConfig` (or dict) to check instead of choosing one.
      min_recall: the recall@k to reach (above 1: unreachable, i.e. exact search).
      log: callable taking a line (default: the logging module).
      total_queries: how many queries will be searched with the choice (e.g. val + test of
        knn-eval); with it, no configuration is chosen when calibrating and building cannot pay
        for itself (`search_pays`): up front by `build_lower_bound_s`, and before each further
        build by the last build's time. None: calibrate regardless of the query count.

    Returns:
      (SearchChoice, the `Searcher` built over `database` with the choice).
    """
    log = log or logging.info
    if not (np.isfinite(min_recall) and float(min_recall) >= 0.0):
        raise ValueError(f"`min_recall` must be a number >= 0. Received: {min_recall}")
    queries = np.asarray(queries, np.float32)
    if queries.shape[0] > max_queries:
        queries = queries[np.linspace(0, queries.shape[0] - 1, max_queries).astype(np.int64)]
    k = min(int(k), database.shape[0])
    exact_index = exact.build(database)
    truth, exact_s = _timed_search(exact_index, queries, k)
    common = dict(k=k, min_recall=float(min_recall), queries=int(queries.shape[0]))
    calibration = _Calibration(
        database, queries, truth, k, min_recall, approximate, log, total_queries
    )
    lower_bound = build_lower_bound_s(database.shape[0], k, exact_s, queries.shape[0])
    if config is None and not search_pays(exact_s, queries.shape[0], total_queries, lower_bound):
        reason = (
            f"too few queries for ScaNN to pay: the exact search of all {total_queries} queries "
            f"(about {exact_s * total_queries / queries.shape[0]:.2f} s) costs less than "
            f"{REQUIRED_SPEEDUP:g}x building an index (at least {lower_bound:.2f} s)"
        )
        return calibration.exact_choice(exact_index, exact_s, reason, common)
    if config is not None:
        config = config if isinstance(config, ScannConfig) else ScannConfig(**dict(config))
        index = calibration.build(config)
        measured = calibration.measure(index, config)
        below = measured[0] < min_recall
        reason = f"explicit configuration ({_summary(config)})" + (
            f": recall@{k} {measured[0]:.4f} is BELOW min_recall {min_recall}" if below else ""
        )
        choice = calibration.choice(index.backend, config, measured, exact_s, reason, common, below)
        return choice, index
    index, best = calibration.search_families(exact_s)
    if best is None:
        reason = (
            f"no ScaNN configuration reached recall@{k} >= {min_recall} {MIN_SAMPLE_SPEEDUP:g}x "
            f"faster than exact search ({exact_s:.3f} s for {queries.shape[0]} queries)"
        )
        return calibration.exact_choice(exact_index, exact_s, reason, common)
    index.config = best.config
    reason = (
        f"chose {_summary(best.config)}: recall@{k} {best.recall:.4f} >= {min_recall}, "
        f"{exact_s / max(best.seconds, 1e-9):.1f}x faster than exact on {queries.shape[0]} queries"
    )
    measured = (best.recall, best.top1, best.seconds)
    return calibration.choice(index.backend, best.config, measured, exact_s, reason, common), index
