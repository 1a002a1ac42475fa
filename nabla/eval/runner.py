"""The evaluation runner: ``nabla evaluate`` (one method) and ``nabla compare`` (several, side by side).

Public functions:

- ``evaluate(policy, reward, dataset, method, output, limit, offset, seed, num_processes, progress)``: one method
  over a dataset slice; prints a summary table and writes ``summary.json``.
- ``compare(policy, reward, dataset, methods, output, ...)``: several methods on the same problems; also writes
  ``comparison.md`` (a side-by-side table) and ``comparison.png`` (accuracy against model calls per problem,
  one curve per method family, e.g. an N-scaling sweep of best-of-N).
- ``run(plan, on_record=None) -> list[MethodSummary]``: what both do, for Python callers.
- ``read_records(output) -> list[dict]``: every record written so far under ``output``.
- :class:`RecordWriter` ``(path).write(record)`` and ``read_jsonl(path)``: the append-only, fsynced JSONL files
  that make any long job resumable (a half-written last line is dropped on both sides).

Records. Each rank appends one JSON line per (problem, method) to ``output/records/rank-<r>.jsonl`` as soon as
the problem is solved (flushed and fsynced). A rerun with the same ``output`` reads every records file, skips
the (problem, method) pairs already there, and drops a half-written last line left by a kill; so an interrupted
run resumes without redoing or duplicating work, with any number of processes. ``output/manifest.json`` holds
the models, dataset, seed and method settings, and a digest of the reward model's weights (a retrained adapter
under the same name is another model): a rerun with different ones is refused (a new method may be added).
Each problem's seed depends only on the run seed and the problem id, so records do not depend on sharding.

Sharding. With ``num_processes > 1`` the pending problems are dealt round-robin to processes started by
Lightning Fabric (``Fabric(accelerator="cpu", devices=k, strategy="ddp_spawn")``: DDP with the spawn launcher,
which also works from notebooks and tests); each loads its own copy of the models.

Pool. With ``pool > 1`` each process solves its problems method by method, ``pool`` problems decoding at once
(continuous batching, ``Solver.solve_many``): their rollouts, proposals and DTO passes share batches and a finished
problem's slot is refilled at once. The records are those of ``pool = 1``; only their order in the files changes.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nabla import jsonio
from nabla._typing import TYPE_CHECKING
from nabla.config import PolicySpec, RewardSpec
from nabla.errors import ConfigurationError, DataError
from nabla.eval.datasets import DatasetSpec, Problem
from nabla.eval.methods import NEEDS_REWARD, MethodSpec, Solver

if TYPE_CHECKING:  # torchmetrics is imported by the summaries: `nabla evaluate --help` does not need torch
    from nabla.eval.metrics import MethodSummary

RECORDS_FOLDER = "records"
MANIFEST = "manifest.json"
SUMMARY = "summary.json"

OnRecord = Callable[[dict[str, Any]], None]


@dataclass
class RunPlan:
    """Everything a run needs; picklable, so that spawned processes receive it whole."""

    policy: PolicySpec
    reward: RewardSpec
    dataset: DatasetSpec
    methods: list[MethodSpec]
    output: str
    limit: int | None = None
    offset: int = 0
    seed: int = 0
    num_processes: int = 1
    progress: bool = True
    problems: list[Problem] | None = None
    pool: int = 1

    @property
    def folder(self) -> Path:
        return Path(self.output)

    def labels(self) -> list[str]:
        return [m.display_label for m in self.methods]


# ---------------------------------------------------------------------------------------------- records on disk
class RecordWriter:
    """Appends records to one rank's file, each flushed and fsynced before the next problem starts."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _drop_partial_tail(path)
        self.handle = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.handle.write(jsonio.dumps(record, ensure_ascii=False) + "\n")
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()


def _drop_partial_tail(path: Path) -> None:
    """Cut a last line that a kill left without its newline (only the rank that owns the file does this)."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    with path.open("r+b") as handle:
        handle.truncate(data.rfind(b"\n") + 1)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The complete records of a file written by :class:`RecordWriter` (none if it does not exist). A last line
    without its newline is a write cut short: it is ignored here, as the writer drops it before appending."""
    path = Path(path)
    if not path.is_file():
        return []
    complete = path.read_text(encoding="utf-8").rpartition("\n")[0]
    records = []
    for number, line in enumerate(complete.split("\n") if complete else []):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number + 1} is not a valid record; remove that line and rerun") from error
    return records


def read_records(output: str | Path) -> list[dict[str, Any]]:
    """All records under ``output`` (every rank's file), the first copy of each (method, problem) pair."""
    records: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for path in sorted((Path(output) / RECORDS_FOLDER).glob("*.jsonl")):
        for record in read_jsonl(path):
            key = (record["method"], record["problem_id"])
            if key not in seen:
                seen.add(key)
                records.append(record)
    return records


# ---------------------------------------------------------------------------------------------- manifest
def _jsonable(value: Any) -> Any:
    return json.loads(jsonio.dumps(value))


def _with_defaults(stored: Any, defaults: Any) -> Any:
    """A manifest entry written before settings were added: the added settings take their defaults."""
    if isinstance(stored, dict) and isinstance(defaults, dict):
        return {**{key: value for key, value in defaults.items() if key not in stored}, **stored}
    return stored


def reward_weights_digest(reward: RewardSpec) -> str | None:
    """A digest of the reward model's local weight files (for ``default``: the embedded adapter), so that records
    scored by a retrained model under the same name are refused, not mixed; ``None`` for a hub name or no reward
    model. Files up to 64 MiB are read whole, larger ones by size and their first and last MiB."""
    import hashlib

    from nabla.defaults import DEFAULT, REWARD_ADAPTER

    if reward.kind != "classifier":
        return None
    folders = [REWARD_ADAPTER if reward.name_or_path == DEFAULT and reward.adapter is None else None]
    folders += [Path(reward.adapter) if reward.adapter else None]
    folders += [Path(reward.name_or_path) if reward.name_or_path != DEFAULT else None]
    digest = hashlib.sha256()
    files = [f for folder in folders if folder and folder.is_dir() for f in sorted(folder.iterdir())]
    weights = [f for f in files if f.suffix in (".safetensors", ".bin", ".gguf", ".pt")]
    if not weights:
        return None
    mib = 1 << 20
    for file in weights:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with file.open("rb") as handle:
            if size <= 64 * mib:
                digest.update(handle.read())
            else:
                digest.update(handle.read(mib))
                handle.seek(size - mib)
                digest.update(handle.read(mib))
    return digest.hexdigest()[:16]


def _check_manifest(plan: RunPlan) -> None:
    """Refuse to mix records of different settings in one folder; record new methods."""
    path = plan.folder / MANIFEST
    shared = _jsonable(
        {
            "policy": asdict(plan.policy),
            "reward": asdict(plan.reward),
            "dataset": asdict(plan.dataset),
            "seed": plan.seed,
            "reward_weights": reward_weights_digest(plan.reward),
        }
    )
    methods = _jsonable({m.display_label: m.to_dict() for m in plan.methods})
    defaults = _jsonable({"policy": asdict(PolicySpec()), "reward": asdict(RewardSpec())})
    if path.is_file():
        manifest = json.loads(path.read_text())
        for key, value in shared.items():
            if _with_defaults(manifest.get(key), defaults.get(key)) != value:
                raise DataError(
                    f"{plan.output} holds records made with another {key} ({manifest.get(key)!r}); pass a new "
                    "--output, or delete the folder to start over"
                )
        for label, settings in methods.items():
            known = manifest["methods"].get(label)
            if known is not None and known != settings:
                raise DataError(
                    f"{plan.output} holds records of method {label!r} with other settings; give the method another "
                    "label, pass a new --output, or delete the folder"
                )
        methods = {**manifest["methods"], **methods}
    plan.folder.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".tmp")
    staging.write_text(jsonio.dumps({**shared, "methods": methods}, indent=2))
    staging.replace(path)


# ---------------------------------------------------------------------------------------------- the work
def _pending(plan: RunPlan) -> list[tuple[Problem, list[int]]]:
    """Problems with the indices of the methods not yet done on them, in dataset order."""
    done = {(r["method"], r["problem_id"]) for r in read_records(plan.output)}
    labels = plan.labels()
    work = []
    for problem in plan.problems:
        todo = [i for i, label in enumerate(labels) if (label, problem.id) not in done]
        if todo:
            work.append((problem, todo))
    return work


def _solve_shard(
    plan: RunPlan, work: list[tuple[Problem, list[int]]], rank: int, world: int, on_record: OnRecord | None = None
) -> int:
    """Solve this rank's share of ``work``, writing each record as it is done; returns how many were written."""
    import torch

    from nabla.progress import loading_quietly

    if world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    share = work[rank::world]
    if not share:
        return 0
    solvers: dict[int, Solver] = {}
    written = 0
    total = sum(len(todo) for _, todo in share)
    with _Progress(plan.progress and rank == 0, total, world) as advance:  # from the first second: loading too
        with loading_quietly():
            policy = plan.policy.load()
            reward = plan.reward.load(policy)
        advance(None)
        writer = RecordWriter(plan.folder / RECORDS_FOLDER / f"rank-{rank}.jsonl")
        try:
            for record in _solved(plan, share, policy, reward, solvers):
                writer.write(record)
                written += 1
                if record.get("status", "ok") != "ok":  # recorded (a rerun goes on past it), and said
                    print(
                        f"nabla: {record['method']} {record['status']} problem {record['problem_id']}: "
                        f"{record['error']}",
                        file=sys.stderr,
                    )
                advance(record)
                if on_record is not None:
                    on_record(record)
        finally:
            writer.close()
    return written


def _solved(
    plan: RunPlan, share: list[tuple[Problem, list[int]]], policy: Any, reward: Any, solvers: dict[int, Solver]
) -> Iterator[dict[str, Any]]:
    """The records of a share as they are solved: problem by problem (``pool`` 1), or method by method with
    ``plan.pool`` problems decoded at once (continuous batching; the same records, in another order)."""

    def solver(index: int) -> Solver:
        if index not in solvers:
            solvers[index] = Solver(plan.methods[index], policy, reward, plan.dataset.prompt_template)
        return solvers[index]

    if plan.pool == 1:
        for problem, todo in share:
            for index in todo:
                yield solver(index).solve(problem, plan.seed)
        return
    for index in range(len(plan.methods)):
        problems = [problem for problem, todo in share if index in todo]
        if problems:
            yield from solver(index).solve_many(problems, plan.seed, plan.pool)


class _Progress:
    """Progress over (problem, method) pairs of rank 0's share (a :class:`nabla.progress.Counter`), with the
    running count of right answers as its note."""

    def __init__(self, enabled: bool, total: int, world: int) -> None:
        from nabla.progress import Counter

        label = "evaluating" + (f" (rank 0 of {world})" if world > 1 else "")
        self.counter = Counter(label, total, progress=enabled, note="loading the models")
        self.right = 0

    def __enter__(self) -> Callable[[dict[str, Any] | None], None]:
        self.counter.__enter__()
        return self.advance

    def advance(self, record: dict[str, Any] | None) -> None:
        """Count a finished record (``None``: the models are loaded, solving starts)."""
        if record is None:
            self.counter.advance(0, note="solving the first problem")
            return
        self.right += bool(record["correct"])
        self.counter.advance(1, note=f"{record['method']} · {self.right}/{self.counter.done + 1} right so far")

    def __exit__(self, *exc: Any) -> None:
        self.counter.__exit__(*exc)


def _fabric_shard(fabric: Any, payload: bytes) -> int:
    plan, work = pickle.loads(payload)
    return _solve_shard(plan, work, fabric.global_rank, fabric.world_size)


def _preflight(plan: RunPlan) -> None:
    """Errors a user can cause, raised here as one-line errors instead of inside worker processes."""
    if plan.num_processes < 1:
        raise ConfigurationError(f"num_processes must be >= 1 (got {plan.num_processes})")
    if plan.pool < 1:
        raise ConfigurationError(f"pool must be >= 1 (got {plan.pool}); 1 solves one problem at a time")
    if not plan.methods:
        raise ConfigurationError("no method to run; list at least one under methods")
    labels = plan.labels()
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ConfigurationError(f"methods share the label(s) {', '.join(repeated)}; give each a distinct label")
    for method in plan.methods:
        if method.name in NEEDS_REWARD and plan.reward.kind == "none":
            raise ConfigurationError(f"method {method.display_label} ranks by reward but reward.kind is none")
        if method.name == "nabla" and plan.reward.kind == "none" and method.optimizer.reward_weight:
            raise ConfigurationError(
                f"method {method.display_label} (∇-Reasoner) needs a differentiable reward; set reward.kind, or "
                "optimizer.reward_weight=0 and sampler.rejection_sampling=false"
            )
    plan.policy.resolved_path()  # converts the default policy once, here, not in every process at the same time


def run(plan: RunPlan, on_record: OnRecord | None = None) -> list[MethodSummary]:
    """Solve every pending (problem, method) pair of ``plan``, then summarise all records of its slice;
    ``plan.progress=False`` silences every progress bar and line, third-party ones included."""
    from nabla.progress import silenced

    with silenced(not plan.progress):
        return _run(plan, on_record)


def _run(plan: RunPlan, on_record: OnRecord | None) -> list[MethodSummary]:
    _preflight(plan)
    if plan.problems is None:
        plan.problems = plan.dataset.load(plan.limit, plan.offset)
    if not plan.problems:
        if plan.offset or plan.limit == 0:
            fix = "lower the offset" if plan.offset else "set limit >= 1, or null for every problem"
            raise DataError(f"the slice offset={plan.offset} limit={plan.limit} holds no problem; {fix}")
        raise DataError("the dataset holds no problem; pass a dataset with at least one")
    _check_manifest(plan)
    work = _pending(plan)
    if work:
        world = min(plan.num_processes, len(work))
        if world == 1:
            _solve_shard(plan, work, 0, 1, on_record)
        else:
            if on_record is not None:
                raise ConfigurationError("on_record callbacks run in-process only; use num_processes=1")
            from lightning.fabric import Fabric

            fabric = Fabric(accelerator="cpu", devices=world, strategy="ddp_spawn")
            # pickled whole: Fabric's launcher walks its arguments and refuses frozen dataclasses such as Problem
            fabric.launch(_fabric_shard, pickle.dumps((plan, work)))
    return _summaries(plan)


def _summaries(plan: RunPlan) -> list[MethodSummary]:
    from nabla.eval.metrics import summarize

    ids = {p.id for p in plan.problems}
    records = [r for r in read_records(plan.output) if r["problem_id"] in ids]
    by_method = {label: [r for r in records if r["method"] == label] for label in plan.labels()}
    missing = [label for label, rows in by_method.items() if len(rows) != len(ids)]
    if missing:
        raise DataError(f"records missing for {', '.join(missing)} after the run; rerun to complete them")
    summaries = [summarize(rows) for rows in by_method.values()]
    (plan.folder / SUMMARY).write_text(jsonio.dumps([s.to_dict() for s in summaries], indent=2))
    return summaries


# ---------------------------------------------------------------------------------------------- commands
def evaluate(
    policy: PolicySpec = PolicySpec(),  # noqa: B008 - jsonargparse reads dataclass defaults
    reward: RewardSpec = RewardSpec(),  # noqa: B008
    dataset: DatasetSpec = DatasetSpec(),  # noqa: B008
    method: MethodSpec = MethodSpec(),  # noqa: B008
    output: str = "runs/evaluate",
    limit: int | None = None,
    offset: int = 0,
    seed: int = 0,
    num_processes: int = 1,
    progress: bool = True,
    problems: list[Problem] | None = None,
    pool: int = 1,
) -> list[MethodSummary]:
    """Run one method over a dataset slice, one JSONL record per problem (resumable), and print a summary.

    Args:
        policy: the causal LM (``default``: the embedded SmolLM2-135M-Instruct).
        reward: the reward model (``kind: self_judge`` needs no training; ``none`` for reward-free methods).
        dataset: the problems and the prompt template.
        method: the decoding method and its settings.
        output: the folder of records, manifest and summary; rerunning with it resumes.
        limit: how many problems (default: all from ``offset`` on).
        offset: the first problem's index.
        seed: the run seed; each problem's seed derives from it and the problem id.
        num_processes: processes to shard problems across (Lightning Fabric DDP on CPU).
        progress: show progress (a bar on a terminal, a line every 20 s otherwise); ``false`` silences all
            progress output, third-party bars included.
        problems: problems to run instead of the dataset's (Python callers, e.g. a generated task); ``limit`` and
            ``offset`` still apply, ``dataset.prompt_template`` still formats them.
        pool: problems decoded at once per process (continuous batching: their rollouts, proposals and DTO
            passes share batches, a finished problem's slot refilled at once); the records are the same for any
            pool, only their order in the files changes.
    """
    from nabla.eval.report import print_summaries

    plan = RunPlan(policy, reward, dataset, [method], output, limit, offset, seed, num_processes, progress, pool=pool)
    plan.problems = _sliced(problems, limit, offset)
    summaries = run(plan)
    print_summaries(summaries, title=_title(plan))
    return summaries


def compare(
    policy: PolicySpec = PolicySpec(),  # noqa: B008 - jsonargparse reads dataclass defaults
    reward: RewardSpec = RewardSpec(),  # noqa: B008
    dataset: DatasetSpec = DatasetSpec(),  # noqa: B008
    methods: list[MethodSpec] | None = None,
    output: str = "runs/compare",
    limit: int | None = None,
    offset: int = 0,
    seed: int = 0,
    num_processes: int = 1,
    progress: bool = True,
    title: str | None = None,
    problems: list[Problem] | None = None,
    pool: int = 1,
    paired: list[tuple[str, str]] | None = None,
) -> list[MethodSummary]:
    """Run several methods on the same problems; print and write a side-by-side table and an accuracy-vs-cost plot.

    Args:
        policy: the causal LM (``default``: the embedded SmolLM2-135M-Instruct).
        reward: the reward model shared by every method that uses one.
        dataset: the problems and the prompt template.
        methods: the methods (default: greedy, self-consistency@4, best-of-4, ∇-Reasoner with 4 rollouts).
        output: the folder of records, manifest, summary, ``comparison.md`` and ``comparison.png``.
        limit: how many problems (default: all from ``offset`` on).
        offset: the first problem's index.
        seed: the run seed; each problem's seed derives from it and the problem id.
        num_processes: processes to shard problems across (Lightning Fabric DDP on CPU).
        progress: show progress (a bar on a terminal, a line every 20 s otherwise); ``false`` silences all
            progress output, third-party bars included.
        title: the title of the table and the plot.
        problems: problems to run instead of the dataset's (Python callers, e.g. a generated task); ``limit`` and
            ``offset`` still apply, ``dataset.prompt_template`` still formats them.
        pool: problems decoded at once per process (continuous batching: their rollouts, proposals and DTO
            passes share batches, a finished problem's slot refilled at once); the records are the same for any
            pool, only their order in the files changes.
        paired: method pairs ``[a, b]`` (labels as in the table, e.g. ``[nabla@8, best_of_n@8]``) to compare problem
            by problem: exact McNemar test and a paired bootstrap 95% interval of ``a - b``, in ``paired.md``
            (default: ∇-Reasoner against every other method of the run).
    """
    from nabla.eval.paired import paired_tests
    from nabla.eval.report import plot_comparison, print_summaries, write_markdown

    methods = methods if methods is not None else default_methods()
    plan = RunPlan(
        policy, reward, dataset, list(methods), output, limit, offset, seed, num_processes, progress, pool=pool
    )
    plan.problems = _sliced(problems, limit, offset)
    summaries = run(plan)
    heading = title or _title(plan)
    print_summaries(summaries, title=heading)
    write_markdown(summaries, plan.folder / "comparison.md", title=heading)
    plot_comparison(summaries, plan.folder / "comparison.png", title=heading)
    pairs = paired if paired is not None else default_pairs([summary.method for summary in summaries])
    for result in paired_tests(plan.folder, pairs, heading):
        low, high = result["difference_ci95"]
        print(
            f"{result['a']} - {result['b']}: {result['difference']:+.1%} [{low:+.1%}, {high:+.1%}] on "
            f"{result['problems']} problems, exact McNemar p = {result['mcnemar_p']:.3g}"
        )
    return summaries


def default_pairs(labels: list[str]) -> list[tuple[str, str]]:
    """Each ∇-Reasoner method of a run against each method that is not one."""
    ours = [label for label in labels if label.startswith("nabla")]
    return [(a, b) for a in ours for b in labels if not b.startswith("nabla")]


def _sliced(problems: list[Problem] | None, limit: int | None, offset: int) -> list[Problem] | None:
    return None if problems is None else list(problems)[offset : None if limit is None else offset + limit]


def _title(plan: RunPlan) -> str:
    sources = ", ".join(dict.fromkeys(p.source for p in plan.problems or []))
    return f"{sources} · {len(plan.problems or [])} problems · seed {plan.seed}"


def default_methods(n: int = 4) -> list[MethodSpec]:
    """Greedy, self-consistency@n, best-of-n and ∇-Reasoner with an n-rollout budget."""
    return [
        MethodSpec("greedy"),
        MethodSpec("self_consistency", n=n),
        MethodSpec("best_of_n", n=n),
        MethodSpec("nabla", n=n),
    ]
