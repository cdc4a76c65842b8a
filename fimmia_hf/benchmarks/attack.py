"""`fimmia-hf bench --benchmarks attack [--seeds 3] [--out FILE]`: how well each detector finds members, over seeds.

The demo's recipe (`fimmia_hf.recipe`) per modality and seed: a pretrained-like base target, SFT-LoRA on
its members (`recipe.MEMBER_FRACTION` of the samples), every stage, then every FiMMIA head trained on one
half of the samples (split by sample) and evaluated on the other, beside every classic attack and the blind
baselines (member / non-member protocol). Figures are means and standard deviations over seeds, so a difference between two methods can
be read against its spread. The dataset-level test is run on cross-fitted scores of the combined head
(each half scored by the head trained on the other), on random draws of n members and n non-members,
and on two disjoint draws of non-members as its null. `neighbor_kwargs` (e.g. `{"protect_template": True}`)
compare neighbour settings on the same targets and splits.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

MODALITIES = ("image", "audio", "video", "text")
DATASET_SIZES = (32, 64, 128)  # samples per side for the dataset-level test
DRAWS = 20  # random draws per size
SUMMARISED = ("auc", "tpr@1%fpr")


def benchmark(
    n_samples: int = 128, *, seeds: int = 3, modalities: tuple[str, ...] = MODALITIES, k: int = 8,
    epochs: int | None = None, neighbor_kwargs: dict[str, Any] | None = None, workdir: str | Path | None = None,
    jobs: int | None = None,
) -> dict[str, Any]:
    """Every modality's figures: `{"modalities": {m: {"methods": ..., "dataset_inference": ...}}}`; the runs (one
    per modality and seed) go side by side in `jobs` processes (`fimmia_hf.recipe.side_by_side`)."""
    import datasets

    from ..recipe import MEMBER_EPOCHS, MEMBER_FRACTION, component_models, side_by_side

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory(prefix="fimmia-bench-attack-") as tmp:
        root = Path(workdir or tmp)
        models = component_models(root / "models", modalities)
        calls = [dict(modality=m, out=root / m / f"seed-{s}", n=n_samples, k=k, seed=s, epochs=epochs, models=models,
                      neighbor_kwargs=neighbor_kwargs) for m in modalities for s in range(seeds)]
        done = side_by_side(_one_run, calls, jobs=jobs)
        runs = {m: done[i * seeds:(i + 1) * seeds] for i, m in enumerate(modalities)}
    return {
        "samples": n_samples, "member_fraction": MEMBER_FRACTION, "seeds": seeds, "neighbors": k,
        "member_epochs": epochs or {m: MEMBER_EPOCHS[m] for m in modalities}, "neighbor_kwargs": neighbor_kwargs or {},
        "modalities": {m: _summarise(r) for m, r in runs.items()},
    }


def _one_run(modality: str, out: Path, *, n: int, k: int, seed: int, epochs: int | None, models: dict[str, str],
             neighbor_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    from .. import split_samples
    from ..recipe import detector_config, detector_scores, scored_tables
    from ..report import build_report
    from ..testing import MARKER_FILE

    def progress(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] seed {seed}: {message}", flush=True)

    tables = scored_tables(modality, out, n=n, k=k, seed=seed, epochs=epochs, models=models,
                           neighbor_kwargs=neighbor_kwargs, progress=progress)
    config = detector_config(modality, tables, models)
    first, second = split_samples(tables["finetuned_scored"], test_size=0.5, seed=seed)
    scores = detector_scores(first, second, out / "detectors", config, seed=seed)
    report = build_report(second, train=first, out_dir=out / "report", detector_scores=scores, modality=modality,
                          n_bootstrap=200, seed=seed)
    combined = {"FiMMIA combined": "combined"}
    swapped = detector_scores(second, first, out / "detectors-swapped", config, seed=seed, heads=combined)
    marker = json.loads((Path(tables["base"]) / MARKER_FILE).read_text(encoding="utf-8"))
    return {
        "methods": {name: {"kind": m["kind"], **{key: m[key] for key in SUMMARISED}}
                    for name, m in report["methods"].items()},
        "base_heldout_answer_loss": marker["heldout_answer_loss"],
        "dataset_inference": _dataset_inference(
            np.concatenate([scores["FiMMIA combined"], swapped["FiMMIA combined"]]),
            np.concatenate([second["label"], first["label"]]), seed=seed,
        ),
    }


def _dataset_inference(scores: np.ndarray, labels: np.ndarray, *, seed: int) -> dict[str, dict[str, list[float]]]:
    """p-values of members vs non-members (and of non-members vs non-members) at each size that fits."""
    from ..audit import dataset_inference

    rng = np.random.default_rng(seed)
    members, non_members = scores[labels == 1], scores[labels == 0]
    figures = {}
    for size in DATASET_SIZES:
        if min(len(members), len(non_members)) < size:
            continue
        real = [dataset_inference(rng.choice(members, size, replace=False),
                                  rng.choice(non_members, size, replace=False)).p_value for _ in range(DRAWS)]
        entry = {"p": real}
        if len(non_members) >= 2 * size:
            null = []
            for _ in range(DRAWS):
                drawn = rng.choice(non_members, 2 * size, replace=False)
                null.append(dataset_inference(drawn[:size], drawn[size:]).p_value)
            entry["null_p"] = null
        figures[str(size)] = entry
    return figures


def _summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    names = [name for name in runs[0]["methods"] if all(name in run["methods"] for run in runs)]
    methods = {}
    for name in names:
        methods[name] = {"kind": runs[0]["methods"][name]["kind"]}
        for key in SUMMARISED:
            values = np.array([run["methods"][name][key] for run in runs], dtype=float)
            methods[name][f"{key}_mean"] = round(float(values.mean()), 4)
            methods[name][f"{key}_std"] = round(float(values.std(ddof=1)) if len(values) > 1 else 0.0, 4)
    classic = [n for n in names if methods[n]["kind"] == "classic attack"]
    best_classic = max(classic, key=lambda n: methods[n]["auc_mean"])
    inference = {}
    for size in runs[0]["dataset_inference"]:
        entry = {}
        for key in ("p", "null_p"):
            values = np.concatenate([run["dataset_inference"][size].get(key, []) for run in runs])
            if len(values):
                entry[f"{key}_median"] = float(np.median(values))
                entry[f"{key}_below_0.05"] = round(float(np.mean(values < 0.05)), 3)
        inference[size] = entry
    loss = [run["base_heldout_answer_loss"] for run in runs]
    return {
        "methods": methods,
        "best_classic_attack": best_classic,
        "combined_minus_best_classic_auc": round(methods["FiMMIA combined"]["auc_mean"]
                                                 - methods[best_classic]["auc_mean"], 4),
        "dataset_inference": inference,
        "base_heldout_answer_loss_mean": round(float(np.mean(loss)), 4),
    }


def format_table(figures: dict[str, Any]) -> str:
    """One line per modality and method (AUC and TPR@1%FPR, mean ± std over seeds), then the dataset-level test."""
    settings = f", neighbours {json.dumps(figures['neighbor_kwargs'])}" if figures.get("neighbor_kwargs") else ""
    lines = [f"{figures['seeds']} seeds, {figures['samples']} samples per modality "
             f"({figures['member_fraction']:.0%} members), held-out half{settings}",
             f"{'modality':<8} {'method':<34} {'AUC':>13} {'TPR@1%FPR':>13}"]
    for modality, result in figures["modalities"].items():
        for name, m in result["methods"].items():
            lines.append(f"{modality:<8} {name:<34} {m['auc_mean']:>6.3f} ± {m['auc_std']:.3f}"
                         f" {m['tpr@1%fpr_mean']:>6.3f} ± {m['tpr@1%fpr_std']:.3f}")
        for size, entry in result["dataset_inference"].items():
            null = f", null {entry['null_p_below_0.05']:.2f}" if "null_p_below_0.05" in entry else ""
            lines.append(f"{modality:<8} dataset-level, n = {size:>3} per side: median p {entry['p_median']:.1e}, "
                         f"share p < 0.05: members {entry['p_below_0.05']:.2f}{null}")
        lines.append(f"{modality:<8} combined − best classic ({result['best_classic_attack']}): "
                     f"{result['combined_minus_best_classic_auc']:+.3f} AUC; base target's held-out answer loss "
                     f"{result['base_heldout_answer_loss_mean']:.2f} nats")
    return "\n".join(lines)
