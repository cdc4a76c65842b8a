"""Benchmarks: both ways compute the same results; `fimmia-hf bench` runs any registered benchmark by name."""

from __future__ import annotations

import json
import sys
import types

import pytest

from fimmia_hf.cli import main


def test_score_benchmark_scores_equal_in_each_layout() -> None:
    from fimmia_hf.benchmarks.score import benchmark

    result = benchmark(n_samples=2, k=4, size="tiny", image_size=(112, 112))
    assert result["max_abs_diff"] < 1e-4 and result["items"] == 10  # in every layout, template-protected too
    # with the media first, every neighbour reuses the cached media and header: fewer positions run
    assert result["token_ratio_media_first"] > result["token_ratio_media_last"] > 1
    assert result["token_ratio_template"] > 1  # its neighbours change only the question, after the media
    # the wall-time ratio itself is a benchmark figure, not asserted; it is the reference's time over ours
    assert result["speedup"] == pytest.approx(result["fimmia_hf_items_per_s"] / result["reference_items_per_s"])


def test_neighbors_benchmark_makes_fewer_generate_calls() -> None:
    from fimmia_hf.benchmarks.neighbors import benchmark

    result = benchmark(n_samples=1, words=40)
    ours, reference = result["generate_calls"]
    assert ours <= 3 and reference == 6 * result["masks_per_neighbor"]
    assert result["neighbors_made"] == 6
    ours_s, reference_s = result["seconds"]  # the wall-time ratio is not asserted: it is the reference's over ours
    assert result["speedup"] == pytest.approx(reference_s / ours_s)


@pytest.mark.slow
def test_embed_benchmark_batched_equals_one_by_one() -> None:
    from fimmia_hf.benchmarks.embed import benchmark

    result = benchmark(16, k=4)
    assert result["max_abs_diff"] < 1e-5  # the ratio itself is a benchmark figure, not a test: it is one by one over batched
    assert result["speedup"] == pytest.approx(result["one_by_one_s"] / result["batched_s"], rel=0.05, abs=0.02)


def test_bench_runs_a_registered_benchmark_by_name(monkeypatch, tmp_path, capsys) -> None:
    """A new benchmark is one module plus its name in the registry (as `bench attack` will be)."""
    for name, ratio in (("toy", 1.5), ("other", 2.0)):
        module = types.ModuleType(f"fimmia_hf.benchmarks.{name}")
        module.benchmark = lambda n_samples=3, ratio=ratio: {"n_samples": n_samples, "ratio": ratio}
        monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr("fimmia_hf.benchmarks.runner.BENCHMARKS", ("toy", "other"))

    assert main(["bench", "--benchmarks", "toy", "--out", str(tmp_path / "one.json")]) == 0
    assert json.loads((tmp_path / "one.json").read_text()) == {"n_samples": 3, "ratio": 1.5}  # its own default
    assert "toy          ratio" in capsys.readouterr().out
    assert main(["bench", "--samples", "5", "--out", str(tmp_path / "all.json")]) == 0  # default: all of them
    assert json.loads((tmp_path / "all.json").read_text()) == {
        "toy": {"n_samples": 5, "ratio": 1.5}, "other": {"n_samples": 5, "ratio": 2.0}}
    assert main(["bench", "--benchmarks", "nope"]) == 2
    assert "unknown benchmark(s) ['nope']; choose from toy, other" in capsys.readouterr().err


def test_bench_passes_neighbor_settings_to_the_benchmarks_that_take_them(monkeypatch, tmp_path) -> None:
    """`--neighbor-kwargs` reaches a benchmark with that parameter (as `attack` has); the others run as before."""
    taking = types.ModuleType("fimmia_hf.benchmarks.taking")
    taking.benchmark = lambda n_samples=3, neighbor_kwargs=None: {"neighbor_kwargs": neighbor_kwargs}
    plain = types.ModuleType("fimmia_hf.benchmarks.plain")
    plain.benchmark = lambda n_samples=3: {"n_samples": n_samples}
    for module in (taking, plain):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr("fimmia_hf.benchmarks.runner.BENCHMARKS", ("taking", "plain"))

    out = tmp_path / "both.json"
    assert main(["bench", "--neighbor-kwargs", '{"protect_template": true}', "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == {"taking": {"neighbor_kwargs": {"protect_template": True}},
                                          "plain": {"n_samples": 3}}
    assert main(["bench", "--neighbor-kwargs", "[1]"]) == 2  # not a JSON object: refused in one line


@pytest.mark.slow
def test_attack_benchmark_reports_every_method_over_seeds(tmp_path):
    """`bench attack` on a small run: every head, classic attack and blind baseline with mean and std over
    seeds, the dataset-level test at each size that fits, and the table printed from those figures."""
    from fimmia_hf.benchmarks.attack import benchmark, format_table

    figures = benchmark(n_samples=96, seeds=2, modalities=("text",), epochs=2, workdir=tmp_path)
    text = figures["modalities"]["text"]
    methods = text["methods"]
    assert {"FiMMIA combined", "FiMMIA", "FiMMIA loss-only", "loss", "min_k_pp_20"} <= methods.keys()
    assert any(m["kind"] == "blind baseline" for m in methods.values())
    assert all(0 <= m["auc_mean"] <= 1 and m["auc_std"] >= 0 for m in methods.values())
    assert methods["loss"]["auc_std"] > 0  # two seeds, two different targets and splits
    assert list(text["dataset_inference"]) == ["32"]  # 36 members and 60 non-members of cross-fitted scores
    assert 0 < text["dataset_inference"]["32"]["p_median"] <= 1
    assert text["best_classic_attack"] in methods and "FiMMIA combined" in format_table(figures)
