"""How long the command line takes to answer ``--help``: ``nabla --help`` and ``nabla <command> --help`` for every
command, each in a fresh process, with the wall and CPU time of the median of ``--repeats`` runs and whether torch,
transformers or Lightning were imported on the way (the target: under 2 s, none of them imported).

    python benchmarks/cli_startup.py                 # every command, 3 runs each
    python benchmarks/cli_startup.py --repeats 5 --commands fit compare

CPU time (user + system of the child) is the figure to compare across machines and loads; wall time on a busy
machine is larger.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from rich.console import Console
from rich.table import Table

from nabla.cli import COMMANDS

TARGET_S = 2.0
HEAVY = ("torch", "transformers", "lightning")
#: runs the CLI's main in a fresh interpreter, then names the heavy modules it imported
PROBE = (
    "import sys\nfrom nabla.cli import main\n"
    "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
    f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)"
)


def measure(args: list[str]) -> tuple[float, float, list[str]]:
    """Wall seconds, CPU seconds (user + system) and the heavy modules imported, for one run of ``nabla args``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env={**os.environ, "COLUMNS": "100"}
    )
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    heavy = next((line[6:] for line in done.stderr.splitlines() if line.startswith("HEAVY=")), "?")
    return wall, cpu, [name for name in heavy.split(",") if name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--commands", nargs="*", default=list(COMMANDS))
    parser.add_argument("--json", help="also write the figures to this file")
    options = parser.parse_args()
    cases = [["--help"]] + [[command, "--help"] for command in options.commands]
    rows = []
    for args in cases:
        runs = [measure(args) for _ in range(options.repeats)]
        wall = statistics.median(run[0] for run in runs)
        cpu = statistics.median(run[1] for run in runs)
        rows.append({"command": "nabla " + " ".join(args), "wall_s": wall, "cpu_s": cpu, "imported": runs[-1][2]})
    table = Table(title=f"nabla --help start-up (median of {options.repeats}; load {os.getloadavg()[0]:.1f})")
    for column in ("command", "wall s", "CPU s", f"< {TARGET_S:g} s", "heavy imports"):
        table.add_column(column, justify="left" if column in ("command", "heavy imports") else "right")
    for row in rows:
        fast = "yes" if row["wall_s"] < TARGET_S else "NO"
        table.add_row(row["command"], f"{row['wall_s']:.2f}", f"{row['cpu_s']:.2f}", fast, ", ".join(row["imported"]))
    Console().print(table)
    if options.json:
        with open(options.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
