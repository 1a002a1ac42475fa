"""Training of the world's two models with ``lightning.Trainer``.

* :class:`PolicyModule` / :class:`PolicyDataModule`: supervised training of the causal LM on gold chains of thought
  (loss on the response tokens only), from a seeded stream of problems that excludes every held-out problem.
* :class:`RewardModule` / :class:`RewardDataModule`: a one-label classifier trained with binary cross-entropy on
  samples of the trained policy labelled by exact grading. Its inputs are built by
  :meth:`nabla.SequenceClassifierReward.input_ids`, the very formatting used when the reward scores responses, and
  its score is read at the last token exactly as :class:`~nabla.SequenceClassifierReward` reads it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice

import lightning as L
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import BinaryAUROC
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from nabla.errors import require_finite
from nabla.policy import Policy
from nabla.prm import ProcessRewardModel
from nabla.reward import SequenceClassifierReward
from nabla.rewardtrain.module import pairwise_loss, warmup_cosine
from nabla.sampler import SamplingConfig
from nabla.worlds.arithmetic.process import LabelledResponse
from nabla.worlds.arithmetic.task import ArithmeticTask, Problem, is_correct, stream

IGNORE = -100


@dataclass
class OptimSettings:
    """AdamW; linear warm-up over ``warmup_fraction`` of the steps, then cosine decay to 10% of ``lr``."""

    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1

    def __post_init__(self) -> None:
        require_finite(self)

    def configure(self, module: L.LightningModule, groups: list[dict] | None = None) -> dict:
        """``groups``: optional parameter groups, each with an ``lr_scale`` (default: every parameter at ``lr``)."""
        if groups is None:
            groups = [{"params": list(module.parameters())}]
        groups = [{"params": g["params"], "lr": self.lr * g.get("lr_scale", 1.0)} for g in groups]
        optimizer = torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay)
        total = max(1, int(module.trainer.estimated_stepping_batches))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, total, self.warmup_fraction)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def _right_pad(rows: Sequence[Sequence[int]], value: int) -> Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


# ---------------------------------------------------------------------- policy
class SupervisedExamples(Dataset):
    """Prompt ⊕ gold response ⊕ EOS per problem, with the prompt's labels masked."""

    def __init__(self, problems: Sequence[Problem], tokenizer: PreTrainedTokenizerBase) -> None:
        prompts = tokenizer([p.question for p in problems], add_special_tokens=False)["input_ids"]
        answers = tokenizer([p.solution for p in problems], add_special_tokens=False)["input_ids"]
        eos = tokenizer.eos_token_id
        self.rows = [(list(q), list(a) + [eos]) for q, a in zip(prompts, answers)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[list[int], list[int]]:
        return self.rows[index]


class PolicyDataModule(L.LightningDataModule):
    """``train_size`` training problems drawn from ``seed`` (never a held-out question) and the dev problems for
    validation."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        task: ArithmeticTask,
        held_out: set[str],
        dev: Sequence[Problem],
        train_size: int,
        batch_size: int,
        seed: int,
    ) -> None:
        super().__init__()
        self.tokenizer, self.task, self.held_out, self.dev = tokenizer, task, held_out, list(dev)
        self.train_size, self.batch_size, self.seed = train_size, batch_size, seed
        self.train_set: SupervisedExamples | None = None
        self.val_set: SupervisedExamples | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            # drawn as the task draws them (repeats allowed: a small task has few distinct 3-term problems)
            problems = list(islice(stream(self.task, self.seed, exclude=self.held_out), self.train_size))
            self.train_set = SupervisedExamples(problems, self.tokenizer)
            self.val_set = SupervisedExamples(self.dev, self.tokenizer)

    def collate(self, batch: list[tuple[list[int], list[int]]]) -> dict[str, Tensor]:
        pad = self.tokenizer.pad_token_id
        ids = _right_pad([q + a for q, a in batch], pad)
        labels = _right_pad([[IGNORE] * len(q) + a for q, a in batch], IGNORE)
        mask = _right_pad([[1] * (len(q) + len(a)) for q, a in batch], 0)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train_set, batch_size=self.batch_size, shuffle=True, collate_fn=self.collate, generator=generator
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256, collate_fn=self.collate)


class MaskedRowsDataModule(L.LightningDataModule):
    """Rows of ``(input ids, targets)`` (targets ``-100`` where there is none), right-padded for
    :class:`PolicyModule`: the supervision of a likelihood process reward model."""

    def __init__(
        self,
        train: Sequence[tuple[list[int], list[int]]],
        val: Sequence[tuple[list[int], list[int]]],
        pad_token_id: int,
        batch_size: int,
        seed: int,
    ) -> None:
        super().__init__()
        self.train_rows, self.val_rows = list(train), list(val)
        self.pad, self.batch_size, self.seed = pad_token_id, batch_size, seed

    def collate(self, batch: list[tuple[list[int], list[int]]]) -> dict[str, Tensor]:
        return {
            "input_ids": _right_pad([ids for ids, _ in batch], self.pad),
            "attention_mask": _right_pad([[1] * len(ids) for ids, _ in batch], 0),
            "labels": _right_pad([targets for _, targets in batch], IGNORE),
        }

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train_rows, batch_size=self.batch_size, shuffle=True, collate_fn=self.collate, generator=generator
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_rows, batch_size=256, collate_fn=self.collate)


class PolicyModule(L.LightningModule):
    """Next-token cross-entropy on the response tokens; logs loss and token accuracy on dev."""

    def __init__(self, model: PreTrainedModel, optim: OptimSettings) -> None:
        super().__init__()
        self.model, self.optim = model, optim

    def _loss_and_accuracy(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits, labels = out.logits[:, :-1].float(), batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE)
        known = labels != IGNORE
        accuracy = (logits.argmax(-1)[known] == labels[known]).float().mean()
        return loss, accuracy

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, accuracy = self._loss_and_accuracy(batch)
        self.log_dict({"train/loss": loss, "train/token_acc": accuracy}, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss, accuracy = self._loss_and_accuracy(batch)
        self.log_dict({"val/loss": loss, "val/token_acc": accuracy}, prog_bar=True)

    def configure_optimizers(self) -> dict:
        return self.optim.configure(self)


# ---------------------------------------------------------------------- reward model
@dataclass
class Sample:
    """A response of the policy to a problem, graded."""

    problem_id: str
    prompt: str
    response: str
    token_ids: list[int]
    correct: bool


def sample_policy(
    policy: Policy,
    problems: Sequence[Problem],
    samples_per_problem: int,
    sampling: SamplingConfig,
    seed: int,
    max_new_tokens: int,
    batch_size: int = 256,
    description: str = "sampling the policy",
) -> list[Sample]:
    """``samples_per_problem`` responses per problem from batched :meth:`Policy.generate`, graded exactly.

    Row ``(problem i, sample k)`` draws from its own generator seeded by ``(seed, i, k)``, so the samples do not
    depend on the batch size.
    """
    rows = [(i, k) for i in range(len(problems)) for k in range(samples_per_problem)]
    contexts = [policy.encode(p.question) for p in problems]
    samples: list[Sample] = []
    with progress_bar() as bar:
        task = bar.add_task(description, total=len(rows))
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            generators = [torch.Generator().manual_seed(seed * 1_000_003 + i * 1009 + k) for i, k in chunk]
            rollouts = policy.generate([contexts[i] for i, _ in chunk], sampling, generators, max_new_tokens)
            for (i, _), rollout in zip(chunk, rollouts):
                response = policy.decode(rollout.token_ids)
                problem = problems[i]
                correct = is_correct(response, problem.answer)
                samples.append(Sample(problem.id, problem.question, response, rollout.token_ids, correct))
            bar.update(task, advance=len(chunk))
    return samples


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True
    )


Row = tuple[list[int], float, list[float]]


class RewardExamples(Dataset):
    """Reward-model inputs (built by ``reward.input_ids``) with their 0/1 outcome labels, grouped by problem (an
    item is every sample of one problem, so that a pairwise loss sees each problem's pairs).

    With ``gold`` (problem id -> token ids of the gold response, EOS included) each row also carries per-token
    labels over the response: 1 while the response so far agrees with the gold chain of thought, 0 from the
    first token that departs from it. In this task the correct chain is unique, so departing from it *is* an
    error (these labels come from exact grading of each step). They serve an auxiliary loss; the outcome label
    sits at the last token, where the reward is read. ``-1`` marks positions without a label (the prompt).

    ``label``: ``outcome`` (the final answer is right) or ``chain`` (the response *is* the gold chain of thought:
    every step right). The weak policy often reaches the right answer through wrong steps (a third of its right
    answers); ``chain`` labels do not reward those, and agree with the per-token labels at every position.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        reward: SequenceClassifierReward,
        gold: dict[str, list[int]] | None = None,
        label: str = "outcome",
    ) -> None:
        if label not in ("outcome", "chain") or (label == "chain" and gold is None):
            raise ValueError(f"label must be 'outcome', or 'chain' with gold responses (got {label!r})")
        groups: dict[str, list[Row]] = {}
        for s in samples:
            ids = reward.input_ids(s.prompt, s.response, s.token_ids).tolist()
            steps = [-1.0] * len(ids)
            if gold is not None:
                steps = _prefix_labels(s.token_ids, gold[s.problem_id], len(ids))
            target = s.correct
            if label == "chain":  # right answer *and* every step right (the gold chain of thought, EOS included)
                target = s.correct and list(s.token_ids) == gold[s.problem_id]
            steps[-1] = float(target)
            groups.setdefault(s.problem_id, []).append((ids, float(target), steps))
        self.groups = list(groups.values())

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> list[Row]:
        return self.groups[index]

    @property
    def rows(self) -> list[Row]:
        return [row for group in self.groups for row in group]

    @property
    def positive_rate(self) -> float:
        rows = self.rows
        return sum(row[1] for row in rows) / max(1, len(rows))


class ProcessExamples(RewardExamples):
    """Process-supervised inputs for a :class:`~nabla.prm.ProcessRewardModel`, grouped by problem: each row's
    labels sit exactly where the PRM reads its scores (every step end of the response but the last position, in
    order, then the last position with the outcome), ``-1`` elsewhere.

    ``items``: ``(problem id, prompt, response token ids, labelled response)``; the labelled response's step labels
    are those of :func:`~nabla.worlds.arithmetic.process.step_labels`. With ``gold`` (problem id -> the gold
    response's token ids) every other response token is labelled too, 1 while the response so far agrees with the
    gold chain ("no error yet", token by token: the error's exact token is marked); the step ends keep their step
    labels.
    """

    def __init__(
        self,
        items: Sequence[tuple[str, str, Sequence[int], LabelledResponse]],
        reward: ProcessRewardModel,
        gold: dict[str, list[int]] | None = None,
    ):
        groups: dict[str, list[Row]] = {}
        step_end = reward.step_end_mask().cpu()
        for problem_id, prompt, token_ids, labelled in items:
            ids = reward.input_ids(prompt, "", list(token_ids)).tolist()
            opening, closing = (len(part) for part in reward._pieces(prompt))
            last = len(ids) - 1
            ends = [i for i in range(opening, len(ids) - closing) if step_end[ids[i]] and i != last]
            steps = list(labelled.step_labels)[: len(ends)]
            if len(steps) != len(ends):
                raise ValueError(f"{len(ends)} step ends but {len(steps)} step labels in {labelled.text!r}")
            labels = [-1.0] * len(ids)
            if gold is not None:
                agreement = _prefix_labels(token_ids, gold[problem_id], len(ids) - closing)
                labels[: len(agreement)] = agreement
            for position, label in zip(ends, steps):
                labels[position] = label
            labels[last] = labelled.outcome
            groups.setdefault(problem_id, []).append((ids, labelled.outcome, labels))
        self.groups = list(groups.values())


def _prefix_labels(response: Sequence[int], gold: Sequence[int], width: int) -> list[float]:
    """``-1`` before the response (the reward input ends with it), then 1 while it agrees with ``gold``."""
    labels = [-1.0] * (width - len(response))
    agrees = True
    for index, token in enumerate(response):
        agrees = agrees and index < len(gold) and gold[index] == token
        labels.append(float(agrees))
    return labels


class RewardDataModule(L.LightningDataModule):
    """Batches of ``problems_per_batch`` problems with all their samples, left-padded."""

    def __init__(
        self, train: RewardExamples, val: RewardExamples, pad_token_id: int, problems_per_batch: int, seed: int
    ) -> None:
        super().__init__()
        self.train_set, self.val_set = train, val
        self.pad, self.problems_per_batch, self.seed = pad_token_id, problems_per_batch, seed

    def collate(self, groups: list[list[Row]]) -> dict[str, Tensor]:
        """Left-padded, as :class:`~nabla.SequenceClassifierReward` pads when it scores."""
        batch = [row for group in groups for row in group]
        width = max(len(ids) for ids, _, _ in batch)
        ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        steps = torch.full((len(batch), width), -1.0)
        for row, (tokens, _, labels) in enumerate(batch):
            ids[row, width - len(tokens) :] = torch.tensor(tokens)
            mask[row, width - len(tokens) :] = 1
            steps[row, width - len(tokens) :] = torch.tensor(labels)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": torch.tensor([label for _, label, _ in batch]),
            "step_labels": steps,
            "group": torch.tensor([g for g, group in enumerate(groups) for _ in group]),
        }

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train_set,
            batch_size=self.problems_per_batch,
            shuffle=True,
            collate_fn=self.collate,
            generator=generator,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=64, collate_fn=self.collate)


class RewardModule(L.LightningModule):
    """Trains the whole (small) reward model; scores are read as :class:`~nabla.SequenceClassifierReward` reads
    them, at the last token.

    Loss: ``pointwise`` (binary cross-entropy of the score against the outcome label), ``pairwise``
    (Bradley-Terry over the correct / wrong pairs of each problem: it cannot be lowered by judging how hard a
    problem looks, only by telling its samples apart), or ``both``; plus ``step_weight`` times the mean
    cross-entropy of the score at every earlier labelled token.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        optim: OptimSettings,
        loss: str = "pairwise",
        step_weight: float = 0.0,
        body_layers: int = 0,
        body_lr_scale: float = 1.0,
    ) -> None:
        """``body_layers`` / ``body_lr_scale``: the embeddings and first ``body_layers`` decoder layers (the ones
        taken from a trained language model) learn at ``body_lr_scale`` times the learning rate, the rest (new
        layers, final norm, score head) at the full rate."""
        super().__init__()
        self.model, self.optim, self.loss_kind, self.step_weight = model, optim, loss, step_weight
        self.body_layers, self.body_lr_scale = body_layers, body_lr_scale
        # a SequenceClassifierReward used for formatting froze the model and put it in eval mode
        self.model.requires_grad_(True).train()
        self.val_auc = BinaryAUROC()

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Scores at every position (``(B, T)``) of left-padded rows; the last column is the reward."""
        body = getattr(self.model, self.model.base_model_prefix)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        hidden = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).last_hidden_state
        return self.model.score(hidden)[..., 0].float()

    def _scores_and_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        all_scores = self(batch["input_ids"], batch["attention_mask"])
        scores, labels = all_scores[:, -1], batch["labels"]
        loss = scores.sum() * 0.0  # keeps the graph when a batch has no pair
        if self.loss_kind in ("pointwise", "both"):
            loss = loss + F.binary_cross_entropy_with_logits(scores, labels)
        if self.loss_kind in ("pairwise", "both"):
            pairwise = pairwise_loss(scores, labels, batch["group"])
            if pairwise is not None:
                loss = loss + pairwise
        steps = batch["step_labels"][:, :-1]
        known = steps >= 0
        if self.step_weight and known.any():
            loss = loss + self.step_weight * F.binary_cross_entropy_with_logits(all_scores[:, :-1][known], steps[known])
        return scores, loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        _, loss = self._scores_and_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        scores, loss = self._scores_and_loss(batch)
        self.val_auc.update(scores, batch["labels"].long())
        self.log("val/loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        self.log("val/auc", self.val_auc, prog_bar=True)

    def configure_optimizers(self) -> dict:
        if self.body_lr_scale == 1.0 or not self.body_layers:
            return self.optim.configure(self)
        body = getattr(self.model, self.model.base_model_prefix)
        layers = body.layers[: self.body_layers]
        old = [*body.embed_tokens.parameters(), *(p for layer in layers for p in layer.parameters())]
        known = {id(p) for p in old}
        new = [p for p in self.parameters() if id(p) not in known]
        return self.optim.configure(self, [{"params": old, "lr_scale": self.body_lr_scale}, {"params": new}])
