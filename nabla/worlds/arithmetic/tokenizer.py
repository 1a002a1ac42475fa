"""A character-level ``PreTrainedTokenizerFast`` over the task's alphabet (``\\boxed{`` is one token).

No chat template: a prompt is the question itself (``47+23-15=?``) and the response follows it directly. The reward
model (no template either) reads ``question + "\\n" + response``, so the newline is in the vocabulary.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, UNK, EOS = "<pad>", "<unk>", "</s>"
BOXED = "\\boxed{"
ALPHABET = list("0123456789+-=?;}") + ["\n", " "]
VOCABULARY = [PAD, UNK, EOS, BOXED, *ALPHABET]


def arithmetic_tokenizer() -> PreTrainedTokenizerFast:
    """The world's tokenizer: one token per character of :data:`ALPHABET`, plus ``\\boxed{``, EOS, PAD, UNK."""
    vocab = {token: index for index, token in enumerate(VOCABULARY)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\\boxed\{|[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        model_max_length=256,
    )
