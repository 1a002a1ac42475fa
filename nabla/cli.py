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
    "duality": ("nabla.worlds.enumerable.command:duality", "measure RL, ∇-Reasoner and Langevin DTO against exact ρ*"),
    "arithmetic": ("nabla.worlds.arithmetic.pipeline:arithmetic", "arithmetic world: train both models and compare"),
    "recipes": ("nabla.recipebook:recipes", "list the recipes shipped with nabla (`--config <name>` runs one)"),
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


#: subcommand -> parameters of its function that only Python callers can pass (not options)
PYTHON_ONLY: dict[str, frozenset[str]] = {
    "evaluate": frozenset({"problems"}),
    "compare": frozenset({"problems"}),
}


def _description(function: Callable[..., Any]) -> str:
    """The docstring without its ``Args:`` section (jsonargparse gives each option its own line of help)."""
    from docstring_parser import parse

    doc = parse(inspect.getdoc(function) or "")
    return "\n\n".join(part for part in (doc.short_description, doc.long_description) if part)


def _read_shared_docs() -> None:
    """Teach docstring-parser (which jsonargparse reads ``Args:`` with) this package's way of documenting related
    fields together, ``lr, weight_decay: AdamW on the adapter.``: each name gets the shared description instead of
    none (docstring-parser would document one parameter called ``"lr, weight_decay"``). Installed once."""
    import copy

    import docstring_parser

    if getattr(docstring_parser.parse, "_nabla_shared_docs", False):
        return
    parse = docstring_parser.parse

    def parse_shared(text: str | None, *args: Any, **kwargs: Any) -> Any:
        doc = parse(text, *args, **kwargs)
        meta = []
        for item in doc.meta:
            if isinstance(item, docstring_parser.DocstringParam) and "," in item.arg_name:
                for name in (part.strip() for part in item.arg_name.split(",")):
                    single = copy.copy(item)
                    single.arg_name, single.args = name, [*item.args[:-1], name]
                    meta.append(single)
            else:
                meta.append(item)
        doc.meta = meta
        return doc

    parse_shared._nabla_shared_docs = True  # type: ignore[attr-defined]
    docstring_parser.parse = parse_shared


def build_parser(command: str):
    """The jsonargparse parser of one subcommand, built from its function's signature and docstring."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    _read_shared_docs()
    function = _load(COMMANDS[command][0])
    parser = ArgumentParser(prog=f"nabla {command}", description=_description(function), exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML recipe; later options override it")
    parser.add_function_arguments(function, fail_untyped=True, skip=set(PYTHON_ONLY.get(command, ())))
    return parser, function


def run(command: str, args: Sequence[str]) -> Any:
    from nabla.progress import silenced
    from nabla.recipebook import resolve_config_args

    parser, function = build_parser(command)
    args = resolve_config_args(args)  # `--config default`: the packaged recipe of that name
    _check_recipes(args)
    config = parser.parse_args(list(args))
    config.pop("config", None)
    init = parser.instantiate(config)
    kwargs = {key: init[key] for key in inspect.signature(function).parameters if key in init}
    with silenced(kwargs.get("progress") is False):  # --progress false: no bar of ours, nor anyone else's
        return function(**kwargs)


def _check_recipes(args: Sequence[str]) -> None:
    """Refuse a ``--config`` file that is not text in one line (the YAML reader would raise a traceback)."""
    from pathlib import Path

    from nabla.errors import ConfigurationError

    paths = [b for a, b in zip(args, args[1:]) if a == "--config"] + [
        a.split("=", 1)[1] for a in args if a.startswith("--config=")
    ]
    for path in map(Path, paths):
        if not path.is_file():
            continue  # jsonargparse names a missing file itself
        try:
            path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as error:
            raise ConfigurationError(
                f"the recipe {str(path)!r} is not a text file (byte {error.start}: {error.reason}); pass a YAML "
                "recipe saved as UTF-8 text"
            ) from error


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
    except UnicodeDecodeError as error:  # a file read as text that is not: a user's input, not a bug
        print(
            f"nabla {command}: error: a file given is not UTF-8 text (byte {error.start}: {error.reason}); pass text "
            "files (recipes, prompts, datasets) saved as UTF-8",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(f"nabla {command}: interrupted; results written so far are kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
