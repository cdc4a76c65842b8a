"""load_samples: formats, ids, media resolution, one clear error per bad-input rule; split_samples."""

from __future__ import annotations

import codecs
import hashlib
import json
from pathlib import Path

import datasets
import pandas as pd
import pytest
from PIL import Image

from fimmia_hf import SampleError, load_samples, split_samples
from fimmia_hf.cli import main as cli_main
from fimmia_hf.data import read_table


def _image(path: Path, color: str = "red") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), color).save(path)
    return path.name if path.parent.name != "media" else f"media/{path.name}"


def _rows(n: int = 4, **extra) -> list[dict]:
    rows = [{"input": f"Вопрос {i}?\nA. да\nB. нет\nОТВЕТ:", "answer": str(i % 2), "ds_name": "ru_qa"} for i in range(n)]
    for row in rows:
        row.update(extra)
    return rows


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet", "json", "jsonl", "disk"])
def test_every_format_loads_the_same_rows(tmp_path: Path, fmt: str) -> None:
    frame = pd.DataFrame(_rows(label=1))
    path = tmp_path / f"table.{fmt}"
    if fmt in ("csv", "tsv"):
        frame.to_csv(path, sep="," if fmt == "csv" else "\t", index=False)
    elif fmt == "parquet":
        frame.to_parquet(path)
    elif fmt == "json":
        frame.to_json(path, orient="records", force_ascii=False)
    elif fmt == "jsonl":
        frame.to_json(path, orient="records", lines=True, force_ascii=False)
    else:
        datasets.Dataset.from_pandas(frame).save_to_disk(str(path))
    ds = load_samples(path)
    assert ds["input"] == frame["input"].tolist()  # newlines and Cyrillic intact
    assert ds["answer"] == ["0", "1", "0", "1"]
    assert ds["label"] == [1, 1, 1, 1]
    assert ds.column_names[:4] == ["sample_id", "input", "answer", "ds_name"]


def test_numeric_answers_stay_strings(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text('input,answer\n"q1","1"\n"q2","007"\n"q3","1.50"\n')
    assert load_samples(tmp_path / "t.csv")["answer"] == ["1", "007", "1.50"]
    (tmp_path / "t.jsonl").write_text('{"input": "q1", "answer": 1}\n{"input": "q2", "answer": "2"}\n')
    assert load_samples(tmp_path / "t.jsonl")["answer"] == ["1", "2"]


def test_sample_id_is_a_stable_content_hash_and_ds_name_defaults_to_stem(tmp_path: Path) -> None:
    pd.DataFrame([{"input": "q", "answer": "a"}, {"input": "q2", "answer": "a"}]).to_csv(tmp_path / "mera_rutie.csv", index=False)
    first = load_samples(tmp_path / "mera_rutie.csv")
    again = load_samples(pd.read_csv(tmp_path / "mera_rutie.csv", dtype=str), ds_name="mera_rutie")
    assert first["ds_name"] == ["mera_rutie", "mera_rutie"]
    assert first["sample_id"] == again["sample_id"]
    assert len(set(first["sample_id"])) == 2
    given = load_samples(pd.DataFrame([{"input": "q", "answer": "a", "sample_id": "s-1"}]))
    assert given["sample_id"] == ["s-1"]


def test_media_paths_resolve_relative_to_the_table_or_media_root(tmp_path: Path) -> None:
    ref = _image(tmp_path / "media" / "a.png")
    pd.DataFrame(_rows(1, image=ref)).to_csv(tmp_path / "t.csv", index=False)
    ds = load_samples(tmp_path / "t.csv")
    assert ds["image"] == [str((tmp_path / "media" / "a.png").resolve())]

    elsewhere = tmp_path / "tables"
    elsewhere.mkdir()
    pd.DataFrame(_rows(1, image=ref)).to_csv(elsewhere / "t.csv", index=False)
    moved = load_samples(elsewhere / "t.csv", media_root=tmp_path)
    assert moved["image"] == ds["image"]
    assert moved["sample_id"] == ds["sample_id"]  # ids use the path as written, not where the table lives


def test_a_dataset_folder_is_only_read(tmp_path: Path) -> None:
    """Issue 16: `load_samples` wrote a `cache-*.arrow` into the user's `save_to_disk` folder."""
    folder = tmp_path / "shared-data"
    datasets.Dataset.from_list(_rows(3, extra="kept")).save_to_disk(str(folder))

    def listing() -> dict[str, tuple[int, int]]:
        return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}

    before = listing()
    folder.chmod(0o555)  # a read-only data folder must work (root ignores the mode: the listing is the check)
    try:
        ds = load_samples(folder)
        ds = ds.map(lambda row: {"length": len(row["input"])})  # nor may a later transform write there
        as_stored = read_table(folder).map(lambda row: {"length": len(row["input"])})  # stage outputs read back
        selected = load_samples(datasets.load_from_disk(str(folder)).select([2, 0]))  # column concatenation flattens
    finally:
        folder.chmod(0o755)
    assert listing() == before
    assert ds["extra"] == ["kept"] * 3 and ds["length"] == [len(r["input"]) for r in _rows(3)]
    assert as_stored["length"] == ds["length"] and selected["input"] == [ds["input"][2], ds["input"][0]]


def test_decoded_hf_image_column_is_accepted() -> None:
    ds = datasets.Dataset.from_dict(
        {"input": ["what shape? <image>"], "answer": ["A"], "image": [Image.new("RGB", (8, 8), "blue")]}
    ).cast_column("image", datasets.Image())
    out = load_samples(ds, ds_name="hf")
    assert out[0]["image"].size == (8, 8)
    assert out["ds_name"] == ["hf"]


# --- one test per validation rule: one clear error naming file, row(s) and column --------------


def _write(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "bad.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _assert_error(path: Path, *fragments: str, **kwargs) -> None:
    before = _digest(path)
    with pytest.raises(SampleError) as err:
        load_samples(path, **kwargs)
    message = str(err.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    assert _digest(path) == before  # the user's file is never modified


def test_missing_required_column(tmp_path: Path) -> None:
    _assert_error(_write(tmp_path, [{"input": "q"}]), "missing required column", "'answer'")


def test_empty_input(tmp_path: Path) -> None:
    _assert_error(_write(tmp_path, [{"input": "q", "answer": "a"}, {"input": "  ", "answer": "b"}]), "'input'", "row 2")


def test_label_outside_0_1(tmp_path: Path) -> None:
    rows = [{"input": f"q{i}", "answer": "a", "label": label} for i, label in enumerate([0, 1, 2, "yes"])]
    _assert_error(_write(tmp_path, rows), "'label'", "row 3", "row 4", "2 row(s)")


def test_more_than_one_media_column(tmp_path: Path) -> None:
    _assert_error(_write(tmp_path, [{"input": "q", "answer": "a", "image": "x.png", "audio": "y.wav"}]), "more than one media column", "image", "audio")


def test_missing_and_undecodable_media_are_all_listed(tmp_path: Path) -> None:
    good = _image(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    rows = [{"input": f"q{i}", "answer": "a", "image": ref} for i, ref in enumerate([good, "gone.png", "broken.png", *[f"m{j}.png" for j in range(25)]])]
    path = _write(tmp_path, rows)
    _assert_error(path, "'image'", "row 2", "not found", "row 3", "cannot decode", "27 row(s)", "and 7 more")


def test_duplicate_sample_id(tmp_path: Path) -> None:
    rows = [{"input": "q1", "answer": "a", "sample_id": "x"}, {"input": "q2", "answer": "b", "sample_id": "y"}, {"input": "q3", "answer": "c", "sample_id": "x"}]
    _assert_error(_write(tmp_path, rows), "'sample_id'", "row 3", "repeats row 1")


def test_modality_mismatch_and_unknown_format(tmp_path: Path) -> None:
    _assert_error(_write(tmp_path, [{"input": "q", "answer": "a"}]), "modality 'audio' needs", modality="audio")
    (tmp_path / "t.xlsx").write_text("x")
    with pytest.raises(SampleError, match="unsupported format"):
        load_samples(tmp_path / "t.xlsx")


# --- split ------------------------------------------------------------------------------------


def test_split_is_stratified_and_keeps_paired_rows_together() -> None:
    rows = []
    for i in range(40):
        for label in (0, 1):  # paired protocol: each sample scored by base (0) and fine-tuned (1)
            rows.append({"sample_id": f"s{i}", "input": f"q{i}", "answer": "a", "label": label, "ds_name": "ab"[i % 2]})
    ds = datasets.Dataset.from_list(rows)
    train, test = split_samples(ds, test_size=0.25, seed=3)
    assert not set(train["sample_id"]) & set(test["sample_id"])
    assert len(set(test["sample_id"])) == 10 and len(test) == 20
    assert sorted(set(test["ds_name"])) == ["a", "b"]
    again = split_samples(ds, test_size=0.25, seed=3)[1]
    assert again["sample_id"] == test["sample_id"]


def test_split_stratifies_member_labels() -> None:
    ds = datasets.Dataset.from_dict({"sample_id": [str(i) for i in range(100)], "label": [int(i < 20) for i in range(100)]})
    _, test = split_samples(ds, test_size=0.5)
    assert sum(test["label"]) == 10


def test_cli_validate_prints_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = _write(tmp_path, _rows(4, label=1))
    assert cli_main(["validate", "--data", str(path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 4 and summary["members"] == 4 and summary["modality"] == "text"
    bad = _write(tmp_path, [{"input": "", "answer": "a"}])
    assert cli_main(["validate", "--data", str(bad)]) == 2
    assert "empty input" in capsys.readouterr().err


# ------------------------------------------------------------------------- text columns, labels, JSON lines
def test_non_text_input_and_answer_are_refused(tmp_path: Path) -> None:
    """Parquet lists and structs are not text: stringifying them ("['Какая', 'фигура?']") would score junk."""
    path = tmp_path / "typed.parquet"
    pd.DataFrame({"input": [["Какая", "фигура?"], ["Какой", "цвет?"]], "answer": ["A", "B"]}).to_parquet(path)
    with pytest.raises(SampleError, match=r"typed\.parquet: column 'input'.*in 2 row.*\n  row 1: a list"):
        load_samples(path)
    pd.DataFrame({"input": ["Какая фигура?", "Какой цвет?"], "answer": [{"text": "A"}, {"text": "B"}]}).to_parquet(path)
    with pytest.raises(SampleError, match=r"column 'answer'.*\n  row 1: a dict"):
        load_samples(path)
    jsonl = tmp_path / "typed.jsonl"
    jsonl.write_text("\n".join(json.dumps({"input": f"q{i}", "answer": a}) for i, a in enumerate(["A", ["B"], 7])))
    with pytest.raises(SampleError, match=r"typed\.jsonl: column 'answer'.*in 1 row.*\n  row 2: a list"):
        load_samples(jsonl)


def test_numbers_become_text_on_purpose(tmp_path: Path) -> None:
    path = tmp_path / "numbers.jsonl"
    path.write_text("\n".join(json.dumps({"input": f"q{i}", "answer": v}) for i, v in enumerate([1, 2.0, 0.5])))
    assert load_samples(path)["answer"] == ["1", "2", "0.5"]


def test_broken_jsonl_line_is_named(tmp_path: Path) -> None:
    lines = [json.dumps(r, ensure_ascii=False) for r in _rows(4)]
    lines[2] = lines[2][:-5]
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(SampleError, match=r"broken\.jsonl: line 3, column \d+: not valid JSON"):
        load_samples(path)
    path.write_text("\n".join([lines[0], "[1, 2]"]), encoding="utf-8")
    with pytest.raises(SampleError, match=r"line 2: expected a JSON object per line, got list"):
        load_samples(path)
    whole = tmp_path / "broken.json"
    whole.write_text("[\n" + ",\n".join(lines) + "\n]", encoding="utf-8")
    with pytest.raises(SampleError, match=r"broken\.json: line 4, column \d+"):
        load_samples(whole)


def test_csv_labels_read_as_numbers_everywhere(tmp_path: Path) -> None:
    """read_table (evaluate, predict, shift) reads a CSV label "1" as 1 and names a bad label's row."""
    path = tmp_path / "scored.csv"
    pd.DataFrame(_rows(3, label="1")).assign(label=["1", "0", ""]).to_csv(path, index=False)
    assert read_table(path)["label"] == [1, 0, None]
    pd.DataFrame(_rows(3)).assign(label=["1", "yes", "0"]).to_csv(path, index=False)
    with pytest.raises(SampleError, match=r"scored\.csv: column 'label'.*\n  row 2: 'yes'"):
        read_table(path)


def test_evaluate_reads_csv_labels(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`fimmia-hf evaluate --test samples.csv`: labels in a CSV are text, and must still evaluate."""
    import numpy as np

    rng = np.random.default_rng(0)
    rows = [{"input": f"вопрос номер {i} {'член' if i % 2 else 'нет'}", "answer": "A", "label": str(i % 2),
             "loss": float(rng.normal(1.0 - 0.5 * (i % 2), 0.1)), "sample_id": f"s{i}"} for i in range(16)]
    path = tmp_path / "samples.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    assert cli_main(["evaluate", "--test", str(path), "--out", str(tmp_path / "report"), "--n-bootstrap", "10"]) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["n_members"] == 8 and report["n_nonmembers"] == 8


def test_unwritable_out_is_one_line_not_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """An --out the user cannot write (here under a file; a read-only folder alike) ends in one error line."""
    path = tmp_path / "samples.csv"
    pd.DataFrame(_rows(3)).to_csv(path, index=False)
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "out.parquet"
    assert cli_main(["neighbors", "--data", str(path), "--out", str(out), "--ops", "delete", "--num-neighbors", "2"]) == 2
    assert f"fimmia-hf neighbors: error: cannot write {out} ([Errno 17] File exists: '{out.parent}'); choose another --out" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_bytes_that_are_not_utf8_name_their_line(tmp_path: Path, suffix: str) -> None:
    rows = [json.dumps(r, ensure_ascii=False).encode() for r in _rows(3)] if suffix == ".jsonl" else [b"input,answer", b"q1,A", b"q2,B"]
    rows[2] = rows[2].replace(b"2", b"\xff2", 1)
    path = tmp_path / f"latin{suffix}"
    path.write_bytes(codecs.BOM_UTF8 + b"\n".join(rows))
    with pytest.raises(SampleError, match=rf"latin\{suffix}: line 3: not UTF-8 text \(byte 0xff: invalid start byte\)"):
        load_samples(path)


def test_stage_outputs_never_go_to_csv(tmp_path: Path) -> None:
    """List columns written to CSV read back as "[1.17 1.06]" text (predict then failed: "could not convert
    string to float: '['"): writing them is refused, and such a CSV made elsewhere is named on reading."""
    from fimmia_hf.data import save_dataset
    from fimmia_hf.testing import synthetic_features

    ds = synthetic_features(3, k=2, dim=4)
    with pytest.raises(SampleError, match=r"feat\.csv: CSV cannot hold the list columns neighbor_losses, embedding, "
                                          r"neighbor_embeddings .*write \.parquet"):
        save_dataset(ds, tmp_path / "feat.csv")
    assert not (tmp_path / "feat.csv").exists()
    ds.to_pandas().to_csv(tmp_path / "elsewhere.csv", index=False)
    with pytest.raises(SampleError, match=r"elsewhere\.csv: the list columns neighbor_losses, embedding, neighbor_embeddings"):
        read_table(tmp_path / "elsewhere.csv")
    assert read_table(save_dataset(ds, tmp_path / "feat.parquet"))["neighbor_losses"] == ds["neighbor_losses"]
def test_cli_split_keeps_a_samples_rows_together_and_stratifies(tmp_path: Path) -> None:
    """A paired-style table (each sample twice) splits by sample, with the labels in the same proportion."""
    rows = [{"sample_id": f"s{i}", "input": f"q{i}", "answer": "a", "ds_name": "d", "label": int(i < 8),
             "model_role": role} for i in range(40) for role in ("base", "finetuned")]
    table = tmp_path / "scored.parquet"
    pd.DataFrame(rows).to_parquet(table)
    assert cli_main(["split", "--data", str(table), "--test-size", "0.25", "--out", str(tmp_path / "splits")]) == 0
    train, test = (pd.read_parquet(tmp_path / "splits" / f"{name}.parquet") for name in ("train", "test"))
    assert len(train) == 60 and len(test) == 20 and not set(train["sample_id"]) & set(test["sample_id"])
    assert test.groupby("sample_id").size().eq(2).all() and test["label"].sum() == 2 * 2  # 8 of 40 members: 2 of the 10 in test
    assert cli_main(["split", "--data", str(table), "--out", str(tmp_path / "splits"), "--seed", "1"]) == 0  # reruns
