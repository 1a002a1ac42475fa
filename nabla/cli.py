"""The ``nabla`` command line: one entry point, one subcommand per job, every option settable from a YAML recipe
(``--config recipe.yaml``), overridable on the command line (``--optimizer.steps 10``) and printable
(``--print_config``), in the jsonargparse / LightningCLI manner.

Each subcommand is a typed function elsewhere in the package; :data:`COMMANDS` maps names to them and only the
chosen one is imported. A :class:`~nabla.errors.NablaError` ends the program with one line on stderr and exit 2.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable, Sequence
from typing import Any

#: subcommand -> (``module:function``, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("nabla.commands:fit", "decode one prompt with ∇-Reasoner and print the answer, revisions and costs"),
    "evaluate": ("nabla.eval.runner:evaluate", "run one method over a dataset slice (resumable JSONL records)"),
    "compare": ("nabla.eval.runner:compare", "run several methods on the same problems: markdown table and plot"),
    "train-reward": ("nabla.rewardtrain.pipeline:train_reward", "train, evaluate and export the default reward model"),
    "rl": ("nabla.rl.train:finetune", "KL-regularised RL fine-tuning of a LoRA adapter (Lightning; CPU, GPU or DDP)"),
    "rl-vs-testtime": ("nabla.rl.compare:rl_vs_testtime", "RL fine-tuning vs ∇-Reasoner, arithmetic world"),
    "duality": ("nabla.worlds.enumerable.duality:duality", "measure RL, ∇-Reasoner and Langevin DTO against exact ρ*"),
    "arithmetic": ("nabla.worlds.arithmetic.pipeline:arithmetic", "arithmetic world: train both models and compare"),
}


def _load(target: str) -> Callable[..., Any]:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: nabla <command> [--config recipe.yaml] [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_text}" for name, (_, help_text) in COMMANDS.items()]
    lines += ["", "Run `nabla <command> --help` for a command's options."]
    return "\n".join(lines)


def build_parser(command: str):
    """The jsonargparse parser of one subcommand, built from its function's signature and docstring."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    function = _load(COMMANDS[command][0])
    parser = ArgumentParser(prog=f"nabla {command}", description=inspect.getdoc(function), exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML recipe; later options override it")
    parser.add_function_arguments(function, fail_untyped=True)
    return parser, function


def run(command: str, args: Sequence[str]) -> Any:
    parser, function = build_parser(command)
    config = parser.parse_args(list(args))
    config.pop("config", None)
    init = parser.instantiate_classes(config)
    return function(**{key: init[key] for key in inspect.signature(function).parameters if key in init})


def main(argv: Sequence[str] | None = None) -> int:
    from nabla.errors import NablaError

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help"}:
        print(_usage())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"nabla: unknown command {command!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    from jsonargparse import ArgumentError

    try:
        run(command, rest)
    except (NablaError, ArgumentError) as error:
        message = " ".join(str(error).split())
        hint = f" (see `nabla {command} --help`)" if isinstance(error, ArgumentError) else ""
        print(f"nabla {command}: error: {message}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nabla {command}: interrupted; results written so far are kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
