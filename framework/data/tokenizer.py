"""Tokenizers for the token store: a Hugging Face ``tokenizers`` tokenizer.json, or a byte-level BPE
trained on the input itself (so a real-data run needs no download).

Documents are separated by an end-of-text token: the tokenizer's own (looked up by the usual
names, or named with ``--eos``); a trained BPE gets ``<|endoftext|>`` as GPT-2 has.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from framework.config import ConfigError

EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>")
BPE_EOS = "<|endoftext|>"
MIN_BPE_VOCAB = 257  # the 256 byte symbols of the byte-level alphabet, and the EOS token


def tokenizer_file(path: str | Path) -> Path:
    """``path`` itself, or the tokenizer.json inside the directory ``path``."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
        if not p.is_file():
            raise ConfigError(f"--tokenizer {path}: the directory holds no tokenizer.json")
    elif not p.is_file():
        raise ConfigError(f"--tokenizer {path}: no such file or directory")
    return p


def load_tokenizer(path: str | Path) -> Tokenizer:
    f = tokenizer_file(path)
    try:
        return Tokenizer.from_file(str(f))
    except Exception as e:  # tokenizers raises a bare Exception with serde's message
        raise ConfigError(f"--tokenizer {f}: not a Hugging Face tokenizers tokenizer.json ({str(e).splitlines()[0]})") from None


def eos_id(tokenizer: Tokenizer, name: str | None = None) -> int:
    """The id of the end-of-text token: ``name``, else the first of ``EOS_NAMES`` the vocabulary has."""
    for candidate in (name,) if name else EOS_NAMES:
        token_id = tokenizer.token_to_id(candidate)
        if token_id is not None:
            return token_id
    if name:
        raise ConfigError(f"--eos {name!r}: the tokenizer has no such token")
    raise ConfigError(f"the tokenizer has none of the end-of-text tokens {', '.join(EOS_NAMES)}; name one with --eos")


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE (GPT-2's scheme: bytes as 256 symbols, no unknown token) of ``vocab_size``
    entries at most, ``<|endoftext|>`` among them, trained on ``texts``."""
    if vocab_size < MIN_BPE_VOCAB:
        raise ConfigError(f"--train-bpe {vocab_size}: expected at least {MIN_BPE_VOCAB} (256 bytes and {BPE_EOS})")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BPE_EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer
