"""`fimmia-hf bench [--benchmarks NAME ...]`: run the registered benchmarks, print one table, optionally write JSON."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
from pathlib import Path
from typing import Any, ClassVar

from transformers.hf_argparser import HfArg

from . import BENCHMARKS, LONG


def run_benchmarks(names: list[str], *, n_samples: int | None = None, seeds: int | None = None,
                   neighbor_kwargs: dict[str, Any] | None = None, jobs: int | None = None,
                   json_path: str | None = None) -> dict[str, dict[str, Any]]:
    """Each benchmark's figures by name; `n_samples` overrides every benchmark's own default, `seeds`,
    `neighbor_kwargs` and `jobs` those of the benchmarks that take them."""
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    given = {"n_samples": n_samples, "seeds": seeds, "neighbor_kwargs": neighbor_kwargs, "jobs": jobs}
    options = {key: value for key, value in given.items() if value is not None}
    results = {}
    for name in names:
        benchmark = _module(name).benchmark
        accepted = inspect.signature(benchmark).parameters
        results[name] = benchmark(**{key: value for key, value in options.items() if key in accepted})
    if json_path:  # one benchmark: its own figures at the top level, as `bench <name> --json` promises
        payload = results[names[0]] if len(names) == 1 else results
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return results


def _module(name: str) -> Any:
    return importlib.import_module(f"{__package__}.{name}")


def _print_table(results: dict[str, Any]) -> None:
    """Flat figures in one shared table; a benchmark with nested figures prints its own (`format_table`)."""
    flat = {name: figures for name, figures in results.items() if not hasattr(_module(name), "format_table")}
    for name in results.keys() - flat.keys():
        print(f"\n{name}\n{_module(name).format_table(results[name])}")
    if not flat:
        return
    print(f"\n{'benchmark':<12} {'figure':<28} {'value':>12}")
    for name, figures in flat.items():
        for key, value in figures.items():
            shown = f"{value:.3f}" if isinstance(value, float) else json.dumps(value)
            print(f"{name:<12} {key:<28} {shown:>12}")


@dataclasses.dataclass
class BenchArguments:
    """`fimmia-hf bench`."""

    EXAMPLE: ClassVar[str] = "fimmia-hf bench --benchmarks neighbors score --samples 64 --out bench.json"
    benchmarks: list[str] = HfArg(default_factory=list, metadata={"metavar": "NAME"},
                                  help=f"which benchmarks to run: {', '.join(BENCHMARKS)} (default: all but "
                                  f"{', '.join(LONG)})")
    samples: int | None = HfArg(default=None, help="samples per benchmark (default: each one's own; e2e measures "
                                "memory at N and 4N)")
    seeds: int | None = HfArg(default=None, help="seeds for the benchmarks that repeat over them (attack: default 3)")
    neighbor_kwargs: str | None = HfArg(default=None, help="attack: NeighborGenerator settings as JSON, e.g. "
                                        "'{\"protect_template\": true}'")
    jobs: int | None = HfArg(default=None, help="attack: processes that run the modalities and seeds side by side "
                             "(default: one per run, at most one more than the CPU cores; 1: one after the other)")
    out: str | None = HfArg(default=None, help="also write the figures to this JSON file")


def run_bench(args: BenchArguments) -> int:
    from ..training import json_object

    names = args.benchmarks or [name for name in BENCHMARKS if name not in LONG]
    neighbor_kwargs = json_object(args.neighbor_kwargs, "neighbor-kwargs") if args.neighbor_kwargs else None
    results = run_benchmarks(names, n_samples=args.samples, seeds=args.seeds, neighbor_kwargs=neighbor_kwargs,
                             jobs=args.jobs, json_path=args.out)
    _print_table(results)
    return 0
