"""The recipes shipped with the package: ``nabla/recipes/`` (in a source checkout ``recipes/`` is a link to the same
folder). ``nabla recipes`` lists them and ``--config NAME`` finds one by name, so an installed wheel has them too.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

#: The folder of the packaged recipes.
RECIPES = Path(__file__).resolve().parent / "recipes"
_COMMAND = re.compile(r"nabla ([a-z-]+) --config")


def recipe_names() -> list[str]:
    """Every packaged recipe's name: its path under :data:`RECIPES` without ``.yaml`` (``arithmetic/tune``)."""
    return sorted(path.relative_to(RECIPES).with_suffix("").as_posix() for path in RECIPES.rglob("*.yaml"))


def find_recipe(name: str) -> Path | None:
    """The packaged recipe called ``name`` (with or without ``.yaml``), or ``None``."""
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    return RECIPES / f"{stem}.yaml" if stem in recipe_names() else None


def recipe_command(path: Path) -> str | None:
    """The subcommand a recipe is for, from its ``nabla <command> --config`` comment line."""
    match = _COMMAND.search(path.read_text(encoding="utf-8"))
    return match.group(1) if match else None


def recipe_summary(path: Path, width: int = 72) -> str:
    """The first sentence of the recipe's opening comment, cut at ``width`` characters."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#") or _COMMAND.search(line):
            break
        lines.append(line.lstrip("# ").strip())
    text = " ".join(lines)
    end = re.search(r"\.(\s|$)", text)
    text = text[: end.start()] if end else text
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


def resolve_config_args(args: Sequence[str]) -> list[str]:
    """``--config NAME`` for a packaged recipe's name becomes its path; an existing file of that name wins."""
    out = list(args)
    for index, arg in enumerate(out):
        if arg == "--config" and index + 1 < len(out):
            out[index + 1] = _config_path(out[index + 1])
        elif arg.startswith("--config="):
            out[index] = "--config=" + _config_path(arg.split("=", 1)[1])
    return out


def _config_path(value: str) -> str:
    if Path(value).expanduser().exists():
        return value
    packaged = find_recipe(value)
    return str(packaged) if packaged is not None else value


def recipes(show: str | None = None) -> list[str]:
    """List the recipes shipped with nabla (name, command, what it runs), or print one.

    Run a recipe with ``nabla <command> --config <name>``; a file path works as well.

    Args:
        show: print this recipe's YAML instead of the list (a name from the list); redirect it to a file to start
            your own recipe.
    """
    from nabla.errors import ConfigurationError

    names = recipe_names()
    if show is not None:
        path = find_recipe(show)
        if path is None:
            raise ConfigurationError(f"no packaged recipe called {show!r}; choose one of {', '.join(names)}")
        print(path.read_text(encoding="utf-8"), end="")
        return [show]
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title="recipes shipped with nabla",
        caption="run: nabla <command> --config <name> · print: nabla recipes --show <name>",
        box=None,
        title_justify="left",
        caption_justify="left",
    )
    table.add_column("name", no_wrap=True)
    table.add_column("command", no_wrap=True)
    table.add_column("what it runs")
    for name in names:
        path = RECIPES / f"{name}.yaml"
        table.add_row(name, recipe_command(path) or "-", recipe_summary(path))
    Console().print(table)
    return names
