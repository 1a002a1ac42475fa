"""Process reward models: step positions, aggregation, soft = hard, DTO and acceptance read one aggregate."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import PROMPT

from nabla import LatentOptimizer, RewardModel, Sampler, TestTimeTrainer, TokenSelection
from nabla.optimizer import DTOObjective
from nabla.policy import LMPrefix
from nabla.prm import (
    AGGREGATIONS,
    LikelihoodProcessReward,
    ProcessRewardModel,
    aggregate_step_logits,
    process_reward_class,
)

pytestmark = pytest.mark.usefixtures("one_thread")

RESPONSE = "we add 2 and 3 . so we get 5 . the answer is \\boxed{ 5 }"
KINDS = ("classifier", "likelihood")


def tiny_prm(tokenizer, kind: str, seed: int = 3, aggregation: str = "min"):
    from transformers import LlamaForCausalLM, LlamaForTokenClassification

    from nabla.tiny import tiny_config

    torch.manual_seed(seed)
    if kind == "classifier":
        config = tiny_config(tokenizer, num_labels=1)
        model = LlamaForTokenClassification(config)
    else:
        config = tiny_config(tokenizer)
        config.process_reward = "likelihood"
        model = LlamaForCausalLM(config)
    config.step_separator, config.step_aggregation = ".", aggregation
    return model.eval()


@pytest.fixture(scope="module", params=KINDS)
def prm(request, tokenizer, policy):
    cls = ProcessRewardModel if request.param == "classifier" else LikelihoodProcessReward
    reward = cls(tiny_prm(tokenizer, request.param), tokenizer)
    reward.bind(policy)
    return reward


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_aggregations_match_their_definitions_on_probabilities():
    logits = torch.tensor([2.0, -1.0, 0.5])
    p = torch.sigmoid(logits.double())

    def logit(q: torch.Tensor) -> float:
        return float(torch.log(q / (1 - q)))

    assert float(aggregate_step_logits(logits, "last")) == pytest.approx(0.5)
    assert float(aggregate_step_logits(logits, "min")) == pytest.approx(-1.0)
    assert float(aggregate_step_logits(logits, "prod")) == pytest.approx(logit(p.prod()))
    assert float(aggregate_step_logits(logits, "mean")) == pytest.approx(logit(p.mean()))
    # confident steps: the product stays finite and ordered where float32 probabilities would round to 1
    sure, surer = torch.tensor([30.0, 30.0]), torch.tensor([30.0, 31.0])
    assert math.isfinite(float(aggregate_step_logits(sure, "prod")))
    assert aggregate_step_logits(surer, "prod") > aggregate_step_logits(sure, "prod")
    with pytest.raises(Exception, match="unknown step aggregation"):
        aggregate_step_logits(logits, "median")


def _row_logits(prm, row: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return prm.model(input_ids=row[None]).logits[0]


def test_classifier_steps_are_read_at_separators_and_at_the_end(tokenizer, policy):
    prm = ProcessRewardModel(tiny_prm(tokenizer, "classifier"), tokenizer)
    prm.bind(policy)
    ids = _ids(tokenizer, RESPONSE)
    steps = prm.step_scores([PROMPT], [RESPONSE], [ids])[0]
    assert len(steps) == RESPONSE.split().count(".") + 1  # two separators, then the response's end
    row = prm.input_ids(PROMPT, RESPONSE, ids)
    dots = [i for i, t in enumerate(row.tolist()) if t == tokenizer.convert_tokens_to_ids(".")]
    assert torch.allclose(steps, _row_logits(prm, row)[[*dots, len(row) - 1], 0], atol=1e-5)
    # no separator: only the end is read, as an outcome reward model reads it
    plain = ProcessRewardModel(prm.model, tokenizer, step_separator="#never#")
    plain.bind(policy)
    assert len(plain.step_scores([PROMPT], [RESPONSE], [ids])[0]) == 1


def test_likelihood_steps_are_the_probabilities_of_their_tokens(tokenizer, policy):
    prm = LikelihoodProcessReward(tiny_prm(tokenizer, "likelihood"), tokenizer)
    prm.bind(policy)
    ids = _ids(tokenizer, RESPONSE) + [tokenizer.eos_token_id]
    steps = prm.step_scores([PROMPT], [RESPONSE], [ids])[0]
    opening, body, closing = prm.input_parts(PROMPT, RESPONSE, ids)
    assert body == ids and closing  # the template's closing tokens end the last step
    row = prm.input_ids(PROMPT, RESPONSE, ids)
    begin = len(opening)
    log_probs = torch.log_softmax(_row_logits(prm, row)[:-1].double(), -1).gather(-1, row[1:, None])[:, 0]
    per_token = log_probs[begin - 1 :]  # token t after position t - 1, for every response and closing token
    dots = [i - begin for i, t in enumerate(row.tolist()) if t == tokenizer.convert_tokens_to_ids(".")]
    bounds = [0, *(d + 1 for d in dots), len(ids) + len(closing)]
    expected = [per_token[a:b].sum() for a, b in zip(bounds, bounds[1:])]
    assert torch.allclose(steps.double(), torch.stack([lp - torch.log(-torch.expm1(lp)) for lp in expected]), atol=1e-4)
    # without a template, a response that did not finish is read with the end token appended ("it stops here"
    # is judged too), and a finished one as it is
    plain = LikelihoodProcessReward(prm.model, tokenizer, chat_template=False)
    plain.bind(policy)
    cut = _ids(tokenizer, "we add 2 and 3 . so we")
    assert plain.input_parts(PROMPT, "", cut)[2] == [tokenizer.eos_token_id]
    assert plain.input_parts(PROMPT, "", ids)[2] == []


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_soft_score_equals_hard_score_at_one_hots_and_is_differentiable(prm, tokenizer, aggregation):
    prm.aggregation = aggregation
    committed = _ids(tokenizer, "we add 2 and 3 .")
    for lookahead in (_ids(tokenizer, "so we get 5 . the answer is \\boxed{ 5 }"), _ids(tokenizer, "so we")):
        text = tokenizer.decode(committed + lookahead)
        hard = float(prm.score([PROMPT], [text], [committed + lookahead])[0])
        for use_cache in (True, False):
            context = prm.context(PROMPT, committed, use_cache=use_cache)
            y = torch.nn.functional.one_hot(torch.tensor(lookahead), prm.alignment.index.shape[0]).float()
            y.requires_grad_(True)
            soft = prm.score_soft(y, context)
            assert float(soft.detach()) == pytest.approx(hard, abs=1e-4)
            (grad,) = torch.autograd.grad(soft, y)
            assert torch.isfinite(grad).all()
            if aggregation != "min":  # min may pick a committed step, a constant: then no gradient, rightly
                assert grad.abs().sum() > 0
    prm.aggregation = "min"


def test_a_context_grown_step_by_step_holds_what_one_built_at_once_holds(prm, tokenizer):
    committed = _ids(tokenizer, "we add 2 . and 3 .")
    grown = prm.context(PROMPT, committed[:2], use_cache=True)
    grown = prm.extend(grown, committed[2:4])
    grown = prm.extend(grown, committed[4:])
    whole = prm.context(PROMPT, committed, use_cache=True).head_state
    assert grown.head_state.count == whole.count == len(committed)
    assert grown.head_state.ends.tolist() == whole.ends.tolist() == [3, 6]
    for name in ("logits", "log_probs", "next_log_probs"):
        if hasattr(whole, name):
            assert torch.allclose(getattr(grown.head_state, name), getattr(whole, name), atol=1e-5)


def test_dto_and_acceptance_read_the_same_aggregate(prm, policy, tokenizer):
    """The reward DTOObjective reports at a hard look-ahead is the score acceptance tests compute."""
    prompt_ids = policy.encode(PROMPT)
    committed = _ids(tokenizer, "we add 2 and 3 .")
    lookahead = torch.tensor(_ids(tokenizer, "so we get 5 . the answer is 5"))
    ids = torch.cat([prompt_ids, torch.tensor(committed)])
    for aggregation in AGGREGATIONS:
        prm.aggregation = aggregation
        objective = DTOObjective(
            policy,
            prm,
            LMPrefix(ids, policy.prefix_cache(ids)),
            prm.context(PROMPT, committed, use_cache=True),
            reward_weight=1.0,
            likelihood_weight=1e-3,
        )
        value = objective.evaluate(lookahead)
        response = committed + lookahead.tolist()
        hard = float(prm.score([PROMPT], [policy.decode(response)], [response])[0])
        assert value.reward == pytest.approx(hard, abs=1e-4)
    prm.aggregation = "min"


def test_trainer_decodes_with_a_prm_and_its_acceptance_rewards_are_prm_scores(prm, policy):
    loose = TokenSelection(max_confidence=1.0, min_entropy=0.0)
    trainer = TestTimeTrainer(
        policy, prm, LatentOptimizer(steps=3), Sampler(max_rollouts=3, max_new_tokens=12, selection=loose)
    )
    result = trainer.fit(PROMPT, seed=0)
    assert result.reward == pytest.approx(float(prm.score([PROMPT], [result.text], [result.token_ids])[0]), abs=1e-5)
    assert result.revisions and all(math.isfinite(r.proposal_reward) for r in result.revisions)


def test_saved_prms_load_through_reward_model_from_pretrained(prm, tokenizer, tmp_path):
    prm.model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert process_reward_class(str(tmp_path)) is type(prm)
    loaded = RewardModel.from_pretrained(str(tmp_path))
    assert type(loaded) is type(prm)
    assert loaded.step_separator == "." and loaded.aggregation == "min"
    assert RewardModel.from_pretrained(str(tmp_path), aggregation="prod").aggregation == "prod"
    with pytest.raises(Exception, match="unknown step aggregation"):
        RewardModel.from_pretrained(str(tmp_path), aggregation="median")


def test_an_outcome_reward_model_refuses_step_settings(saved_models):
    _, reward_dir = saved_models
    assert process_reward_class(str(reward_dir)) is None
    with pytest.raises(Exception, match="aggregation applies to process reward models"):
        RewardModel.from_pretrained(str(reward_dir), aggregation="min")


@pytest.mark.slow
def test_the_default_model_read_as_a_likelihood_prm_scores_and_differentiates():
    """``process_reward: likelihood`` on the default SmolLM2: soft = hard at one-hots under every aggregation, and
    the loop runs on it (offline; the embedded model is untrained as a PRM, so no claim on its ordering)."""
    from nabla.config import PolicySpec, RewardSpec

    policy = PolicySpec(name_or_path="default").load()
    prm = RewardSpec(name_or_path="default", process_reward="likelihood", step_separator="\n").load(policy)
    assert isinstance(prm, LikelihoodProcessReward) and prm.step_separator == "\n"
    prm.bind(policy)
    prompt, committed = "What is 7 * 8 - 5?", policy.tokenizer("7 * 8 = 56.\n", add_special_tokens=False)["input_ids"]
    lookahead = policy.tokenizer("56 - 5 = 51.\nSo \\boxed{51}.", add_special_tokens=False)["input_ids"]
    ids = committed + lookahead
    for aggregation in AGGREGATIONS:
        prm.aggregation = aggregation
        hard = float(prm.score([prompt], [policy.decode(ids)], [ids])[0])
        y = torch.nn.functional.one_hot(torch.tensor(lookahead), prm.alignment.index.shape[0]).float()
        y.requires_grad_(True)
        soft = prm.score_soft(y, prm.context(prompt, committed, use_cache=True))
        assert float(soft.detach()) == pytest.approx(hard, abs=1e-3)
        assert torch.isfinite(torch.autograd.grad(soft, y)[0]).all()
    trainer = TestTimeTrainer(policy, prm, LatentOptimizer(steps=2), Sampler(max_rollouts=2, max_new_tokens=24))
    result = trainer.fit(prompt, seed=0)
    assert math.isfinite(result.reward)
