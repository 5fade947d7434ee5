"""Tiny tokenizers built locally, so tests and `zoo tiny` never need a hub.

Each keeps the real tokenizer's class, special tokens and behaviour that the pipelines rely
on (CLIP's `</w>` BPE, T5's sentencepiece unigram with `</s>`, the Qwen and Mistral chat
templates); only the vocabulary is small.
"""

from __future__ import annotations

import string
from typing import Any

# Printable ASCII is enough for prompts in tests; anything else falls back to unk or bytes.
_CHARS = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
_WORDS = [
    "a",
    "photo",
    "of",
    "the",
    "and",
    "with",
    "in",
    "on",
    "wearing",
    "person",
    "man",
    "woman",
    "cat",
    "dog",
    "shirt",
    "dress",
    "red",
    "blue",
    "green",
    "black",
    "white",
    "striped",
    "cloth",
    "garment",
    "pose",
    "keep",
    "image",
    "two",
    "reference",
    "sks",
    "style",
    "portrait",
]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (used by CLIP and Qwen BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


# The words of the synthetic try-on captions: word-level tokenizers make each one a single token.
SYNTHETIC_WORDS = [
    "a",
    "person",
    "wearing",
    "plain",
    "striped",
    "checked",
    "polka",
    "dot",
    "logo",
    "t",
    "shirt",
    "dress",
    "red",
    "blue",
    "green",
    "yellow",
    "purple",
    "orange",
    "pink",
    "teal",
    "white",
    "black",
    "product",
    "shot",
    "of",
    "flat",
    "garment",
    "pose",
    "keep",
    "image",
    "in",
    "the",
    "and",
    "on",
    "with",
]


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE: merge the lowest-ranked adjacent pair until none applies."""
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:], strict=False))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2 :]
    return symbols


def word_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges that make each word one token. Merges are added word by word, and a word's earlier
    merges always outrank later ones, so adding a word never splits one added before it."""
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        symbols = _apply_merges(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            symbols = _apply_merges(symbols, ranks)
    return merges


def clip_tokenizer(model_max_length: int = 77, words: list[str] | None = None) -> Any:
    """CLIP BPE over single characters: every byte and its end-of-word form, plus merges that make
    each of `words` a single token (a word-level vocabulary for toy models)."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for ch in _bytes_to_unicode().values():
        vocab[ch] = len(vocab)
    for ch in _bytes_to_unicode().values():
        vocab[ch + "</w>"] = len(vocab)
    merges = word_merges(words or [])
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=list(merges))
    tok.model_max_length = model_max_length
    return tok


def t5_tokenizer(model_max_length: int = 512, words: list[str] | None = None) -> Any:
    """T5 sentencepiece-unigram vocabulary of characters and whole words (a few, or `words`)."""
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -1.0) for w in dict.fromkeys(_WORDS + (words or []))]
    pieces += [(w, -1.5) for w in words or [] if len(w) > 1]  # inside hyphenated words: polka-dot, t-shirt
    pieces += [(c, -3.0) for c in _CHARS] + [("▁" + c, -2.5) for c in string.ascii_lowercase]
    tok = T5Tokenizer(vocab=pieces, extra_ids=100)
    tok.model_max_length = model_max_length
    return tok


QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and not enable_thinking %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}"
)

MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | map(attribute='text') | join('') %}{% endif %}"
    "{% if message['role'] == 'system' %}{{ '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST]' + text + '[/INST]' }}"
    "{% else %}{{ text + eos_token }}{% endif %}"
    "{% endfor %}"
)


def _byte_bpe_vocab(specials: list[str]) -> dict[str, int]:
    vocab = {ch: i for i, ch in enumerate(_bytes_to_unicode().values())}
    for s in specials:
        vocab[s] = len(vocab)
    return vocab


def qwen_tokenizer(model_max_length: int = 512) -> Any:
    """Qwen2 byte-level BPE (no merges) with Qwen's chat markers and template."""
    from transformers import Qwen2Tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    tok = Qwen2Tokenizer(vocab=_byte_bpe_vocab(specials), merges=[])
    tok.add_special_tokens({"additional_special_tokens": specials[1:]})
    tok.chat_template = QWEN_CHAT_TEMPLATE
    tok.model_max_length = model_max_length
    return tok


def mistral_tokenizer(model_max_length: int = 512) -> Any:
    """Byte-level BPE with Mistral's control tokens; stands in for the Pixtral processor's tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
    vocab = {s: i for i, s in enumerate(specials)}
    for ch in _bytes_to_unicode().values():
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=specials[4:],
    )
    tok.chat_template = MISTRAL_CHAT_TEMPLATE
    tok.model_max_length = model_max_length
    return tok


BUILDERS = {"clip": clip_tokenizer, "t5": t5_tokenizer, "qwen": qwen_tokenizer, "mistral": mistral_tokenizer}


def tiny_tokenizer(kind: str, model_max_length: int, words: list[str] | None = None) -> Any:
    """A tiny tokenizer; with `words` (CLIP and T5), each of those words is one token."""
    if words and kind in ("clip", "t5"):
        return BUILDERS[kind](model_max_length, words=words)
    return BUILDERS[kind](model_max_length)
