"""The README's claims about `make demo`, checked on the demo itself (slow: the whole demo).

If the recipe stops showing membership (a base target that no longer learns the task, members no longer
memorised, a head that no longer reads the fine-tuning, a blind baseline that finds a shift), this fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fimmia_hf.demo import MODALITIES, demo
from fimmia_hf.testing import MARKER_FILE


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    demo(out)
    return out


def _methods(out: Path, modality: str, protocol: str) -> dict:
    return json.loads((out / "reports" / f"{modality}-{protocol}" / "report.json").read_text())["methods"]


@pytest.mark.slow
@pytest.mark.parametrize("modality", MODALITIES)
def test_demo_targets_learn_and_members_are_partly_memorised(demo_run: Path, modality: str) -> None:
    """The base target answers in the task's format; on held-out samples LOSS separates members from
    non-members without trivialising the task, and no blind baseline finds more than its sampling error."""
    marker = json.loads((demo_run / modality / "base-target" / MARKER_FILE).read_text())
    assert marker["heldout_answer_loss"] <= np.log(4) + 0.3  # within 0.3 nats of four options, far below ln V
    methods = _methods(demo_run, modality, "member")
    assert 0.6 <= methods["loss"]["auc"] <= 0.97
    blind = [m["auc"] for m in methods.values() if m["kind"] == "blind baseline"]
    # With no shift, a blind baseline's AUC on 24 held-out members and 40 non-members has a standard error of
    # about 0.075: 0.16 is two of them. (At 0.12, 1.6 of them, one of the demo's 16 baselines falls outside in
    # most seeds: seed 0 has three at 0.36-0.63 on one machine, four at 0.36-0.65 on another.) A real shift gives 0.9+.
    assert blind and np.all(np.abs(np.array(blind) - 0.5) <= 0.16)


@pytest.mark.slow
@pytest.mark.parametrize("modality", MODALITIES)
def test_demo_detects_members_among_non_members(demo_run: Path, modality: str) -> None:
    """Member / non-member protocol on held-out samples: the best FiMMIA head's 95 % interval lies above chance
    (the blind embedding-only ablation does not count), as the README's table says."""
    methods = _methods(demo_run, modality, "member")
    heads = [m for name, m in methods.items() if m["kind"] == "detector" and "(blind)" not in name]
    assert max(heads, key=lambda m: m["auc"])["auc_ci"][0] > 0.5


@pytest.mark.slow
@pytest.mark.parametrize("modality", MODALITIES)
def test_demo_combined_head_detects_the_fine_tuning(demo_run: Path, modality: str) -> None:
    """Paired protocol (the same members under the base and the fine-tuned target): the combined head's
    95 % interval lies above chance."""
    assert _methods(demo_run, modality, "paired")["FiMMIA combined"]["auc_ci"][0] > 0.5
