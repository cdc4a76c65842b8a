"""Shared fixtures: an isolated cache per test session and tiny models built once per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> None:
    """Tiny models run faster on one thread than fighting over two busy cores."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _isolated_caches(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Stage caches and datasets caches go to a temporary folder, never the user's home."""
    root = tmp_path_factory.mktemp("caches")
    os.environ["FIMMIA_HF_CACHE"] = str(root / "fimmia_hf")
    import datasets

    datasets.config.HF_DATASETS_CACHE = root / "datasets"


@pytest.fixture(scope="session", autouse=True)
def _no_user_accelerate_config(tmp_path_factory: pytest.TempPathFactory) -> None:
    """CLI tests run in-process even where the user has run `accelerate config`."""
    import accelerate.commands.config

    accelerate.commands.config.default_config_file = str(tmp_path_factory.mktemp("accelerate") / "none.yaml")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory):
    """`tiny_model(kind)` -> path of a tiny model folder, built once per session and kind."""
    from fimmia_hf.testing import build_tiny

    root = tmp_path_factory.mktemp("tiny_models")
    return lambda kind, seed=0: build_tiny(kind, root / f"{kind}-{seed}", seed=seed)


@pytest.fixture(scope="session")
def kit_target(tmp_path_factory: pytest.TempPathFactory):
    """`kit_target(modality)` -> the kit's pretrained-like target (`build_target`, ~1 min), built once per session."""
    from fimmia_hf.testing import build_target

    root = tmp_path_factory.mktemp("kit_targets")
    return lambda modality: build_target(modality, root / modality)


@pytest.fixture(scope="session")
def synthetic_table(tmp_path_factory: pytest.TempPathFactory):
    """`synthetic_table(modality, n)` -> CSV path of synthetic samples with media beside it."""
    from fimmia_hf.testing import make_synthetic_samples

    root = tmp_path_factory.mktemp("synthetic")
    cache: dict[tuple, str] = {}

    def make(modality: str, n: int = 8, seed: int = 0) -> str:
        key = (modality, n, seed)
        if key not in cache:
            cache[key] = make_synthetic_samples(root / f"{modality}-{n}-{seed}", modality=modality, n=n, seed=seed)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def absolute_loss_signal():
    """`absolute_loss_signal(n, effect=..., seed=0)` -> scored samples (`synthetic_features` with no delta signal) whose
    membership shows in the absolute loss only: members' losses, of the sample and of every neighbour alike, are
    lower by `effect`, so ΔL and Δe carry nothing. Per-token lists as the scorer writes them (answer of 3 tokens)."""
    import numpy as np

    from fimmia_hf.testing import synthetic_features

    def make(n: int, *, effect: float, seed: int = 0):
        ds = synthetic_features(n, k=4, dim=8, shift=0.0, seed=seed)
        rng = np.random.default_rng(seed + 1)
        lower = effect * np.asarray(ds["label"], dtype=np.float64)
        loss = np.asarray(ds["loss"], dtype=np.float64) - lower
        neighbor_losses = np.asarray(ds["neighbor_losses"], dtype=np.float64) - lower[:, None]
        noise = rng.normal(0.0, 0.3, (n, 3))
        mean_lp = -rng.uniform(1.0, 2.0, (n, 3))
        columns = {
            "loss": loss, "neighbor_losses": neighbor_losses,
            "token_logprobs": -loss[:, None] + noise - noise.mean(1, keepdims=True),  # their mean NLL is the loss
            "token_mean_logprob": mean_lp, "token_std_logprob": rng.uniform(0.5, 1.5, (n, 3)), "token_entropy": -mean_lp,
        }
        ds = ds.remove_columns(["loss", "neighbor_losses"])
        for name, values in columns.items():
            ds = ds.add_column(name, values.tolist())
        return ds

    return make
