"""The sampling stage: several responses of the policy per training problem, written to JSONL as they come.

One line per problem (``samples.jsonl``): its id, prompt, gold answer, whether it is held out, and its sampled
responses (policy token ids, text, finish reason). A rerun skips the problems already in the file, so an
interrupted run resumes; a sidecar ``samples.meta.json`` holds the settings, and a rerun with different ones is
refused rather than mixing two distributions in one file. Greedy responses of the held-out problems (the
baseline of the best-of-N lift) go to ``greedy.jsonl`` the same way.

Every row draws from its own generator, seeded from the run seed, the problem id and the sample index, so a
problem's samples do not depend on the batch it ran in.
"""

from __future__ import annotations

import json
import random
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nabla import jsonio
from nabla._typing import TYPE_CHECKING
from nabla.errors import ConfigurationError, DataError, require_finite
from nabla.eval.datasets import (
    DATASETS,
    PROMPT_TEMPLATE,
    Problem,
    dataset_purpose,
    format_question,
    load_dataset,
    require_training_split,
)
from nabla.progress import Counter
from nabla.rewardtrain.wordproblems import NAME as GENERATED
from nabla.rewardtrain.wordproblems import SPLIT as GENERATED_SPLIT
from nabla.rewardtrain.wordproblems import one_step_problems
from nabla.sampler import SamplingConfig

if TYPE_CHECKING:  # torch and transformers are imported where they are used (a fast `--help`)
    from nabla.policy import Policy

#: A prompt that asks for the answer without asking for reasoning: the 135M default policy answers it briefly.
SHORT_PROMPT_TEMPLATE = "{question} Put the final answer in \\boxed{}."
SAMPLES_FILE = "samples.jsonl"
GREEDY_FILE = "greedy.jsonl"
META_FILE = "samples.meta.json"


@dataclass
class SampleSettings:
    """Which problems to sample and how.

    Args:
        datasets: training sets as ``name/split`` (``mawps/addsub``, ``gsm8k/train``, ``generated/onestep``: the
            procedural one-step word problems of :mod:`nabla.rewardtrain.wordproblems`); evaluation-only sets
            (SVAMP, ASDiv, GSM8K test, MATH test, MATH-500) are refused. ``name/split:count`` draws ``count``
            problems from that set alone, after the others.
        problems: how many problems to draw from the union of the sets listed without a count.
        samples_per_problem: responses per problem.
        heldout_fraction: share of problems (by problem, not by sample) kept out of training for evaluation.
        max_new_tokens: longest response.
        sampling: temperature / top-k / top-p of the samples.
        problems_per_batch: problems whose samples run as one batch (batch = this x samples_per_problem).
        greedy_heldout: also decode each held-out problem greedily (the baseline of the best-of-N lift).
        prompt_templates: prompts around each question (``{question}`` is replaced); each problem gets one of them,
            chosen by a hash of its id, so the reward model learns to judge answers to every prompt style listed
            (default: the evaluation prompt, which makes small models reason at length, and a short one).
        exclude_evaluation_overlap: drop training questions that also occur in an evaluation-only set.
    """

    datasets: list[str] = field(
        default_factory=lambda: ["mawps/addsub", "mawps/singleop", "mawps/singleeq", "mawps/multiarith"]
    )
    problems: int = 256
    samples_per_problem: int = 8
    heldout_fraction: float = 0.25
    max_new_tokens: int = 128
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.7, top_p=0.95))
    problems_per_batch: int = 4
    greedy_heldout: bool = True
    prompt_templates: list[str] = field(default_factory=lambda: [PROMPT_TEMPLATE, SHORT_PROMPT_TEMPLATE])
    exclude_evaluation_overlap: bool = True

    def __post_init__(self) -> None:
        require_finite(self)
        if not self.datasets:
            raise ConfigurationError("data.datasets is empty; name at least one training set, e.g. mawps/addsub")
        for source in self.datasets:
            parse_source(source)
        if self.problems < 2:
            raise ConfigurationError(f"data.problems must be >= 2 (got {self.problems})")
        if self.samples_per_problem < 2:
            raise ConfigurationError(f"data.samples_per_problem must be >= 2 (got {self.samples_per_problem})")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ConfigurationError(f"data.heldout_fraction must be in (0, 1) (got {self.heldout_fraction})")
        if self.max_new_tokens < 1 or self.problems_per_batch < 1:
            raise ConfigurationError("data.max_new_tokens and data.problems_per_batch must be >= 1")
        if not self.prompt_templates or any("{question}" not in t for t in self.prompt_templates):
            raise ConfigurationError("data.prompt_templates needs at least one template, each with {question}")

    def prompt(self, problem: Problem, seed: int) -> str:
        """The problem's prompt, in the template its id hashes to."""
        index = zlib.crc32(f"{seed}/template/{problem.id}".encode()) % len(self.prompt_templates)
        return format_question(problem.question, self.prompt_templates[index])


def parse_source(source: str) -> tuple[str, str, int | None]:
    """``mawps/addsub`` -> ``("mawps", "addsub", None)``; ``generated/onestep:120`` -> (..., 120): a source with
    its own count. Only training material is accepted."""
    spec, _, count = source.partition(":")
    name, _, split = spec.partition("/")
    if not split:
        raise ConfigurationError(f"dataset {source!r} needs a split: write it as name/split, e.g. gsm8k/train")
    if count and (not count.isdigit() or int(count) < 1):
        raise ConfigurationError(f"dataset {source!r}: the count after ':' must be a positive integer")
    if name == GENERATED:
        if split != GENERATED_SPLIT:
            raise ConfigurationError(f"the generated set is {GENERATED}/{GENERATED_SPLIT}, not {spec!r}")
    else:
        require_training_split(name, split)
    return name, split, int(count) if count else None


def load_source(name: str, split: str) -> list[Problem]:
    if name == GENERATED:
        return one_step_problems()
    return load_dataset(name, split)


def normalized(question: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9]+", " ", question.lower()).split())


def evaluation_questions() -> set[str]:
    """Normalised questions of every evaluation-only set (MAWPS shares 271 questions with ASDiv, verbatim)."""
    questions: set[str] = set()
    for name, splits in DATASETS.items():
        for split in splits:
            if dataset_purpose(name, split) == "evaluation":
                questions.update(normalized(p.question) for p in load_dataset(name, split))
    return questions


def select_problems(settings: SampleSettings, seed: int) -> list[Problem]:
    """The problems of a run, in sampling order: ``settings.problems`` drawn with ``seed`` from the union of the
    sources listed without a count, then, for each ``name/split:count`` source, ``count`` drawn from it alone.
    Repeated questions are dropped, and (unless turned off) any question that an evaluation set also holds."""
    excluded = evaluation_questions() if settings.exclude_evaluation_overlap else set()

    def fresh(problems: list[Problem]) -> list[Problem]:
        kept = []
        for problem in problems:
            key = normalized(problem.question)
            if key not in excluded:
                excluded.add(key)
                kept.append(problem)
        return kept

    sources = [parse_source(source) for source in settings.datasets]
    pool = fresh([p for name, split, count in sources if count is None for p in load_source(name, split)])
    random.Random(seed).shuffle(pool)
    chosen = pool[: settings.problems]
    for name, split, count in sources:
        if count is not None:
            own = fresh(load_source(name, split))
            random.Random(seed).shuffle(own)
            chosen += own[:count]
    return chosen


def is_heldout(problem_id: str, fraction: float, seed: int) -> bool:
    """A problem's side of the split, from a hash of its id: any prefix of the problem list splits alike."""
    return zlib.crc32(f"{seed}/{problem_id}".encode()) / 2**32 < fraction


def row_seed(seed: int, problem_id: str, index: int) -> int:
    return zlib.crc32(f"{seed}/{problem_id}/{index}".encode())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file; a last line cut short by a kill is ignored."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    records = []
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines) - 1:
                continue
            raise DataError(f"{path}:{number + 1} is not valid JSON; remove that line and rerun") from error
    return records


def check_meta(folder: Path, meta: dict[str, Any]) -> None:
    """Write the settings beside the samples, or refuse when the samples there were made with other ones."""
    path = folder / META_FILE
    meta = json.loads(json.dumps(meta))
    if path.is_file():
        known = json.loads(path.read_text())
        if known != meta:
            changed = sorted(k for k in set(known) | set(meta) if known.get(k) != meta.get(k))
            raise DataError(
                f"the samples in {folder} were made with other settings ({', '.join(changed)} differ); use another "
                "work_dir or delete samples.jsonl to resample"
            )
        return
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(jsonio.dumps(meta, indent=2))


def sampling_meta(
    settings: SampleSettings, policy_name: str, seed: int, demonstrations: Sequence[Sequence[str]] = ()
) -> dict[str, Any]:
    """What determines the samples of a problem. Which problems are drawn does not (a run with more problems or
    other sources reuses the samples already there; grading takes the selected problems only)."""
    meta = asdict(settings)
    for key in ("datasets", "problems", "exclude_evaluation_overlap", "problems_per_batch", "greedy_heldout"):
        meta.pop(key)
    extra = {"demonstrations": [list(pair) for pair in demonstrations]} if demonstrations else {}
    return {"policy": policy_name, "seed": seed, **meta, **extra}


def _batches(items: Sequence[Problem], size: int) -> Iterator[list[Problem]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _response(policy: Policy, token_ids: list[int], finish_reason: str) -> dict[str, Any]:
    return {"token_ids": token_ids, "text": policy.decode(token_ids), "finish_reason": finish_reason}


def _problem_record(problem: Problem, prompt: str, heldout: bool) -> dict[str, Any]:
    return {
        "id": problem.id,
        "source": problem.source,
        "prompt": prompt,
        "answer": problem.answer,
        "heldout": heldout,
    }


def sample_problems(
    policy: Policy,
    problems: Sequence[Problem],
    settings: SampleSettings,
    folder: Path,
    seed: int,
    progress: bool = True,
) -> int:
    """Sample the problems not yet in ``folder/samples.jsonl``; returns how many were sampled now."""
    return _sample_into(
        folder / SAMPLES_FILE,
        policy,
        problems,
        settings,
        seed,
        settings.sampling,
        settings.samples_per_problem,
        settings.problems_per_batch,
        "sampling",
        progress,
    )


def sample_greedy(
    policy: Policy,
    problems: Sequence[Problem],
    settings: SampleSettings,
    folder: Path,
    seed: int,
    progress: bool = True,
) -> int:
    """Greedy responses of the held-out problems not yet in ``folder/greedy.jsonl``."""
    heldout = [p for p in problems if is_heldout(p.id, settings.heldout_fraction, seed)]
    greedy = SamplingConfig(temperature=0.0, top_k=None, top_p=None)
    per_batch = settings.problems_per_batch * settings.samples_per_problem
    return _sample_into(folder / GREEDY_FILE, policy, heldout, settings, seed, greedy, 1, per_batch, "greedy", progress)


def _sample_into(
    path: Path,
    policy: Policy,
    problems: Sequence[Problem],
    settings: SampleSettings,
    seed: int,
    sampling: SamplingConfig,
    per_problem: int,
    problems_per_batch: int,
    name: str,
    progress: bool,
) -> int:
    """``per_problem`` responses of each problem not yet in ``path``, one record per problem as it completes."""
    import torch

    from nabla.eval.runner import RecordWriter

    done = {record["id"] for record in read_jsonl(path)}
    pending = [p for p in problems if p.id not in done]
    writer = RecordWriter(path)
    try:
        with Counter(name, len(problems), len(problems) - len(pending), progress) as bar:
            for batch in _batches(pending, problems_per_batch):
                prompts = [settings.prompt(p, seed) for p in batch]
                contexts = [policy.encode(prompt) for prompt in prompts for _ in range(per_problem)]
                generators = [
                    torch.Generator().manual_seed(row_seed(seed, p.id, j)) for p in batch for j in range(per_problem)
                ]
                rollouts = policy.generate(contexts, sampling, generators, settings.max_new_tokens)
                for i, (problem, prompt) in enumerate(zip(batch, prompts)):
                    record = _problem_record(problem, prompt, is_heldout(problem.id, settings.heldout_fraction, seed))
                    rows = rollouts[i * per_problem : (i + 1) * per_problem]
                    record["responses"] = [_response(policy, r.token_ids, r.finish_reason) for r in rows]
                    writer.write(record)
                bar.advance(len(batch))
    finally:
        writer.close()
    return len(pending)
