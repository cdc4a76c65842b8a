"""`fimmia-hf`: one subcommand per stage, one way to parse them all.

Each subcommand lives beside the code that does the work (a stage package's `cli` module, or the
module itself) as an arguments dataclass (help text in field metadata, an `EXAMPLE` command line)
and a `run_<command>(args)` function. This file only routes: it imports a module when its command is
used (so `fimmia-hf --help` stays fast) and parses its dataclass the way TRL does (`trl.TrlParser`:
`--config FILE.yaml` sets defaults, the command line always wins). `accelerate launch -m fimmia_hf.cli
<command> ...` runs the same code in every process.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import sys
from typing import Any

# command -> (module, arguments dataclass, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "validate": ("data", "ValidateArguments", "check a sample table (columns, labels, media) and print a summary"),
    "split": ("data", "SplitArguments", "split a table by sample into train and test (stratified by label and ds_name)"),
    "finetune": ("finetuning", "FinetuneArguments",
                 "SFT-LoRA fine-tune a target on member samples (controlled members)"),
    "neighbors": ("neighbors.cli", "NeighborsArguments",
                  "generate K perturbed neighbours of each sample's text (and media)"),
    "embed": ("embeddings.cli", "EmbedArguments", "embed each sample and its neighbours (text and media)"),
    "score": ("scoring.cli", "ScoreArguments",
              "score samples and their neighbours with a target model (losses, per-token statistics)"),
    "train": ("training", "TrainArguments", "train a FiMMIA detector on scored samples (writes its model card)"),
    "predict": ("training", "PredictArguments", "score samples with a trained detector; write predictions and metrics"),
    "evaluate": ("report", "EvaluateArguments",
                 "one report: detector, classic attacks and blind baselines on a test split"),
    "attribute": ("attribution", "AttributeArguments",
                  "gradient attribution of the detector's input groups (ΔL vs Δe vs Δm), with graphs"),
    "shift": ("shift", "ShiftArguments", "blind (model-free) baselines: is the member/non-member split shifted?"),
    "push": ("hub", "PushArguments", "push a detector (with its model card) to the Hugging Face Hub"),
    "audit": ("audit", "AuditArguments", "dataset-level inference: was the target trained on this set? (test "
              "against known non-members, with a distribution-shift check)"),
    "demo": ("demo", "DemoArguments", "the whole pipeline end to end on synthetic data with tiny models (no network)"),
    "bench": ("benchmarks.runner", "BenchArguments",
              "benchmarks: each stage vs its naive loop, end-to-end throughput, memory"),
}

# commands that use every process `accelerate launch` starts (data-parallel training, sharded scoring)
DISTRIBUTED = {"finetune", "score", "train"}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the option help (as HfArgumentParser shows them, unless the help says it or there is
    none), each flag in its one dashed spelling (the underscore one HfArgumentParser adds still works),
    the example kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if isinstance(action, argparse._StoreFalseAction):  # HfArgumentParser's --no-x of a flag x that is on
            return f"the opposite of {action.option_strings[0].replace('--no-', '--', 1)}"
        if action.default in (None, False, []) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        shown = copy.copy(action)
        shown.option_strings = [s for s in action.option_strings if "_" not in s] or action.option_strings
        return super()._format_action_invocation(shown)


def _command_parser_class() -> type:
    """Built on first use: importing trl takes seconds, which `fimmia-hf --help` should not pay."""
    from trl import TrlParser

    class CommandParser(TrlParser):
        """TrlParser that also takes YAML keys spelled like the flags (`lora-r` as well as `lora_r`)."""

        def set_defaults_with_config(self, **config: Any) -> list[str]:
            return super().set_defaults_with_config(**{k.replace("-", "_"): v for k, v in config.items()})

    return CommandParser


def command_parser(name: str) -> Any:
    """The parser of one command: its arguments dataclass, `--config`, and an example in `--help`."""
    module, class_name, help_text = COMMANDS[name]
    arguments = getattr(importlib.import_module(f"fimmia_hf.{module}"), class_name)
    parser = _command_parser_class()(
        arguments, prog=f"fimmia-hf {name}", description=help_text, formatter_class=_HelpFormatter,
        epilog=f"example:\n  {arguments.EXAMPLE}", allow_abbrev=False,
    )
    for action in parser._actions:  # the dashed spelling first: it is the one usage lines show
        action.option_strings.sort(key=lambda flag: "_" in flag)
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML mapping of any of the options above: it sets "
                        "their defaults, a value given on the command line always wins")
    return parser


def check_config_file(path: str) -> None:
    """Refuse a `--config` file that is not a YAML mapping in one line naming its line and column (TrlParser would
    end in a parser traceback, or a message without the place)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            loaded = yaml.safe_load(fh)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ValueError(f"{path}: not valid YAML: {where}{getattr(err, 'problem', None) or err}") from None
    if not isinstance(loaded, dict):
        got = "an empty file" if loaded is None else f"a {type(loaded).__name__}"
        raise ValueError(f"{path}: expected a mapping of option names to values, got {got}")


def parse_command(name: str, argv: list[str]) -> Any:
    """`argv` (what follows the command name) parsed into the command's arguments dataclass."""
    argv = [part for arg in argv for part in (arg.split("=", 1) if arg.startswith("--config=") else [arg])]
    parser = command_parser(name)
    if "--config" in argv:
        if argv.index("--config") + 1 == len(argv):
            parser.error("argument --config: expected one argument")
        check_config_file(argv[argv.index("--config") + 1])
    args, *_, from_config, unknown = parser.parse_args_and_config(
        argv, return_remaining_strings=True, separate_remaining_strings=True)
    if from_config:
        config = argv[argv.index("--config") + 1]
        raise ValueError(f"{config}: unknown option(s) {from_config[::2]}; see `fimmia-hf {name} --help`")
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fimmia-hf", description="Membership inference (training-data leakage detection) for multimodal LLMs.",
        epilog="`fimmia-hf <command> --help` lists a command's options, with an example.",
    )
    version = importlib.import_module("fimmia_hf").__version__
    parser.add_argument("--version", action="version", version=f"%(prog)s {version}")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, (_, _, help_text) in COMMANDS.items():
        subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


def _relaunch_with_accelerate(argv: list[str]) -> int | None:
    """As TRL's CLI does: where the user has an accelerate config (`accelerate config`), run a
    distributed command through `accelerate launch -m fimmia_hf.cli ...`, so `fimmia-hf train` and
    `accelerate launch -m fimmia_hf.cli train` behave the same. Returns None to run in-process."""
    import os

    if "LOCAL_RANK" in os.environ or "ACCELERATE_MIXED_PRECISION" in os.environ:
        return None  # already a launched process
    from accelerate.commands.config import default_config_file

    if not os.path.isfile(default_config_file):
        return None  # no config: one process, exactly what `accelerate launch` would start
    from accelerate.commands.launch import launch_command, launch_command_parser

    launch_command(launch_command_parser().parse_args(["-m", "fimmia_hf.cli", *argv]))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        _top_parser().parse_args(argv[:1])  # help, version, or a usage error naming the commands
        return 2
    name = argv[0]
    from .configuration_fimmia import PickledWeightsError  # here, not at the top: `fimmia-hf --help` stays fast

    try:
        args = parse_command(name, argv[1:])
        if name in DISTRIBUTED and (code := _relaunch_with_accelerate(argv)) is not None:
            return code
        result = getattr(importlib.import_module(f"fimmia_hf.{COMMANDS[name][0]}"), f"run_{name}")(args)
        return result if isinstance(result, int) else 0
    except (ValueError, OSError, PickledWeightsError) as err:  # bad input, unreadable or unwritable files: one line
        print(f"fimmia-hf {name}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
