"""The kit's membership experiment: a target with known members, every stage's columns, every detector.

The demo and the attack-quality benchmark run the same recipe, so what the README shows is what the
benchmark measures. For one modality:
1. the base target is the kit's pretrained-like model (`fimmia_hf.testing.build_target`: trained as a
   language model on a disjoint pool, so it answers in the task's format);
2. SFT-LoRA on the members (`fimmia_hf.finetune`, the product path; `MEMBER_FRACTION` of the samples) gives
   the fine-tuned target, which memorises part of its members;
3. neighbours (the kit's trained T5 infiller), text and media embeddings, and the losses of both
   targets (`NeighborGenerator`, `TextEmbedder`, `ModalityEmbedder`, `TargetScorer`);
4. detectors of every head trained on a training split by sample, scored on the held-out split.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

MEDIA_ENCODER_KIND = {"image": "image-encoder", "video": "image-encoder", "audio": "audio-encoder"}
# SFT-LoRA of the members: every projection of the language model, rank 16, at 3e-3. Members are memorised
# after 25-40 passes, whether 32 or 64 of them share the adapter (LOSS AUC at 15 / 40 epochs, one seed: image
# 0.69 / 0.86, video 0.67 / 0.73 with 64 members; 0.76 / 0.87 and 0.69 / 0.76 with 32); a rate of 1e-2 or
# batches of 4 memorised less, and with 128 members of 256 no schedule passed 0.63. Fewer members make each
# epoch cheaper, more members make the held-out intervals narrower: 48 of the demo's 128 samples. How far 40
# epochs go depends on the machine: on one, seed 0 gave LOSS 0.83 / 0.81 / 0.81 (image / audio / video), on
# another (AMD EPYC, AVX-512; the same base targets) 0.83 / 0.98 / 0.80, audio memorised all but completely.
# 30 epochs there: 0.84 / 0.94 / 0.75 (34: 0.83 / 0.96 / 0.71), so audio, image and text take 30. Video, the
# slowest to memorise, keeps 40: at 30 its paired-protocol combined head fell to 0.65-0.86 over three runs.
MEMBER_FRACTION = 0.375
MEMBER_EPOCHS = {"image": 30, "audio": 30, "video": 40, "text": 30}
MEMBER_LORA = {
    "r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
MEMBER_LEARNING_RATE = 3e-3
#: Report name -> detector head, the best-performing first (the combined head reads the classic attacks too).
HEADS = {
    "FiMMIA combined": "combined",
    "FiMMIA": "fimmia",
    "FiMMIA loss-only": "loss_only",
    "FiMMIA embedding-only (blind)": "embedding_only",
}


def component_models(out: str | Path, modalities: tuple[str, ...], *, seed: int = 0) -> dict[str, str]:
    """The neighbour, text-embedding and media-embedding models (built once, then cached under `out`)."""
    from .testing import build_infiller, build_tiny

    out = Path(out)
    models = {"infiller": build_infiller(out / "infiller", seed=seed)}
    for kind in sorted({"text-encoder", *(MEDIA_ENCODER_KIND[m] for m in modalities if m in MEDIA_ENCODER_KIND)}):
        models[kind] = build_tiny(kind, out / kind, seed=seed)
    return models


def scored_tables(
    modality: str, out: str | Path, *, n: int, k: int, seed: int, models: dict[str, str],
    epochs: int | None = None, member_fraction: float = MEMBER_FRACTION, base: str | None = None,
    neighbor_kwargs: dict[str, Any] | None = None, progress: Any = print,
) -> dict[str, Any]:
    """Steps 1-3 for `n` fresh synthetic samples (`member_fraction` of them members): returns the base and
    fine-tuned targets and the samples scored by each (`base_scored`, `finetuned_scored`, same rows and
    neighbours). `epochs`: SFT-LoRA passes over the members (default `MEMBER_EPOCHS[modality]`); `neighbor_kwargs`
    go to `NeighborGenerator` (e.g. `protect_template`)."""
    from . import ModalityEmbedder, NeighborGenerator, TargetScorer, TextEmbedder, finetune, load_samples
    from .testing import build_target, make_synthetic_samples

    out = Path(out)
    samples = load_samples(make_synthetic_samples(out / "samples", modality=modality, n=n, seed=seed,
                                                  member_fraction=member_fraction))
    members = samples.filter(lambda row: row["label"] == 1)
    progress(f"{modality}: the kit's pretrained-like base target (built once, then cached)")
    base = base or build_target(modality, out / "base-target", seed=seed)
    progress(f"{modality}: SFT-LoRA on the {len(members)} member samples")
    finetuned = finetune(
        base, members, output_dir=out / "finetuned", lora=MEMBER_LORA, epochs=epochs or MEMBER_EPOCHS[modality],
        learning_rate=MEMBER_LEARNING_RATE, per_device_train_batch_size=8, logging_steps=1000, disable_tqdm=True,
        activation_checkpointing=False, seed=seed,
    )
    progress(f"{modality}: neighbours, embeddings and losses of {n} samples (K = {k})")
    neighbor_kwargs = {"seed": seed, **(neighbor_kwargs or {})}
    ds = NeighborGenerator(models["infiller"], num_neighbors=k, **neighbor_kwargs).apply(samples)
    ds = TextEmbedder(models["text-encoder"]).apply(ds)
    if modality in MEDIA_ENCODER_KIND:
        ds = ModalityEmbedder(models[MEDIA_ENCODER_KIND[modality]], modality=modality).apply(ds)
    return {
        "base": base, "finetuned": finetuned, "neighbor_kwargs": neighbor_kwargs,
        "base_scored": TargetScorer(base).apply(ds), "finetuned_scored": TargetScorer(finetuned).apply(ds),
    }


def detector_config(modality: str, tables: dict[str, Any], models: dict[str, str]) -> dict[str, Any]:
    """The detector config of the recipe: the fine-tuned target and the component models that made the features."""
    config = {"modality": modality, "target_model": tables["finetuned"], "neighbor_model": models["infiller"],
              "embedding_model": models["text-encoder"], "neighbor_kwargs": tables["neighbor_kwargs"]}
    if modality in MEDIA_ENCODER_KIND:
        config["media_embedding_model"] = models[MEDIA_ENCODER_KIND[modality]]
    return config


def detector_scores(
    train: Any, test: Any, out: str | Path, config: dict[str, Any], *, epochs: int = 20, seed: int = 0,
    heads: dict[str, str] = HEADS,
) -> dict[str, np.ndarray]:
    """Step 4: train each head on `train` (saved under `out/<head>`); their scores on `test`."""
    from .training import predict, train_detector

    scores = {}
    for name, head in heads.items():
        model = train_detector(
            train, config={**config, "head": head}, output_dir=Path(out) / head, seed=seed,
            num_train_epochs=epochs, per_device_train_batch_size=16, logging_steps=1000, disable_tqdm=True,
        )
        scores[name] = np.asarray(predict(model, test, progress=False)["score"])
    return scores


def _init_process(threads: int) -> None:
    """A side-by-side process: its share of the cores, and the parent's quiet logs."""
    import warnings

    import datasets
    import torch

    torch.set_num_threads(threads)
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning)


def side_by_side(fn: Callable[..., Any], calls: Sequence[dict[str, Any]], *, jobs: int | None = None) -> list[Any]:
    """`fn(**kwargs)` for each of `calls` in `jobs` processes that share the CPU cores; the results in order.

    The kit's tiny models gain a tenth of a step from a second thread, so processes of one thread each do
    far more work per second than one process with every thread (the demo: 7.3 min in 3 processes on 2
    cores, 11.2 in one). Default: one process per call, at most one more than the cores (the spare keeps
    the cores busy while another process reads or writes). `jobs=1` runs the calls here, one after the other.
    """
    cores = os.cpu_count() or 1
    jobs = min(len(calls), cores + 1) if jobs is None else jobs
    if jobs <= 1:
        return [fn(**kwargs) for kwargs in calls]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")  # a forked torch can hang on its thread pool
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_process,
                             initargs=(max(1, cores // jobs),)) as pool:
        futures = [pool.submit(fn, **kwargs) for kwargs in calls]
        return [future.result() for future in futures]
