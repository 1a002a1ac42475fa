"""Prompts for RL fine-tuning as a ``LightningDataModule``.

Every batch is a deterministic function of (seed, epoch, batch position): each epoch shuffles the prompts with
``seed + epoch`` and rank ``r`` of ``W`` takes its share of each global batch. The sampler starts an epoch at the
batch that follows the trainer's ``global_step``, so a run resumed from a mid-epoch checkpoint sees exactly the
batches an uninterrupted run would have seen (the dataloader holds no state of its own to restore).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from nabla.errors import DataError


class PromptDataset(Dataset):
    def __init__(self, prompts: Sequence[str]) -> None:
        self.prompts = list(prompts)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"index": index, "prompt": self.prompts[index]}


def collate_prompts(items: list[dict[str, Any]]) -> dict[str, list]:
    return {"index": [item["index"] for item in items], "prompt": [item["prompt"] for item in items]}


class StepSampler(DistributedSampler):
    """Rank ``rank``'s indices of full global batches of a seeded per-epoch permutation (incomplete global
    batches are dropped). Iteration starts at batch ``start_batch() % batches_per_epoch``."""

    def __init__(
        self,
        dataset: Dataset,
        *,
        batch_size: int,
        num_replicas: int,
        rank: int,
        seed: int,
        start_batch: Callable[[], int] = lambda: 0,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.start_batch = start_batch
        self.batches_per_epoch = len(dataset) // (batch_size * num_replicas)  # type: ignore[arg-type]
        if self.batches_per_epoch < 1:
            raise DataError(
                f"{len(dataset)} prompts cannot fill one batch of {batch_size} on each of {num_replicas} "  # type: ignore[arg-type]
                "processes; add prompts or lower batch_size"
            )

    def __len__(self) -> int:
        return self.batches_per_epoch * self.batch_size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator).tolist()  # type: ignore[arg-type]
        width = self.batch_size * self.num_replicas
        first = self.start_batch() % self.batches_per_epoch
        for batch in range(first, self.batches_per_epoch):
            start = batch * width + self.rank * self.batch_size
            yield from order[start : start + self.batch_size]


class StepDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`StepSampler`. Its position is the trainer's ``global_step`` (restored with
    the loops), so its own state is empty; declaring it tells Lightning that mid-epoch resumption is exact."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file (one per line) or a JSONL file (field ``prompt``, ``question`` or ``problem``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no prompts file at {str(path)!r}; pass a .txt (one prompt per line) or .jsonl file")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return lines
    prompts = []
    for number, line in enumerate(lines, 1):
        record = json.loads(line)
        text = next((record[k] for k in ("prompt", "question", "problem") if k in record), None)
        if not isinstance(text, str):
            raise DataError(f"{path}:{number} has no 'prompt', 'question' or 'problem' string field")
        prompts.append(text)
    return prompts


class PromptDataModule(L.LightningDataModule):
    """Training prompts, ``batch_size`` prompts per process and step (each gets ``group_size`` completions in
    the RL module)."""

    def __init__(self, prompts: Sequence[str], batch_size: int = 4, seed: int = 0) -> None:
        super().__init__()
        if not prompts:
            raise DataError("no training prompts; pass at least one prompt")
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1 (got {batch_size})")
        self.dataset = PromptDataset(prompts)
        self.batch_size = batch_size
        self.seed = seed

    def train_dataloader(self) -> StepDataLoader:
        trainer = self.trainer
        if trainer is not None and trainer.accumulate_grad_batches != 1:
            raise DataError("RL fine-tuning steps once per batch; set trainer.accumulate_grad_batches=1")
        sampler = StepSampler(
            self.dataset,
            batch_size=self.batch_size,
            num_replicas=trainer.world_size if trainer is not None else 1,
            rank=trainer.global_rank if trainer is not None else 0,
            seed=self.seed,
            start_batch=(lambda: trainer.global_step) if trainer is not None else (lambda: 0),
        )
        return StepDataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler, collate_fn=collate_prompts)
