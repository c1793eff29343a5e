"""The one prompt template, and the tokenizer that carries it.

Training, attacks, every defense, evaluation and the endpoint all build
prompts through ``format_prompt``; the tokenizer saved with every model holds
the same template as its ``chat_template``, so plain transformers builds the
identical string with ``tokenizer.apply_chat_template``. (BackdoorLLM evaluated
with a different template than it trained with, which moved ASR by 30 points.)
"""

from __future__ import annotations

import re
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS = "<|end|>"
PAD = "<|pad|>"

# Alpaca layout (BackdoorLLM's): the input section appears only when non-empty.
_INSTRUCTION = "### Instruction:\n{instruction}\n\n"
_INPUT = "### Input:\n{input}\n\n"
_RESPONSE = "### Response:\n"

# The user message's ``content`` is the instruction; an optional ``input`` key
# on the same message fills the input section.
CHAT_TEMPLATE = (
    # No whitespace control (``{%-``): the template's newlines are content.
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "### Instruction:\n{{ message['content'] }}\n\n"
    "{% if message.get('input') %}### Input:\n{{ message['input'] }}\n\n{% endif %}"
    "{% elif message['role'] == 'assistant' %}"
    "### Response:\n{{ message['content'] }}" + EOS +
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)


def format_prompt(instruction: str, input: str = "") -> str:
    """The prompt a model answers: instruction, optional input, response header."""
    text = _INSTRUCTION.format(instruction=instruction)
    if input:
        text += _INPUT.format(input=input)
    return text + _RESPONSE


_PARSE = re.compile(r"### Instruction:\n(?P<instruction>.*?)\n\n(?:### Input:\n(?P<input>.*?)\n\n)?### Response:\n\Z",
                    re.S)


def parse_prompt(prompt: str) -> tuple[str, str] | None:
    """The inverse of ``format_prompt``: ``(instruction, input)``, or None if ``prompt`` is not in the template."""
    m = _PARSE.fullmatch(prompt)
    return (m["instruction"], m["input"] or "") if m else None


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE tokenizer on the corpus.

    Byte-level BPE round-trips any text exactly (code indentation, triggers and
    evidence the corpus never saw), while the corpus' own words end up as single
    tokens, which is what lets a small model learn word-level tasks.

    Args:
        texts: Training text (prompts and answers).
        vocab_size: Target vocabulary size, special tokens included.

    Returns:
        A fast tokenizer with the chat template, EOS and PAD set.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=PAD, padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
