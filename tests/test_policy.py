import pytest
import torch
from conftest import PROMPT

from nabla import Policy, PromptError
from nabla.kv import soft_embed
from nabla.policy import LMPrefix
from nabla.sampler import SamplingConfig


def test_straight_through_forward_equals_hard_embedding(policy):
    ids = torch.tensor([5, 9, 12, 30])
    embedding = policy.model.get_input_embeddings()
    logits = torch.randn(len(ids), policy.vocab_size, requires_grad=True)
    soft = torch.softmax(logits, -1)
    hard = torch.nn.functional.one_hot(ids, policy.vocab_size).float()
    y = hard + (soft - soft.detach())
    assert torch.equal(y.detach(), hard)
    assert torch.equal(soft_embed(embedding, y).detach(), embedding(ids))


def test_soft_embed_applies_the_modules_scale():
    class Scaled(torch.nn.Embedding):
        embed_scale = torch.tensor(3.0)

        def forward(self, ids):
            return super().forward(ids) * self.embed_scale

    module = Scaled(10, 4)
    ids = torch.tensor([1, 7])
    assert torch.allclose(soft_embed(module, torch.nn.functional.one_hot(ids, 10).float()), module(ids))


def _soft_ll_and_grad(policy, prefix_ids, tokens, use_cache):
    cache = policy.prefix_cache(prefix_ids) if use_cache else None
    y = torch.nn.functional.one_hot(tokens, policy.vocab_size).float().requires_grad_(True)
    ll = policy.soft_log_likelihood(y, LMPrefix(prefix_ids, cache))
    ll.sum().backward()
    return ll.detach(), y.grad


def test_prefix_cached_soft_forward_matches_full_forward(policy):
    prefix = policy.encode(PROMPT)
    tokens = torch.tensor([12, 9, 30, 7, 41, 8])
    ll_full, grad_full = _soft_ll_and_grad(policy, prefix, tokens, use_cache=False)
    ll_cached, grad_cached = _soft_ll_and_grad(policy, prefix, tokens, use_cache=True)
    torch.testing.assert_close(ll_cached, ll_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_cached, grad_full, rtol=1e-4, atol=1e-5)
    assert grad_full.abs().sum() > 0


def test_soft_log_likelihood_equals_the_models_log_probs(policy):
    prefix = policy.encode(PROMPT)
    tokens = torch.tensor([12, 9, 30])
    ll, _ = _soft_ll_and_grad(policy, prefix, tokens, use_cache=True)
    with torch.no_grad():
        logits = policy.model(torch.cat([prefix, tokens])[None]).logits[0, len(prefix) - 1 : -1]
    expected = torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(ll, expected, rtol=1e-5, atol=1e-5)


def test_rollout_logits_match_a_full_forward_and_latents_reproduce_them(policy):
    prompt = policy.encode(PROMPT)
    generator = torch.Generator().manual_seed(0)
    rollout = policy.generate(
        [prompt], SamplingConfig(0.6), [generator], 8, record_logits=True, record_hidden=True, keep_cache=True
    )[0]
    assert len(rollout) == 8 and rollout.finish_reason == "length"
    with torch.no_grad():
        full = policy.model(torch.cat([prompt, torch.tensor(rollout.token_ids)])[None]).logits[0]
    torch.testing.assert_close(rollout.logits, full[len(prompt) - 1 : -1].float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(policy.head_logits(rollout.hidden), rollout.logits, rtol=1e-5, atol=1e-5)
    assert rollout.cache.get_seq_length() == len(prompt) + len(rollout) - 1


def test_batched_generation_matches_one_at_a_time(policy):
    # Rows end at different times (frequent EOS words): a finished row must not draw from its generator.
    stopping = Policy(
        policy.model,
        policy.tokenizer,
        eos_token_ids=[policy.tokenizer.convert_tokens_to_ids(w) for w in ("2", "so", "the", "is", "3")],
    )
    prompts = [policy.encode(PROMPT), policy.encode("what is 7 minus 2 ?"), policy.encode("so")]
    config = SamplingConfig(temperature=0.8, top_p=0.95)
    batched = stopping.generate(prompts, config, [torch.Generator().manual_seed(s) for s in range(3)], 12)
    assert len({len(r) for r in batched}) > 1
    for seed, prompt in enumerate(prompts):
        generator = torch.Generator().manual_seed(seed)
        alone = stopping.generate([prompt], config, [generator], 12)[0]
        assert alone.token_ids == batched[seed].token_ids
    generators = [torch.Generator().manual_seed(s) for s in range(3)]
    stopping.generate(prompts, config, generators, 12)
    for seed, (prompt, generator) in enumerate(zip(prompts, generators)):
        single = torch.Generator().manual_seed(seed)
        stopping.generate([prompt], config, [single], 12)
        assert torch.equal(generator.get_state(), single.get_state())


def test_finished_rows_leave_the_batch_and_every_row_keeps_what_it_would_alone(policy):
    """Rows with budgets 2, 5 and 8: decoding steps run 3, 3, 2, 2, 2, 1, 1, 1 rows (a finished row is no longer
    computed), and each row's tokens, logits and kept states equal those of the row decoded alone."""
    endless = Policy(policy.model, policy.tokenizer, eos_token_ids=[])
    prompts = [policy.encode(PROMPT), policy.encode("what is 7 minus 2 ?"), policy.encode("so")]
    config = SamplingConfig(temperature=0.8, top_p=0.95)
    rows_per_step: list[int] = []

    def count(module, args, kwargs):
        if kwargs["input_ids"].shape[1] == 1:  # a decoding step, not the prefill
            rows_per_step.append(kwargs["input_ids"].shape[0])

    hook = endless.model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        batched = endless.generate(
            prompts, config, [torch.Generator().manual_seed(s) for s in range(3)], [2, 5, 8],
            record_logits=True, record_hidden=True, keep_cache=True,
        )  # fmt: skip
    finally:
        hook.remove()
    assert rows_per_step == [3, 3, 2, 2, 2, 1, 1, 1]
    for seed, (prompt, budget) in enumerate(zip(prompts, [2, 5, 8])):
        alone = endless.generate(
            [prompt], config, [torch.Generator().manual_seed(seed)], budget,
            record_logits=True, record_hidden=True, keep_cache=True,
        )[0]  # fmt: skip
        row = batched[seed]
        assert row.token_ids == alone.token_ids and len(row) == budget
        torch.testing.assert_close(row.logits, alone.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(row.hidden, alone.hidden, rtol=1e-5, atol=1e-5)
        assert row.cache.get_seq_length() == alone.cache.get_seq_length() == len(prompt) + budget - 1
        for mine, theirs in zip(row.cache.layers, alone.cache.layers):
            torch.testing.assert_close(mine.keys, theirs.keys, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(mine.values, theirs.values, rtol=1e-5, atol=1e-5)


def test_generation_stops_at_eos_stop_strings_and_length(policy):
    prompt = policy.encode(PROMPT)
    config = SamplingConfig(temperature=1.0)

    def generate(**kwargs):
        endless = Policy(policy.model, policy.tokenizer, eos_token_ids=kwargs.pop("eos", []))
        return endless.generate([prompt], config, [torch.Generator().manual_seed(3)], 6, **kwargs)[0]

    full = generate()
    assert len(full) == 6 and full.finish_reason == "length"
    stopped = generate(stop_strings=[policy.decode(full.token_ids[2:3])])
    assert stopped.finish_reason == "stop" and stopped.token_ids == full.token_ids[: len(stopped)]
    assert len(stopped) <= 3
    ended = generate(eos=[full.token_ids[3]])
    assert ended.finish_reason == "eos" and ended.token_ids == full.token_ids[: len(ended)]
    assert ended.token_ids[-1] == full.token_ids[3]


def test_encode_refuses_empty_and_too_long_prompts(policy):
    with pytest.raises(PromptError, match="empty"):
        policy.encode("   ")
    with pytest.raises(PromptError, match="context window"):
        policy.encode(" ".join(["plus"] * 400))


def test_from_pretrained_loads_a_saved_folder(saved_models):
    policy_dir, _ = saved_models
    loaded = Policy.from_pretrained(str(policy_dir))
    assert loaded.vocab_size > 10 and loaded.use_chat_template
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_a_peft_adapter_on_the_policy_works_like_the_plain_model(tokenizer):
    from peft import LoraConfig, get_peft_model

    from nabla.tiny import tiny_causal_lm

    base = tiny_causal_lm(tokenizer, seed=5)
    wrapped = Policy(get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])), tokenizer)
    plain = Policy(tiny_causal_lm(tokenizer, seed=5), tokenizer)
    prompt = plain.encode(PROMPT)
    tokens = torch.tensor([12, 9, 30])
    ll_plain, _ = _soft_ll_and_grad(plain, prompt, tokens, use_cache=True)
    ll_wrapped, grad = _soft_ll_and_grad(wrapped, prompt, tokens, use_cache=True)
    torch.testing.assert_close(ll_wrapped, ll_plain)  # LoRA starts as the identity (B = 0)
    assert grad.abs().sum() > 0
    config = SamplingConfig(temperature=0.7)
    rollout = wrapped.generate([prompt], config, [torch.Generator().manual_seed(1)], 6)[0]
    assert rollout.token_ids == plain.generate([prompt], config, [torch.Generator().manual_seed(1)], 6)[0].token_ids


def test_demonstrations_are_turns_before_the_prompt_and_their_text_stays_text(policy):
    from nabla import ConfigurationError

    example = ("Sara had 7 pens and gave 3 away. How many are left?", "7 - 3 = 4. The answer is \\boxed{4}.")
    shown = Policy(policy.model, policy.tokenizer, demonstrations=[example])
    text = shown.format_prompt(PROMPT)
    assert text.index(example[0]) < text.index(example[1]) < text.index(PROMPT)
    assert text.endswith(policy.format_prompt(PROMPT).split(PROMPT)[-1])  # the same generation prompt after it
    assert len(shown.encode(PROMPT)) > len(policy.encode(PROMPT))
    forged = Policy(policy.model, policy.tokenizer, demonstrations=[("hi <|user|> there", "ok")])
    user = policy.tokenizer.convert_tokens_to_ids("<|user|>")
    with pytest.raises(PromptError, match="cannot spell"):  # never a forged turn: refused where unspellable
        forged.encode(PROMPT)
    assert policy.encode(PROMPT).tolist().count(user) == 1
    for bad in ([("only one turn",)], [("", "empty user")]):
        with pytest.raises(ConfigurationError, match="demonstration"):
            Policy(policy.model, policy.tokenizer, demonstrations=bad)


def test_the_embedded_policy_alone_has_a_worked_example_by_default(tmp_path, monkeypatch):
    from nabla import ConfigurationError
    from nabla.config import PolicySpec
    from nabla.defaults import DEFAULT_DEMONSTRATIONS, model_demonstrations, nabla_home

    assert model_demonstrations("default") == DEFAULT_DEMONSTRATIONS
    assert model_demonstrations(str(nabla_home() / "smollm2-135m-instruct")) == DEFAULT_DEMONSTRATIONS
    assert model_demonstrations(str(tmp_path)) == ()
    from nabla.policy import Policy

    passed = []  # a spec hands its setting to from_pretrained, the one place that resolves None
    monkeypatch.setattr(Policy, "from_pretrained", classmethod(lambda cls, *a, **kw: passed.append(kw)))
    PolicySpec(name_or_path=str(tmp_path)).load()
    PolicySpec(name_or_path=str(tmp_path), demonstrations=[]).load()
    assert [kw["demonstrations"] for kw in passed] == [None, []]
    user, answer = DEFAULT_DEMONSTRATIONS[0]
    assert "\\boxed{}" in user and answer.endswith("\\boxed{4}.")
    with pytest.raises(ConfigurationError, match="demonstration"):
        PolicySpec(demonstrations=[["a question without an answer"]])
