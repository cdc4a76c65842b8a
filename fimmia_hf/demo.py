"""`fimmia-hf demo`: the whole pipeline end to end on synthetic data with tiny models, offline.

For each modality: tiny targets are first fine-tuned on a disjoint pool so that the *base* model
already knows the task format (a random-weight base would make membership trivially visible), then
SFT-LoRA on the member half gives the fine-tuned target. Neighbours, embeddings and the losses of both
targets follow; detectors (FiMMIA and its loss-only / embedding-only ablations) are trained on a
training split by sample and evaluated on the held-out samples beside every classic attack and the
blind baselines, under both protocols:
- paired: the member samples scored by the base (label 0) and the fine-tuned target (label 1);
- member / non-member: the fine-tuned target on members vs non-members.
The image detector is saved with its model card and served by `pipeline("membership-inference")`.
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

MODALITIES = ("image", "audio", "video")
TARGET_KIND = {"image": "image-text", "video": "image-text", "audio": "audio-text"}
MEDIA_ENCODER_KIND = {"image": "image-encoder", "video": "image-encoder", "audio": "audio-encoder"}
# Tiny random models have std-0.02 tied embeddings: with a frozen final norm their logits cannot move far
# enough to learn anything in a few steps, so the demo adapts every projection and trains the final norm.
TINY_LORA = {
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "lora_dropout": 0.0,
    "modules_to_save": ["model.norm"],
}
HEADS = {"FiMMIA": "fimmia", "FiMMIA loss-only": "loss_only", "FiMMIA embedding-only (blind)": "embedding_only"}


def _step(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _detectors(train: Any, test: Any, out: Path, config: dict[str, Any], epochs: int, seed: int) -> dict[str, np.ndarray]:
    """Train FiMMIA and its ablations on `train`; their scores on `test`."""
    from .training import predict, train_detector

    scores = {}
    for name, head in HEADS.items():
        model = train_detector(
            train, config={**config, "head": head}, output_dir=out / head, seed=seed,
            num_train_epochs=epochs, per_device_train_batch_size=16, logging_steps=1000, disable_tqdm=True,
        )
        scores[name] = np.asarray(predict(model, test, progress=False)["score"])
    return scores


def run_modality(modality: str, out: Path, *, n: int, pool: int, k: int, seed: int, models: dict[str, str]) -> dict[str, Any]:
    """Every stage for one modality; returns the two protocols' reports."""
    from . import ModalityEmbedder, NeighborGenerator, TargetScorer, TextEmbedder, finetune, load_samples, split_samples
    from .features import paired_dataset
    from .report import build_report
    from .testing import make_synthetic_samples

    data = out / "data" / modality
    work = out / "models" / modality
    samples = load_samples(make_synthetic_samples(data / "samples", modality=modality, n=n, seed=seed))
    pool_samples = load_samples(make_synthetic_samples(data / "pool", modality=modality, n=pool, seed=seed + 1000))
    members = samples.filter(lambda row: row["label"] == 1)

    quiet = {"logging_steps": 1000, "disable_tqdm": True, "activation_checkpointing": False, "seed": seed}
    _step(f"{modality}: teaching the base target the task format on {pool} disjoint samples")
    finetune(models[TARGET_KIND[modality]], pool_samples, output_dir=work / "base", lora=TINY_LORA, epochs=6,
             learning_rate=2e-2, merge=True, per_device_train_batch_size=8, **quiet)
    base = str(work / "base" / "merged")
    _step(f"{modality}: SFT-LoRA on the {len(members)} member samples")
    finetune(base, members, output_dir=work / "finetuned", lora=TINY_LORA, epochs=20, learning_rate=3e-2,
             per_device_train_batch_size=4, **quiet)
    finetuned = str(work / "finetuned")

    _step(f"{modality}: neighbours, embeddings and losses of {n} samples (K = {k})")
    ds = NeighborGenerator(models["t5-infill"], num_neighbors=k, seed=seed).apply(samples)
    ds = TextEmbedder(models["text-encoder"]).apply(ds)
    ds = ModalityEmbedder(models[MEDIA_ENCODER_KIND[modality]], modality=modality).apply(ds)
    base_scored = TargetScorer(base).apply(ds)
    ft_scored = TargetScorer(finetuned).apply(ds)
    base_scored.save_to_disk(str(data / "scored-base"))  # kept for `fimmia-hf train/evaluate/attribute`
    ft_scored.save_to_disk(str(data / "scored-finetuned"))

    config = {
        "modality": modality, "target_model": finetuned, "neighbor_model": models["t5-infill"],
        "embedding_model": models["text-encoder"], "media_embedding_model": models[MEDIA_ENCODER_KIND[modality]],
        "neighbor_kwargs": {"seed": seed},
    }
    protocols = {
        "member / non-member": ft_scored,
        "paired": paired_dataset(
            base_scored.filter(lambda r: r["label"] == 1).remove_columns("label"),
            ft_scored.filter(lambda r: r["label"] == 1).remove_columns("label"),
        ),
    }
    results = {}
    for protocol, table in protocols.items():
        slug = "member" if protocol.startswith("member") else "paired"
        train, test = split_samples(table, test_size=0.5, seed=seed)
        _step(f"{modality} / {protocol}: detectors on {len(train)} training rows, report on {len(test)} held-out rows")
        scores = _detectors(train, test, work / f"detector-{slug}", {**config, "protocol": slug}, epochs=20, seed=seed)
        results[protocol] = build_report(
            test, train=train, out_dir=out / "reports" / f"{modality}-{slug}", detector_scores=scores,
            modality=modality, n_bootstrap=500, seed=seed, title=f"FiMMIA demo: {modality}, {protocol} protocol",
        )
    results["_member_test"] = split_samples(ft_scored, test_size=0.5, seed=seed)[1]
    return results


def _cell(methods: dict[str, Any], name: str | None, key: str = "auc") -> str:
    if name is None:
        return "n/a"
    low, high = methods[name][f"{key}_ci"]
    return f"{methods[name][key]:.2f} [{low:.2f}, {high:.2f}]"


def _summary_rows(reports: dict[tuple[str, str], dict[str, Any]]) -> list[dict[str, str]]:
    rows = []
    for (modality, protocol), report in reports.items():
        methods, classic, blind = report["methods"], report["best_classic_attack"], report["best_blind_baseline"]
        rows.append({
            "modality": modality, "protocol": protocol,
            "FiMMIA AUC": _cell(methods, "FiMMIA"), "FiMMIA TPR@1%FPR": _cell(methods, "FiMMIA", "tpr@1%fpr"),
            "loss-only AUC": _cell(methods, "FiMMIA loss-only"),
            "embedding-only AUC": _cell(methods, "FiMMIA embedding-only (blind)"),
            "best classic attack": f"{classic} {methods[classic]['auc']:.2f}" if classic else "n/a",
            "best blind baseline": f"{blind.removeprefix('blind: ')} {methods[blind]['auc']:.2f}" if blind else "n/a",
            "shift warning": "YES" if any(w.startswith("DISTRIBUTION SHIFT") for w in report["warnings"]) else "no",
        })
    return rows


def _markdown_table(rows: list[dict[str, str]]) -> str:
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row[h] for h in head) + " |" for row in rows]
    return "\n".join(lines)


def demo(
    out_dir: str | Path = "demo_output", *, modalities: tuple[str, ...] = MODALITIES, n: int = 128, pool: int = 64,
    k: int = 8, seed: int = 0,
) -> dict[str, Any]:
    """Run the demo into `out_dir`; returns the summary (also written to `summary.md` / `summary.json`)."""
    import datasets
    from transformers import pipeline

    from .hub import render_model_card
    from .testing import build_tiny

    started = time.perf_counter()
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices from trl/peft internals
    out = Path(out_dir)
    datasets.disable_progress_bars()  # the stages' own bars stay; map's per-chunk bars would flood the log
    kinds = {"t5-infill", "text-encoder", *(TARGET_KIND[m] for m in modalities), *(MEDIA_ENCODER_KIND[m] for m in modalities)}
    _step(f"building tiny models: {', '.join(sorted(kinds))}")
    models = {kind: build_tiny(kind, out / "models" / "tiny" / kind, seed=seed) for kind in sorted(kinds)}

    reports, held_out = {}, {}
    for modality in modalities:
        results = run_modality(modality, out, n=n, pool=pool, k=k, seed=seed, models=models)
        held_out[modality] = results.pop("_member_test")
        for protocol, report in results.items():
            reports[(modality, protocol)] = report

    first = modalities[0]
    detector_dir = out / "models" / first / "detector-member" / "fimmia"
    _step(f"saving the {first} detector with its model card: {detector_dir}")
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

    rows = _summary_rows(reports)
    minutes = (time.perf_counter() - started) / 60
    table = _markdown_table(rows)
    (out / "summary.md").write_text(
        f"# fimmia-hf demo summary\n\n{n} samples per modality (half members), K = {k}, held-out half; "
        f"AUC and TPR@1%FPR with 95 % bootstrap intervals. {minutes:.1f} minutes.\n\n{table}\n"
    )
    summary = {"rows": rows, "minutes": minutes, "reports": {f"{m}-{p}": r["title"] for (m, p), r in reports.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    print("\n" + table + f"\n\nDone in {minutes:.1f} min. Reports: {out / 'reports'}; summary: {out / 'summary.md'}")
    return summary


@dataclasses.dataclass
class DemoArguments:
    """`fimmia-hf demo`."""

    EXAMPLE: ClassVar[str] = "fimmia-hf demo --modalities image --samples 64 --out demo_output"
    out: str = HfArg(default="demo_output", help="folder for data, models, reports and the summary")
    modalities: list[str] = HfArg(default_factory=lambda: list(MODALITIES), metadata={"choices": MODALITIES},
                                  help="modalities to run")
    samples: int = HfArg(default=128, help="samples per modality (half of them members)")
    pool: int = HfArg(default=64, help="disjoint samples that teach the base target the format")
    num_neighbors: int = HfArg(default=8, help="K neighbours per sample")
    seed: int = HfArg(default=0, help="seed of the data, the models and every stage")


def run_demo(args: DemoArguments) -> int:
    demo(args.out, modalities=tuple(args.modalities), n=args.samples, pool=args.pool, k=args.num_neighbors,
         seed=args.seed)
    return 0
