"""`fimmia-hf bench [--benchmarks NAME ...]`: run the registered benchmarks, print one table, optionally write JSON."""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from typing import Any, ClassVar

from transformers.hf_argparser import HfArg

from . import BENCHMARKS


def run_benchmarks(names: list[str], *, n_samples: int | None = None,
                   json_path: str | None = None) -> dict[str, dict[str, Any]]:
    """Each benchmark's figures by name; `n_samples` overrides every benchmark's own default."""
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    size = {} if n_samples is None else {"n_samples": n_samples}
    results = {name: importlib.import_module(f"{__package__}.{name}").benchmark(**size) for name in names}
    if json_path:  # one benchmark: its own figures at the top level, as `bench <name> --json` promises
        payload = results[names[0]] if len(names) == 1 else results
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return results


def _print_table(results: dict[str, Any]) -> None:
    print(f"\n{'benchmark':<12} {'figure':<28} {'value':>12}")
    for name, figures in results.items():
        for key, value in figures.items():
            shown = f"{value:.3f}" if isinstance(value, float) else json.dumps(value)
            print(f"{name:<12} {key:<28} {shown:>12}")


@dataclasses.dataclass
class BenchArguments:
    """`fimmia-hf bench`."""

    EXAMPLE: ClassVar[str] = "fimmia-hf bench --benchmarks neighbors score --samples 64 --out bench.json"
    benchmarks: list[str] = HfArg(default_factory=list, metadata={"metavar": "NAME"},
                                  help=f"which benchmarks to run (default: all): {', '.join(BENCHMARKS)}")
    samples: int | None = HfArg(default=None, help="samples per benchmark (default: each one's own; e2e measures "
                                "memory at N and 4N)")
    out: str | None = HfArg(default=None, help="also write the figures to this JSON file")


def run_bench(args: BenchArguments) -> int:
    results = run_benchmarks(args.benchmarks or list(BENCHMARKS), n_samples=args.samples, json_path=args.out)
    _print_table(results)
    return 0
