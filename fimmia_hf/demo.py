"""`fimmia-hf demo`: the whole pipeline end to end on synthetic data with tiny models, offline.

For each modality: the kit's pretrained-like target (`fimmia_hf.testing.build_target`: a tiny model
trained as a language model on a disjoint pool, so it answers in the task's format) is the *base*
model; SFT-LoRA on the members (48 of 128 samples; `fimmia_hf.finetune`, the product path) gives the fine-tuned
target, which memorises part of its members. Neighbours, embeddings and the losses of both targets follow;
detectors (FiMMIA, its loss-only / embedding-only ablations) are trained on a training split by sample
and evaluated on the held-out samples beside every classic attack and the blind baselines, under both
protocols:
- paired: the member samples scored by the base (label 0) and the fine-tuned target (label 1);
- member / non-member: the fine-tuned target on members vs non-members.
The image detector is saved with its model card and served by `pipeline("membership-inference")`.
The modalities run side by side, one process each (`fimmia_hf.recipe.side_by_side`).
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from transformers.hf_argparser import HfArg

from .recipe import MEMBER_FRACTION

MODALITIES = ("image", "audio", "video")
PAIRED_NOTE = ("No blind baselines and no embedding-only head: both rows of a sample share their inputs (base vs "
               "fine-tuned target), so a model that sees only the inputs is at chance by construction.")


def _step(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _dataset_verdict(test: Any, scores: np.ndarray, seed: int) -> dict[str, Any]:
    """The set-level test on the held-out split: members against non-members, and, as a check of its
    calibration, one random half of the non-members against the other (no membership: p should be large)."""
    from .audit import dataset_inference

    labels = np.asarray(test["label"])
    members, non_members = scores[labels == 1], scores[labels == 0]
    halves = np.random.default_rng(seed).permutation(len(non_members))
    half = len(halves) // 2
    return {
        "members_vs_non_members": dataset_inference(members, non_members).to_dict(),
        "non_members_vs_non_members": dataset_inference(
            non_members[halves[:half]], non_members[halves[half:]]
        ).to_dict(),
    }


def run_modality(modality: str, out: Path, *, n: int, k: int, seed: int, epochs: int | None, models: dict[str, str],
                 member_fraction: float) -> dict[str, Any]:
    """Every stage for one modality; returns the two protocols' reports and the dataset-level verdict."""
    from . import split_samples
    from .features import paired_dataset
    from .recipe import HEADS, detector_config, detector_scores, scored_tables
    from .report import build_report

    data = out / modality
    tables = scored_tables(modality, data, n=n, k=k, seed=seed, epochs=epochs, models=models,
                           member_fraction=member_fraction, progress=_step)
    base_scored, ft_scored = tables["base_scored"], tables["finetuned_scored"]
    base_scored.save_to_disk(str(data / "scored-base"))  # kept for `fimmia-hf train/evaluate/attribute/audit`
    ft_scored.save_to_disk(str(data / "scored-finetuned"))

    config = detector_config(modality, tables, models)
    protocols = {
        "member / non-member": ft_scored,
        "paired": paired_dataset(
            base_scored.filter(lambda r: r["label"] == 1).remove_columns("label"),
            ft_scored.filter(lambda r: r["label"] == 1).remove_columns("label"),
        ),
    }
    results: dict[str, Any] = {}
    for protocol, table in protocols.items():
        slug = "member" if protocol.startswith("member") else "paired"
        train, test = split_samples(table, test_size=0.5, seed=seed)
        _step(f"{modality} / {protocol}: detectors on {len(train)} training rows, report on {len(test)} held-out rows")
        heads = HEADS if slug == "member" else {name: h for name, h in HEADS.items() if h != "embedding_only"}
        scores = detector_scores(train, test, data / f"detector-{slug}", {**config, "protocol": slug}, seed=seed,
                                 heads=heads)
        paired = {} if slug == "paired" else None  # {}: no blind baselines, None: run them
        results[protocol] = build_report(
            test, train=train, out_dir=out / "reports" / f"{modality}-{slug}", detector_scores=scores,
            modality=modality, n_bootstrap=500, seed=seed, title=f"FiMMIA demo: {modality}, {protocol} protocol",
            blind=paired, notes=[PAIRED_NOTE] if slug == "paired" else None,
        )
        if slug == "member":
            results["_dataset"] = _dataset_verdict(test, scores["FiMMIA combined"], seed)
            results["_member_test"] = test
    return results


def _cell(methods: dict[str, Any], name: str | None, key: str = "auc") -> str:
    if name is None:
        return "n/a"
    low, high = methods[name][f"{key}_ci"]
    return f"{methods[name][key]:.2f} [{low:.2f}, {high:.2f}]"


def _best(methods: dict[str, Any], kind: str) -> str | None:
    """The best method of a kind by AUC; among detectors, the blind embedding-only ablation does not count."""
    names = [n for n, m in methods.items() if m["kind"] == kind and "(blind)" not in n]
    return max(names, key=lambda n: methods[n]["auc"], default=None)


def _summary_rows(reports: dict[tuple[str, str], dict[str, Any]], verdicts: dict[str, Any]) -> list[dict[str, str]]:
    rows = []
    for (modality, protocol), report in reports.items():
        methods, classic, blind = report["methods"], report["best_classic_attack"], report["best_blind_baseline"]
        detector = _best(methods, "detector")
        verdict = verdicts.get(modality, {}).get("members_vs_non_members") if protocol.startswith("member") else None
        rows.append({
            "modality": modality, "protocol": protocol,
            "best FiMMIA head": f"{detector} {_cell(methods, detector)}",
            "FiMMIA AUC": _cell(methods, "FiMMIA"),
            "FiMMIA combined TPR@1%FPR": _cell(methods, "FiMMIA combined", "tpr@1%fpr"),
            "LOSS AUC": _cell(methods, "loss"),
            "best classic attack": f"{classic} {methods[classic]['auc']:.2f}" if classic else "n/a",
            "best blind baseline": f"{blind.removeprefix('blind: ')} {methods[blind]['auc']:.2f}" if blind else "n/a",
            "dataset-level p": f"{verdict['p_value']:.1e}" if verdict else "n/a",
            "shift warning": _shift_cell(report["warnings"]),
        })
    return rows


def _shift_cell(warnings: list[str]) -> str:
    from .report import CHANCE_NOTE

    shift = next((w for w in warnings if w.startswith("DISTRIBUTION SHIFT")), None)
    return "no" if shift is None else "YES, may be chance" if CHANCE_NOTE in shift else "YES"


def _markdown_table(rows: list[dict[str, str]]) -> str:
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row[h] for h in head) + " |" for row in rows]
    return "\n".join(lines)


def demo(
    out_dir: str | Path = "demo_output", *, modalities: tuple[str, ...] = MODALITIES, n: int = 128, k: int = 8,
    epochs: int | None = None, member_fraction: float = MEMBER_FRACTION, seed: int = 0, jobs: int | None = None,
) -> dict[str, Any]:
    """Run the demo into `out_dir`; returns the summary (also written to `summary.md` / `summary.json`).

    `jobs` processes run the modalities side by side (default: one per modality where the cores allow, as
    `side_by_side` chooses; 1: one after the other)."""
    import datasets
    from transformers import pipeline

    from .hub import render_model_card
    from .recipe import component_models, side_by_side

    started = time.perf_counter()
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices from trl/peft internals
    out = Path(out_dir)
    datasets.disable_progress_bars()  # the stages' own bars stay; map's per-chunk bars would flood the log
    _step("the kit's component models: a trained T5 infiller, text and media encoders (built once, then cached)")
    models = component_models(out / "models", modalities, seed=seed)

    if jobs != 1 and len(modalities) > 1:
        _step(f"{', '.join(modalities)} side by side (their steps interleave below)")
    runs = side_by_side(run_modality, [dict(modality=m, out=out, n=n, k=k, seed=seed, epochs=epochs, models=models,
                                            member_fraction=member_fraction) for m in modalities], jobs=jobs)
    reports, held_out, verdicts = {}, {}, {}
    for modality, results in zip(modalities, runs):
        held_out[modality] = results.pop("_member_test")
        verdicts[modality] = results.pop("_dataset")
        for protocol, report in results.items():
            reports[(modality, protocol)] = report
        _print_verdict(modality, verdicts[modality])

    first = modalities[0]
    detector_dir = out / first / "detector-member" / "combined"
    _step(f"the {first} detector (FiMMIA combined) with its model card: {detector_dir}")
    from .modeling_fimmia import FiMMIAForMembershipInference

    detector = FiMMIAForMembershipInference.from_pretrained(detector_dir)
    render_model_card(detector, f"fimmia-demo-{first}", metrics=reports[(first, "member / non-member")]).save(
        detector_dir / "README.md"
    )

    _step("pipeline('membership-inference') on held-out samples")
    pipe = pipeline("membership-inference", model=str(detector_dir), device="cpu")
    examples = held_out[first].select(range(min(4, len(held_out[first]))))
    predictions = pipe([{"input": r["input"], "answer": r["answer"], first: r[first]} for r in examples])
    for row, prediction in zip(examples, predictions):
        truth = "member" if row["label"] == 1 else "non-member"
        print(f"  {row['sample_id']}  truth={truth:<10}  score={prediction['score']:.3f}  label={prediction['label']}")

    rows = _summary_rows(reports, verdicts)
    minutes = (time.perf_counter() - started) / 60
    table = _markdown_table(rows)
    (out / "summary.md").write_text(
        f"# fimmia-hf demo summary\n\n{n} samples per modality, {round(n * member_fraction)} of them members, K = {k}, "
        f"held-out half; AUC and TPR@1%FPR with 95 % bootstrap intervals. {minutes:.1f} minutes.\n\n{table}\n"
    )
    summary = {"rows": rows, "minutes": minutes, "dataset_inference": verdicts,
               "reports": {f"{m}-{p}": r["title"] for (m, p), r in reports.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    print("\n" + table + f"\n\nDone in {minutes:.1f} min. Reports: {out / 'reports'}; summary: {out / 'summary.md'}")
    return summary


def _print_verdict(modality: str, verdict: dict[str, Any]) -> None:
    real, null = verdict["members_vs_non_members"], verdict["non_members_vs_non_members"]
    print(f"  dataset level ({modality}, FiMMIA combined scores, {real['test']} test): held-out members vs "
          f"non-members p = {real['p_value']:.1e} (d = {real['effect_size']:.2f}); two halves of the non-members "
          f"p = {null['p_value']:.2f}", flush=True)


@dataclasses.dataclass
class DemoArguments:
    """`fimmia-hf demo`."""

    EXAMPLE: ClassVar[str] = "fimmia-hf demo --modalities image --samples 64 --out demo_output"
    out: str = HfArg(default="demo_output", help="folder for data, models, reports and the summary")
    modalities: list[str] = HfArg(default_factory=lambda: list(MODALITIES), metadata={"choices": MODALITIES},
                                  help="modalities to run")
    samples: int = HfArg(default=128, help="samples per modality")
    member_fraction: float = HfArg(default=MEMBER_FRACTION, help="share of the samples the target is fine-tuned on")
    epochs: int | None = HfArg(default=None, help="SFT-LoRA epochs on the members (default: the recipe's for each "
                               "modality, fimmia_hf.recipe.MEMBER_EPOCHS)")
    num_neighbors: int = HfArg(default=8, help="K neighbours per sample")
    seed: int = HfArg(default=0, help="seed of the data, the models and every stage")
    jobs: int | None = HfArg(default=None, help="processes that run the modalities side by side, sharing the "
                             "CPU cores (default: one per modality, at most one more than the cores; 1: one after "
                             "the other)")


def run_demo(args: DemoArguments) -> int:
    demo(args.out, modalities=tuple(args.modalities), n=args.samples, k=args.num_neighbors, epochs=args.epochs,
         member_fraction=args.member_fraction, seed=args.seed, jobs=args.jobs)
    return 0
