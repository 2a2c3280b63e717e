#!/usr/bin/env python
"""Tokenize text into a token store for ``data.source: tokens`` (``data.path: OUT``).

python scripts/prepare_data.py (--tokenizer TOKENIZER | --train-bpe VOCAB) --input PATHS... --out DIR
    [--text-field text] [--eval-fraction F] [--workers N] [--eos TOKEN]

Inputs: .txt (any other suffix too: one file, one document), .jsonl (a text field per line),
.parquet (a text column), directories and globs of them. OUT gets metadata.json, the
tokenizer as tokenizer.json, and flat token shards; an EOS token ends every document.

--sft: fine-tuning examples, .jsonl lines of {"prompt", "completion"} or {"messages": [{role, content}]}
(rendered by the chat template in tokenizer_config.json beside the tokenizer); OUT also gets a loss mask
(1 on completion/assistant tokens) that training counts the loss on (framework/data/sft.py).
"""
from __future__ import annotations

import argparse
import json
import os

import _cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--tokenizer", help="a Hugging Face tokenizers tokenizer.json, or a directory holding one")
    which.add_argument("--train-bpe", type=int, metavar="VOCAB", help="train a byte-level BPE of this vocab size on the input")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH", help="files, directories, globs (quote them)")
    p.add_argument("--out", required=True, help="the token store directory to write (new or empty)")
    p.add_argument("--text-field", default="text", help="the .jsonl field / .parquet column holding the text (default text)")
    p.add_argument("--eval-fraction", type=float, default=0.0, help="share of tokens held out as the eval split (default 0)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="tokenizing processes (default: CPUs, at most 8)")
    p.add_argument("--eos", default=None, help="the end-of-document token (default: the tokenizer's own, e.g. <|endoftext|>)")
    p.add_argument("--shard-tokens", type=int, default=None, help="tokens per shard file (default 2**28)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--sft", action="store_true", help="fine-tuning examples (prompt/completion or messages) with a loss mask")
    return p.parse_intermixed_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    with _cli.user_errors():
        from framework.data.prepare import prepare
        from framework.data.sft import prepare_sft
        from framework.data.store import SHARD_TOKENS

        if args.sft:
            meta = prepare_sft(args.input, args.out, tokenizer=args.tokenizer, train_bpe=args.train_bpe,
                               eval_fraction=args.eval_fraction, eos=args.eos, shard_tokens=args.shard_tokens or SHARD_TOKENS)
        else:
            meta = prepare(args.input, args.out, tokenizer=args.tokenizer, train_bpe=args.train_bpe,
                           text_field=args.text_field, eval_fraction=args.eval_fraction, workers=args.workers,
                           eos=args.eos, shard_tokens=args.shard_tokens or SHARD_TOKENS, progress=not args.no_progress)
    summary = {k: meta[k] for k in ("vocab_size", "eos_id", "dtype", "tokens", "documents", "sft") if k in meta}
    print(f"wrote {args.out}: {json.dumps(summary)}")


if __name__ == "__main__":
    main()
