import json
import math
import os
import subprocess
import sys

import lightning as L
import pytest
import torch
from conftest import PROMPT

from nabla import CallableReward, ConfigurationError, Policy, SamplingConfig, SequenceClassifierReward
from nabla.rl import (
    KLRegularizedRL,
    LoRASettings,
    NothingTrainableError,
    PromptDataModule,
    RLConfig,
    advantages,
    exact_kl,
    grpo_advantages,
    kl_estimate,
    response_log_probs,
    rloo_advantages,
)
from nabla.rl.module import padding_id
from nabla.rl.train import RLTrainerSettings, quiet_lightning
from nabla.tiny import tiny_causal_lm, tiny_classifier

PROMPTS = [PROMPT, "what is 4 minus 1 ?", "what is 5 times 2 ?", "what is 7 plus 7 ?", "what is 9 minus 4 ?", "so ?"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, above all on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fresh_module(tokenizer, **config) -> KLRegularizedRL:
    """A module on its own copy of the tiny policy (LoRA is injected into the model in place)."""
    policy = Policy(tiny_causal_lm(tokenizer, seed=0), tokenizer)
    reward = SequenceClassifierReward(tiny_classifier(tokenizer, seed=1), tokenizer)
    settings = dict(group_size=2, max_new_tokens=4, lr=5e-2, lam=2.0)
    settings.update(config)
    return KLRegularizedRL(policy, reward, RLConfig(**settings), LoRASettings(r=4, alpha=8))


# ---------------------------------------------------------------------------- KL estimators
def test_k1_and_k3_are_unbiased_and_k3_is_nonnegative():
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        log_p = torch.log_softmax(torch.randn(6, generator=generator, dtype=torch.float64) * 2, -1)
        log_q = torch.log_softmax(torch.randn(6, generator=generator, dtype=torch.float64) * 2, -1)
        exact = exact_kl(log_p, log_q)
        p = log_p.exp()
        for estimator in ("k1", "k3"):  # expectation under p, computed exactly over the 6 outcomes
            assert float((p * kl_estimate(log_p, log_q, estimator)).sum()) == pytest.approx(float(exact), rel=1e-9)
        assert bool((kl_estimate(log_p, log_q, "k3") >= 0).all()) and bool((kl_estimate(log_p, log_q, "k2") >= 0).all())
        assert bool((kl_estimate(log_p, log_q, "k1") < 0).any())  # k1 is unbiased but not pointwise non-negative


def test_kl_estimators_monte_carlo_and_k2_bias():
    log_p = torch.log_softmax(torch.tensor([2.0, 0.0, -1.0, 0.5], dtype=torch.float64), -1)
    log_q = torch.log_softmax(torch.tensor([-1.0, 1.0, 0.0, 0.0], dtype=torch.float64), -1)
    samples = torch.multinomial(log_p.exp(), 200_000, replacement=True, generator=torch.Generator().manual_seed(1))
    exact = float(exact_kl(log_p, log_q))
    for estimator in ("k1", "k3"):
        assert float(kl_estimate(log_p[samples], log_q[samples], estimator).mean()) == pytest.approx(exact, rel=0.02)
    assert float((log_p.exp() * kl_estimate(log_p, log_q, "k2")).sum()) != pytest.approx(exact, rel=0.02)


# ---------------------------------------------------------------------------- advantages
def test_advantages_hand_computed():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 6.0], [5.0, 5.0, 5.0, 5.0]])
    std = math.sqrt(14 / 3)
    expected_grpo = torch.tensor([[-2 / std, -1 / std, 0.0, 3 / std], [0.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(grpo_advantages(rewards, eps=0.0)[0], expected_grpo[0])
    assert torch.equal(grpo_advantages(rewards)[1], expected_grpo[1])  # a constant group has no signal
    assert torch.allclose(grpo_advantages(rewards, scale=False)[0], torch.tensor([-2.0, -1.0, 0.0, 3.0]))
    expected_rloo = torch.tensor([[1 - 11 / 3, 2 - 10 / 3, 0.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(rloo_advantages(rewards), expected_rloo)
    assert torch.allclose(advantages(rewards, "rloo"), 4 / 3 * grpo_advantages(rewards, scale=False))
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(torch.ones(3, 1))


# ---------------------------------------------------------------------------- log-probs, reference, errors
def test_response_log_probs_match_the_sampler(tokenizer):
    policy = Policy(tiny_causal_lm(tokenizer, seed=0), tokenizer)
    contexts = [policy.encode(PROMPT), policy.encode("so ?")]
    generators = [torch.Generator().manual_seed(s) for s in (0, 1)]
    rollouts = policy.generate(contexts, SamplingConfig(temperature=1.0, top_p=None), generators, 6, record_logits=True)
    values = response_log_probs(policy.model, contexts, [r.token_ids for r in rollouts], padding_id(policy))
    for row, rollout in enumerate(rollouts):
        n = len(rollout)
        expected = torch.log_softmax(rollout.logits, -1).gather(-1, torch.tensor(rollout.token_ids)[:, None])[:, 0]
        assert torch.allclose(values.log_probs[row, :n], expected, atol=1e-5)
        assert bool((values.mask[row, :n] == 1).all()) and bool((values.mask[row, n:] == 0).all())


def test_reference_is_the_base_model_with_the_adapter_disabled(tokenizer):
    module = fresh_module(tokenizer)
    with torch.no_grad():
        for name, parameter in module.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
    base = tiny_causal_lm(tokenizer, seed=0)
    contexts = [module.policy.encode(PROMPT)] * 2
    responses = [[7, 8, 9], [10, 3]]
    reference = module.log_probs(contexts, responses, reference=True)
    expected = response_log_probs(base, contexts, responses, module.pad_id)
    assert torch.equal(reference.log_probs, expected.log_probs)
    tuned = module.log_probs(contexts, responses, reference=False)
    assert not torch.allclose(tuned.log_probs, expected.log_probs)
    assert tuned.log_probs.requires_grad and not reference.log_probs.requires_grad
    assert sum(p.numel() for p in module.model.parameters()) < 2 * sum(p.numel() for p in base.parameters())


def test_nothing_trainable_is_a_clear_error(tokenizer, tmp_path):
    policy = Policy(tiny_causal_lm(tokenizer, seed=0), tokenizer)
    reward = CallableReward(lambda prompt, response: 0.0)
    with pytest.raises(NothingTrainableError, match="nothing to train"):
        KLRegularizedRL(policy, reward, RLConfig(group_size=2), lora=None)
    module = fresh_module(tokenizer)
    module.save_adapter(tmp_path / "adapter")
    from peft import PeftModel

    frozen = PeftModel.from_pretrained(tiny_causal_lm(tokenizer, seed=0), str(tmp_path / "adapter"))
    with pytest.raises(NothingTrainableError, match="frozen"):
        KLRegularizedRL(Policy(frozen, tokenizer), reward, RLConfig(group_size=2), lora=None)


@pytest.mark.filterwarnings("ignore:.*self.trainer.*")
def test_a_step_charges_the_test_time_cost_kinds_and_kl_placements_differ(tokenizer):
    module = fresh_module(tokenizer, group_size=3)
    batch = {"prompt": PROMPTS[:2], "index": [0, 1]}
    contexts, responses = module.sample(batch["prompt"], batch["index"], step=0)
    again = module.sample(batch["prompt"], batch["index"], step=0)[1]
    assert responses == again and len(responses) == 6
    module.cost.reset()
    module.training_step(batch, 0)
    cost = module.cost.snapshot()
    assert cost["lm_forward"] == 12 and cost["lm_backward"] == 6 and cost["rm_forward"] == 6
    assert cost["generated_tokens"] >= sum(len(r) for r in responses) and cost["flops"] > 0
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.2, 0.9, 0.1])
    with torch.no_grad():
        for name, parameter in module.model.named_parameters():
            if "lora_B" in name:
                parameter.add_(0.3)
    policy = module.log_probs(contexts, responses, reference=False)
    reference = module.log_probs(contexts, responses, reference=True)
    in_reward = module.loss_terms(rewards, policy, reference)
    module.config.kl_placement = "loss"
    in_loss = module.loss_terms(rewards, policy, reference)
    assert float(in_reward["kl_loss"]) == 0.0 and float(in_loss["kl_loss"]) > 0.0
    assert float(in_loss["kl_k3"]) >= 0.0


# ---------------------------------------------------------------------------- checkpoints
class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(outputs["loss"])


def _fit(tokenizer, folder, max_steps, resume=None):
    quiet_lightning()
    module = fresh_module(tokenizer)
    recorder = LossRecorder()
    settings = RLTrainerSettings(
        max_steps=max_steps, default_root_dir=str(folder), checkpoint_every_n_steps=2, progress=False
    )
    trainer = settings.build([recorder])
    trainer.fit(module, datamodule=PromptDataModule(PROMPTS, batch_size=2, seed=3), ckpt_path=resume)
    return module, recorder


def test_checkpoint_holds_the_adapter_only_and_resume_continues_identically(tokenizer, tmp_path):
    # 6 prompts, 2 per step: 3 steps an epoch, so the step-2 checkpoint is mid-epoch.
    whole, whole_run = _fit(tokenizer, tmp_path / "whole", 5)
    checkpoint = tmp_path / "whole" / "checkpoints" / "step2.ckpt"
    state = torch.load(checkpoint, weights_only=False)
    assert state["state_dict"] and all("lora_" in key for key in state["state_dict"])
    assert set(state["state_dict"]) == whole.trainable_names()
    assert state["nabla_training_cost"]["model_calls"] > 0
    resumed, resumed_run = _fit(tokenizer, tmp_path / "resumed", 5, resume=str(checkpoint))
    assert sorted(resumed_run.losses) == [3, 4, 5]
    assert all(resumed_run.losses[step] == whole_run.losses[step] for step in (3, 4, 5))
    for (name, a), (_, b) in zip(whole.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name
    assert resumed.cost.snapshot()["lm_forward"] == whole.cost.snapshot()["lm_forward"]


# ---------------------------------------------------------------------------- DDP
def test_two_process_ddp_run_through_the_cli(saved_models, tmp_path):
    policy_dir, reward_dir = saved_models
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:4]) + "\n")
    command = [
        sys.executable, "-m", "nabla.cli", "rl",
        "--policy.name_or_path", str(policy_dir), "--reward.name_or_path", str(reward_dir),
        "--prompts_file", str(prompts), "--batch_size", "1",
        "--rl.group_size", "2", "--rl.max_new_tokens", "3", "--lora.r", "2",
        "--trainer.max_steps", "2", "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.checkpoint_every_n_steps", "2",
        "--trainer.progress", "false", "--output", str(tmp_path / "adapter"),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Starting with 2 processes" in done.stdout + done.stderr
    cost = json.loads((tmp_path / "adapter" / "training_cost.json").read_text())
    # 2 steps x 2 processes x 1 prompt x 2 completions, each scored once and passed forward twice
    assert cost["rm_forward"] == 8 and cost["lm_forward"] == 16
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 2 and all("lora_" in key for key in state["state_dict"])


# ---------------------------------------------------------------------------- the comparison command
def test_break_even_counts_prompts_until_training_is_repaid():
    from nabla.rl.compare import break_even

    assert break_even(1000.0, 2.0, 12.0) == 100.0
    assert break_even(1000.0, 12.0, 12.0) == math.inf and break_even(0.0, 1.0, 2.0) == 0.0


def test_rl_vs_testtime_end_to_end_on_a_tiny_arithmetic_world(tmp_path):
    from nabla.rl.compare import RLStage, rl_vs_testtime
    from nabla.worlds.arithmetic.models import ModelSize, new_policy, new_reward
    from nabla.worlds.arithmetic.pipeline import SplitSizes, World
    from nabla.worlds.arithmetic.task import ArithmeticTask
    from nabla.worlds.arithmetic.tokenizer import arithmetic_tokenizer

    task = ArithmeticTask(min_terms=2, max_terms=2, max_value=20)
    world = World.prepare(tmp_path / "world", task, SplitSizes(test=3, dev=2, reward_train=2, reward_val=2), seed=0)
    tokenizer = arithmetic_tokenizer()
    size = ModelSize(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=64)
    for folder, model in (
        (world.policy_dir, new_policy(tokenizer, size, 0)),
        (world.reward_dir, new_reward(tokenizer, size, 1)),
    ):
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    stage = RLStage(
        config=RLConfig(lam=1000.0, group_size=2, max_new_tokens=6),
        trainer=RLTrainerSettings(max_steps=2, progress=False, checkpoint_every_n_steps=0),
        train_prompts=4,
        batch_size=2,
    )
    arguments = dict(world=str(world.folder), rl=stage, budget=2, limit=2, kl_samples=2, progress=False)
    rows = rl_vs_testtime(**arguments, output=str(tmp_path / "out"), docs=str(tmp_path / "docs"))
    assert [(r["policy"], r["method"]) for r in rows] == [
        ("base", "greedy"), ("base", "sampling"), ("base", "nabla@2"), ("RL", "greedy"), ("RL", "sampling")
    ]  # fmt: skip
    tuned = rows[3]
    assert tuned["training"]["model_calls"] > 0 and tuned["kl_to_base"] is not None and tuned["break_even"]
    assert (tmp_path / "docs" / "rl_vs_testtime_lam1000.md").is_file()
    assert (tmp_path / "docs" / "rl_vs_testtime_lam1000.png").is_file()
    record = json.loads((tmp_path / "out" / "rl.json").read_text())
    assert record["lam"] == 1000.0 and record["beta"] == pytest.approx(1e-3) and record["steps"] == 2
    with pytest.raises(ConfigurationError, match="share λ"):
        rl_vs_testtime(**{**arguments, "rl": RLStage(config=RLConfig(lam=5.0))}, output=str(tmp_path / "x"))
    again = rl_vs_testtime(**arguments, output=str(tmp_path / "out"), docs=str(tmp_path / "docs"))
    assert again == rows  # the adapter and the evaluation records are reused, not redone
    marker = (tmp_path / "out" / "world_fingerprint.txt").read_text()
    new_reward(tokenizer, size, 2).save_pretrained(world.reward_dir)  # the world changes under the results
    rl_vs_testtime(**arguments, output=str(tmp_path / "out"), docs=str(tmp_path / "docs"))
    assert (tmp_path / "out" / "world_fingerprint.txt").read_text() != marker
    assert json.loads((tmp_path / "out" / "rl.json").read_text())["session_wall_s"] != record["session_wall_s"]
