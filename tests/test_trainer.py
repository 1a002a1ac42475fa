import json

import pytest
import torch
from conftest import PROMPT, TokenBonusReward

from nabla import (
    Acceleration,
    CallableReward,
    Callback,
    ConfigurationError,
    DeviceMismatchError,
    LatentOptimizer,
    Policy,
    PromptError,
    RewardNotDifferentiableError,
    Sampler,
    SequenceClassifierReward,
    TestTimeTrainer,
    TokenSelection,
)
from nabla.tiny import tiny_classifier

STAT_KEYS = {
    "rollouts",
    "rejections",
    "dto_runs",
    "grad_steps",
    "cached_steps",
    "generated_tokens",
    "model_calls",
    "lm_forward",
    "lm_backward",
    "rm_forward",
    "rm_backward",
    "prefill",
    "selector",
    "flops",
    "wall_time_s",
}


def _trainer(policy, reward, *, optimizer=None, acceleration=None, callbacks=None, **sampler):
    sampler.setdefault("max_new_tokens", 16)
    return TestTimeTrainer(
        policy,
        reward,
        optimizer or LatentOptimizer(steps=5),
        Sampler(**sampler),
        acceleration=acceleration,
        callbacks=callbacks,
    )


def _without_time(stats):
    return {k: v for k, v in stats.items() if k != "wall_time_s"}


def test_fit_returns_text_reward_and_full_cost_accounting(policy, reward):
    result = _trainer(policy, reward).fit(PROMPT, seed=0)
    assert result.text == policy.decode(result.token_ids) and len(result.token_ids) <= 16
    assert result.stats.keys() >= STAT_KEYS
    parts = ["lm_forward", "lm_backward", "rm_forward", "rm_backward", "generated_tokens", "prefill", "selector"]
    assert result.stats["model_calls"] == sum(result.stats[p] for p in parts)
    assert result.stats["flops"] > 0 and result.stats["wall_time_s"] > 0
    assert result.stats["rollouts"] == 1 + result.stats["proposals"]
    assert result.stats["dto_runs"] == len(result.dto_runs) > 0
    assert result.reward == pytest.approx(float(reward.score([PROMPT], [result.text], [result.token_ids])[0]), abs=1e-5)
    json.dumps(result.to_dict())


def test_same_seed_same_result_and_other_seeds_differ(policy, reward):
    trainer = _trainer(policy, reward)
    first, again = trainer.fit(PROMPT, seed=7), trainer.fit(PROMPT, seed=7)
    assert first.token_ids == again.token_ids and first.reward == again.reward
    assert _without_time(first.stats) == _without_time(again.stats)
    others = {tuple(trainer.fit(PROMPT, seed=s).token_ids) for s in range(3)}
    assert len(others) > 1


def test_accepted_revisions_raise_the_reward_and_rejected_ones_do_not(policy, tokenizer):
    bonus = TokenBonusReward(tokenizer.convert_tokens_to_ids("apples"), tokenizer, bonus=1.0)
    trainer = _trainer(policy, bonus, optimizer=LatentOptimizer(steps=10, lr=0.5), max_new_tokens=24)
    plain = _trainer(policy, bonus, max_rollouts=1, max_new_tokens=24)
    for seed in range(4):
        result = trainer.fit(PROMPT, seed=seed)
        for revision in result.revisions:
            assert revision.accepted == (revision.proposal_reward > revision.current_reward)
        first = plain.fit(PROMPT, seed=seed)
        assert result.reward >= first.reward


def test_acceptance_scores_both_candidates_from_identical_formatting(policy, reward, monkeypatch):
    captured = []
    original = reward.input_ids

    def spy(prompt, response, response_ids=None):
        ids = original(prompt, response, response_ids)
        captured.append((ids.tolist(), list(response_ids)))
        return ids

    monkeypatch.setattr(reward, "input_ids", spy)
    result = _trainer(policy, reward, acceleration=Acceleration.reference()).fit(PROMPT, seed=1)
    assert result.revisions, "the test needs at least one proposal"
    opening, closing = reward._pieces(PROMPT)
    assert len(captured) == 2 * len(result.revisions)  # reference mode re-scores the current rollout every time
    for ids, response in captured:
        assert ids == [*opening, *response, *closing]


def test_reference_mode_decodes_the_same_tokens_with_more_model_calls(policy, reward):
    selection = TokenSelection(max_confidence=0.97, min_entropy=0.25, min_grad_norm=0.0)
    for space in ("logits", "latents"):
        trainer = _trainer(policy, reward, optimizer=LatentOptimizer(steps=6, lr=0.3, space=space), selection=selection)
        for seed in range(2):
            fast, slow = trainer.fit(PROMPT, seed=seed), trainer.reference().fit(PROMPT, seed=seed)
            assert fast.token_ids == slow.token_ids
            assert [r.accepted for r in fast.revisions] == [r.accepted for r in slow.revisions]
            assert fast.stats["model_calls"] < slow.stats["model_calls"]
            assert fast.stats["selector"] < slow.stats["selector"]


def test_rollout_budget_one_is_plain_sampling(policy, reward):
    result = _trainer(policy, reward, max_rollouts=1).fit(PROMPT, seed=3)
    assert result.stats["rollouts"] == 1 and result.stats["dto_runs"] == 0
    sample = policy.generate([policy.encode(PROMPT)], Sampler().rollout, [torch.Generator().manual_seed(3)], 16)[0]
    assert result.token_ids == sample.token_ids


def test_budget_and_length_end_the_loop(policy, reward):
    result = _trainer(policy, reward, max_rollouts=3, max_new_tokens=9).fit(PROMPT, seed=0)
    assert result.stats["rollouts"] <= 3 and len(result.token_ids) <= 9


def test_stop_strings_and_eos_end_the_response(policy, reward):
    first = _trainer(policy, reward, max_rollouts=1, max_new_tokens=40).fit(PROMPT, seed=0)
    stop_word = policy.decode(first.token_ids[3:4])
    stopped = _trainer(policy, reward, max_rollouts=1, max_new_tokens=40, stop_strings=[stop_word]).fit(PROMPT, seed=0)
    assert stopped.finish_reason == "stop" and stopped.token_ids == first.token_ids[: len(stopped.token_ids)]
    looped = _trainer(policy, reward, max_new_tokens=40, stop_strings=[stop_word]).fit(PROMPT, seed=0)
    assert looped.finish_reason in {"stop", "length", "eos"}
    if looped.finish_reason == "stop":
        assert stop_word in policy.tokenizer.decode(looped.token_ids)
    eos_words = ("2", "3", "so", "the", "is")
    eos_policy = Policy(
        policy.model, policy.tokenizer, eos_token_ids=[policy.tokenizer.convert_tokens_to_ids(w) for w in eos_words]
    )
    ended = _trainer(eos_policy, reward, max_new_tokens=40).fit(PROMPT, seed=0)
    assert ended.finish_reason == "eos" and ended.token_ids[-1] in eos_policy.eos_token_ids
    assert all(t not in eos_policy.eos_token_ids for t in ended.token_ids[:-1])


def test_works_without_rejection_sampling_and_likelihood_only(policy, reward):
    no_rejection = _trainer(policy, reward, rejection_sampling=False).fit(PROMPT, seed=0)
    assert no_rejection.stats["rejections"] == 0
    assert no_rejection.stats["acceptances"] == no_rejection.stats["proposals"]
    likelihood_only = TestTimeTrainer(
        policy,
        None,
        LatentOptimizer(steps=4, reward_weight=0.0, likelihood_weight=1.0),
        Sampler(rejection_sampling=False, max_new_tokens=12),
    )
    result = likelihood_only.fit(PROMPT, seed=0)
    assert result.reward is None and result.stats["rm_forward"] == 0 and result.stats["dto_runs"] > 0


def test_suffix_update_and_latents_space_run(policy, reward):
    for optimizer in (LatentOptimizer(steps=3, update="suffix"), LatentOptimizer(steps=3, space="latents")):
        result = _trainer(policy, reward, optimizer=optimizer).fit(PROMPT, seed=0)
        assert result.stats["dto_runs"] > 0


def test_callbacks_fire_in_order_and_match_the_stats(policy, reward):
    class Recorder(Callback):
        def __init__(self):
            self.events = []

        def on_fit_start(self, trainer, state):
            self.events.append("start")

        def on_rollout(self, trainer, state, rollout):
            self.events.append("rollout")

        def on_dto_step(self, trainer, state, record):
            self.events.append("step")

        def on_accept(self, trainer, state, revision):
            self.events.append("accept")

        def on_reject(self, trainer, state, revision):
            self.events.append("reject")

        def on_fit_end(self, trainer, result):
            self.events.append("end")

    recorder = Recorder()
    result = _trainer(policy, reward, callbacks=[recorder]).fit(PROMPT, seed=2)
    events = recorder.events
    assert events[0] == "start" and events[-1] == "end"
    assert events.count("reject") == result.stats["rejections"]
    assert events.count("accept") == result.stats["acceptances"]
    assert events.count("step") == sum(len(run.steps) for run in result.dto_runs)


def test_lightning_logger_receives_dto_steps(policy, reward, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(tmp_path, name="fit")
    TestTimeTrainer(policy, reward, LatentOptimizer(steps=2), Sampler(max_new_tokens=8), logger=logger).fit(PROMPT)
    text = (tmp_path / "fit" / "version_0" / "metrics.csv").read_text()
    assert "dto/loss" in text and "fit/model_calls" in text


def test_bad_inputs_raise_typed_errors(policy, reward, tokenizer):
    trainer = _trainer(policy, reward)
    with pytest.raises(PromptError, match="empty"):
        trainer.fit("")
    with pytest.raises(PromptError, match="context window"):
        trainer.fit(" ".join(["plus"] * 300))
    verifier = CallableReward(lambda p, r: 1.0)
    with pytest.raises(RewardNotDifferentiableError, match="reward_weight"):
        TestTimeTrainer(policy, verifier, LatentOptimizer(), Sampler())
    TestTimeTrainer(policy, verifier, LatentOptimizer(reward_weight=0.0, likelihood_weight=1.0), Sampler())
    with pytest.raises(ConfigurationError, match="rejection"):
        TestTimeTrainer(policy, None, LatentOptimizer(reward_weight=0.0, likelihood_weight=1.0), Sampler())
    with pytest.raises(ConfigurationError, match="max_rollouts"):
        Sampler(max_rollouts=0)
    elsewhere = SequenceClassifierReward(tiny_classifier(tokenizer).to("meta"), tokenizer)
    with pytest.raises(DeviceMismatchError, match="same device"):
        TestTimeTrainer(policy, elsewhere, LatentOptimizer(), Sampler())
