"""Dispatch efficiency of the Ray evaluator, with simulated scoring at a fixed cost per candidate.

    python bench/dispatch.py [--cost 0.02] [--generations 3] [--actors 1,2,4,8,16]
                             [--populations 20,256] [--chunk-size N|guided] [--straggler 3]
                             [--backup both|on|off] [--example-shards 1,auto] [--batches 8]

The real `RayEvaluator` (orchestrator/evaluation/ray_eval.py) drives actors whose `evaluate`
sleeps `cost * len(Z)` seconds and returns the squared norm of each row as its loss, so the time
of a generation is the scoring time plus everything the evaluator adds: chunking, dispatch, the
round trips and the wait loop. Sleeping actors use no CPU, so 16 of them fit on 2 cores; they are
created with num_cpus=0 so Ray schedules them all. A simulated actor holds `--batches` training
batches; on an example shard (`cluster.example_shards`, each setting of `--example-shards` in
turn) it sleeps for its share of the batches and returns per-batch terms, which the evaluator
combines (common/shards.py).

Each actor count runs with backup chunks off and on (`--backup`), and, with two actors or more,
with one straggler too: the first actor (the one that takes the first chunk) scores
`--straggler` times slower. For each setting and population: one warm-up generation, then the
median of `--generations` timed ones (back to back, as in a run: a straggler still finishing a
losing backup copy starts the next generation busy), against these references:
  ideal_s       ceil(population / actors) * cost: the perfect split on full-speed actors, no
                overhead (with a straggler too: what the cluster would do without one);
  capacity_s    population * cost / (the actors' summed speed): the perfect split over the
                actors as they are (a straggler counts 1 / --straggler); with example shards
                the bound to compare with when actors outnumber candidates;
  chunk_ideal_s the evaluator's fixed chunks (on their example shards) handed in order to the
                first idle actor, without
                backups and without overhead. ideal_s / chunk_ideal_s is lost to chunk
                granularity (and the straggler), chunk_ideal_s / measured_s to dispatch overhead
                when backups are off.
efficiency = ideal_s / measured_s. Every generation checks that each candidate got its own loss.

The last line of stdout is JSON.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import RunConfig  # noqa: E402
from common.messages import EvalResult  # noqa: E402
from common.shards import BatchTerms, combine_batches, shard_range  # noqa: E402
from orchestrator.evaluation.dispatch import chunks  # noqa: E402
from orchestrator.evaluation.ray_eval import RayEvaluator, init_ray  # noqa: E402


@ray.remote
class SimActor:
    """EvalActor's remote methods that the evaluator calls, with scoring replaced by a sleep."""

    def __init__(self, cfg: dict, stats: dict | None = None, threads: int | None = None,
                 cost: float = 0.02, dim: int = 8, n_layers: int = 4, batches: int = 8) -> None:
        self.cost, self.dim, self.n_layers, self.factor = cost, dim, n_layers, 1.0
        self.batches = batches
        self.stats = stats if stats is not None else {"simulated": True}
        self.committed: dict[int, np.ndarray] = {}

    def info(self) -> dict:
        return {"n_layers": self.n_layers, "dim": self.dim, "stats": self.stats,
                "train_batches": self.batches}

    def commit(self, layer: int, z: np.ndarray) -> None:
        self.committed[layer] = np.asarray(z)

    def slow(self, factor: float) -> None:
        """Score `factor` times slower from now on (1: full speed)."""
        self.factor = factor

    def evaluate(self, layer: int, Z: np.ndarray) -> EvalResult:
        time.sleep(self.cost * self.factor * len(Z))
        return EvalResult(expected_losses(Z, self.batches), np.zeros(len(Z)))

    def evaluate_shard(self, layer: int, Z: np.ndarray, shard: tuple[int, int]) -> BatchTerms:
        first, stop = shard_range(self.batches, *shard)
        time.sleep(self.cost * self.factor * len(Z) * (stop - first) / self.batches)
        return sim_terms(Z, first, stop, self.batches)

    def pid(self) -> int:
        import os

        return os.getpid()


if __name__ != "__main__" and __name__ in sys.modules:
    # imported (e.g. by a test) from a folder Ray workers cannot import: ship SimActor by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def sim_terms(Z: np.ndarray, first: int, stop: int, batches: int) -> BatchTerms:
    """Simulated terms of batches [first, stop): batch b's loss sum is the squared norm of the
    columns b, b + batches, ... of each row; one example per batch."""
    sums = np.stack([np.einsum("ij,ij->i", Z[:, b::batches], Z[:, b::batches])
                     for b in range(first, stop)]).reshape(stop - first, len(Z))
    return BatchTerms(first, sums, np.zeros_like(sums), np.ones(stop - first, dtype=np.int64))


def expected_losses(Z: np.ndarray, batches: int = 8) -> np.ndarray:
    """The simulated loss: the mean over batches of their terms (each row's squared norm over
    the number of batches), so a misplaced result is caught exactly."""
    return combine_batches(sim_terms(Z, 0, batches, batches))[0]


def chunk_option(text: str) -> int | str:
    """--chunk-size: an integer or "guided" (cluster.chunk_size)."""
    return text if text == "guided" else int(text)


def chunk_makespan(sizes: list[int], actors: int, cost: float, straggler: float = 1.0) -> float:
    """Generation time with no overhead and no backups: chunks in index order, each to the first
    idle actor (the lowest-numbered of those idle at once); actor 0 is `straggler` times slower."""
    free = [(0.0, i) for i in range(actors)]
    for size in sizes:
        began, i = heapq.heappop(free)
        heapq.heappush(free, (began + cost * size * (straggler if i == 0 else 1.0), i))
    return max(t for t, _ in free)


def time_generations(ev: RayEvaluator, population: int, generations: int, rng,
                     batches: int = 8) -> list[float]:
    """Wall time of each timed generation after one warm-up; every loss is checked in place."""
    times = []
    for gen in range(generations + 1):
        Z = rng.standard_normal((population, ev.info.dim))
        began = time.perf_counter()
        losses = ev.evaluate(0, Z).losses
        elapsed = time.perf_counter() - began
        if not np.array_equal(losses, expected_losses(Z, batches)):
            raise AssertionError(f"misplaced losses at population {population}, generation {gen}")
        if gen:  # generation 0 warms up the actors and Ray's paths
            times.append(elapsed)
    return times


def settings(actors: int, straggler: float, backup: str) -> list[tuple[bool, bool]]:
    """(straggler, backup) pairs to measure: a straggler needs two actors or more."""
    stragglers = [False, True] if straggler > 1 and actors > 1 else [False]
    backups = {"off": [False], "on": [True], "both": [False, True]}[backup]
    return [(s, b) for s in stragglers for b in backups]


def piece_sizes(ev: RayEvaluator, n: int, batches: int) -> list[float]:
    """The work of each piece the evaluator dispatches for a population of n, in candidates
    scored on every batch, in dispatch order."""
    shards = ev.shards(n)
    return [(stop - start) * (b - a) / batches
            for start, stop in chunks(n, ev.chunk_size, ev.num_actors)
            for a, b in (shard_range(batches, i, shards) for i in range(shards))]


def measure(actors: int, populations: list[int], cost: float, generations: int,
            chunk_size: int | str | None = None, seed: int = 0, straggler: float = 3.0,
            backup: str = "both", example_shards: tuple = (1,),
            batches: int = 8) -> list[dict]:
    """One evaluator with `actors` simulated actors; one row per setting and population (a
    shard setting that gives a population the shard count of an earlier one is skipped)."""
    ev = RayEvaluator(RunConfig.from_dict({"seed": seed}), num_actors=actors, cpus_per_actor=0,
                      chunk_size=chunk_size, actor_cls=SimActor,
                      actor_args={"cost": cost, "batches": batches})
    rng = np.random.default_rng([seed, actors])
    rows = []
    try:
        for slow, backed in settings(actors, straggler, backup):
            ev.pool.settle()  # no copy of the previous setting still at work
            factor = straggler if slow else 1.0
            ray.get(ev.actors[0].slow.remote(factor))
            ev.backup_chunks = backed
            for n in populations:
                seen = set()
                for setting in example_shards:
                    ev.example_shards = setting
                    if ev.shards(n) in seen:
                        continue
                    seen.add(ev.shards(n))
                    rows.append(row(ev, n, slow, backed, cost, factor, batches,
                                    statistics.median(time_generations(ev, n, generations, rng,
                                                                       batches))))
    finally:
        ev.close()
    return rows


def row(ev: RayEvaluator, n: int, slow: bool, backed: bool, cost: float, factor: float,
        batches: int, measured: float) -> dict:
    """One setting's row: what was dispatched, the references and the measured time."""
    actors = ev.num_actors
    chunk_sizes = [stop - start for start, stop in chunks(n, ev.chunk_size, actors)]
    sizes = piece_sizes(ev, n, batches)
    ideal = math.ceil(n / actors) * cost
    return {"actors": actors, "population": n, "straggler": slow, "backup": backed,
            "chunk_size": max(chunk_sizes), "chunks": len(chunk_sizes),
            "example_shards": ev.example_shards, "shards": ev.shards(n),
            "ideal_s": round(ideal, 4),
            "capacity_s": round(n * cost / (actors - 1 + 1 / factor), 4),
            "chunk_ideal_s": round(chunk_makespan(sizes, actors, cost, factor), 4),
            "measured_s": round(measured, 4), "efficiency": round(ideal / measured, 3)}


def key(row: dict) -> str:
    """A row's name in the summary: actors x population, then -straggler, -backup, -shardsS."""
    return (f"{row['actors']}x{row['population']}" + ("-straggler" if row["straggler"] else "")
            + ("-backup" if row["backup"] else "")
            + (f"-shards{row['shards']}" if row["shards"] > 1 else ""))


def run_bench(actor_counts: list[int], populations: list[int], cost: float, generations: int,
              chunk_size: int | str | None = None, straggler: float = 3.0,
              backup: str = "both", example_shards: tuple = (1,),
              batches: int = 8) -> dict:
    rows = [r for a in actor_counts
            for r in measure(a, populations, cost, generations, chunk_size,
                             straggler=straggler, backup=backup,
                             example_shards=example_shards, batches=batches)]
    return {"cost_s": cost, "generations": generations, "chunk_size_option": chunk_size,
            "straggler_factor": straggler, "batches": batches, "results": rows,
            "efficiency": {key(r): r["efficiency"] for r in rows}}


def table(result: dict) -> str:
    head = (f"{'actors':>6} {'pop':>5} {'strag':>5} {'backup':>6} {'chunk':>5} {'shards':>6} "
            f"{'ideal_s':>8} "
            f"{'capacity':>8} {'chunk_ideal':>11} {'measured_s':>10} {'efficiency':>10}")
    lines = [f"cost {result['cost_s'] * 1000:g} ms/candidate, straggler "
             f"{result['straggler_factor']:g}x slower, median of {result['generations']} "
             f"generations after a warm-up", head]
    for r in result["results"]:
        lines.append(f"{r['actors']:>6} {r['population']:>5} {'yes' if r['straggler'] else '-':>5} "
                     f"{'on' if r['backup'] else 'off':>6} {r['chunk_size']:>5} "
                     f"{r['shards']:>6} "
                     f"{r['ideal_s']:>8.3f} {r['capacity_s']:>8.3f} {r['chunk_ideal_s']:>11.3f} "
                     f"{r['measured_s']:>10.3f} {r['efficiency']:>10.3f}")
    return "\n".join(lines)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def shard_settings(text: str) -> list[int | str]:
    """Comma-separated `cluster.example_shards` values: auto or integers."""
    return [x if x == "auto" else int(x) for x in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--cost", type=float, default=0.02,
                        help="simulated scoring seconds per candidate")
    parser.add_argument("--generations", type=int, default=3,
                        help="timed generations per setting (after one warm-up); the median counts")
    parser.add_argument("--actors", type=ints, default=[1, 2, 4, 8, 16],
                        help="comma-separated actor counts")
    parser.add_argument("--populations", type=ints, default=[20, 256],
                        help="comma-separated population sizes")
    parser.add_argument("--chunk-size", type=chunk_option, default=None,
                        help="candidates per chunk, or 'guided' (shrinking chunks); default: "
                             "the evaluator's own choice")
    parser.add_argument("--straggler", type=float, default=3.0,
                        help="how many times slower the straggler scores (1: no straggler rows)")
    parser.add_argument("--backup", choices=("both", "on", "off"), default="both",
                        help="measure with backup chunks on, off, or both")
    parser.add_argument("--example-shards", type=shard_settings, default=[1],
                        help="comma-separated cluster.example_shards settings (auto or N)")
    parser.add_argument("--batches", type=int, default=8,
                        help="training batches of a simulated actor (16-shot binary, batch 4)")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    args = parser.parse_args()
    init_ray(None, args.num_cpus)
    try:
        result = run_bench(args.actors, args.populations, args.cost, args.generations,
                           args.chunk_size, args.straggler, args.backup,
                           tuple(args.example_shards), args.batches)
    finally:
        ray.shutdown()
    print(table(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
