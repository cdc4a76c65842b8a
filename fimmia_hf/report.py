"""One evaluation report: the detector, every classic attack and the blind baselines on one test split.

A membership result means little without a model-free control on the same split: if a classifier that
never queries the model separates members from non-members, the split is shifted and the attack may be
measuring the shift. So the report always puts the blind baselines beside the detector, states the lift
over the best of them, and warns loudly when any of them reaches AUC >= 0.6. With a few dozen samples and
several baselines one of them gets there by chance now and then, so the warning also gives each flagged
baseline's p-value (Mann-Whitney), adjusted for the number of baselines, and says when none is significant.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import datasets
import numpy as np
from transformers.hf_argparser import HfArg

from . import attacks, shift
from .data import SampleError, labels_of, table_column, table_columns
from .metrics import json_safe, membership_metrics, plot_roc

SHIFT_WARNING_AUC = 0.6
CHANCE_NOTE = "No flagged baseline is significant after adjusting for their number: with this few samples it may be chance"
# warnings that head the report (and the console) instead of waiting in the notes at its end
HEADLINE_WARNINGS = ("DISTRIBUTION SHIFT", "PERMUTED-LABEL CHECK")
_SUMMARY_KEYS = ("auc", "tpr@0.1%fpr", "tpr@1%fpr", "tpr@5%fpr", "fpr@95%tpr")


def _fmt(entry: Mapping[str, Any], key: str) -> str:
    value = entry.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    low, high = entry.get(f"{key}_ci", (math.nan, math.nan))
    return f"{value:.3f} [{low:.2f}, {high:.2f}]"


def _table(rows: list[tuple[str, str, Mapping[str, Any]]]) -> str:
    head = "| method | kind | AUC [95% CI] | TPR@0.1%FPR | TPR@1%FPR | TPR@5%FPR | FPR@95%TPR |\n|---|---|---|---|---|---|---|"
    lines = [f"| {name} | {kind} | " + " | ".join(_fmt(m, k) for k in _SUMMARY_KEYS) + " |" for name, kind, m in rows]
    return "\n".join([head, *lines])


def build_report(
    test: datasets.Dataset,
    *,
    out_dir: str | Path,
    detector_scores: Mapping[str, np.ndarray] | None = None,
    train: datasets.Dataset | None = None,
    blind: Mapping[str, Mapping[str, Any]] | None = None,
    modality: str | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    title: str = "Membership inference report",
    notes: list[str] | None = None,
) -> dict[str, Any]:
    """Evaluate every method on `test` and write `report.md`, `report.json` and `roc.png` to `out_dir`.

    `detector_scores` maps names ("FiMMIA", "FiMMIA loss-only", ...) to scores aligned with `test`.
    Classic attacks come from the scorer's columns in `test`. Blind baselines are fitted on `train`
    and scored on `test` when `train` is given, else cross-validated on `test`; pass `blind` to reuse
    results already computed. Returns the report as a dict (what `report.json` holds).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if "label" not in test.column_names:
        raise SampleError("the test split needs a 'label' column (1 = member, 0 = non-member) to be evaluated")
    labels = np.asarray(labels_of(test["label"], "test split"), dtype=np.int64)
    groups = test["ds_name"] if "ds_name" in test.column_names else None

    def metrics(scores: np.ndarray) -> dict[str, Any]:
        return membership_metrics(labels, scores, n_bootstrap=n_bootstrap, seed=seed, groups=groups)

    methods: dict[str, dict[str, Any]] = {}
    scores_of: dict[str, np.ndarray] = {}
    for name, scores in (detector_scores or {}).items():
        scores_of[name] = np.asarray(scores, dtype=float)
        methods[name] = {"kind": "detector", **metrics(scores_of[name])}
    for name, scores in attacks.score_all(test).items():
        if np.isnan(scores).any():
            continue  # an attack undefined on some rows (e.g. empty answers) is left out, not imputed
        scores_of[name] = scores
        methods[name] = {"kind": "classic attack", **metrics(scores)}
    if blind is None:
        blind = (
            shift.run_blind_baselines(train, test_ds=test, modality=modality, seed=seed)
            if train is not None
            else shift.run_blind_baselines(test, modality=modality, seed=seed)
        )
    for name, entry in blind.items():
        scores_of[f"blind: {name}"] = np.asarray(entry["scores"], dtype=float)
        methods[f"blind: {name}"] = {"kind": "sanity check" if name == shift.PERMUTED else "blind baseline", **entry}

    blind_names = [n for n, m in methods.items() if m["kind"] == "blind baseline"]
    best_blind = max(blind_names, key=lambda n: methods[n]["auc"], default=None)
    for name in blind_names:  # one question (is the split shifted?) asked of every baseline: adjust for their number
        methods[name]["shift_p_value"] = min(1.0, auc_p_value(labels, scores_of[name]) * len(blind_names))
    warnings: list[str] = []
    shift_warning = _shift_warning(methods, blind_names)
    if shift_warning:
        warnings.append(shift_warning)
    sanity_warning = shift.sanity_warning(blind.get(shift.PERMUTED))
    if sanity_warning:
        warnings.append(sanity_warning)

    lift = {}
    primary = next(iter(detector_scores or {}), None)
    if primary is not None and best_blind is not None:
        lift = {
            "method": primary,
            "best_blind": best_blind,
            "auc": methods[primary]["auc"] - methods[best_blind]["auc"],
            "tpr@1%fpr": methods[primary]["tpr@1%fpr"] - methods[best_blind]["tpr@1%fpr"],
        }

    classic = sorted((n for n, m in methods.items() if m["kind"] == "classic attack"), key=lambda n: -methods[n]["auc"])
    detectors = [n for n, m in methods.items() if m["kind"] == "detector"]
    ties = tied_methods(scores_of, classic)
    shown = {group[0]: tie_name(group, test) for group in ties}  # a tied group: its first member, named for all
    classic_shown = [n for n in classic if n in shown or not any(n in g for g in ties)]
    plotted = detectors + classic_shown[:4] + sorted(blind_names, key=lambda n: -methods[n]["auc"])[:3]
    plot_roc({shown.get(n, n): (labels, scores_of[n]) for n in plotted}, out_dir / "roc.png", log="both", title=title)

    report = {
        "title": title,
        "n_members": int(labels.sum()),
        "n_nonmembers": int(len(labels) - labels.sum()),
        "methods": methods,
        "best_classic_attack": classic[0] if classic else None,
        "best_blind_baseline": best_blind,
        "lift_over_best_blind": lift,
        "ties": [{"methods": group, "name": shown[group[0]]} for group in ties],
        "blind_evaluation": shift.describe_evaluation(blind),
        # sample-size warnings are the same for every method: state each once
        "warnings": warnings + list(dict.fromkeys(w for m in methods.values() for w in m.get("warnings", []))),
        "notes": notes or [],
        "roc_plot": "roc.png",
    }
    per_row = ("scores", "labels")  # arrays as long as the data: kept in the returned dict, not in report.json
    saved = {**report, "methods": {n: {k: v for k, v in m.items() if k not in per_row} for n, m in methods.items()}}
    (out_dir / "report.json").write_text(json.dumps(json_safe(saved), indent=2, ensure_ascii=False))
    (out_dir / "report.md").write_text(_markdown(report, methods, detectors, classic, blind_names))
    return report


def tied_methods(scores_of: Mapping[str, np.ndarray], names: Sequence[str]) -> list[list[str]]:
    """Groups (of two or more, in the order of ``names``) of methods that rank every sample alike: their ROC
    curves and every metric are the same, so they are one curve and one row."""
    from scipy.stats import rankdata

    groups: dict[bytes, list[str]] = {}
    for name in names:
        groups.setdefault(rankdata(scores_of[name]).tobytes(), []).append(name)
    return [group for group in groups.values() if len(group) > 1]


def tie_name(group: Sequence[str], test: Any) -> str:
    """One name for tied methods: ``loss = zlib = min_k_*`` (a family's settings starred), with the reason when
    it is the usual one, answers of one token (where every per-token statistic is the loss)."""
    families = dict.fromkeys(re.sub(r"(_k?\d+)+$", "_*", name) for name in group)
    name = " = ".join(families)
    lengths = {len(v) for v in table_column(test, "token_logprobs") if v is not None} \
        if "token_logprobs" in table_columns(test) else set()
    return f"{name}: one-token answers" if lengths == {1} else name


def _shift_warning(methods: dict, blind_names: list[str]) -> str | None:
    """The distribution-shift warning, with each flagged baseline's interval and whether chance explains it."""
    shifted = [n for n in blind_names if methods[n]["auc"] >= SHIFT_WARNING_AUC]
    if not shifted:
        return None
    listed = ", ".join(f"{n} {methods[n]['auc']:.3f} [{methods[n]['auc_ci'][0]:.2f}, {methods[n]['auc_ci'][1]:.2f}]" for n in shifted)
    warning = (
        f"DISTRIBUTION SHIFT: {len(shifted)} blind baseline(s) reach AUC >= {SHIFT_WARNING_AUC} without querying the "
        f"model ({listed}). Members and non-members differ in ways visible without the model; membership claims "
        "from this split are not supported."
    )
    if not any(methods[n]["shift_p_value"] < 0.05 for n in shifted):
        p_values = ", ".join(f"{n} {methods[n]['shift_p_value']:.2f}" for n in shifted)
        warning += (f" {CHANCE_NOTE} (Mann-Whitney p-values, Bonferroni-adjusted over the {len(blind_names)} blind "
                    f"baselines: {p_values}); a larger split tells.")
    return warning


def auc_p_value(labels: Sequence[int], scores: Sequence[float]) -> float:
    """One-sided p-value of an AUC at least this high when the labels carry no information about the scores (a
    blind baseline's held-out scores under no shift): the Mann-Whitney U test, as AUC = U / (members x non-members).
    Ties count a half, as in the AUC; scores that are all tied give 1."""
    from scipy.stats import mannwhitneyu

    members = np.asarray(labels) == 1
    scores = np.asarray(scores, dtype=float)
    return float(mannwhitneyu(scores[members], scores[~members], alternative="greater").pvalue)


def _markdown(report: dict, methods: dict, detectors: list[str], classic: list[str], blind_names: list[str]) -> str:
    merged = {n for tie in report["ties"] for n in tie["methods"][1:]}  # a tied group is one row, its first
    named = {tie["methods"][0]: tie["name"].split(":")[0] for tie in report["ties"]}
    classic = [n for n in classic if n not in merged]
    order = detectors + classic + sorted(blind_names, key=lambda n: -methods[n]["auc"])
    order += [n for n, m in methods.items() if m["kind"] == "sanity check"]
    parts = [f"# {report['title']}", ""]
    parts += [f"> **WARNING** {w}" for w in report["warnings"] if w.startswith(HEADLINE_WARNINGS)]
    parts += [
        "",
        f"Test split: {report['n_members']} members, {report['n_nonmembers']} non-members. "
        "Metrics are exact (step ROC, no interpolation); intervals are 95 % stratified bootstrap.",
        "",
        *([report["blind_evaluation"], ""] if report.get("blind_evaluation") else []),
        _table([(named.get(n, n), methods[n]["kind"], methods[n]) for n in order]),
        "",
        *[f"Tied: {', '.join(tie['methods'])} rank every sample alike ({tie['name']}), so they share one row and "
          "one ROC curve." for tie in report["ties"]],
    ]
    lift = report["lift_over_best_blind"]
    if lift:
        parts.append(
            f"**Lift of {lift['method']} over the best blind baseline ({lift['best_blind']}):** "
            f"AUC {lift['auc']:+.3f}, TPR@1%FPR {lift['tpr@1%fpr']:+.3f}."
        )
    parts += ["", "![ROC curves, linear and log-log](roc.png)", ""]
    headline = detectors + classic[:1] + ([report["best_blind_baseline"]] if report["best_blind_baseline"] else [])
    group_names = sorted({g for n in headline for g in methods[n].get("groups", {})})
    if len(group_names) > 1:
        parts += ["## Per dataset (AUC)", "", "| ds_name | " + " | ".join(headline) + " |", "|---" * (len(headline) + 1) + "|"]
        for g in group_names:
            cells = [methods[n].get("groups", {}).get(g, {}).get("auc") for n in headline]
            parts.append(f"| {g} | " + " | ".join("n/a" if c is None else f"{c:.3f}" for c in cells) + " |")
        parts.append("")
    other = [w for w in report["warnings"] if not w.startswith(HEADLINE_WARNINGS)]
    if other:
        parts += ["## Notes and warnings", "", *[f"- {w}" for w in other], ""]
    parts += [f"- {n}" for n in report["notes"]]
    return "\n".join(parts) + "\n"


@dataclasses.dataclass
class EvaluateArguments:
    """`fimmia-hf evaluate`."""

    EXAMPLE: ClassVar[str] = ("fimmia-hf evaluate --model detector --test-base test_base --test-finetuned test_finetuned "
                              "--ablation loss-only=runs/loss_only --out report")
    out: str = HfArg(help="folder for report.md, report.json and roc.png")
    test: str | None = HfArg(
        default=None, help="scored test split (save_to_disk folder or Parquet) with a 'label' column")
    test_base: str | None = HfArg(default=None, help="paired protocol: test samples scored by the base model")
    test_finetuned: str | None = HfArg(
        default=None, help="paired protocol: the same test samples scored by the fine-tuned model")
    model: str | None = HfArg(
        default=None, help="trained detector folder or Hub id (omit to report only attacks and baselines)")
    ablation: list[str] = HfArg(default_factory=list, metadata={"metavar": "NAME=DIR"},
                                help="other detectors to report beside it, e.g. loss-only=runs/loss_only")
    train: str | None = HfArg(
        default=None, help="training split: the blind baselines are fitted on it and scored on the test split")
    train_base: str | None = HfArg(default=None, help="paired protocol: training samples scored by the base model")
    train_finetuned: str | None = HfArg(
        default=None, help="paired protocol: the same training samples scored by the fine-tuned model")
    modality: str | None = HfArg(default=None, metadata={"choices": ("image", "audio", "video", "text")},
                                 help="the samples' modality (default: from the media column)")
    n_bootstrap: int = HfArg(default=1000, help="bootstrap resamples for the confidence intervals")
    seed: int = HfArg(default=0, help="seed of the bootstrap and the blind baselines")
    title: str = HfArg(default="Membership inference report", help="title of the report")


def run_evaluate(args: EvaluateArguments) -> int:
    from .training import load_protocol, predict

    test = load_protocol(args.test, args.test_base, args.test_finetuned, "test")
    if test is None:
        raise ValueError("no test data: give --test, or --test-base and --test-finetuned")
    train = load_protocol(args.train, args.train_base, args.train_finetuned, "train")
    detectors = {"FiMMIA": args.model} if args.model else {}
    for item in args.ablation:
        name, sep, path = item.partition("=")
        if not sep:
            raise ValueError(f"--ablation expects NAME=DIR, got {item!r}")
        detectors[name] = path
    scores = {name: np.asarray(predict(path, test)["score"]) for name, path in detectors.items()}
    report = build_report(
        test, out_dir=args.out, detector_scores=scores, train=train, modality=args.modality,
        n_bootstrap=args.n_bootstrap, seed=args.seed, title=args.title,
    )
    print((Path(args.out) / "report.md").read_text())
    for warning in report["warnings"]:
        if warning.startswith(HEADLINE_WARNINGS):
            print(f"WARNING: {warning}")
    return 0
