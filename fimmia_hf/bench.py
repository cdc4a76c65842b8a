"""`fimmia-hf bench`: every stage against its naive reference loop, in one run, as ratios.

Each stage module owns its benchmark (`benchmark(...) -> dict`, the same models and samples for
both ways); this module runs them, adds the end-to-end throughput (neighbours -> embeddings ->
scores) and the peak memory at N and 4N samples, each measured in a fresh process so that one
run's memory does not hide in another's, and prints one table.
"""

from __future__ import annotations

import argparse
import importlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

STAGES = {"score": "scoring", "neighbors": "neighbors", "embed": "embeddings"}


def end_to_end(n: int, workdir: str | Path, k: int = 8) -> dict[str, float]:
    """Neighbours, text embeddings and target scores for `n` synthetic image samples; time and peak RSS."""
    import datasets

    from . import NeighborGenerator, TargetScorer, TextEmbedder, load_samples
    from .testing import build_tiny, make_synthetic_samples

    workdir = Path(workdir)
    models = {kind: build_tiny(kind, workdir / "models" / kind) for kind in ("image-text", "t5-infill", "text-encoder")}
    ds = load_samples(make_synthetic_samples(workdir / f"data-{n}", modality="image", n=n))
    datasets.disable_progress_bars()
    cache = workdir / f"cache-{n}"
    start = time.perf_counter()
    ds = NeighborGenerator(models["t5-infill"], num_neighbors=k).apply(ds, cache_dir=cache / "neighbors")
    ds = TextEmbedder(models["text-encoder"]).apply(ds, cache_dir=cache / "embed")
    ds = TargetScorer(models["image-text"]).apply(ds, cache_dir=cache / "score")
    seconds = time.perf_counter() - start
    return {
        "samples": n,
        "seconds": seconds,
        "samples_per_second": n / seconds,
        "peak_rss_mb": peak_rss_mb(),
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's VmHWM starts afresh at exec, unlike `ru_maxrss`,
    which a child inherits from the parent that forked it (so it would report the parent's peak)."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _end_to_end_in_subprocess(n: int, workdir: Path) -> dict[str, float]:
    code = f"import json; from fimmia_hf.bench import end_to_end; print(json.dumps(end_to_end({n}, {str(workdir)!r})))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"end-to-end benchmark with {n} samples failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_all(stages: list[str], *, n: int = 16, json_path: str | None = None) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for stage in stages:
        if stage == "e2e":
            with tempfile.TemporaryDirectory() as tmp:
                _end_to_end_in_subprocess(2, Path(tmp))  # builds the models once, outside the timings
                small, large = (_end_to_end_in_subprocess(size, Path(tmp)) for size in (n, 4 * n))
            results["e2e"] = {
                "samples_per_second": large["samples_per_second"],
                f"peak_rss_mb@{n}": small["peak_rss_mb"],
                f"peak_rss_mb@{4 * n}": large["peak_rss_mb"],
                "rss_ratio_4n_over_n": large["peak_rss_mb"] / small["peak_rss_mb"],
            }
        else:
            results[stage] = importlib.import_module(f"fimmia_hf.{STAGES[stage]}").benchmark()
    if json_path:  # one stage: its own figures at the top level, as `bench <stage> --json` promises
        payload = results[stages[0]] if len(stages) == 1 else results
        Path(json_path).write_text(json.dumps(payload, indent=2))
    return results


def _print_table(results: dict[str, Any]) -> None:
    print(f"\n{'benchmark':<12} {'figure':<28} {'value':>12}")
    for stage, figures in results.items():
        for key, value in figures.items():
            shown = f"{value:.3f}" if isinstance(value, float) else json.dumps(value)
            print(f"{stage:<12} {key:<28} {shown:>12}")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "stages", nargs="*", metavar="stage",
        help="which benchmarks to run (default: all): score, neighbors, embed, e2e",
    )
    parser.add_argument("--samples", type=int, default=16, help="N for the end-to-end run (memory is measured at N and 4N)")
    parser.add_argument("--json", help="also write the figures to this JSON file")


def run_bench(args: argparse.Namespace) -> int:
    unknown = sorted(set(args.stages) - {*STAGES, "e2e"})
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; choose from {', '.join([*STAGES, 'e2e'])}")
    results = run_all(args.stages or [*STAGES, "e2e"], n=args.samples, json_path=args.json)
    _print_table(results)
    return 0
