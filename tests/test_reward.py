import pytest
import torch
from conftest import PROMPT

from nabla import (
    CallableReward,
    ConfigurationError,
    RewardNotDifferentiableError,
    SequenceClassifierReward,
    VocabularyMismatchError,
)
from nabla.reward import VocabularyAlignment
from nabla.tiny import WORDS, tiny_classifier, tiny_tokenizer


def _soft_score_and_grad(reward, committed, tokens, use_cache, vocab):
    context = reward.context(PROMPT, committed, use_cache=use_cache)
    y = torch.nn.functional.one_hot(tokens, vocab).float().requires_grad_(True)
    score = reward.score_soft(y, context)
    score.backward()
    return score.detach(), y.grad


def test_soft_score_of_a_hard_one_hot_equals_the_plain_score(reward, policy):
    committed, tokens = [12, 9], torch.tensor([30, 7, 41])
    soft, _ = _soft_score_and_grad(reward, committed, tokens, True, policy.vocab_size)
    response = committed + tokens.tolist()
    plain = reward.score([PROMPT], [policy.decode(response)], [response])[0]
    torch.testing.assert_close(soft, plain, rtol=1e-5, atol=1e-5)


def test_cached_soft_score_matches_the_full_forward_in_value_and_gradient(reward, policy):
    committed, tokens = [12, 9, 14], torch.tensor([30, 7, 41, 8])
    full, grad_full = _soft_score_and_grad(reward, committed, tokens, False, policy.vocab_size)
    cached, grad_cached = _soft_score_and_grad(reward, committed, tokens, True, policy.vocab_size)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_cached, grad_full, rtol=1e-4, atol=1e-6)
    assert grad_full.abs().sum() > 0


def test_extending_a_cached_context_equals_building_it_whole(reward, policy):
    tokens = torch.tensor([30, 7])
    grown = reward.extend(reward.context(PROMPT, [12], use_cache=True), [9, 14])
    y = torch.nn.functional.one_hot(tokens, policy.vocab_size).float()
    whole = reward.context(PROMPT, [12, 9, 14], use_cache=False)
    torch.testing.assert_close(reward.score_soft(y, grown), reward.score_soft(y, whole), rtol=1e-5, atol=1e-5)


def test_batched_plain_scores_match_single_scores(reward, policy):
    responses = [[12, 9], [30, 7, 41, 8, 9], [5]]
    texts = [policy.decode(r) for r in responses]
    batched = reward.score([PROMPT] * 3, texts, responses)
    single = torch.cat([reward.score([PROMPT], [t], [r]) for t, r in zip(texts, responses)])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)


def test_reward_input_wraps_the_response_in_the_chat_template(reward, policy):
    ids = reward.input_ids(PROMPT, "2 plus 3", [11, 30, 12])
    text = reward.tokenizer.decode(ids)
    assert text.startswith("<|user|> what is 2 plus 3 ? <|end|> <|assistant|>")
    assert text.endswith("<|end|>")
    assert ids[-4:-1].tolist() == [11, 30, 12]


def test_vocabulary_alignment_maps_rows_by_token_string():
    source = tiny_tokenizer()
    shuffled = list(reversed(WORDS))[:-5]  # a different order, five words missing
    target = tiny_tokenizer(shuffled)
    alignment = VocabularyAlignment.build(source, target, len(source))
    assert not alignment.identical
    for word in ("plus", "7", "answer"):
        assert alignment.index[source.convert_tokens_to_ids(word)] == target.convert_tokens_to_ids(word)
    missing = source.convert_tokens_to_ids(WORDS[0])
    assert alignment.index[missing] == -1
    assert alignment.coverage == pytest.approx(1 - 5 / len(source))
    y = torch.nn.functional.one_hot(torch.tensor([source.convert_tokens_to_ids("plus"), missing]), len(source)).float()
    mapped = alignment.map_weights(y, len(target))
    assert mapped[0, target.convert_tokens_to_ids("plus")] == 1 and mapped[0].sum() == 1
    assert mapped[1].sum() == 0


def test_alignment_refuses_a_reward_model_that_shares_too_little_vocabulary(policy):
    foreign = tiny_tokenizer([f"w{i}" for i in range(40)] + ["plus"])
    reward = SequenceClassifierReward(tiny_classifier(foreign), foreign)
    with pytest.raises(VocabularyMismatchError, match="maps onto"):
        reward.bind(policy)


def test_cross_vocabulary_reward_scores_soft_tokens_through_aligned_rows(policy):
    target = tiny_tokenizer(list(reversed(WORDS)))
    reward = SequenceClassifierReward(tiny_classifier(target, seed=4), target)
    reward.bind(policy)
    assert not reward.alignment.identical and reward.alignment.coverage == 1.0
    tokens = torch.tensor([policy.tokenizer.convert_tokens_to_ids(w) for w in ("2", "plus", "3")])
    y = torch.nn.functional.one_hot(tokens, policy.vocab_size).float()
    soft = reward.score_soft(y, reward.context(PROMPT, [], use_cache=True))
    plain = reward.score([PROMPT], ["2 plus 3"])[0]
    torch.testing.assert_close(soft, plain, rtol=1e-5, atol=1e-5)


def test_callable_reward_scores_text_and_refuses_gradients():
    reward = CallableReward(lambda prompt, response: float(len(response)))
    assert reward.score(["p", "p"], ["ab", "abcd"]).tolist() == [2.0, 4.0]
    assert not reward.differentiable
    with pytest.raises(RewardNotDifferentiableError):
        reward.context("p", [], use_cache=True)


def test_sequence_classifier_needs_exactly_one_label(tokenizer):
    with pytest.raises(ConfigurationError, match="one output label"):
        SequenceClassifierReward(tiny_classifier(tokenizer, num_labels=2), tokenizer)


def test_reward_from_pretrained_loads_a_saved_folder(saved_models, policy):
    _, reward_dir = saved_models
    reward = SequenceClassifierReward.from_pretrained(str(reward_dir))
    reward.bind(policy)
    assert reward.alignment.identical
    assert reward.score([PROMPT], ["5"]).shape == (1,)


def test_self_judge_is_the_policys_yes_no_log_odds_and_differentiable(policy):
    from nabla.judge import SelfJudgeReward

    judge = SelfJudgeReward.from_policy(policy, yes="so", no="the")
    judge.bind(policy)
    response = [11, 30, 12]
    ids = judge.input_ids(PROMPT, policy.decode(response), response)
    import torch as _torch

    with _torch.no_grad():
        logits = policy.model(ids[None]).logits[0, -1]
    expected = logits[judge.yes_id] - logits[judge.no_id]
    plain = judge.score([PROMPT], [policy.decode(response)], [response])[0]
    _torch.testing.assert_close(plain, expected, rtol=1e-5, atol=1e-5)
    y = _torch.nn.functional.one_hot(_torch.tensor(response), policy.vocab_size).float().requires_grad_(True)
    soft = judge.score_soft(y, judge.context(PROMPT, [], use_cache=True))
    soft.backward()
    _torch.testing.assert_close(soft.detach(), plain, rtol=1e-5, atol=1e-5)
    assert y.grad.abs().sum() > 0
