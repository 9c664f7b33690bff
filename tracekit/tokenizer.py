"""A byte-level tokenizer built in memory, so the tiny presets need no download.

Every UTF-8 byte is one token (ids 0-255, GPT-2's byte-to-unicode alphabet), plus five special tokens and a
small chat template. It is a real ``PreTrainedTokenizerFast``: padding, attention masks and
``apply_chat_template`` behave as with any hub tokenizer.
"""
from __future__ import annotations

from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}{{ eos_token }}\n"
    "{% else %}{{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@lru_cache(maxsize=1)
def _backend() -> Tokenizer:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet, key=lambda c: _byte_of(c)))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return tok


@lru_cache(maxsize=1)
def _byte_table() -> dict[str, int]:
    # GPT-2's bytes_to_unicode, inverted: printable bytes map to themselves, the rest to 256+n
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _byte_of(ch: str) -> int:
    return _byte_table()[ch]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh tokenizer instance (vocab 261: 256 bytes + 5 specials), left padding for generation."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_backend(),
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        padding_side="left",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


VOCAB_SIZE = 256 + len(SPECIALS)
