"""protect_template: neighbours perturb each sample's own lines, never the boilerplate its task shares."""

from __future__ import annotations

import datasets
import pytest

from fimmia_hf.neighbors import NeighborGenerator
from fimmia_hf.neighbors.template import template_lines

PREAMBLE = "Help me, please. There is a task of this kind: understanding images and answering about them."
CLOSING = "Answer with the letter of the right option only, written after the word ANSWER with a space."
QUESTIONS = [
    "Which colour is the large cube standing behind the small metal sphere on the left side?",
    "How many rubber cylinders are there in front of the big yellow object near the table?",
    "Is the shiny red ball the same size as the matte green cone beside the window frame?",
    "What shape is the purple object that is partly hidden behind the two grey blocks here?",
]
OPS = ("fill", "delete", "duplicate", "swap")


def task(*questions: str, ds_name: str = "ruclevr") -> datasets.Dataset:
    texts = [f"{PREAMBLE}\n<image>\n{q}\n{CLOSING}" if q else f"{PREAMBLE}\n<image>\n{CLOSING}" for q in questions]
    return datasets.Dataset.from_dict({"sample_id": [f"s{i}" for i in range(len(texts))], "input": texts,
                                       "ds_name": [ds_name] * len(texts)})


@pytest.fixture(scope="module")
def t5(tiny_model) -> str:
    return tiny_model("t5-infill")


def test_template_lines_never_change_and_the_question_does(t5, tmp_path):
    ds = task(*QUESTIONS)
    out = NeighborGenerator(t5, num_neighbors=12, min_masks=2, protect_template=True).apply(ds, cache_dir=tmp_path)
    for row, question in zip(out, QUESTIONS):
        assert row["num_neighbors"] == 12 and set(row["neighbor_ops"]) == set(OPS)
        for neighbor in row["neighbors"]:
            lines = neighbor.split("\n")
            assert [lines[0], lines[1], lines[3]] == [PREAMBLE, "<image>", CLOSING] and lines[2] != question
    # without it, the same generator changes the shared lines (what the setting exists to stop)
    plain = NeighborGenerator(t5, num_neighbors=12, min_masks=2).apply(ds, cache_dir=tmp_path)
    assert any(PREAMBLE not in n or CLOSING not in n for row in plain for n in row["neighbors"])


def test_share_rule_at_the_boundary():
    texts = ["shared\nhalf\nown 0", "shared\nhalf\nown 1", "shared\nthree\nown 2", "shared\nthree\nown 3",
             "shared\nown 4"]
    groups = ["a", "a", "a", "a", "b"]
    # "three" is in 2 of a's 4 samples: template at share 0.5, not above; a line of one sample never is
    assert template_lines(texts, groups, 0.5) == {"a": {"shared", "half", "three"}, "b": set()}
    assert template_lines(texts, groups, 0.51) == {"a": {"shared"}, "b": set()}
    assert template_lines(texts, groups, 0.25)["a"] == {"shared", "half", "three"}  # own lines: one sample each
    assert template_lines(texts, groups, 1.0) == {"a": {"shared"}, "b": set()}  # "b" has a single sample


def test_share_setting_is_checked():
    assert NeighborGenerator(ops=("swap",), protect_template=True).template_share == 0.5
    assert NeighborGenerator(ops=("swap",), protect_template=0.8).template_share == 0.8
    assert NeighborGenerator(ops=("swap",)).template_share is None
    for bad in (0, 1.5, -0.2):
        with pytest.raises(ValueError, match="protect_template must be"):
            NeighborGenerator(ops=("swap",), protect_template=bad)


def test_all_template_sample_warns_and_keeps_todays_neighbours(tmp_path):
    ds = task("", QUESTIONS[0], QUESTIONS[1])  # the first is the template alone
    ops = ("delete", "duplicate", "swap")
    with pytest.warns(UserWarning, match=r"1 sample\(s\) have no word to change outside their template lines"):
        protected = NeighborGenerator(ops=ops, num_neighbors=6, protect_template=True).apply(ds, cache_dir=tmp_path)
    plain = NeighborGenerator(ops=ops, num_neighbors=6).apply(ds, cache_dir=tmp_path)
    assert protected[0]["neighbors"] == plain[0]["neighbors"] and protected[0]["num_neighbors"] == 6
    assert protected[1]["neighbors"] != plain[1]["neighbors"]
    assert all(n.startswith(PREAMBLE + "\n<image>\n") for n in protected[1]["neighbors"])


def test_template_is_found_per_ds_name(tmp_path):
    ds = datasets.concatenate_datasets([task(*QUESTIONS[:2], ds_name="a"), task(QUESTIONS[2], ds_name="b")])
    ds = ds.map(lambda row, i: {"sample_id": f"s{i}"}, with_indices=True)
    gen = NeighborGenerator(ops=("delete", "swap"), num_neighbors=6, min_masks=3, protect_template=True)
    out = gen.apply(ds, cache_dir=tmp_path)  # "b" has one sample: nothing to compare it with, no template
    assert all(PREAMBLE in n and CLOSING in n for row in out.select([0, 1]) for n in row["neighbors"])
    assert any(PREAMBLE not in n or CLOSING not in n for n in out[2]["neighbors"])


def test_mask_ratio_counts_only_the_samples_own_words():
    from fimmia_hf.neighbors.operations import mask_count
    from fimmia_hf.neighbors.template import line_patterns
    from fimmia_hf.neighbors.words import Words

    boilerplate = " ".join(f"rule{i}" for i in range(60))
    text = f"{boilerplate}\n" + " ".join(f"own{i}" for i in range(20))
    plain, protected = Words.parse(text, []), Words.parse(text, [], line_patterns([boilerplate]))
    assert protected.eligible == list(range(60, 80)) and protected.shared == 60
    # a quarter of the sample's 20 words, not of all 80 (which would change every one of them)
    assert mask_count(protected, 0.25, 1, 40) == 5 and mask_count(plain, 0.25, 1, 40) == 20


def test_cli_protects_the_template(tmp_path):
    from fimmia_hf.cli import parse_command
    from fimmia_hf.neighbors.cli import run_neighbors

    task(*QUESTIONS).remove_columns("sample_id").add_column("answer", list("ABCD")).to_csv(tmp_path / "samples.csv", index=False)
    args = parse_command("neighbors", ["--data", str(tmp_path / "samples.csv"), "--out", str(tmp_path / "out"),
                                       "--ops", "delete,swap", "--num-neighbors", "4", "--protect-template", "0.5",
                                       "--cache-dir", str(tmp_path / "cache")])
    assert run_neighbors(args) == 0
    out = datasets.load_from_disk(str(tmp_path / "out"))
    assert all(n.startswith(f"{PREAMBLE}\n<image>\n") and n.endswith(CLOSING) for r in out for n in r["neighbors"])


def test_given_template_protects_exactly_those_lines_even_alone(tmp_path):
    ds = task(QUESTIONS[0])  # one sample: the share rule finds no template in it
    gen = NeighborGenerator(ops=("delete", "swap"), num_neighbors=8, min_masks=3, template={"ruclevr": [CLOSING]})
    out = gen.apply(ds, cache_dir=tmp_path)[0]["neighbors"]
    assert all(n.endswith("\n" + CLOSING) for n in out)  # the given line, in every neighbour
    assert any(not n.startswith(PREAMBLE) for n in out)  # a line not given is perturbed
    found = NeighborGenerator(ops=("delete", "swap"), num_neighbors=8, min_masks=3, protect_template=True)
    assert any(CLOSING not in n for n in found.apply(ds, cache_dir=tmp_path)[0]["neighbors"])
    other = gen.apply(task(QUESTIONS[0], ds_name="other"), cache_dir=tmp_path)[0]["neighbors"]
    assert any(CLOSING not in n for n in other)  # a ds_name the template does not list has no template line


def test_given_template_is_checked():
    assert NeighborGenerator(ops=("swap",), template={"a": ("y", "x", "y")}).template == {"a": ("x", "y")}
    for bad in ({"a": "one line"}, {"a": [" padded "]}, {"a": ["two\nlines"]}, {"a": [""]}, ["x"]):
        with pytest.raises(ValueError, match="template"):
            NeighborGenerator(ops=("swap",), template=bad)


@pytest.fixture(scope="module")
def template_detector(tiny_model, tmp_path_factory) -> str:
    """A loss-only detector trained (one epoch) on a table of two tasks, with protect_template."""
    from fimmia_hf import train_detector
    from fimmia_hf.testing import synthetic_features

    table = synthetic_features(n=16, k=4, ds_names=2)
    texts = [f"{PREAMBLE}\nQuestion {i}: {QUESTIONS[i % 4]}\n{CLOSING}" for i in range(len(table))]
    table = table.remove_columns("input").add_column("input", texts)
    out = tmp_path_factory.mktemp("template-detector")
    config = {"head": "loss_only", "projection_dim": 8, "hidden_sizes": [8], "modality": "text",
              "target_model": tiny_model("text-lm"), "neighbor_kwargs": {"ops": ["delete", "swap"], "protect_template": 0.5}}
    train_detector(table, config=config, output_dir=out, num_train_epochs=1, save_strategy="no", logging_steps=100)
    return str(out)


def test_trained_detector_stores_its_template_lines(template_detector):
    import json
    from pathlib import Path

    from fimmia_hf import FiMMIAConfig

    stored = json.loads((Path(template_detector) / "config.json").read_text())["neighbor_kwargs"]["template"]
    assert stored == {"synthetic_a": sorted([PREAMBLE, CLOSING]), "synthetic_b": sorted([PREAMBLE, CLOSING])}
    assert FiMMIAConfig.from_pretrained(template_detector).neighbor_kwargs["template"] == stored  # lists, kept


def test_pipeline_scores_a_sample_the_same_alone_and_with_its_task(template_detector):
    from transformers import pipeline

    with pytest.warns(UserWarning, match="no decision threshold"):  # trained without a validation split
        pipe = pipeline("membership-inference", model=template_detector, device="cpu")
    rows = [{"input": f"{PREAMBLE}\n{q}\n{CLOSING}", "answer": "A", "ds_name": "synthetic_a"} for q in QUESTIONS[:3]]
    alone = pipe(rows[0], return_features=True)
    together = pipe(rows, return_features=True)
    assert alone["score"] == pytest.approx(together[0]["score"], abs=1e-6)
    assert alone["features"]["neighbors"] == together[0]["features"]["neighbors"]
    for neighbor in alone["features"]["neighbors"]:
        first, question, last = neighbor.split("\n")
        assert (first, last) == (PREAMBLE, CLOSING) and question != QUESTIONS[0]
