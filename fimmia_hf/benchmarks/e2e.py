"""`fimmia-hf bench e2e`: neighbours -> text embeddings -> target scores, end to end.

Throughput at 4N samples and peak memory at N and 4N, each run in a fresh process so that one
run's memory does not hide in another's; memory should stay flat, as stages stream chunks to the cache.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def end_to_end(n: int, workdir: str | Path, k: int = 8) -> dict[str, float]:
    """Neighbours, text embeddings and target scores for `n` synthetic image samples; time and peak RSS."""
    import datasets

    from .. import NeighborGenerator, TargetScorer, TextEmbedder, load_samples
    from ..testing import build_tiny, make_synthetic_samples

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


def _in_subprocess(n: int, workdir: Path) -> dict[str, float]:
    code = f"import json; from {__name__} import end_to_end; print(json.dumps(end_to_end({n}, {str(workdir)!r})))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"end-to-end benchmark with {n} samples failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def benchmark(n_samples: int = 16) -> dict[str, Any]:
    """Samples per second at 4N samples, peak memory at N and 4N, and their ratio."""
    with tempfile.TemporaryDirectory() as tmp:
        _in_subprocess(2, Path(tmp))  # builds the models once, outside the timings
        small, large = (_in_subprocess(size, Path(tmp)) for size in (n_samples, 4 * n_samples))
    return {
        "samples_per_second": large["samples_per_second"],
        f"peak_rss_mb@{n_samples}": small["peak_rss_mb"],
        f"peak_rss_mb@{4 * n_samples}": large["peak_rss_mb"],
        "rss_ratio_4n_over_n": large["peak_rss_mb"] / small["peak_rss_mb"],
    }
