"""`evaluate` wrapper of :func:`fimmia_hf.metrics.membership_metrics`.

Load offline from its folder, ``evaluate.load(fimmia_hf.metrics.evaluate_module_path())`` (the folder of this
file, which ``evaluate`` loads like a Hub metric), then
``metric.compute(prediction_scores=scores, references=labels, groups=ds_names)``. The numbers are exactly
those of ``membership_metrics`` (AUC, TPR@0.1/1/5 %FPR without interpolation, FPR@95%TPR, stratified
bootstrap intervals, warnings, per-group results).
"""

import datasets
import evaluate

from fimmia_hf.metrics import membership_metrics

_DESCRIPTION = """Membership-inference metrics: exact step-ROC AUC, TPR at fixed low FPRs (largest TPR with
FPR <= x, no interpolation), FPR at 95% TPR, stratified-bootstrap 95% intervals. Label 1 = member; higher
score = member."""

_KWARGS_DESCRIPTION = """
Args:
    prediction_scores (list of float): membership scores, higher = more likely member.
    references (list of int): 1 = member, 0 = non-member.
    fprs (tuple of float, optional): FPR levels, default (0.001, 0.01, 0.05).
    n_bootstrap (int, optional): bootstrap resamples for the intervals, default 1000 (0 = none).
    seed (int, optional): bootstrap seed, default 0.
    groups (list of str, optional): group of each sample (e.g. ds_name) for per-group results.
Returns:
    dict with auc, tpr@<x>%fpr, fpr@95%tpr, each with <key>_ci, n_members, n_nonmembers, warnings[, groups].
Examples:
    >>> metric = evaluate.load(fimmia_hf.metrics.evaluate_module_path())
    >>> metric.compute(prediction_scores=[0.9, 0.1, 0.8, 0.3], references=[1, 0, 1, 0], n_bootstrap=0)["auc"]
    1.0
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MembershipMetrics(evaluate.Metric):
    """Membership-inference metrics as an `evaluate.Metric` (same conventions as fimmia_hf.metrics)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"prediction_scores": datasets.Value("float64"), "references": datasets.Value("int32")}
            ),
        )

    def _compute(
        self,
        prediction_scores,
        references,
        fprs=(0.001, 0.01, 0.05),
        n_bootstrap=1000,
        seed=0,
        groups=None,
    ):
        return membership_metrics(
            references, prediction_scores, fprs=tuple(fprs), n_bootstrap=n_bootstrap, seed=seed, groups=groups
        )
