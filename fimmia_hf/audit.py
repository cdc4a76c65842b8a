"""Dataset-level membership inference: was the target trained on this *set* of samples?

A contamination audit asks about a set (a benchmark), not a sample. Sample-level attacks may sit near chance,
yet on a set the target was trained on their scores still shift on average, and a one-sided test of the suspect
set's scores against those of a reference set of known non-members from the same distribution detects that
shift (Maini et al. 2024, "LLM Dataset Inference": a learned combination of attack scores, aggregated by a t-test
between suspect and validation sets). :func:`dataset_inference` is that test. Its p-value is calibrated when both
sets come from one distribution; a small one says the suspect set scores higher, which membership explains, but
so does any difference between the two sets. So ``fimmia-hf audit`` also runs the blind baselines (classifiers
that never query the model) between the two sets and says when a shift could explain the result.

The scores come from a trained detector (any head; "FiMMIA combined" reads the classic attacks too) or from one
classic attack (``--score loss``). Tables are scored tables (the stages' output, as ``fimmia-hf evaluate --test``
takes); with a detector, raw sample tables are scored through ``pipeline("membership-inference")`` with the
component models recorded in the detector (convenient for small sets; for large ones run the stages first:
they are cached and resume).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from transformers.hf_argparser import HfArg

TESTS = ("welch", "mann-whitney")
ALTERNATIVES = ("greater", "less", "two-sided")


@dataclasses.dataclass(frozen=True)
class DatasetInferenceResult:
    """Outcome of :func:`dataset_inference`.

    p_value: of the one-sided (by default) test that suspect scores exceed reference scores.
    effect_size: Cohen's d, (mean suspect − mean reference) / pooled standard deviation.
    auc: P(suspect score > reference score), ties counted half: how separable the sets are sample by sample.
    test: ``"welch"`` (Welch's t-test, unequal variances) or ``"mann-whitney"`` (rank test).
    """

    p_value: float
    effect_size: float
    n_suspect: int
    n_reference: int
    test: str
    alternative: str
    statistic: float
    auc: float
    mean_suspect: float
    mean_reference: float

    def significant(self, alpha: float = 0.05) -> bool:
        return self.p_value < alpha

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _finite_scores(values: Any, name: str) -> np.ndarray:
    scores = np.asarray(values, dtype=np.float64).reshape(-1)
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        raise ValueError(f"{name}[{bad[0]}] is {scores[bad[0]]}: drop the samples without a score "
                         f"({bad.size} of {scores.size}) before the test")
    if scores.size < 2:
        raise ValueError(f"{name} holds {scores.size} score(s); the test needs at least 2 per set")
    return scores


def dataset_inference(
    suspect_scores: Sequence[float], reference_scores: Sequence[float], *, alternative: str = "greater",
    test: str = "welch",
) -> DatasetInferenceResult:
    """Test whether the suspect set's membership scores exceed those of a reference set of known non-members.

    Scores follow the package convention (higher = more likely a member): a detector's P(member) or a classic
    attack's score. ``alternative="greater"`` is the audit's question; ``"less"`` and ``"two-sided"`` exist for
    completeness. ``test="welch"`` (default, as Maini et al.) compares means and needs no equal variances;
    ``"mann-whitney"`` compares ranks and is exact under the null whatever the score distribution. The reference
    samples must not have been used to train the detector whose scores are tested.
    """
    if test not in TESTS:
        raise ValueError(f"test must be one of {TESTS}, got {test!r}")
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")
    from scipy import stats

    suspect = _finite_scores(suspect_scores, "suspect_scores")
    reference = _finite_scores(reference_scores, "reference_scores")
    n_s, n_r = suspect.size, reference.size
    pooled = math.sqrt(((n_s - 1) * suspect.var(ddof=1) + (n_r - 1) * reference.var(ddof=1)) / (n_s + n_r - 2))
    if pooled == 0.0:
        raise ValueError("every suspect and reference score is the same value: no test is possible")
    if test == "welch":
        outcome = stats.ttest_ind(suspect, reference, equal_var=False, alternative=alternative)
    else:
        outcome = stats.mannwhitneyu(suspect, reference, alternative=alternative)
    ordered = np.sort(reference)  # AUC = U / (n_s n_r): reference scores below each suspect score, ties half
    below = np.searchsorted(ordered, suspect, "left") + np.searchsorted(ordered, suspect, "right")
    return DatasetInferenceResult(
        p_value=float(outcome.pvalue), effect_size=float((suspect.mean() - reference.mean()) / pooled),
        n_suspect=n_s, n_reference=n_r, test=test, alternative=alternative, statistic=float(outcome.statistic),
        auc=float(below.sum() / (2 * n_s * n_r)), mean_suspect=float(suspect.mean()),
        mean_reference=float(reference.mean()),
    )


# --------------------------------------------------------------------------------------------- the audit
def _detector_scores(ds: Any, detector: str, where: str, pipeline_kwargs: dict[str, Any]) -> np.ndarray:
    """A detector's scores for a table: `predict` where it is scored, else the pipeline runs the stages."""
    from .features import missing_inputs
    from .hub import load_detector
    from .training import predict

    model = load_detector(detector)
    missing = missing_inputs(model.config, ds.column_names)
    if not missing:
        return np.asarray(predict(model, ds, progress=False)["score"], dtype=np.float64)
    from transformers import pipeline

    print(f"{where}: not scored for this detector (no {', '.join(missing)}); running its stages through the pipeline")
    pipe = pipeline("membership-inference", model=detector, **pipeline_kwargs)
    return np.array([r["score"] for r in pipe(ds)], dtype=np.float64)


def _attack_scores(ds: Any, name: str, where: str) -> np.ndarray:
    from .attacks import missing_attacks, score_all

    scores = score_all(ds)
    if name not in scores:
        why = "; ".join(f"{family}: {reason}" for family, reason in missing_attacks(ds).items() if name.startswith(family))
        known = ", ".join(scores) or "none (score the samples first: fimmia-hf score)"
        raise ValueError(f"{where}: no classic attack {name!r} ({why or 'unknown name'}); available: {known}")
    return scores[name]


def _blind_table(suspect: Any, reference: Any) -> Any:
    """Suspect (label 1) and reference (label 0) samples in one table: the text and media the blind baselines read."""
    import datasets

    from .media import MEDIA_COLUMNS

    shared = [c for c in ("sample_id", "input", "answer", *MEDIA_COLUMNS) if c in suspect.column_names
              and c in reference.column_names]
    parts = []
    for ds, label in ((suspect, 1), (reference, 0)):
        part = ds.select_columns(shared).flatten_indices()
        parts.append(part.add_column("label", [label] * len(part)))
    return datasets.concatenate_datasets([parts[0], parts[1].cast(parts[0].features)])


def _shift(blind: dict[str, dict[str, Any]]) -> list[str]:
    """The blind baselines that tell the sets apart: AUC >= the report's warning level, or a 95 % CI above 0.5."""
    from .report import SHIFT_WARNING_AUC
    from .shift import PERMUTED

    return [name for name, entry in blind.items() if name != PERMUTED
            and (entry["auc"] >= SHIFT_WARNING_AUC or entry["auc_ci"][0] > 0.5)]


def _verdict(result: DatasetInferenceResult, alpha: float, blind: dict | None, shifted: list[str]) -> str:
    found = f"p = {result.p_value:.3g}, effect size d = {result.effect_size:+.2f}, AUC {result.auc:.2f}"
    shift_text = ", ".join(f"{n} AUC {blind[n]['auc']:.2f} [{blind[n]['auc_ci'][0]:.2f}, {blind[n]['auc_ci'][1]:.2f}]"
                           for n in shifted)
    if not result.significant(alpha):
        verdict = f"NO EVIDENCE that the target was trained on the suspect set ({found}; alpha {alpha:g})."
        if shifted:
            verdict += (f" Note: blind baselines tell the two sets apart without the model ({shift_text}), so the "
                        "reference set may not be a valid control.")
    elif shifted:
        verdict = (f"INCONCLUSIVE: the suspect set scores higher than the reference set ({found}), but blind "
                   f"baselines tell the two sets apart without the model ({shift_text}): the difference may come "
                   "from a distribution shift, not from training. Use a reference set from the suspect set's "
                   "distribution.")
    else:
        verdict = f"EVIDENCE that the target was trained on the suspect set: it scores higher than the reference ({found})"
        verdict += "; no blind baseline tells the sets apart." if blind is not None else "."
    if blind is None:
        verdict += " The two sets were not checked for a distribution shift (blind baselines skipped)."
    return verdict


def audit(
    suspect: str | Path, reference: str | Path, *, detector: str | None = None, score: str | None = None,
    test: str = "welch", alpha: float = 0.05, blind: bool = True, modality: str | None = None,
    media_root: str | Path | None = None, search: str = "standard", seed: int = 0,
    pipeline_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Score both tables (with ``detector``, or the classic attack named ``score``), run :func:`dataset_inference`
    and, with ``blind``, the blind baselines between the sets; returns the JSON-ready result with a ``verdict``.
    Samples without a score (no valid neighbour) are left out and counted."""
    from .data import load_samples
    from .metrics import json_safe
    from .shift import run_blind_baselines

    if (detector is None) == (score is None):
        raise ValueError("give either a detector (--detector DIR) or a classic attack's score (--score loss)")
    tables = {"suspect": suspect, "reference": reference}
    data = {role: load_samples(path, modality=modality, media_root=media_root) for role, path in tables.items()}
    overlap = sorted(set(data["suspect"]["sample_id"]) & set(data["reference"]["sample_id"]))
    if overlap:
        raise ValueError(f"{len(overlap)} sample(s) are in both the suspect and the reference set, e.g. {overlap[:3]}; "
                         "the reference must hold known non-members only")
    scores, dropped = {}, {}
    for role, ds in data.items():
        where = f"{role} table {tables[role]}"
        values = (_detector_scores(ds, detector, where, pipeline_kwargs or {}) if detector is not None
                  else _attack_scores(ds, score, where))
        dropped[role] = int((~np.isfinite(values)).sum())
        scores[role] = values[np.isfinite(values)]
    result = dataset_inference(scores["suspect"], scores["reference"], test=test)
    baselines = None
    if blind:
        baselines = run_blind_baselines(_blind_table(data["suspect"], data["reference"]), modality=modality,
                                        search=search, seed=seed, progress=False)
        baselines = {n: {k: v for k, v in e.items() if k != "scores"} for n, e in baselines.items()}
    shifted = _shift(baselines) if baselines is not None else []
    return json_safe({
        "suspect": str(suspect), "reference": str(reference),
        "score": f"detector {detector}" if detector is not None else f"classic attack {score}",
        "without_score": dropped, "alpha": alpha, "dataset_inference": result.to_dict(),
        "significant": result.significant(alpha), "blind_baselines": baselines, "shift_detected": bool(shifted),
        "shifted_baselines": shifted, "verdict": _verdict(result, alpha, baselines, shifted),
    })


# --------------------------------------------------------------------------------------------- CLI
@dataclasses.dataclass
class AuditArguments:
    """`fimmia-hf audit`."""

    EXAMPLE: ClassVar[str] = ("fimmia-hf audit --suspect bench_scored --reference heldout_scored --detector runs/det "
                              "--out audit.json")
    suspect: str = HfArg(help="the samples the target may have been trained on: a scored table (save_to_disk folder, "
                         "Parquet, CSV...) or, with --detector, a raw sample table (scored through the pipeline)")
    reference: str = HfArg(help="known non-members from the same distribution, in the same format (never used to "
                           "train the detector)")
    out: str = HfArg(help="write the result (test, blind baselines, verdict) to this JSON file")
    detector: str | None = HfArg(default=None, help="detector folder or Hub id whose scores are tested")
    score: str | None = HfArg(default=None, help="test a classic attack's score instead of a detector's, e.g. loss, "
                              "min_k_pp_20, zlib (scored tables)")
    test: str = HfArg(default="welch", metadata={"choices": TESTS},
                      help="welch (Welch's t-test, as Maini et al. 2024) | mann-whitney (rank test)")
    alpha: float = HfArg(default=0.05, help="significance level of the verdict")
    blind: bool = HfArg(default=True, help="run the blind baselines between the two sets (--no-blind skips the "
                        "distribution-shift check)")
    search: str = HfArg(default="standard", metadata={"choices": ("fast", "standard", "full")},
                        help="hyper-parameter grid of the blind baselines")
    modality: str | None = HfArg(default=None, metadata={"choices": ("image", "audio", "video", "text")},
                                 help="the samples' modality (default: from the media column)")
    media_root: str | None = HfArg(
        default=None, help="folder that relative media paths start from (default: each table's folder)")
    target_model: str | None = HfArg(
        default=None, help="raw tables only: the target to score with instead of the one the detector records")
    device: str | None = HfArg(default=None, help="raw tables only: device of the pipeline's models, e.g. cuda")
    seed: int = HfArg(default=0, help="seed of the blind baselines")


def run_audit(cfg: AuditArguments) -> dict[str, Any]:
    """``fimmia-hf audit``: prints the verdict, writes the JSON; returns the result."""
    from .data import check_writable

    check_writable(cfg.out)  # the scores computed for the audit live in a temporary cache: fail before them
    pipeline_kwargs = {k: v for k, v in (("target_model", cfg.target_model), ("device", cfg.device)) if v is not None}
    result = audit(cfg.suspect, cfg.reference, detector=cfg.detector, score=cfg.score, test=cfg.test, alpha=cfg.alpha,
                   blind=cfg.blind, modality=cfg.modality, media_root=cfg.media_root, search=cfg.search, seed=cfg.seed,
                   pipeline_kwargs=pipeline_kwargs)
    out = Path(cfg.out)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    di = result["dataset_inference"]
    print(f"{di['n_suspect']} suspect vs {di['n_reference']} reference samples, {result['score']}, {di['test']} test\n"
          f"{result['verdict']}\nresult: {out}")
    return result


__all__ = ["AuditArguments", "DatasetInferenceResult", "audit", "dataset_inference", "run_audit"]
