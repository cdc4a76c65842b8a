"""SFT-LoRA fine-tuning: the media reach the model, the loss masks the scored tokens, members learn.

Fast tests run one or two optimizer steps per modality on the tiny models; the loss-drop test that
trains for real is marked slow.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("TRL_DISABLE_USAGE_STATS", "1")

from fimmia_hf.chat import IGNORE_INDEX, ChatEncoder  # noqa: E402
from fimmia_hf.data import load_samples  # noqa: E402
from fimmia_hf.finetuning import ChatCollator, finetune, language_model_prefix, lora_config  # noqa: E402

KIND = {"image": "image-text", "video": "image-text", "audio": "audio-text", "text": "text-lm"}
# where each family's media enter the model, and the batch key that must arrive there
TOWER = {
    "image": ("model.visual", "pixel_values"),
    "video": ("model.visual", "pixel_values_videos"),
    "audio": ("model.audio_tower", "input_features"),
}
FAST = dict(activation_checkpointing=False, per_device_train_batch_size=2, logging_steps=1000, use_cpu=True)


def _load(path: str):
    from fimmia_hf.scoring import load_target

    return load_target(path, dtype=torch.float32)


@pytest.mark.parametrize("modality", ["image", "video", "audio"])
def test_media_reach_the_model_during_training(modality, tiny_model, synthetic_table, tmp_path):
    """A training step feeds each sample's own media tensor into the vision/audio tower."""
    model, processor = _load(tiny_model(KIND[modality]))
    samples = load_samples(synthetic_table(modality, n=4)).select(range(2))
    tower_name, key = TOWER[modality]
    seen: list[torch.Tensor] = []
    tower = model.get_submodule(tower_name)

    def record(module, args, kwargs):  # the tower's first input: pixel patches or mel features
        first = args[0] if args else next(iter(kwargs.values()))
        seen.append(first.detach().clone())

    hook = tower.register_forward_pre_hook(record, with_kwargs=True)
    before = {n: p.detach().clone() for n, p in tower.named_parameters()}
    try:
        # video also covers the default activation checkpointing (the tower then runs again in backward)
        finetune(
            (model, processor),
            samples,
            output_dir=tmp_path / "out",
            max_steps=1,
            **{**FAST, "activation_checkpointing": modality == "video"},
        )
    finally:
        hook.remove()
    assert seen, f"the {tower_name} never ran during training: the {modality} did not reach the model"
    collate = ChatCollator(ChatEncoder(processor), modality)
    batches = [collate([samples[i], samples[j]])[key] for i, j in ((0, 1), (1, 0))]  # the trainer shuffles
    assert any(s.shape == b.shape and torch.allclose(s.float(), b.float()) for s in seen for b in batches), (
        f"the {tower_name} ran on something other than the batch's {key}"
    )
    for name, param in tower.named_parameters():  # the tower stays frozen
        assert torch.equal(param.detach(), before[name]), f"{tower_name}.{name} changed during training"


@pytest.mark.parametrize("modality", ["image", "audio", "text"])
def test_labels_are_exactly_the_scored_tokens(modality, tiny_model, synthetic_table):
    """The collator's labels equal the tokens TargetScorer scores (same builder), padding included."""
    _, processor = _load(tiny_model(KIND[modality]))
    rows = load_samples(synthetic_table(modality, n=4)).select(range(3))
    media = None if modality == "text" else modality
    encoder = ChatEncoder(processor)
    collator = ChatCollator(encoder, media)
    batch = collator(list(rows))
    for i, row in enumerate(rows):
        enc = collator.encode(row)
        n = len(enc.input_ids)
        assert batch["input_ids"][i, :n].tolist() == enc.input_ids
        scored = [j for j in range(batch["labels"].shape[1]) if batch["labels"][i, j] != IGNORE_INDEX]
        assert scored == enc.score_positions and scored, "training labels differ from the scored positions"
        assert batch["attention_mask"][i].sum() == n
        answer_ids = (
            processor.tokenizer(row["answer"], add_special_tokens=False)["input_ids"]
            if media
            else processor(row["answer"], add_special_tokens=False)["input_ids"]
        )
        assert [batch["input_ids"][i, j].item() for j in scored] == answer_ids  # only the answer is trained


@pytest.mark.parametrize("kind", ["audio-text", "image-text"])
def test_lora_only_in_language_model(kind, tiny_model):
    """Default LoRA targets q_proj/v_proj of the language model only (the audio tower has q_proj/v_proj too)."""
    from peft import get_peft_model

    model, _ = _load(tiny_model(kind))
    prefix = language_model_prefix(model)
    peft_model = get_peft_model(model, lora_config(model))
    adapted = {n.split(".lora_A")[0] for n, _ in peft_model.named_parameters() if ".lora_A" in n}
    assert adapted and all(
        re.search(rf"{re.escape(prefix)}\.layers\.\d+\.self_attn\.(q_proj|v_proj)$", n) for n in adapted
    )
    assert all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)


def test_cli_yaml_merge_and_scorer_accepts_output(tiny_model, synthetic_table, tmp_path):
    """`fimmia-hf finetune --config x.yaml --merge` writes an adapter folder and merged weights; both score."""
    from fimmia_hf.cli import main
    from fimmia_hf.scoring import TargetScorer

    base = tiny_model("text-lm")
    data = synthetic_table("text", n=4)
    config = tmp_path / "ft.yaml"
    config.write_text(
        f"model: {base}\ndata: {data}\nbatch_size: 2\nlora_r: 4\nmodules_to_save: [lm_head]\n"
        "training_args: {max_steps: 2, activation_checkpointing: false, use_cpu: true}\n",
        encoding="utf-8",
    )
    out = tmp_path / "adapter"
    assert (
        main(["finetune", "--config", str(config), "--out", str(out), "--modality", "text", "--members-only", "--merge"])
        == 0
    )
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and Path(adapter["base_model_name_or_path"]) == Path(base).resolve()
    assert adapter["modules_to_save"] == ["lm_head"]
    assert (out / "merged" / "model.safetensors").is_file()
    info = json.loads((out / "fimmia_finetune.json").read_text())
    assert info["train_samples"] == 2 and info["trainer"] == "trl.SFTTrainer"
    samples = load_samples(data).select(range(2))
    losses = [TargetScorer(str(p), token_stats=False).apply(samples)["loss"] for p in (out, out / "merged")]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)  # adapter == merged weights
    assert all(np.isfinite(losses[0]))


def test_same_seed_gives_the_same_adapter(tiny_model, synthetic_table, tmp_path):
    """The adapters are initialised before the Trainer seeds anything: `seed` must cover them too."""
    from safetensors.torch import load_file

    data = load_samples(synthetic_table("text", n=4))
    weights = []
    for run in ("a", "b"):
        out = finetune(tiny_model("text-lm"), data, output_dir=tmp_path / run, max_steps=2, activation_checkpointing=False,
                       use_cpu=True, logging_steps=1000, seed=7)
        weights.append(load_file(Path(out) / "adapter_model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_unknown_training_argument_is_rejected(tiny_model, synthetic_table, tmp_path):
    with pytest.raises(ValueError, match="unknown training argument"):
        finetune(tiny_model("text-lm"), synthetic_table("text", n=4), output_dir=tmp_path, no_such_option=1)


# -------------------------------------------------------------------------------------------------
# members learn: the fine-tuned model's loss separates members from non-members (slow)
# -------------------------------------------------------------------------------------------------
def _member_gap(modality: str, kit_target, synthetic_table, tmp_path) -> dict[str, float]:
    """The demo's member step (`fimmia_hf.recipe`) on the label-1 half of 32 fresh samples; the mean answer
    loss of members and non-members under the kit's pretrained-like target and after SFT-LoRA."""
    from fimmia_hf.recipe import MEMBER_LEARNING_RATE, MEMBER_LORA
    from fimmia_hf.scoring import TargetScorer

    base = kit_target(modality)
    samples = load_samples(synthetic_table(modality, n=32, seed=5))
    members = samples.filter(lambda r: r["label"] == 1)
    out = finetune(base, members, output_dir=tmp_path / modality, lora=MEMBER_LORA, epochs=15,
                   learning_rate=MEMBER_LEARNING_RATE, per_device_train_batch_size=8, activation_checkpointing=False,
                   logging_steps=1000, use_cpu=True)
    labels = np.array(samples["label"])
    figures = {}
    for name, target in (("before", base), ("after", out)):
        loss = np.array(TargetScorer(target, token_stats=False).apply(samples)["loss"])
        figures[f"{name}_members"], figures[f"{name}_non_members"] = loss[labels == 1].mean(), loss[labels == 0].mean()
    print(modality, {k: round(float(v), 3) for k, v in figures.items()})
    return figures


@pytest.mark.slow
@pytest.mark.parametrize("modality", ["image", "text", "video", "audio"])
def test_members_loss_falls_below_non_members(modality, kit_target, synthetic_table, tmp_path):
    f = _member_gap(modality, kit_target, synthetic_table, tmp_path)
    assert abs(f["before_members"] - f["before_non_members"]) < 0.3  # the base target saw neither half
    assert f["after_members"] < f["before_members"] - 0.2  # members learned
    assert f["after_members"] < f["after_non_members"] - 0.2  # ... more than non-members


@pytest.mark.slow
def test_two_processes_under_accelerate_launch(tiny_model, synthetic_table, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo) trains and saves one adapter folder."""
    import subprocess
    import sys

    config = Path(__file__).resolve().parents[1] / "scripts" / "accelerate_cpu.yaml"
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        "-m",
        "fimmia_hf.cli",
        "finetune",
        "--model",
        tiny_model("image-text"),
        "--data",
        synthetic_table("image", n=4),
        "--out",
        str(out),
        "--training-args",
        '{"max_steps": 2, "activation_checkpointing": false, "use_cpu": true}',
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "fimmia_finetune.json").read_text())["processes"] == 2
