"""Sampling ρ* exactly: a Metropolis-adjusted discrete Langevin sampler over responses, driven by DTO's gradient.

The target is the optimum of KL-regularised RL, ``ρ*(y|x) ∝ π_ref(y|x) · exp(λ·r(x, y))``. With
``f(y) = log π_ref(y|x) + λ·r(x, y)`` the sampler is DMALA (Zhang, Liu & Liu, ICML 2022, "A Langevin-like Sampler
for Discrete Distributions") on one-hot sequences, with ``∂f/∂onehot`` from :class:`~nabla.DTOObjective` (weights
λ and 1): the gradient machinery of ∇-Reasoner, used for a sampler whose stationary law is ρ* by construction.

State and variable length. The state is a sequence ``s`` of ``K`` tokens (``K = max_new_tokens``, cut to the
context window). Its response ``resp(s)`` is ``s`` cut where :meth:`~nabla.Policy.generate` would stop (the first
end token or stop string, else all ``K``). The positions after the cut carry π_ref's own continuation past it, and
the reward reads the response only:

    f̃(s) = log π_ref(s_1 … s_K | x) + λ·r(x, resp(s)).

The tail's conditional probabilities sum to one, so ``Σ_tail exp f̃(s) = π_ref(resp) · exp(λ·r(resp))``: the
response of a state drawn from ``exp f̃`` is distributed as ρ*, exactly, with no length prior and no padding token.
(Padding the tail with a fixed token would make every shortening a move of all later positions at once; a uniform
tail would make it ``V`` times less likely than it should be.) The start is one π_ref rollout of ``K`` tokens that
does not stop at end tokens, so its response is a plain π_ref sample.

Proposal. With ``g = ∂f̃/∂onehot(s)`` (``K × V``; the LM part over all ``K`` positions, the reward part over the
response), every position draws independently

    q_i(v | s) ∝ exp(½·(g_i[v] − g_i[s_i]) − 𝟙[v ≠ s_i] / α)

over its support ``S_i``: the whole vocabulary, or with ``top_k`` (for large vocabularies) the ``k`` most likely
tokens of π_ref at position ``i`` of the start rollout (its recorded logits) plus the start's own token, fixed for
the whole chain. The reverse proposal ``q(s | s')`` is the same rule at ``s'`` (its gradient) over the same
supports, so the ratio is exact; with ``top_k`` the chain samples ρ* restricted to ``S_1 × … × S_K`` (close to ρ*
when the sets hold nearly all of its mass), without it ρ* itself. (A support recomputed at every state would freeze
any start token outside it: the move away could never be reversed.)

Acceptance. ``min(1, exp(f̃(s') − f̃(s)) · q(s | s') / q(s' | s))``. The evaluation at ``s'`` (the one extra
forward/backward per step) serves this test and, once accepted, the next proposal. ``metropolis=False`` takes every
proposal (the unadjusted sampler, DULA): biased, kept as the ablation that shows what the test is for.

Cost goes to one :class:`~nabla.CostMeter` per chain: the start rollout (``generated_tokens``, ``prefill``), the
reward model's prompt (``prefill``), four calls per objective evaluation (``lm_forward``, ``lm_backward``,
``rm_forward``, ``rm_backward``) and ``proposals`` / ``acceptances`` / ``rejections`` (a proposal that changes no
token is the current state: it is neither evaluated nor counted). Each chain draws from its own generator only (the
rollout, ``K`` uniforms per proposal, one per test), so a seed gives the same sample alone or inside any batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from nabla._typing import TYPE_CHECKING
from nabla.errors import ConfigurationError, RewardNotDifferentiableError, require_finite
from nabla.sampler import DEFAULT_MAX_NEW_TOKENS, SamplingConfig

if TYPE_CHECKING:  # torch is imported where it is used: the settings load without it (a fast `--help`)
    import torch
    from torch import Tensor

    from nabla.cost import CostMeter
    from nabla.optimizer import DTOObjective
    from nabla.policy import Policy
    from nabla.reward import RewardContext, RewardModel


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass
class MCMCSettings:
    """Settings of the sampler (module docstring: the target, the proposal, the test).

    Args:
        lam: λ of ``ρ* ∝ π_ref · exp(λ r)`` (0: π_ref itself, no reward model needed).
        steps: Metropolis–Hastings steps per sample (each one objective evaluation, unless the proposal changes
            nothing); 0 returns the start rollout.
        step_size: α of the proposal; a position leaves its token with weight ``exp(gain/2 − 1/α)``.
        top_k: restrict each position's proposal, for the whole chain, to π_ref's ``top_k`` most likely tokens at
            that position of the start rollout, plus the start's own token; ``None``: the whole vocabulary.
        metropolis: the Metropolis–Hastings test (``False``: every proposal is taken, DULA; biased, for ablation).
        max_new_tokens: ``K``, the state's length and the longest response.
        init: how the start rollout is drawn (default: π_ref itself, temperature 1 without truncation).
        stop_strings: strings that end a response, as in :class:`~nabla.Sampler`.
        answer: ``"last"``: the chain's final response (a sample of ρ*); ``"best"``: the highest-reward response
            it visited (a search over the chain, not a sample of ρ*).
        batch_size: chains advanced together (one batched forward and backward per model and step).
    """

    lam: float = 1.0
    steps: int = 20
    step_size: float = 1.0
    top_k: int | None = None
    metropolis: bool = True
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    init: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=1.0, top_p=None))
    stop_strings: list[str] = field(default_factory=list)
    answer: Literal["last", "best"] = "last"
    batch_size: int = 64

    def __post_init__(self) -> None:
        require_finite(self)
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or not math.isfinite(self.lam):
            raise ConfigurationError(f"mcmc lam must be a finite number (got {self.lam!r}); set lam >= 0")
        if self.lam < 0:
            raise ConfigurationError(f"mcmc lam must be >= 0 (got {self.lam}); ρ* ∝ π_ref·exp(λ r) needs λ >= 0")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ConfigurationError(f"mcmc steps must be an integer >= 0 (got {self.steps!r})")
        if isinstance(self.step_size, bool) or not isinstance(self.step_size, (int, float)):
            raise ConfigurationError(f"mcmc step_size must be a number (got {self.step_size!r})")
        if not (math.isfinite(self.step_size) and self.step_size > 0):
            raise ConfigurationError(f"mcmc step_size must be a finite number > 0 (got {self.step_size})")
        if self.top_k is not None and not _positive_int(self.top_k):
            raise ConfigurationError(f"mcmc top_k must be an integer >= 1 or null (got {self.top_k!r})")
        if not _positive_int(self.max_new_tokens):
            raise ConfigurationError(f"mcmc max_new_tokens must be an integer >= 1 (got {self.max_new_tokens!r})")
        if self.answer not in ("last", "best"):
            raise ConfigurationError(f"mcmc answer must be 'last' or 'best' (got {self.answer!r})")
        if not _positive_int(self.batch_size):
            raise ConfigurationError(f"mcmc batch_size must be an integer >= 1 (got {self.batch_size!r})")


@dataclass
class MCMCState:
    """One state of the chain and what the sampler knows there: ``f̃``, its gradient and the proposal support."""

    tokens: Tensor
    length: int
    finish_reason: str
    log_target: float
    log_likelihood: float
    reward: float | None
    grad: Tensor
    support: Tensor | None = None

    @property
    def response(self) -> list[int]:
        return self.tokens[: self.length].tolist()


@dataclass
class MCMCResult:
    """One sample: the response, its reward, the cost accounting and the chain's trace."""

    prompt: str
    text: str
    token_ids: list[int]
    reward: float | None
    finish_reason: str
    stats: dict[str, float]
    start: list[int]
    evaluations: int
    rewards: list[float | None] = field(default_factory=list)
    seed: int = 0

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted over proposed moves (moves that change at least one token); ``None`` when none was proposed."""
        proposals = self.stats.get("proposals", 0.0)
        return self.stats.get("acceptances", 0.0) / proposals if proposals else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "acceptance_rate": self.acceptance_rate}


@dataclass
class _Chain:
    prompt: str
    seed: int
    generator: torch.Generator
    meter: _Tally
    lm: DTOObjective
    rm: DTOObjective | None
    support: Tensor | None = None
    state: MCMCState | None = None
    best: MCMCState | None = None
    start: list[int] = field(default_factory=list)
    rewards: list[float | None] = field(default_factory=list)
    evaluations: int = 0


class MCMCSampler:
    """Samples responses from ``ρ* ∝ π_ref · exp(λ r)`` with DMALA over a :class:`~nabla.Policy` and a
    differentiable :class:`~nabla.RewardModel` (module docstring).

    Args:
        policy: π_ref.
        reward: the reward (must be differentiable when ``settings.lam > 0``).
        settings: :class:`MCMCSettings`.
    """

    def __init__(self, policy: Policy, reward: RewardModel | None, settings: MCMCSettings | None = None) -> None:
        from nabla.policy import Policy

        self.settings = settings or MCMCSettings()
        if self.settings.lam and (reward is None or not reward.differentiable):
            raise RewardNotDifferentiableError(
                "the MCMC sampler with lam > 0 needs a differentiable reward model (a transformer reward); pass one "
                "or set lam=0 to sample π_ref"
            )
        self.policy, self.reward = policy, reward
        if reward is not None:
            reward.bind(policy)
        # the start rollout does not stop at end tokens: its tail is π_ref's continuation past the response
        self._unstopped = Policy(
            policy.model,
            policy.tokenizer,
            chat_template=policy.use_chat_template,
            system_prompt=policy.system_prompt,
            demonstrations=policy.demonstrations,
            eos_token_ids=[],
        )

    # ------------------------------------------------------------------ sampling
    def sample(self, prompt: str, seed: int = 0) -> MCMCResult:
        """One sample of ρ*(·|prompt); deterministic for a given ``seed`` on CPU."""
        return self.sample_batch([prompt], [seed])[0]

    def sample_batch(self, prompts: Sequence[str], seeds: int | Sequence[int] = 0) -> list[MCMCResult]:
        """One chain per prompt (``seeds[i]``, or ``seeds + i`` for an int), advanced ``batch_size`` at a time;
        each result is the one :meth:`sample` gives. ``wall_time_s`` is each batch's time over its size."""
        seeds = [seeds + i for i in range(len(prompts))] if isinstance(seeds, int) else list(seeds)
        if len(seeds) != len(prompts):
            raise ConfigurationError(f"{len(prompts)} prompts need {len(prompts)} seeds, got {len(seeds)}")
        size = self.settings.batch_size
        results: list[MCMCResult] = []
        for start in range(0, len(prompts), size):
            results += self._run(list(prompts[start : start + size]), seeds[start : start + size])
        return results

    def _run(self, prompts: list[str], seeds: list[int]) -> list[MCMCResult]:
        import torch

        from nabla.cost import CostMeter

        started = time.perf_counter()
        ids = [self.policy.encode(prompt) for prompt in prompts]
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        tallies = [_Tally() for _ in prompts]
        rollouts = self._unstopped.generate(
            ids,
            self.settings.init,
            generators,
            self.settings.max_new_tokens,
            record_logits=self.settings.top_k is not None,
            keep_cache=True,
            meter=tallies,
        )
        contexts = self._reward_contexts(prompts, tallies)
        chains, starts = [], []
        for b, rollout in enumerate(rollouts):
            tallies[b].update("rollouts")
            lm, rm = self._objectives(ids[b], rollout.cache, contexts[b], tallies[b])
            starts.append(torch.tensor(rollout.token_ids, device=self.policy.device))
            support = self.support(rollout.logits, starts[-1]) if rollout.logits is not None else None
            chains.append(_Chain(prompts[b], seeds[b], generators[b], tallies[b], lm, rm, support))
        for chain, state in zip(chains, self._evaluate(chains, starts)):
            chain.state = chain.best = state
            chain.start, chain.rewards, chain.evaluations = state.response, [state.reward], 1
        for _ in range(self.settings.steps):
            self._step(chains)
        share = (time.perf_counter() - started) / len(chains)
        meter, results = CostMeter(), []
        for chain in chains:
            chain.meter.update("wall_time_s", share)
            meter.reset()
            chain.meter.add_to(meter)
            final = chain.best if self.settings.answer == "best" else chain.state
            assert final is not None
            results.append(
                MCMCResult(
                    prompt=chain.prompt,
                    text=self.policy.decode(final.response),
                    token_ids=final.response,
                    reward=final.reward,
                    finish_reason=final.finish_reason,
                    stats=meter.snapshot(),
                    start=chain.start,
                    evaluations=chain.evaluations,
                    rewards=chain.rewards,
                    seed=chain.seed,
                )
            )
        return results

    def _step(self, chains: list[_Chain]) -> None:
        """One proposal and test for every chain: the moving chains' proposals are evaluated as one batch."""
        import torch

        proposed, forward, moving = [], [], []
        for i, chain in enumerate(chains):
            assert chain.state is not None
            logits = self.proposal_logits(chain.state)
            tokens = _draw(logits, chain.generator).to(chain.state.tokens.device)
            proposed.append(tokens)
            forward.append(_log_proposal(logits, tokens))
            if not torch.equal(tokens, chain.state.tokens):
                moving.append(i)
        states = self._evaluate([chains[i] for i in moving], [proposed[i] for i in moving]) if moving else []
        for i, state in zip(moving, states):
            chain = chains[i]
            current = chain.state
            assert current is not None
            chain.evaluations += 1
            chain.meter.update("proposals")
            accepted = True
            if self.settings.metropolis:
                log_ratio = state.log_target - current.log_target
                log_ratio += _log_proposal(self.proposal_logits(state), current.tokens) - forward[i]
                uniform = float(torch.rand(1, generator=chain.generator, dtype=torch.float64))
                accepted = not math.isnan(log_ratio) and math.log(uniform) < log_ratio
            if accepted:
                chain.state = state
                chain.meter.update("acceptances")
                if _better(state, chain.best):
                    chain.best = state
            else:
                chain.meter.update("rejections")
        for chain in chains:
            assert chain.state is not None
            chain.rewards.append(chain.state.reward)

    # ------------------------------------------------------------------ the pieces (public for inspection)
    def proposal_logits(self, state: MCMCState) -> Tensor:
        """Log-weights of ``q_i(·|s)`` per position (``(K, V)``, float64; ``-inf`` outside the support)."""
        return proposal_logits(state.grad, state.tokens, self.settings.step_size, state.support)

    def log_proposal(self, state: MCMCState, tokens: Tensor) -> float:
        """``log q(tokens | state)``: the sum of the positions' log-probabilities (``-inf`` outside the support)."""
        return _log_proposal(self.proposal_logits(state), tokens)

    def log_acceptance(self, current: MCMCState, proposal: MCMCState) -> float:
        """``log [exp(f̃(s') − f̃(s)) · q(s|s') / q(s'|s)]``: the test accepts with ``min(1, exp(·))`` (``-inf`` for a
        move that ``current`` cannot propose, or whose reverse ``proposal`` cannot)."""
        forward = self.log_proposal(current, proposal.tokens)
        if forward == -math.inf:
            return -math.inf
        return proposal.log_target - current.log_target + self.log_proposal(proposal, current.tokens) - forward

    def support(self, logits: Tensor, tokens: Tensor) -> Tensor | None:
        """The proposal support of a chain started at ``tokens`` whose positions had π_ref logits ``logits``
        (``(K, V)``): the ``top_k`` most likely tokens of each position and the start's own (``None``: all)."""
        import torch

        top_k = self.settings.top_k
        if top_k is None or top_k >= logits.shape[-1]:
            return None
        support = torch.zeros(logits.shape, dtype=torch.bool, device=tokens.device)
        support.scatter_(1, logits.topk(top_k, dim=-1).indices.to(tokens.device), True)
        support.scatter_(1, tokens[:, None], True)
        return support

    def states(self, prompt: str, tokens: Sequence[Sequence[int]], support: Tensor | None = None) -> list[MCMCState]:
        """The sampler's view of given ``K``-token states of ``prompt`` with the proposal ``support`` (``(K, V)``
        booleans, see :meth:`support`; ``None``: all tokens), one batched evaluation, not charged."""
        import torch

        tally = _Tally()
        prompt_ids = self.policy.encode(prompt)
        context = self._reward_contexts([prompt], [tally])[0]
        lm, rm = self._objectives(prompt_ids, self.policy.prefix_cache(prompt_ids), context, tally)
        chain = _Chain(prompt, 0, torch.Generator(), tally, lm, rm, support)
        rows = [torch.tensor(list(t), dtype=torch.long, device=self.policy.device) for t in tokens]
        return self._evaluate([chain] * len(rows), rows)

    def cut(self, tokens: Sequence[int]) -> tuple[int, str]:
        """Length and finish reason of the response of a ``K``-token state: where :meth:`Policy.generate` with a
        budget of ``K`` would have stopped."""
        eos, stops, tokens = self.policy.eos_token_ids, self.settings.stop_strings, list(tokens)
        for position, token in enumerate(tokens):
            reason = self.policy._finish_reason(tokens[: position + 1], token, eos, stops, len(tokens))
            if reason:
                return position + 1, reason
        return len(tokens), "length"

    # ------------------------------------------------------------------ objective evaluations
    def _reward_contexts(self, prompts: list[str], tallies: list[_Tally]) -> list[RewardContext | None]:
        """The reward model's prompt states, computed once per distinct prompt of a batch (they are only read) and
        charged to every chain, as each would pay alone."""
        if not self.settings.lam:
            return [None] * len(prompts)
        assert self.reward is not None
        made: dict[str, tuple[RewardContext, _Tally]] = {}
        for prompt, tally in zip(prompts, tallies):
            if prompt not in made:
                paid = _Tally()
                made[prompt] = (self.reward.context(prompt, [], use_cache=True, meter=paid), paid)  # type: ignore[arg-type]
            made[prompt][1].add_to(tally)
        return [made[prompt][0] for prompt in prompts]

    def _objectives(
        self, prompt_ids: Tensor, cache: Any, context: RewardContext | None, tally: _Tally
    ) -> tuple[DTOObjective, DTOObjective | None]:
        """The LM part (weight 1, over all ``K`` positions) and the reward part (weight λ, over the response)."""
        from nabla.optimizer import DTOObjective
        from nabla.policy import LMPrefix

        prefix, meter = LMPrefix(prompt_ids, cache), tally
        lm = DTOObjective(self.policy, None, prefix, None, reward_weight=0.0, likelihood_weight=1.0, meter=meter)  # type: ignore[arg-type]
        if context is None:
            return lm, None
        lam = self.settings.lam
        rm = DTOObjective(
            self.policy, self.reward, prefix, context, reward_weight=lam, likelihood_weight=0.0, meter=meter
        )  # type: ignore[arg-type]
        return lm, rm

    def _evaluate(self, chains: Sequence[_Chain], tokens: Sequence[Tensor]) -> list[MCMCState]:
        """``f̃`` and its gradient at each chain's state ``tokens[b]``."""
        import torch

        from nabla.optimizer import DTOObjective

        cuts = [self.cut(t.tolist()) for t in tokens]
        lm_values = DTOObjective.evaluate_batch([c.lm for c in chains], list(tokens))
        rm_values: list[Any] = [None] * len(chains)
        if self.settings.lam:
            responses = [t[:length] for t, (length, _) in zip(tokens, cuts)]
            rm_values = DTOObjective.evaluate_batch([c.rm for c in chains], responses)  # type: ignore[misc]
        states = []
        for chain, row, lm, rm, (length, reason) in zip(chains, tokens, lm_values, rm_values, cuts):
            grad = -lm.grad
            log_likelihood = float(lm.log_likelihood)
            log_target, reward = log_likelihood, None
            finite = lm.finite
            if rm is not None:
                grad[:length] -= rm.grad
                reward = float(rm.reward)
                log_target += self.settings.lam * reward
                finite = finite and rm.finite
            if not finite:  # a state the models cannot score: refused as a proposal, left at once as a start
                grad, log_target = torch.zeros_like(grad), -math.inf
            states.append(MCMCState(row, length, reason, log_target, log_likelihood, reward, grad, chain.support))
        return states


def proposal_logits(grad: Tensor, tokens: Tensor, step_size: float, support: Tensor | None = None) -> Tensor:
    """DMALA's per-position log-weights ``½·(g_i[v] − g_i[s_i]) − 𝟙[v ≠ s_i]/α`` (``(K, V)``, float64), ``-inf``
    outside ``support``; ``g = ∂f̃/∂onehot`` at the state ``tokens``."""
    import torch

    g = grad.double()
    index = tokens.to(g.device)[:, None]
    logits = 0.5 * (g - g.gather(1, index)) - 1.0 / step_size
    logits.scatter_(1, index, 0.0)
    if support is not None:
        logits = logits.masked_fill(~support.to(g.device), -torch.inf)
    return logits


def _log_proposal(logits: Tensor, tokens: Tensor) -> float:
    import torch

    log_q = torch.log_softmax(logits, dim=-1).gather(1, tokens.to(logits.device)[:, None])
    return float(log_q.sum())


def _draw(logits: Tensor, generator: torch.Generator) -> Tensor:
    """One token per position from ``softmax(logits)`` by inverse CDF in float64, one uniform per position from
    ``generator`` (a zero-probability token is never drawn: ``right=True`` skips the CDF's flat steps)."""
    import torch

    probs = torch.softmax(logits.double().cpu(), dim=-1)
    cdf = probs.cumsum(-1)
    uniforms = torch.rand(logits.shape[0], generator=generator, dtype=torch.float64)
    tokens = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    return tokens.clamp(max=logits.shape[-1] - 1)


class _Tally:
    """A chain's cost, added up in plain floats and put on a :class:`~nabla.CostMeter` once at the end: a
    torchmetrics update per model call costs more than a step of a tiny model. Same kinds, same sums."""

    def __init__(self) -> None:
        from nabla.cost import CALL_KINDS, EVENT_KINDS

        self.known = set(CALL_KINDS + EVENT_KINDS)
        self.counts: dict[str, float] = {}
        self.flops = 0.0

    def update(self, kind: str, count: float = 1.0, flops: float = 0.0) -> None:
        if kind not in self.known:
            raise KeyError(f"unknown cost kind {kind!r}")
        self.counts[kind] = self.counts.get(kind, 0.0) + count
        self.flops += flops

    def add_to(self, meter: CostMeter | _Tally) -> None:
        for kind, count in self.counts.items():
            meter.update(kind, count)
        if self.flops:
            meter.update("flops", self.flops)


def _better(state: MCMCState, best: MCMCState | None) -> bool:
    if best is None:
        return True
    return state.reward is not None and (best.reward is None or state.reward > best.reward)
