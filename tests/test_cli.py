"""The command layer: every command parsed one way (TrlParser), `--config` sets defaults only, examples in help."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml

from fimmia_hf.cli import COMMANDS, command_parser, main, parse_command


def _arguments(name: str) -> type:
    return command_parser(name).dataclass_types[0]


def _fields(name: str) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(_arguments(name)) if f.init]


def _required(name: str) -> dict[str, typing.Any]:
    """A value for every required option (what a YAML file may give instead of the command line)."""
    return {f.name: f"yaml-{f.name}" for f in _fields(name) if f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING}


def _probe(name: str) -> tuple[str, typing.Any, typing.Any]:
    """(option, its default, another value) for an option with a scalar default; else (a required or an optional
    text option, a command-line value, a YAML value)."""
    for f in _fields(name):
        if isinstance(f.default, bool):
            return f.name, f.default, not f.default
        if isinstance(f.default, (int, float)) and not f.metadata.get("choices"):
            return f.name, f.default, f.default + 3
        if isinstance(f.default, str) and not f.metadata.get("choices"):
            return f.name, f.default, f.default + "-yaml"
    hints = typing.get_type_hints(_arguments(name))
    field = next(iter(_required(name)), None) or next(f.name for f in _fields(name) if hints[f.name] == str | None)
    return field, "from-the-command-line", f"yaml-{field}"


def _flag(option: str) -> str:
    return "--" + option.replace("_", "-")


@pytest.mark.parametrize("name", list(COMMANDS))
def test_command_line_wins_over_yaml_even_when_it_gives_the_default(name: str, tmp_path) -> None:
    option, default, other = _probe(name)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({**_required(name), option.replace("_", "-"): other}))
    from_yaml = parse_command(name, ["--config", str(config)])
    assert getattr(from_yaml, option) == other  # YAML sets the default (a required option too)...
    given = str(default).lower() if isinstance(default, bool) else str(default)
    from_line = parse_command(name, [f"--config={config}", _flag(option), given])
    assert getattr(from_line, option) == default  # ... the command line always wins, even with the default value
    assert type(from_line).__name__ == COMMANDS[name][1]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_shows_an_example_and_every_option_explained(name: str, capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main([name, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert f"example:\n  fimmia-hf {name} --" in text
    assert "--config FILE.yaml" in text
    assert all(f.metadata.get("help") for f in _fields(name)), [f.name for f in _fields(name) if not f.metadata.get("help")]
    assert len(text.splitlines()) < 150


def test_one_spelling_for_the_output_and_the_shared_options() -> None:
    names = {f.name for command in COMMANDS for f in _fields(command)}
    assert not names & {"output", "output_dir", "num_train_epochs", "per_device_train_batch_size", "test_data"}
    assert "out" in {f.name for f in _fields("train")} and "out" in {f.name for f in _fields("finetune")}


def test_bad_configuration_is_one_clear_line(tmp_path, capsys) -> None:
    (tmp_path / "bad.yaml").write_text("learning_rat: 0.1\n")
    assert main(["train", "--config", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml: unknown option(s) ['--learning_rat']" in err and "Traceback" not in err
    (tmp_path / "list.yaml").write_text("- 1\n")
    assert main(["split", "--config", str(tmp_path / "list.yaml")]) == 2
    assert "list.yaml: expected a mapping of option names to values, got a list" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--out", "x", "--no-such-flag", "1"])
    assert "unrecognized arguments: --no-such-flag 1" in capsys.readouterr().err
    for text, message in (("{seed: 3}", "not valid JSON"), ('["seed"]', "expected a JSON object")):
        assert main(["train", "--out", str(tmp_path / "d"), "--train", "t", "--neighbor-kwargs", text]) == 2
        assert f"--neighbor-kwargs: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "predict", "audit", "finetune"])
def test_bad_yaml_config_names_its_line(command: str, tmp_path, capsys) -> None:
    """Bad YAML in --config is one line naming the file, line and column, not a parser traceback."""
    config = tmp_path / "bad.yaml"
    config.write_text("epochs: 3\nlr: [1, 2\nbad: x\n")
    assert main([command, "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{config}: not valid YAML: line 3, column 4: expected ',' or ']'" in err and "Traceback" not in err
    config.write_text("")
    assert main([command, "--config", str(config)]) == 2
    assert "expected a mapping of option names to values, got an empty file" in capsys.readouterr().err


def test_paired_inputs_are_spelled_alike_and_need_both_halves(tmp_path, capsys) -> None:
    for argv, message in (
        (["evaluate", "--test-base", "b", "--out", str(tmp_path)], "needs both --test-base and --test-finetuned"),
        (["evaluate", "--test", "t", "--test-finetuned", "f", "--out", str(tmp_path)],
         "either --test or --test-base/--test-finetuned"),
        (["train", "--train-finetuned", "f", "--out", str(tmp_path)], "needs both --train-base and --train-finetuned"),
        (["predict", "--model", "m", "--base", "b", "--out", str(tmp_path / "p.csv")], "needs both --base and --finetuned"),
    ):
        assert main(argv) == 2
        assert message in capsys.readouterr().err
