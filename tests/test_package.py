"""The package's import-time contract: registrations done, heavy modules left for first use."""

from __future__ import annotations

import subprocess
import sys


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_import_registers_config_model_and_task_without_loading_heavy_modules(tmp_path) -> None:
    out = _run(
        "import sys, fimmia_hf\n"
        "heavy = [m for m in ('fimmia_hf.modeling_fimmia', 'transformers.pipelines', 'fimmia_hf.scoring', 'datasets') if m in sys.modules]\n"
        "from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, pipeline\n"
        "from transformers.pipelines import PIPELINE_REGISTRY\n"
        "config = AutoConfig.for_model('fimmia', embedding_dim=8)\n"
        "fimmia_hf.FiMMIAForMembershipInference(config).save_pretrained(sys.argv[1] if len(sys.argv) > 1 else %r)\n"
        "model = AutoModelForSequenceClassification.from_pretrained(%r)\n"
        "print(heavy, type(config).__name__, type(model).__name__, type(AutoModel.from_pretrained(%r)).__name__,\n"
        "      'membership-inference' in PIPELINE_REGISTRY.supported_tasks)" % ((str(tmp_path),) * 3)
    )
    assert out.splitlines()[-1] == "[] FiMMIAConfig FiMMIAForMembershipInference FiMMIAForMembershipInference True"


def test_task_is_registered_when_pipelines_were_imported_first() -> None:
    out = _run(
        "from transformers.pipelines import PIPELINE_REGISTRY\nimport fimmia_hf\n"
        "print('membership-inference' in PIPELINE_REGISTRY.supported_tasks)"
    )
    assert out.splitlines()[-1] == "True"
