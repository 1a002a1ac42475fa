"""KL-regularised RL fine-tuning of a :class:`~nabla.Policy` as a ``LightningModule`` (LoRA through peft).

One training step, for a batch of prompts on each process:

1. sample ``group_size`` completions per prompt on-policy with :meth:`Policy.generate` (temperature 1, no top-p by
   default: the distribution being trained), each from its own generator seeded by (seed, step, prompt, member);
2. score them with the same :class:`~nabla.RewardModel` the test-time path uses (or any verifier wrapped in
   :class:`~nabla.CallableReward`);
3. per-token log-probabilities under the policy (with gradient) and under the reference, which is the same model
   with the LoRA adapter disabled (``with model.disable_adapter():``, no second copy);
4. KL either in the reward, ``r - β · Σ_t (log π - log π_ref)`` (k1, gradient stopped), or in the loss,
   ``β · Σ_t k3`` (differentiated); ``β = 1 / λ`` with λ the test-time ``LatentOptimizer.lam``;
5. GRPO or RLOO advantages of the (shaped) rewards within each group, and the loss
   ``-mean_i(A_i · Σ_t log π(y_i,t)) (+ KL term)``.

With k1 in the reward and RLOO advantages this is an unbiased stochastic gradient of
``E_π[r] - β·KL(π ‖ π_ref)``, whose maximiser is ``ρ* ∝ π_ref · exp(λ r)`` — the distribution ∇-Reasoner's
objective ``-λ r - log π`` targets at test time (``docs/duality.md``).

Every model call is charged to a :class:`~nabla.CostMeter` with the kinds the test-time path uses
(``prefill``/``generated_tokens`` for sampling, ``rm_forward`` for rewards, ``lm_forward`` for the policy and
reference passes, ``lm_backward``), so that training cost and inference cost compare on one scale.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from nabla.baselines import derive_seed
from nabla.cost import CALL_KINDS, EVENT_KINDS, CostMeter, backward_flops, forward_flops
from nabla.errors import ConfigurationError, NablaError
from nabla.policy import Policy
from nabla.reward import RewardModel
from nabla.rl.advantages import advantages
from nabla.rl.kl import kl_k3
from nabla.rl.settings import LoRASettings, RLConfig


class NothingTrainableError(ConfigurationError):
    """The model handed to the RL trainer has no parameter with ``requires_grad``."""


class TrainingDivergedError(NablaError, FloatingPointError):
    """The RL loss became NaN or infinite."""


@dataclass
class TokenLogProbs:
    """Per-token values of a batch of responses, right-padded to the longest (``mask`` marks real tokens)."""

    log_probs: Tensor
    entropy: Tensor
    mask: Tensor

    def sequence(self) -> Tensor:
        return (self.log_probs * self.mask).sum(-1)


def response_log_probs(
    model: torch.nn.Module, contexts: Sequence[Tensor], responses: Sequence[Sequence[int]], pad_id: int
) -> TokenLogProbs:
    """``log π(y_t | x, y_<t)`` and the entropy of π at every response position, in one batched forward.

    Rows are ``context ⊕ response`` left-padded so that every response ends at the last position; only the
    logits of the last ``max_len + 1`` positions are computed (``logits_to_keep``).
    """
    device = next(model.parameters()).device
    lengths = [len(r) for r in responses]
    if min(lengths) < 1:
        raise ValueError("every response needs at least one token")
    rows = [
        torch.cat([c.to(device), torch.as_tensor(list(r), dtype=torch.long, device=device)])
        for c, r in zip(contexts, responses)
    ]
    width, longest = max(len(r) for r in rows), max(lengths)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=longest + 1)
    logits = out.logits[:, :-1].float()  # kept column j predicts the token at kept column j + 1
    log_softmax = torch.log_softmax(logits, dim=-1)
    log_probs = log_softmax.gather(-1, ids[:, -longest:].unsqueeze(-1)).squeeze(-1)
    entropy = -(log_softmax.exp() * log_softmax).sum(-1)
    # Row i's response fills its last n_i columns; column t of the result is its t-th token.
    steps = torch.arange(longest, device=device)[None]
    n = torch.tensor(lengths, device=device)[:, None]
    columns = (steps + longest - n).clamp(max=longest - 1)
    valid = (steps < n).float()
    return TokenLogProbs(log_probs.gather(1, columns) * valid, entropy.gather(1, columns) * valid, valid)


def padding_id(policy: Policy) -> int:
    """The id that fills left padding (the tokenizer's pad token, else its EOS, else 0); masked out anyway."""
    tokenizer = policy.tokenizer
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def completion_generator(seed: int, step: int, prompt_index: int, member: int) -> torch.Generator:
    """The generator of one completion: distinct for every (seed, step, prompt, member), the same on every rank
    and after a resume."""
    return torch.Generator().manual_seed(derive_seed(seed, "rl", step, prompt_index, member))


def attach_lora(policy: Policy, lora: LoRASettings | None, seed: int = 0) -> torch.nn.Module:
    """The policy's model with a trainable LoRA adapter injected in place (``policy.model`` then runs through
    it), returned as the ``PeftModel`` that can disable it; refuses a model with nothing trainable."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if isinstance(policy.model, PeftModel):
        if lora is not None:
            raise ConfigurationError("the policy already carries a peft adapter; pass lora=None to train it as is")
        model = policy.model
    elif lora is None:
        raise NothingTrainableError(
            "nothing to train: the policy's weights are frozen and no LoRA adapter is configured; set lora "
            "(LoRASettings) to train an adapter"
        )
    elif lora.adapter is not None:
        if not (Path(lora.adapter) / "adapter_config.json").is_file():
            raise ConfigurationError(f"no peft adapter at {lora.adapter!r}; pass a folder saved with save_pretrained")
        model = PeftModel.from_pretrained(policy.model, lora.adapter, is_trainable=True)
    else:
        config = LoraConfig(
            task_type="CAUSAL_LM",
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=0.0,  # sampling and the loss forward must see one and the same policy
            target_modules=lora.target_modules,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the adapter's random initialisation is part of the run's seed
            model = get_peft_model(policy.model, config)
    if not any(p.requires_grad for p in model.parameters()):
        raise NothingTrainableError(
            "nothing to train: every parameter of the policy's model is frozen (an adapter loaded for inference?); "
            "load the adapter with is_trainable=True or set lora"
        )
    return model


class KLRegularizedRL(L.LightningModule):
    """KL-regularised RL of a policy's LoRA adapter against a reward (see the module docstring).

    Args:
        policy: the policy; its model receives the adapter in place (do not share it with other code while
            training).
        reward: any :class:`~nabla.RewardModel` (it is bound to the policy here).
        config: RL settings (λ, KL placement, advantages, group size, optimiser, sampling).
        lora: the adapter to train; ``None`` only for a policy whose model is already a trainable ``PeftModel``.
    """

    def __init__(
        self,
        policy: Policy,
        reward: RewardModel,
        config: RLConfig | None = None,
        lora: LoRASettings | None = LoRASettings(),  # noqa: B008 - a frozen default is never mutated
    ) -> None:
        super().__init__()
        self.config = config or RLConfig()
        self.policy = policy
        self.reward = reward
        self.model = attach_lora(policy, lora, seed=self.config.seed)
        self.reward.bind(policy)
        self.cost = CostMeter()
        self.strict_loading = False  # checkpoints hold the adapter only
        self.save_hyperparameters(
            {"rl": asdict(self.config), "lora": asdict(lora) if lora is not None else None}, logger=True
        )
        self._step_started = 0.0

    # ------------------------------------------------------------------ parts
    @property
    def pad_id(self) -> int:
        return padding_id(self.policy)

    def trainable_names(self) -> set[str]:
        return {name for name, parameter in self.named_parameters() if parameter.requires_grad}

    def sample(self, prompts: Sequence[str], indices: Sequence[int], step: int) -> tuple[list[Tensor], list[list[int]]]:
        """``group_size`` on-policy completions of each prompt (contexts repeated, response token ids)."""
        group, config = self.config.group_size, self.config
        contexts = [self.policy.encode(p) for p in prompts for _ in range(group)]
        generators = [completion_generator(config.seed, step, i, g) for i in indices for g in range(group)]
        rollouts = self.policy.generate(
            contexts,
            config.sampling,
            generators,
            config.max_new_tokens,
            stop_strings=config.stop_strings,
            meter=self.cost,
        )
        return contexts, [r.token_ids for r in rollouts]

    def log_probs(
        self, contexts: Sequence[Tensor], responses: Sequence[Sequence[int]], *, reference: bool
    ) -> TokenLogProbs:
        """Per-token log-probabilities under the policy (with gradient) or the reference (adapter disabled)."""
        tokens = sum(len(c) + len(r) for c, r in zip(contexts, responses))
        self.cost.update("lm_forward", len(responses), flops=forward_flops(self.policy.params, tokens))
        if not reference:
            return response_log_probs(self.model, contexts, responses, self.pad_id)
        with torch.no_grad(), self.model.disable_adapter():
            return response_log_probs(self.model, contexts, responses, self.pad_id)

    def loss_terms(self, rewards: Tensor, policy: TokenLogProbs, reference: TokenLogProbs) -> dict[str, Tensor]:
        """The loss and what is logged about it, from rewards ``(P·G,)`` and per-token log-probabilities."""
        config, mask = self.config, policy.mask
        log_ratio = (policy.log_probs - reference.log_probs) * mask
        sequence_kl = log_ratio.sum(-1).detach()
        rewards = rewards.to(sequence_kl.device)
        shaped = rewards - config.beta * sequence_kl if config.kl_placement == "reward" else rewards
        advantage = advantages(shaped.view(-1, config.group_size), config.advantage, scale=config.scale_advantages)
        policy_loss = -(advantage.flatten().detach() * policy.sequence()).mean()
        k3 = (kl_k3(policy.log_probs, reference.log_probs) * mask).sum(-1)
        kl_loss = config.beta * k3.mean() if config.kl_placement == "loss" else torch.zeros_like(policy_loss)
        tokens = mask.sum().clamp(min=1)
        return {
            "loss": policy_loss + kl_loss,
            "policy_loss": policy_loss.detach(),
            "kl_loss": kl_loss.detach(),
            "reward": rewards.mean(),
            "kl": sequence_kl.mean(),
            "kl_k3": k3.detach().mean(),
            "entropy": (policy.entropy.detach() * mask).sum() / tokens,
            "length": mask.sum(-1).mean(),
        }

    # ------------------------------------------------------------------ Lightning hooks
    def on_fit_start(self) -> None:
        reward_model = getattr(self.reward, "model", None)
        if isinstance(reward_model, torch.nn.Module):
            reward_model.to(self.device)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_started = time.perf_counter()

    def training_step(self, batch: dict[str, list], batch_idx: int) -> Tensor:
        prompts, indices = batch["prompt"], batch["index"]
        contexts, responses = self.sample(prompts, indices, self.global_step)
        repeated = [p for p in prompts for _ in range(self.config.group_size)]
        texts = [self.policy.decode(r) for r in responses]
        rewards = self.reward.score(repeated, texts, responses, meter=self.cost).float()
        policy = self.log_probs(contexts, responses, reference=False)
        reference = self.log_probs(contexts, responses, reference=True)
        terms = self.loss_terms(rewards, policy, reference)
        tokens = sum(len(c) + len(r) for c, r in zip(contexts, responses))
        self.cost.update("lm_backward", len(responses), flops=backward_flops(self.policy.params, tokens))
        if not torch.isfinite(terms["loss"]):
            raise TrainingDivergedError(
                f"the RL loss became {float(terms['loss'])} at step {self.global_step}; lower rl.lr or raise rl.lam"
            )
        size = len(repeated)
        for name, value in terms.items():
            self.log(f"train/{name}", value, batch_size=size, prog_bar=name in ("reward", "kl"))
        return terms["loss"]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.cost.update("wall_time_s", time.perf_counter() - self._step_started)
        local = self.cost.snapshot()
        for kind in ("model_calls", "flops"):
            self.log(f"cost/{kind}", local[kind], on_step=True, on_epoch=False, reduce_fx="sum", sync_dist=False)

    def configure_optimizers(self) -> Any:
        parameters = [p for p in self.parameters() if p.requires_grad]
        if not parameters:
            raise NothingTrainableError("nothing to train: no parameter of the policy requires a gradient; set lora")
        optimizer = torch.optim.AdamW(parameters, lr=self.config.lr, weight_decay=self.config.weight_decay)
        total = self.trainer.max_steps if self.trainer is not None else -1
        if not self.config.lr_decay or total < 1:
            return optimizer
        factor = lambda step: 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / total)))  # noqa: E731
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the adapter's weights (the frozen base is the reference, loaded from its own folder) and the
        training cost so far, summed over processes."""
        trainable = self.trainable_names()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["nabla_training_cost"] = self.training_cost()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        missing = self.trainable_names() - set(checkpoint.get("state_dict", {}))
        if missing:
            raise ConfigurationError(
                f"the checkpoint lacks {len(missing)} adapter tensors (e.g. {sorted(missing)[0]}); resume with the "
                "same lora settings it was trained with"
            )
        totals = checkpoint.get("nabla_training_cost", {})
        first = self.trainer is None or self.trainer.global_rank == 0
        for kind in CALL_KINDS + EVENT_KINDS:
            getattr(self.cost, kind).fill_(float(totals.get(kind, 0.0)) if first else 0.0)

    def training_cost(self) -> dict[str, float]:
        """Model calls, FLOPs and wall time spent by training so far, summed over processes."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.cost._computed = None
            return self.cost.compute()
        return self.cost.snapshot()

    def save_adapter(self, folder: str | Path) -> Path:
        """The trained adapter as a peft folder (``Policy.from_pretrained(base, adapter=folder)`` loads it)."""
        folder = Path(folder)
        self.model.save_pretrained(str(folder))
        return folder
