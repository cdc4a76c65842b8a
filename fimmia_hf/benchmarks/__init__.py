"""Benchmarks: each stage against its naive reference loop, and the pipeline end to end.

Each benchmark is one module of this package, named as `fimmia-hf bench <name>` calls it, with
`benchmark(n_samples=<its default>, **options) -> dict` returning plain-number figures (the same models
and samples both ways, so ratios compare like with like). A new benchmark is one more module here and
its name in `BENCHMARKS`; `runner` runs them, prints one table and writes the JSON.
"""

BENCHMARKS = ("score", "neighbors", "embed", "e2e", "attack")  # in the order `fimmia-hf bench` runs them
LONG = ("attack",)  # run only when named: the attack-quality benchmark trains targets (~30 minutes on 2 CPU cores)
