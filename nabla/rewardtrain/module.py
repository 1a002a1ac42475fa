"""The outcome reward model as a ``LightningModule``: a one-label sequence classifier (the policy's backbone with a
score head) with a LoRA adapter through peft, trained with a pointwise (BCE) or pairwise (Bradley-Terry) loss.

The score is read exactly as :class:`~nabla.reward.SequenceClassifierReward` reads it at test time: left-padded
inputs, positions counted from each row's first real token, the body's last hidden state at the last position,
then the score head. The adapter is saved with peft's ``save_pretrained`` (``modules_to_save=["score"]`` puts the
head in the same file) and loads with ``SequenceClassifierReward.from_pretrained(backbone, adapter=folder)``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from nabla import jsonio
from nabla.errors import DataError
from nabla.progress import lightning_progress
from nabla.rewardtrain.corruption import with_corruptions
from nabla.rewardtrain.data import Example, RewardDataModule, build_groups, read_graded
from nabla.rewardtrain.settings import ADAPTER_FOLDER, LoraSettings, TrainSettings

TRAINING_FILE = "training.json"


def load_classifier(backbone: str) -> tuple[Any, Any]:
    """The backbone as a one-label ``AutoModelForSequenceClassification`` (a new score head) and its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from nabla.policy import load_pretrained

    tokenizer = load_pretrained(AutoTokenizer, backbone)
    model = load_pretrained(AutoModelForSequenceClassification, backbone, num_labels=1, dtype=torch.float32)
    if model.config.pad_token_id is None:
        pad = tokenizer.pad_token_id
        model.config.pad_token_id = pad if pad is not None else tokenizer.eos_token_id
    return model, tokenizer


def with_lora(classifier: Any, lora: LoraSettings) -> Any:
    """``classifier`` wrapped with a LoRA adapter; trainable: the adapter and the score head."""
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        layers_to_transform=None if lora.layers is None else list(lora.layers),
        modules_to_save=["score"],
    )
    return get_peft_model(classifier, config)


def reward_formatter(classifier: Any, tokenizer: Any, policy_tokenizer: Any | None = None) -> Any:
    """A :class:`~nabla.reward.SequenceClassifierReward` over ``classifier`` whose :meth:`input_ids` formats every
    training input, aligned with the policy's vocabulary so that response ids are used as scoring uses them.
    (It freezes the classifier's weights; the adapter added afterwards is what trains.)"""
    from nabla.reward import SequenceClassifierReward, VocabularyAlignment

    formatter = SequenceClassifierReward(classifier, tokenizer)
    classifier.train()  # the formatter put it in eval mode; training mode is Lightning's to set
    source = tokenizer if policy_tokenizer is None else policy_tokenizer
    formatter.alignment = VocabularyAlignment.build(source, tokenizer, len(source))
    return formatter


def last_position_scores(
    classifier: Any,
    input_ids: Tensor,
    attention_mask: Tensor,
    features: Tensor | None = None,
    first_layer: int = 0,
) -> Tensor:
    """Scores (``(B,)``, float32) of left-padded rows, read as scoring reads them. With ``features`` (the output
    of layers ``0 .. first_layer - 1`` for these rows, cached) only the layers from ``first_layer`` on run."""
    body = getattr(classifier, classifier.base_model_prefix)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    if features is None:
        out = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions)
    else:
        with layer_range(body, first_layer, None):
            out = body(inputs_embeds=features, attention_mask=attention_mask, position_ids=positions)
    return classifier.score(out.last_hidden_state[:, -1])[:, 0].float()


@contextmanager
def layer_range(body: Any, start: int, stop: int | None, final_norm: bool = True) -> Iterator[None]:
    """Run only decoder layers ``start .. stop - 1`` of ``body`` (the same modules, so an adapter inside them
    trains as usual); without ``final_norm`` the output is the hidden state entering layer ``stop``."""
    layers, norm = body.layers, body.norm
    body.layers = torch.nn.ModuleList(list(layers)[start:stop])
    if not final_norm:
        body.norm = torch.nn.Identity()
    try:
        yield
    finally:
        body.layers, body.norm = layers, norm


@torch.no_grad()
def cache_lower_layers(
    classifier: Any, groups: Sequence[Sequence[Example]], stop: int, pad_id: int, progress: bool = True
) -> None:
    """Store on every example the output of layers ``0 .. stop - 1`` (frozen: no adapter below ``stop``), so that
    training runs only the upper layers; computed once, in the scoring layout (left padding, positions)."""
    from nabla.progress import Counter
    from nabla.rewardtrain.data import collate_groups

    body = getattr(classifier, classifier.base_model_prefix)
    was_training = classifier.training
    classifier.eval()
    try:
        with Counter(f"caching layers 0-{stop - 1}", len(groups), 0, progress) as bar:
            for group in groups:
                batch = collate_groups([group], pad_id)
                mask = batch["attention_mask"]
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                with layer_range(body, 0, stop, final_norm=False):
                    hidden = body(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions)
                for row, example in enumerate(group):
                    example.features = hidden.last_hidden_state[row, -len(example.input_ids) :].clone()
                bar.advance()
    finally:
        classifier.train(was_training)


def pairwise_loss(scores: Tensor, labels: Tensor, group: Tensor) -> Tensor | None:
    """Bradley-Terry: ``-log sigmoid(s_correct - s_wrong)`` over every (correct, wrong) pair of one problem;
    ``None`` when the batch holds no such pair."""
    same = group[:, None] == group[None, :]
    pairs = same & (labels[:, None] > 0.5) & (labels[None, :] < 0.5)
    if not pairs.any():
        return None
    margins = scores[:, None] - scores[None, :]
    return -F.logsigmoid(margins[pairs]).mean()


def warmup_cosine(step: int, total: int, warmup_fraction: float = 0.1, floor: float = 0.1) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to ``floor``."""
    warmup = max(1, int(total * warmup_fraction))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class RewardModule(L.LightningModule):
    """Trains the adapter and score head. Logs ``train_loss``, ``val_loss`` and ``val_auc`` (held-out AUROC)."""

    def __init__(
        self,
        classifier: Any,
        lora: LoraSettings,
        training: TrainSettings,
        positive_fraction: float = 0.5,
        first_layer: int = 0,
    ) -> None:
        from torchmetrics import MeanMetric
        from torchmetrics.classification import BinaryAUROC

        super().__init__()
        self.first_layer = first_layer
        self.training_settings = training
        self.model = with_lora(classifier, lora)
        balance = training.balance and 0.0 < positive_fraction < 1.0
        weight = (1 - positive_fraction) / positive_fraction if balance else 1.0
        self.register_buffer("pos_weight", torch.tensor(weight, dtype=torch.float32), persistent=False)
        self.val_auc = BinaryAUROC()
        self.epoch_loss = MeanMetric()
        self.history: dict[int, dict[str, float]] = {}

    def forward(self, input_ids: Tensor, attention_mask: Tensor, features: Tensor | None = None) -> Tensor:
        """Scores; ``features`` are cached outputs of the frozen layers below ``first_layer``."""
        return last_position_scores(self.model.get_base_model(), input_ids, attention_mask, features, self.first_layer)

    def loss(self, scores: Tensor, labels: Tensor, group: Tensor) -> Tensor:
        kind = self.training_settings.loss
        total = scores.sum() * 0.0  # keeps the graph when a batch has no pair
        if kind in ("pointwise", "both"):
            total = total + F.binary_cross_entropy_with_logits(scores, labels, pos_weight=self.pos_weight)
        if kind in ("pairwise", "both"):
            pairwise = pairwise_loss(scores, labels, group)
            if pairwise is not None:
                total = total + pairwise
        return total

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        scores = self(batch["input_ids"], batch["attention_mask"], batch.get("features"))
        loss = self.loss(scores, batch["labels"], batch["group"])
        if not torch.isfinite(loss):
            raise FloatingPointError("the reward model's loss is not finite; lower training.lr")
        self.log("train_loss", loss, prog_bar=True, batch_size=len(scores))
        self.epoch_loss.update(loss.detach())
        return loss

    def on_train_epoch_end(self) -> None:
        self.history.setdefault(self.current_epoch, {})["train_loss"] = float(self.epoch_loss.compute())
        self.epoch_loss.reset()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        scores = self(batch["input_ids"], batch["attention_mask"], batch.get("features"))
        self.log("val_loss", self.loss(scores, batch["labels"], batch["group"]), batch_size=len(scores))
        self.val_auc.update(scores, batch["labels"].long())

    def on_validation_epoch_end(self) -> None:
        auc = self.val_auc.compute()
        self.log("val_auc", auc, prog_bar=True)
        self.val_auc.reset()
        if not self.trainer.sanity_checking:
            self.history.setdefault(self.current_epoch, {})["val_auc"] = float(auc)

    def configure_optimizers(self) -> dict[str, Any]:
        parameters = [p for p in self.parameters() if p.requires_grad]
        settings = self.training_settings
        optimizer = torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=settings.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def save_adapter(self, folder: Path, base_name: str) -> Path:
        """The adapter and score head, with peft's ``save_pretrained`` (no model card)."""
        self.model.save_pretrained(folder)
        card = folder / "README.md"
        if card.is_file():
            card.unlink()
        config_path = folder / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = base_name  # not this machine's cache path
        config_path.write_text(jsonio.dumps(config, indent=2, sort_keys=True))
        return folder


def response_ids(tokenizer: Any, text: str, ended: bool = True) -> list[int]:
    """A response's token ids as the policy would emit them: the text, then (``ended``) the end-of-turn token."""
    return tokenizer.encode(text, add_special_tokens=False) + ([tokenizer.eos_token_id] if ended else [])


def fit_reward_model(
    folder: Path,
    backbone: str,
    lora: LoraSettings,
    training: TrainSettings,
    seed: int = 0,
    progress: bool = True,
    policy_path: str | None = None,
) -> tuple[RewardModule, RewardDataModule, dict[str, Any]]:
    """Train on the graded samples in ``folder`` (held-out problems for validation only); returns the trained
    module, its data and a summary."""
    from lightning.pytorch.loggers import CSVLogger
    from transformers import AutoTokenizer

    from nabla.policy import load_pretrained

    L.seed_everything(seed, workers=True, verbose=False)
    graded = read_graded(folder)
    classifier, tokenizer = load_classifier(backbone)
    policy_tokenizer = None if policy_path in (None, backbone) else load_pretrained(AutoTokenizer, policy_path)
    formatter = reward_formatter(classifier, tokenizer, policy_tokenizer)
    train_records, corruptions = with_corruptions(
        [r for r in graded if not r["heldout"]],
        training.corruptions_per_response,
        seed,
        lambda text, ended: response_ids(tokenizer, text, ended),
        training.corruption_kinds,
    )
    heldout_records = [r for r in graded if r["heldout"]]
    train_groups, dropped = build_groups(formatter, train_records, training.dedupe, training.max_length)
    val_groups, _ = build_groups(formatter, heldout_records, training.dedupe, None)
    pad_id = int(classifier.config.pad_token_id)
    data = RewardDataModule(train_groups, val_groups, pad_id, training.problems_per_batch, seed)
    positives = data.positive_fraction()
    if positives in (0.0, 1.0):
        raise DataError(f"every training response is {'wrong' if positives == 0 else 'correct'}; sample more problems")
    started = time.perf_counter()
    first_layer = min(lora.layers) if lora.layers and training.cache_frozen_layers else 0
    if first_layer:
        cache_lower_layers(classifier, train_groups + val_groups, first_layer, pad_id, progress)
    module = RewardModule(classifier, lora, training, positives, first_layer)
    from nabla.rl.train import quiet_lightning

    quiet_lightning()
    show_bar, callbacks = lightning_progress(progress, "training the reward model")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_epochs=training.epochs,
        accumulate_grad_batches=training.accumulate_grad_batches,
        gradient_clip_val=training.gradient_clip,
        logger=CSVLogger(folder, name="logs"),
        enable_checkpointing=False,
        enable_progress_bar=show_bar,
        callbacks=callbacks,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=5,
        limit_val_batches=1.0 if val_groups else 0,
    )
    cached = time.perf_counter()
    trainer.fit(module, datamodule=data)
    summary = {
        "train_problems": len(train_groups),
        "train_examples": sum(len(g) for g in train_groups),
        "train_positive_fraction": positives,
        "corruptions": corruptions,
        "dropped_too_long": dropped,
        "heldout_problems": len(val_groups),
        "loss": training.loss,
        "epochs": training.epochs,
        "optimizer_steps": int(trainer.global_step),
        "history": [{"epoch": epoch, **values} for epoch, values in sorted(module.history.items())],
        "cache_time_s": cached - started,
        "fit_time_s": time.perf_counter() - cached,
        "trainable_parameters": sum(p.numel() for p in module.model.parameters() if p.requires_grad),
    }
    return module, data, summary


def train(
    folder: Path,
    backbone: str,
    lora: LoraSettings,
    training: TrainSettings,
    seed: int = 0,
    progress: bool = True,
    policy_path: str | None = None,
    base_name: str | None = None,
) -> dict[str, Any]:
    """Train, then save the adapter to ``folder/adapter`` and the summary to ``folder/training.json``."""
    module, _, summary = fit_reward_model(folder, backbone, lora, training, seed, progress, policy_path)
    module.save_adapter(folder / ADAPTER_FOLDER, base_name or backbone)
    (folder / TRAINING_FILE).write_text(jsonio.dumps(summary, indent=2))
    return summary
