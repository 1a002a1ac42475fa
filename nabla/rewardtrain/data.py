"""Grading the samples, turning them into reward inputs, and the Lightning data module.

Every reward input is built by :meth:`nabla.reward.TransformerReward.input_ids`, the one formatting that scoring
uses too, so the model is trained on exactly what it will be asked to score. Batches hold whole problems (all
the responses of a problem together), so a pairwise loss sees every pair of a problem.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from nabla import jsonio
from nabla.errors import DataError
from nabla.eval.grading import is_correct, last_boxed
from nabla.reward import TransformerReward
from nabla.rewardtrain.sampling import GREEDY_FILE, SAMPLES_FILE, read_jsonl

GRADED_FILE = "graded.jsonl"
GRADING_FILE = "grading.json"


# ---------------------------------------------------------------------------------------------- grading
def grade_record(record: dict[str, Any]) -> dict[str, Any] | None:
    """The record with ``correct`` on each response; ``None`` when the gold answer cannot be parsed."""
    graded = dict(record)
    graded["responses"] = []
    for response in record["responses"]:
        correct = is_correct(record["answer"], response["text"])
        if correct is None:
            return None
        graded["responses"].append({**response, "correct": bool(correct)})
    return graded


def grade_samples(folder: Path, problem_ids: Sequence[str] | None = None) -> dict[str, Any]:
    """Grade the samples of ``problem_ids`` (default: every problem in ``samples.jsonl``), and the greedy
    responses, into ``graded.jsonl``; summary in ``grading.json``."""
    samples = read_jsonl(folder / SAMPLES_FILE)
    if not samples:
        raise DataError(f"no samples in {folder / SAMPLES_FILE}; run the sample stage first")
    if problem_ids is not None:
        by_id = {record["id"]: record for record in samples}
        missing = [i for i in problem_ids if i not in by_id]
        if missing:
            example = missing[0]
            raise DataError(f"{len(missing)} selected problems have no samples (e.g. {example}); run the sample stage")
        samples = [by_id[i] for i in problem_ids]
    greedy = {r["id"]: r["responses"][0] for r in read_jsonl(folder / GREEDY_FILE)}
    graded: list[dict[str, Any]] = []
    skipped = 0
    for record in samples:
        result = grade_record(record)
        if result is None:
            skipped += 1
            continue
        if record["id"] in greedy:
            response = greedy[record["id"]]
            result["greedy"] = {**response, "correct": bool(is_correct(record["answer"], response["text"]))}
        graded.append(result)
    with (folder / GRADED_FILE).open("w", encoding="utf-8") as handle:
        for record in graded:
            handle.write(jsonio.dumps(record, ensure_ascii=False) + "\n")
    summary = grading_summary(graded, skipped)
    summary["by_source"] = {
        source: grading_summary([r for r in graded if r["source"] == source])
        for source in sorted({r["source"] for r in graded})
    }
    (folder / GRADING_FILE).write_text(jsonio.dumps(summary, indent=2))
    return summary


def grading_summary(graded: Sequence[dict[str, Any]], skipped: int = 0) -> dict[str, Any]:
    """Per-sample accuracy, pass@k and greedy accuracy of the train and held-out problems."""
    summary: dict[str, Any] = {"skipped_unparsable_gold": skipped}
    sides = {"train": [r for r in graded if not r["heldout"]], "heldout": [r for r in graded if r["heldout"]]}
    for side, records in sides.items():
        labels = [[resp["correct"] for resp in r["responses"]] for r in records]
        flat = [x for row in labels for x in row]
        finishes = Counter(resp["finish_reason"] for r in records for resp in r["responses"])
        greedy = [r["greedy"]["correct"] for r in records if "greedy" in r]
        summary[side] = {
            "problems": len(records),
            "responses": len(flat),
            "correct_responses": int(sum(flat)),
            "sample_accuracy": sum(flat) / len(flat) if flat else 0.0,
            "pass_at_k": sum(any(row) for row in labels) / len(labels) if labels else 0.0,
            "problems_with_both_labels": sum(any(row) and not all(row) for row in labels),
            "greedy_accuracy": sum(greedy) / len(greedy) if greedy else None,
            "finish_reasons": dict(finishes),
            "boxed_fraction": (
                sum(last_boxed(resp["text"]) is not None for r in records for resp in r["responses"]) / len(flat)
                if flat
                else None
            ),
        }
    return summary


def read_graded(folder: Path) -> list[dict[str, Any]]:
    graded = read_jsonl(folder / GRADED_FILE)
    if not graded:
        raise DataError(f"no graded samples in {folder / GRADED_FILE}; run the grade stage first")
    return graded


# ---------------------------------------------------------------------------------------------- reward inputs
@dataclass
class Example:
    """One reward input: ids (as the reward model reads them), label (1 = correct) and its problem's index.
    ``features``: the frozen lower layers' output for these ids (``(T, d)``), when cached."""

    input_ids: Tensor
    label: float
    group: int
    features: Tensor | None = None


def problem_examples(
    formatter: TransformerReward,
    record: dict[str, Any],
    group: int,
    dedupe: bool = True,
) -> list[Example]:
    """The reward inputs of one problem's responses, built exactly as scoring builds them."""
    examples, seen = [], set()
    for response in record["responses"]:
        key = tuple(response["token_ids"])
        if dedupe and key in seen:
            continue
        seen.add(key)
        ids = formatter.input_ids(record["prompt"], response["text"], response["token_ids"])
        examples.append(Example(ids, float(response["correct"]), group))
    return examples


def build_groups(
    formatter: TransformerReward,
    records: Sequence[dict[str, Any]],
    dedupe: bool = True,
    max_length: int | None = None,
) -> tuple[list[list[Example]], int]:
    """One list of examples per problem; examples longer than ``max_length`` are dropped (count returned)."""
    groups, dropped = [], 0
    for index, record in enumerate(records):
        examples = problem_examples(formatter, record, index, dedupe)
        kept = [e for e in examples if max_length is None or len(e.input_ids) <= max_length]
        dropped += len(examples) - len(kept)
        if kept:
            groups.append(kept)
    return groups, dropped


def collate_groups(groups: Sequence[Sequence[Example]], pad_id: int) -> dict[str, Tensor]:
    """Left-padded ids (the last position is every row's last token, where the score is read), mask, labels,
    and each row's problem index."""
    rows = [example for group in groups for example in group]
    width = max(len(e.input_ids) for e in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, example in enumerate(rows):
        ids[i, width - len(example.input_ids) :] = example.input_ids
        mask[i, width - len(example.input_ids) :] = 1
    labels = torch.tensor([e.label for e in rows], dtype=torch.float32)
    group = torch.tensor([e.group for e in rows], dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "group": group}
    if all(e.features is not None for e in rows):
        features = torch.zeros((len(rows), width, rows[0].features.shape[-1]), dtype=rows[0].features.dtype)
        for i, example in enumerate(rows):
            features[i, width - len(example.input_ids) :] = example.features
        batch["features"] = features
    return batch


class RewardDataModule(L.LightningDataModule):
    """Training and held-out problems as batches of whole problems."""

    def __init__(
        self,
        train_groups: list[list[Example]],
        val_groups: list[list[Example]],
        pad_id: int,
        problems_per_batch: int = 2,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not train_groups:
            raise DataError("no training examples; sample more problems or lower data.heldout_fraction")
        self.train_groups, self.val_groups = train_groups, val_groups
        self.pad_id, self.problems_per_batch, self.seed = pad_id, problems_per_batch, seed

    def _collate(self, groups: Sequence[Sequence[Example]]) -> dict[str, Tensor]:
        return collate_groups(groups, self.pad_id)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train_groups,  # type: ignore[arg-type]
            batch_size=self.problems_per_batch,
            shuffle=True,
            generator=generator,
            collate_fn=self._collate,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_groups,  # type: ignore[arg-type]
            batch_size=self.problems_per_batch,
            shuffle=False,
            collate_fn=self._collate,
        )

    def positive_fraction(self) -> float:
        labels = [e.label for g in self.train_groups for e in g]
        return sum(labels) / len(labels)
