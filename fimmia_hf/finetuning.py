"""SFT-LoRA fine-tuning of a target model on member samples (the controlled M_leak of FiMMIA).

Why this exists: the paired protocol needs a model that has certainly seen a set of samples. The
original recipe (LoRA r=8, alpha=16, dropout 0.05 on q_proj/v_proj, lr 2e-4, 5 epochs, TRL
SFTTrainer) is kept, but its two defects are not: its image path trained on text only (the image
never reached the model) and its training objective was built by a different code path than the
loss it later measured. Here the batches come from `chat.ChatEncoder`, the same builder that
`TargetScorer` uses, so the tokens trained on are exactly the tokens scored, and the media tensors
(pixel values, video frames, audio features) go into every training step.

One collator serves every modality; the trainer is TRL's `SFTTrainer` where TRL supports the model
family (text, image, video) and `transformers.Trainer` for audio, which TRL has no path for. LoRA
targets only the language model (the vision/audio towers stay frozen: all base weights are frozen
and no adapter is placed outside the language model). The output folder holds the adapter and the
processor, so `TargetScorer(output_dir)` accepts it as is; `merge=True` also writes merged full
weights to `output_dir/merged`. Everything runs unchanged under `accelerate launch`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import datasets
from transformers.hf_argparser import HfArg

from .chat import IGNORE_INDEX, ChatEncoder, ChatEncoding, is_per_token
from .data import load_samples, modality_of
from .media import MEDIA_COLUMNS

DEFAULT_TARGET_MODULES = ("q_proj", "v_proj")
DEFAULT_LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "bias": "none", "task_type": "CAUSAL_LM"}
MERGED_SUBDIR = "merged"


# ----------------------------------------------------------------------------------------------
# batches: ChatEncoder rows -> padded tensors with labels
# ----------------------------------------------------------------------------------------------
def _pad_to(tensor: Any, shape: Sequence[int], value: float) -> Any:
    """Right-pad every dimension but the first of `tensor` to `shape[1:]`."""
    import torch.nn.functional as F

    pads: list[int] = []
    for have, want in zip(reversed(tensor.shape[1:]), reversed(shape[1:])):
        pads += [0, want - have]
    return F.pad(tensor, pads, value=value) if any(pads) else tensor


class ChatCollator:
    """Turn sample rows (`input`, `answer`, optional media column) into one padded training batch.

    Each row is encoded by `ChatEncoder.encode`, so `labels` is -100 everywhere except the tokens the
    scorer measures. Per-token processor outputs (e.g. `mm_token_type_ids`) are right-padded with 0
    like the ids; media tensors (`pixel_values`, `image_grid_thw`, `pixel_values_videos`,
    `input_features`, ...) are concatenated along their first dimension, zero-padded where their
    other dimensions differ (padding masks such as `feature_attention_mask` then read 0 = padding).
    """

    def __init__(self, encoder: ChatEncoder, modality: str | None, *, num_frames: int = 8) -> None:
        if modality is not None and modality not in MEDIA_COLUMNS:
            raise ValueError(f"unknown modality {modality!r}; expected one of {', '.join(MEDIA_COLUMNS)} or None")
        self.encoder = encoder
        self.modality = modality
        self.num_frames = num_frames
        pad = encoder.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else encoder.tokenizer.eos_token_id
        if self.pad_token_id is None:
            raise ValueError(
                f"{type(encoder.tokenizer).__name__} has neither a pad nor an eos token to pad batches with"
            )

    def encode(self, row: dict[str, Any]) -> ChatEncoding:
        """Encode one sample row (media decoded here, so the dataset may hold paths)."""
        media = (
            self.encoder.load_media(self.modality, row[self.modality], num_frames=self.num_frames)
            if self.modality
            else None
        )
        return self.encoder.encode(row["input"], row["answer"], media, self.modality)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return self.collate([self.encode(row) for row in rows])

    def collate(self, encodings: Sequence[ChatEncoding]) -> dict[str, Any]:
        """Pad encodings (from `encode`) into one batch; lets a loop encode its samples once for many epochs."""
        import torch

        width = max(len(e.input_ids) for e in encodings)
        batch: dict[str, Any] = {
            "input_ids": torch.full((len(encodings), width), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(encodings), width), dtype=torch.long),
            "labels": torch.full((len(encodings), width), IGNORE_INDEX, dtype=torch.long),
        }
        for i, enc in enumerate(encodings):
            n = len(enc.input_ids)
            batch["input_ids"][i, :n] = torch.tensor(enc.input_ids)
            batch["attention_mask"][i, :n] = 1
            batch["labels"][i, :n] = torch.tensor(enc.labels)
        for key in encodings[0].inputs:
            values = [e.inputs.get(key) for e in encodings]
            if any(v is None for v in values):
                raise ValueError(f"processor output '{key}' is missing for some rows of the batch")
            values = [v if torch.is_tensor(v) else torch.as_tensor(v) for v in values]
            if all(is_per_token(v, len(e.input_ids)) for v, e in zip(values, encodings)):
                batch[key] = torch.cat([_pad_to(v, (1, width), 0) for v in values])
            else:
                shape = [max(v.shape[d] for v in values) for d in range(values[0].dim())]
                batch[key] = (
                    torch.cat([_pad_to(v, shape, 0) for v in values]) if values[0].dim() else torch.stack(values)
                )
        return batch


# ----------------------------------------------------------------------------------------------
# model and LoRA
# ----------------------------------------------------------------------------------------------
def language_model_prefix(model: Any) -> str:
    """Module path of the language model (decoder) inside `model`, e.g. "model.language_model"."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is not None:
        for name, module in model.named_modules():
            if module is decoder:
                return name
    for name in ("model.language_model", "language_model", "model"):
        try:
            model.get_submodule(name)
            return name
        except AttributeError:
            continue
    raise ValueError(
        f"cannot find the language model inside {type(model).__name__}; pass a LoraConfig with target_modules"
    )


def lora_config(model: Any, lora: Any = None) -> Any:
    """The LoRA config, with leaf-name `target_modules` restricted to the language model by a regex.

    `lora` may be None (the original recipe), a dict of `LoraConfig` fields overriding it, or a
    ready `LoraConfig` (used as is). A regex string `target_modules` is also used as is.
    """
    from peft import LoraConfig

    if isinstance(lora, LoraConfig):
        return lora
    if lora is not None and not isinstance(lora, dict):
        raise ValueError(f"lora must be None, a dict or a peft.LoraConfig, not {type(lora).__name__}")
    fields = {**DEFAULT_LORA, **(lora or {})}
    targets = fields.pop("target_modules", None) or DEFAULT_TARGET_MODULES
    if not isinstance(targets, str):  # leaf names -> a regex anchored inside the language model
        prefix = language_model_prefix(model)
        leaves = "|".join(re.escape(t) for t in targets)
        targets = rf"^{re.escape(prefix)}\..*\.({leaves})$" if prefix else rf"^(.*\.)?({leaves})$"
        matched = [n for n, _ in model.named_modules() if re.fullmatch(targets, n)]
        if not matched:
            raise ValueError(
                f"no module named {', '.join(map(repr, targets.split('|')))} inside the language model '{prefix}'"
            )
    return LoraConfig(target_modules=targets, **fields)


def _load_trainable(model: Any, dtype: Any) -> tuple[Any, Any, str]:
    """(model, processor, name_or_path) from a path / Hub id, or an already loaded (model, processor) pair."""
    from .scoring import load_target

    if isinstance(model, (tuple, list)):
        loaded, processor = model
        ref = getattr(loaded, "name_or_path", "") or ""
    else:
        ref = str(model)
        if os.path.isdir(ref):
            ref = str(Path(ref).resolve())  # the adapter records its base: make it findable from anywhere
        loaded, processor = load_target(ref, dtype=dtype)
    if hasattr(loaded, "merge_and_unload"):  # fine-tuning a fine-tuned adapter: start from its merged weights
        loaded = loaded.merge_and_unload()
    return loaded, processor, ref


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------
def _as_samples(data: Any, modality: str | None) -> datasets.Dataset:
    if isinstance(data, datasets.Dataset) and "sample_id" in data.column_names:
        if modality not in (None, modality_of(data)):
            raise ValueError(f"modality {modality!r} requested but the dataset is {modality_of(data)!r}")
        return data
    return load_samples(data, modality=modality)


def _training_config(
    output_dir: str, epochs: float, learning_rate: float, has_eval: bool, overrides: dict[str, Any]
) -> Any:
    """SFTConfig with the original recipe's values; `overrides` (any SFTConfig/TrainingArguments field) win."""
    import torch
    from trl import SFTConfig

    valid = {f.name for f in dataclasses.fields(SFTConfig)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(
            f"unknown training argument(s) {', '.join(unknown)} (not SFTConfig / TrainingArguments fields)"
        )
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    values: dict[str, Any] = dict(
        output_dir=output_dir,
        num_train_epochs=epochs,
        learning_rate=learning_rate,
        per_device_train_batch_size=1,
        per_device_eval_batch_size=1,
        gradient_accumulation_steps=1,
        activation_checkpointing=True,  # (formerly gradient_checkpointing)
        activation_checkpointing_kwargs={"use_reentrant": False},
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=0.3,
        bf16=bf16,
        eval_strategy="epoch" if has_eval else "no",
        save_strategy="no",  # the adapter is saved once, at the end
        logging_steps=10,
        report_to="none",
        data_seed=1234,
        seed=1234,
        max_length=None,  # never truncate media tokens; ChatEncoder truncates the user text if asked
        remove_unused_columns=False,  # the collator needs input/answer/media
        dataset_kwargs={"skip_prepare_dataset": True},
        dataloader_pin_memory=False,
    )
    overrides = dict(overrides)
    for old in ("gradient_checkpointing", "gradient_checkpointing_kwargs"):  # deprecated aliases still accepted
        if old in overrides:
            overrides.setdefault(old.replace("gradient", "activation"), overrides.pop(old))
    values.update(overrides)
    return SFTConfig(**values)


def finetune(
    model: Any,
    train: Any,
    *,
    eval: Any = None,
    output_dir: str | os.PathLike,
    lora: Any = None,
    epochs: float = 5,
    learning_rate: float = 2e-4,
    merge: bool = False,
    modality: str | None = None,
    answer_only: bool = True,
    include_closing_tokens: bool = False,
    system_prompt: str | None = None,
    max_length: int | None = None,
    num_frames: int = 8,
    dtype: Any = "auto",
    callbacks: Sequence[Any] = (),
    **training_args: Any,
) -> str:
    """SFT-LoRA fine-tune `model` on the samples `train`; return `output_dir` (adapter + processor).

    `model`: Hub id or folder (or a loaded `(model, processor)` pair). `train`/`eval`: anything
    `load_samples` reads, or its result. `lora`: None (r=8, alpha=16, dropout 0.05 on q_proj/v_proj
    of the language model), a dict of overrides or a `peft.LoraConfig`. `answer_only`,
    `include_closing_tokens`, `system_prompt`, `max_length`, `num_frames` choose the trained tokens
    and media exactly as the `TargetScorer` arguments of the same names do; keep them equal to the
    scorer's. Other keyword arguments are `trl.SFTConfig` / `TrainingArguments` fields.
    With `merge=True` merged full weights (+ processor) are also saved in `output_dir/merged`.
    """
    from peft import get_peft_model
    from transformers import Trainer, set_seed
    from trl import SFTTrainer

    train_ds = _as_samples(train, modality)
    modality_name = modality_of(train_ds)
    eval_ds = _as_samples(eval, modality_name) if eval is not None else None
    if eval_ds is not None and modality_of(eval_ds) != modality_name:
        raise ValueError(f"train is {modality_name!r} but eval is {modality_of(eval_ds)!r}")
    media = None if modality_name == "text" else modality_name
    keep = ["input", "answer"] + ([media] if media else [])
    train_ds = train_ds.select_columns(keep)
    eval_ds = eval_ds.select_columns(keep) if eval_ds is not None else None
    if len(train_ds) == 0:
        raise ValueError("no training samples")

    base, processor, base_ref = _load_trainable(model, dtype)
    encoder = ChatEncoder(
        processor,
        answer_only=answer_only,
        include_closing_tokens=include_closing_tokens,
        max_length=max_length,
        system_prompt=system_prompt,
    )
    collator = ChatCollator(encoder, media, num_frames=num_frames)
    config = _training_config(str(output_dir), epochs, learning_rate, eval_ds is not None, training_args)

    set_seed(config.seed)  # the adapters are initialised here, before the Trainer seeds anything
    peft_model = get_peft_model(base, lora_config(base, lora))
    if config.activation_checkpointing:
        peft_model.enable_input_require_grads()  # adapters after frozen embeddings still need a grad path
    # TRL's SFTTrainer handles text, image and video models; TRL has no audio path, so audio uses Trainer.
    trainer_cls = Trainer if media == "audio" else SFTTrainer
    trainer = trainer_cls(
        model=peft_model,
        args=config,
        data_collator=collator,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=processor,
        callbacks=list(callbacks),
    )
    started = time.perf_counter()
    result = trainer.train()
    trainer.save_model(str(output_dir))  # adapter_config.json + adapter weights + processor, main process only
    if trainer.is_world_process_zero():
        _write_info(Path(output_dir), base_ref, media, config, result, time.perf_counter() - started, len(train_ds))
        if merge:
            merged_dir = Path(output_dir) / MERGED_SUBDIR
            merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
            merged.save_pretrained(merged_dir)
            processor.save_pretrained(merged_dir)
    trainer.accelerator.wait_for_everyone()
    return str(output_dir)


def _write_info(
    out: Path, base_ref: str, modality: str | None, config: Any, result: Any, seconds: float, n: int
) -> None:
    """A small record of what was trained, for reports and model cards."""
    info = {
        "base_model": base_ref,
        "modality": modality or "text",
        "train_samples": n,
        "epochs": config.num_train_epochs,
        "learning_rate": config.learning_rate,
        "train_loss": getattr(result, "training_loss", None),
        "train_seconds": round(seconds, 2),
        "processes": config.world_size,
        "trainer": "transformers.Trainer" if modality == "audio" else "trl.SFTTrainer",
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "fimmia_finetune.json").write_text(json.dumps(info, indent=2), encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# CLI: `fimmia-hf finetune`
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class FinetuneArguments:
    """`fimmia-hf finetune`: what a user sets; any other `trl.SFTConfig` field goes in `--training-args`."""

    EXAMPLE: ClassVar[str] = ("fimmia-hf finetune --model Qwen/Qwen2.5-VL-3B-Instruct --data members.csv --members-only "
                              "--epochs 5 --out adapters/qwen-members --training-args '{\"bf16\": true}'")
    model: str = HfArg(help="base model: Hub id or local folder")
    data: str = HfArg(help="training samples: CSV/TSV/Parquet/JSON/JSONL or a dataset folder")
    out: str = HfArg(help="folder for the LoRA adapter and the processor (and merged/ with --merge)")
    modality: str | None = HfArg(default=None, metadata={"choices": ("image", "video", "audio", "text")},
                                 help="the samples' modality (default: from the columns)")
    eval: str | None = HfArg(default=None, help="evaluation samples (same format)")
    members_only: bool = HfArg(default=False, help="train only on rows with label 1")
    epochs: float = HfArg(default=5.0, help="training epochs")
    learning_rate: float = HfArg(default=2e-4, help="learning rate (constant, the original recipe)")
    batch_size: int = HfArg(default=1, help="samples per device and step")
    gradient_accumulation_steps: int = HfArg(default=1, help="steps whose gradients are summed before an update")
    seed: int = HfArg(default=1234, help="seed of the adapters' initialisation and the data order")
    merge: bool = HfArg(default=False, help="also save merged weights in OUT/merged")
    lora_r: int = HfArg(default=8, help="LoRA rank")
    lora_alpha: int = HfArg(default=16, help="LoRA alpha")
    lora_dropout: float = HfArg(default=0.05, help="LoRA dropout")
    lora_target_modules: list[str] = HfArg(default_factory=lambda: list(DEFAULT_TARGET_MODULES),
                                           help="leaf module names to adapt inside the language model")
    modules_to_save: list[str] = HfArg(default_factory=list, help="modules trained in full and saved beside the "
                                       "adapter (peft modules_to_save), e.g. lm_head embed_tokens")
    answer_only: bool = HfArg(default=True, help="train on the answer tokens only (as scored); --no-answer-only "
                              "trains on the whole text")
    include_closing_tokens: bool = HfArg(default=False, help="also train on the tokens closing the answer turn")
    system_prompt: str | None = HfArg(default=None, help="system message added to every chat (as in `score`)")
    max_length: int | None = HfArg(default=None, help="truncate longer prompts from the left (never the answer)")
    num_frames: int = HfArg(default=8, help="video frames per sample")
    training_args: str | None = HfArg(default=None, help="other trl.SFTConfig / TrainingArguments fields as JSON, "
                                      "e.g. '{\"max_steps\": 100, \"bf16\": true}'")


def run_finetune(args: FinetuneArguments) -> int:
    """Run `fimmia-hf finetune` from parsed arguments; prints the output folder."""
    from .training import json_object

    train = load_samples(args.data, modality=args.modality)
    if args.members_only:
        if "label" not in train.column_names:
            raise ValueError(f"{args.data}: --members-only needs a 'label' column")
        train = train.filter(lambda row: row["label"] == 1)
    training = {
        "per_device_train_batch_size": args.batch_size, "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "seed": args.seed, **json_object(args.training_args, "training-args"),
    }
    out = finetune(
        args.model,
        train,
        eval=args.eval,
        output_dir=args.out,
        epochs=args.epochs,
        learning_rate=args.learning_rate,
        merge=args.merge,
        modality=args.modality,
        lora={
            "r": args.lora_r,
            "lora_alpha": args.lora_alpha,
            "lora_dropout": args.lora_dropout,
            "target_modules": list(args.lora_target_modules),
            "modules_to_save": list(args.modules_to_save) or None,
        },
        answer_only=args.answer_only,
        include_closing_tokens=args.include_closing_tokens,
        system_prompt=args.system_prompt,
        max_length=args.max_length,
        num_frames=args.num_frames,
        **training,
    )
    print(out)
    return 0
