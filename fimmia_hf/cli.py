"""`fimmia-hf`: one subcommand per stage.

Each subcommand lives beside the code that does the work (a stage package's `cli` module, or the
module itself), as a pair of functions `add_<command>_arguments(parser)` and `run_<command>(args)`;
this file only routes, and imports a module when its command is used, so `fimmia-hf --help` stays
fast. `accelerate launch -m fimmia_hf.cli <command> ...` runs the same code in every process.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .configuration_fimmia import PickledWeightsError

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "validate": ("data", "check a sample table (columns, labels, media) and print a summary"),
    "finetune": ("finetuning", "SFT-LoRA fine-tune a target on member samples (controlled members)"),
    "neighbors": ("neighbors.cli", "generate K perturbed neighbours of each sample's text (and media)"),
    "embed": ("embeddings.cli", "embed each sample and its neighbours (text and media)"),
    "score": ("scoring.cli", "score samples and their neighbours with a target model (losses, per-token statistics)"),
    "train": ("training", "train a FiMMIA detector on scored samples"),
    "predict": ("training", "score samples with a trained detector; write predictions and metrics"),
    "evaluate": ("report", "one report: detector, classic attacks and blind baselines on a test split"),
    "attribute": ("attribution", "gradient attribution of the detector's input groups (ΔL vs Δe vs Δm), with graphs"),
    "shift": ("shift", "blind (model-free) baselines: is the member/non-member split shifted?"),
    "push": ("hub", "push a detector (with its model card) to the Hugging Face Hub"),
    "audit": ("audit", "dataset-level inference: was the target trained on this set? (test against known "
              "non-members, with a distribution-shift check)"),
    "demo": ("demo", "the whole pipeline end to end on synthetic data with tiny models (no network)"),
    "bench": ("benchmarks.runner", "benchmarks: each stage vs its naive loop, end-to-end throughput, memory"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only `command`'s module is imported to add its arguments."""
    parser = argparse.ArgumentParser(
        prog="fimmia-hf",
        description="Membership inference (training-data leakage detection) for multimodal LLMs.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {importlib.import_module('fimmia_hf').__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, (module, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == command:
            getattr(importlib.import_module(f"fimmia_hf.{module}"), f"add_{name}_arguments")(sub)
    return parser


# commands that use every process `accelerate launch` starts (data-parallel training, sharded scoring)
DISTRIBUTED = {"finetune", "score", "train"}


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
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    if args.command in DISTRIBUTED and (code := _relaunch_with_accelerate(argv)) is not None:
        return code
    module = importlib.import_module(f"fimmia_hf.{COMMANDS[args.command][0]}")
    try:
        result = getattr(module, f"run_{args.command}")(args)
        return result if isinstance(result, int) else 0
    except (ValueError, OSError, PickledWeightsError) as err:  # bad input, unreadable or unwritable files: one line
        print(f"fimmia-hf {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
