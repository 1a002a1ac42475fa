"""The policy as its own judge: a reward that needs no training.

The policy reads the problem and the response inside a verification question and the reward is the log-odds of
its next token being "Yes" rather than "No". It shares the policy's weights and vocabulary, so it is
differentiable through the same soft embeddings as the policy itself.
"""

from __future__ import annotations

from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from nabla.errors import ConfigurationError
from nabla.policy import Policy
from nabla.reward import _SENTINEL, TransformerReward

JUDGE_QUESTION = (
    "Here is a math problem and a proposed solution.\n\nProblem: {prompt}\n\nSolution: {response}\n\n"
    "Is the solution correct? Answer with Yes or No."
)


class SelfJudgeReward(TransformerReward):
    """``r = logit(yes) - logit(no)`` of a causal LM asked whether the response is correct."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        question: str = JUDGE_QUESTION,
        yes: str = "Yes",
        no: str = "No",
        chat_template: bool | None = None,
    ) -> None:
        if "{prompt}" not in question or "{response}" not in question:
            raise ConfigurationError("the judge question needs {prompt} and {response} placeholders")
        super().__init__(model, tokenizer)
        self.question = question
        self.yes_id, self.no_id = self._single_token(yes), self._single_token(no)
        has_template = getattr(tokenizer, "chat_template", None) is not None
        self.use_chat_template = has_template if chat_template is None else chat_template

    @classmethod
    def from_policy(cls, policy: Policy, **kwargs) -> SelfJudgeReward:
        return cls(policy.model, policy.tokenizer, **kwargs)

    def _single_token(self, word: str) -> int:
        ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ConfigurationError(f"the judge word {word!r} tokenises to nothing")
        return int(ids[0])

    def body(self):
        return getattr(self.model, self.model.base_model_prefix)

    def head(self, hidden: Tensor) -> Tensor:
        weight = self.model.get_output_embeddings().weight
        pair = weight[[self.yes_id, self.no_id]].to(hidden.dtype)
        logits = hidden @ pair.T
        return (logits[:, 0] - logits[:, 1]).float()

    def _template_pieces(self, prompt: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        content = self.question.replace("{response}", _SENTINEL).replace("{prompt}", self.user_text(prompt))
        if self.use_chat_template:
            messages = [{"role": "user", "content": content}]
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            special = False
        else:
            text, special = content + "\nAnswer:", True
        before, after = text.split(_SENTINEL)
        opening = self.encode_text(before, add_special_tokens=special)
        closing = self.encode_text(after)
        return tuple(opening), tuple(closing)
