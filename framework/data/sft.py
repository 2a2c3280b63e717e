"""Supervised fine-tuning data: .jsonl examples -> a token store with a loss mask (scripts/prepare_data.py --sft).

Each line is one example, one of:
  {"prompt": "...", "completion": "..."}   the prompt's tokens, then the completion's; the completion is the target
  {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...]}
      rendered by the tokenizer's chat template (``chat_template`` of the ``tokenizer_config.json`` beside its
      tokenizer.json, with jinja2 as Hugging Face renders it); what each assistant message adds to the rendered
      text (its content and the template's end-of-turn) is the target, the rest (system, user, the
      assistant header the template puts before a reply) is not
Every example ends with the EOS token, a target (the model learns to stop). The store's loss mask is 1 on the
target tokens (framework/data/store.py); examples are its documents, packed as any (``data.packing: eos``).

Every line is read, checked and tokenized before anything is written: a bad line, or messages without a chat
template, is one line naming it (exit 2) and no store. The examples are held in memory while they are.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from framework.config import ConfigError
from framework.data.store import SHARD_TOKENS, StoreWriter, check_out

TOKENIZER_CONFIG = "tokenizer_config.json"


def read_examples(files: list[Path]) -> list[tuple[str, int, dict]]:
    """(file, line number, example) of every non-empty line; ConfigError for a line that is not an example."""
    examples = []
    for f in files:
        if f.suffix != ".jsonl":
            raise ConfigError(f"--sft: {f} is not a .jsonl file (one example per line)")
        with open(f, "rb") as lines:
            for n, line in enumerate(lines, 1):
                if line.strip():
                    examples.append((str(f), n, _example(line, f"{f} line {n}")))
    if not examples:
        raise ConfigError(f"--sft: no example in {', '.join(map(str, files))}")
    return examples


def _example(line: bytes, where: str) -> dict:
    try:
        obj = json.loads(line)
    except ValueError:
        raise ConfigError(f"{where}: not valid JSON") from None
    if not isinstance(obj, dict) or not ({"prompt", "completion"} <= obj.keys() or "messages" in obj):
        fields = ", ".join(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ConfigError(f"{where}: no prompt/completion or messages fields (fields: {fields}); --sft reads "
                          '{"prompt": ..., "completion": ...} or {"messages": [{"role": ..., "content": ...}, ...]}')
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise ConfigError(f"{where}: messages must be a list of {{role, content}} objects with string values")
        if not any(m["role"] == "assistant" for m in messages):
            raise ConfigError(f"{where}: no assistant message (nothing to train on)")
        return {"messages": messages}
    for key in ("prompt", "completion"):
        if not isinstance(obj[key], str):
            raise ConfigError(f"{where}: field {key!r} is {type(obj[key]).__name__}, expected a string")
    return {"prompt": obj["prompt"], "completion": obj["completion"]}


class ChatTemplate:
    """A tokenizer_config.json's chat template, rendered as transformers renders it (sandboxed jinja2)."""

    def __init__(self, tokenizer_dir: Path | None):
        config = None if tokenizer_dir is None else tokenizer_dir / TOKENIZER_CONFIG
        where = "the tokenizer (--train-bpe)" if config is None else str(config)
        if config is None or not config.is_file():
            raise ConfigError(f"--sft: messages need a chat template, and {where} "
                              f"{'has none' if config is None else 'does not exist'}; write prompt/completion lines")
        try:
            cfg = json.loads(config.read_text(encoding="utf-8"))
        except ValueError:
            raise ConfigError(f"--sft: {config} is not valid JSON") from None
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if not isinstance(template, str) or not template:
            raise ConfigError(f"--sft: messages need a chat template, and {config} has no chat_template; "
                              "write prompt/completion lines")
        try:
            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise ConfigError("--sft: rendering the chat template needs jinja2 (pip install jinja2)") from None

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        self.error, self.where = TemplateError, config
        try:
            self.template = env.from_string(template)
        except TemplateError as e:
            raise ConfigError(f"--sft: the chat template of {config} does not compile ({e})") from None
        self.tokens = {k: v.get("content") if isinstance(v, dict) else v for k, v in cfg.items()
                       if k.endswith("_token") and isinstance(v, str | dict)}  # bos_token, eos_token, ...

    def render(self, messages: list[dict], add_generation_prompt: bool, where: str) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.tokens)
        except self.error as e:
            raise ConfigError(f"{where}: the chat template of {self.where} cannot render it ({e})") from None

    def pieces(self, messages: list[dict], where: str) -> list[tuple[str, int]]:
        """The rendered conversation as (text, is_target) pieces: what each assistant message adds is a target."""
        out, done = [], ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self._extends(done, self.render(messages[:i], True, where), where)
            after = self._extends(before, self.render(messages[:i + 1], False, where), where)
            out += [(before[len(done):], 0), (after[len(before):], 1)]
            done = after
        return out + [(self._extends(done, self.render(messages, False, where), where)[len(done):], 0)]

    def _extends(self, prefix: str, text: str, where: str) -> str:
        if not text.startswith(prefix):
            raise ConfigError(f"{where}: the chat template of {self.where} does not render a conversation as a "
                              "growing text (an earlier turn renders differently later); its targets cannot be found")
        return text


def example_pieces(example: dict, template: ChatTemplate | None, where: str) -> list[tuple[str, int]]:
    if "messages" in example:
        return template.pieces(example["messages"], where)
    return [(example["prompt"], 0), (example["completion"], 1)]


def encode_example(tokenizer, pieces: list[tuple[str, int]], eos: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of the pieces (each encoded alone, so a target's tokens are its own), then EOS; and their loss mask."""
    pieces = [(text, target) for text, target in pieces if text]
    encodings = tokenizer.encode_batch([text for text, _ in pieces], add_special_tokens=False)
    ids = [e.ids for e in encodings]
    tokens = np.array([t for part in ids for t in part] + [eos], np.uint32)
    mask = np.array([target for (_, target), part in zip(pieces, ids) for _ in part] + [1], np.uint8)
    return tokens, mask


def prepare_sft(inputs: list[str], out: str | Path, *, tokenizer: str | None = None, train_bpe: int | None = None,
                eval_fraction: float = 0.0, eos: str | None = None, shard_tokens: int = SHARD_TOKENS) -> dict:
    """The examples of the .jsonl ``inputs`` as a token store with a loss mask at ``out``; returns its metadata."""
    from framework.data import tokenizer as tok
    from framework.data.prepare import SplitAssigner, expand_inputs

    if (tokenizer is None) == (train_bpe is None):
        raise ConfigError("give exactly one of --tokenizer and --train-bpe")
    if not 0 <= eval_fraction < 1:
        raise ConfigError(f"--eval-fraction {eval_fraction}: expected a fraction in [0, 1)")
    check_out(out)
    files = expand_inputs(inputs)
    examples = read_examples(files)
    chat = any("messages" in e for _, _, e in examples)
    template = ChatTemplate(None if tokenizer is None else tok.tokenizer_file(tokenizer).parent) if chat else None
    pieces = [example_pieces(e, template, f"{f} line {n}") for f, n, e in examples]
    if train_bpe is not None:
        model = tok.train_bpe((text for p in pieces for text, _ in p), train_bpe)
        tokenizer_json = model.to_str()
    else:
        model = tok.load_tokenizer(tokenizer)
        tokenizer_json = tok.tokenizer_file(tokenizer).read_text(encoding="utf-8")
    eos_id = tok.eos_id(model, eos)
    encoded = [encode_example(model, p, eos_id) for p in pieces]
    for (f, n, _), (tokens, _) in zip(examples, encoded):
        if (tokens[:-1] == eos_id).any():  # it separates the packed examples: inside one it would split it
            raise ConfigError(f"{f} line {n}: holds the end-of-document token {model.id_to_token(eos_id)!r}, which "
                              "separates examples; name another with --eos")
    writer = StoreWriter(out, tokenizer_json, model.get_vocab_size(), eos_id, shard_tokens, loss_mask=True)
    assign = SplitAssigner(eval_fraction)
    for tokens, mask in encoded:
        writer.write(assign(len(tokens)), tokens, documents=1, mask=mask)
    targets = int(sum(mask.sum() for _, mask in encoded))
    return writer.finish(eos_token=model.id_to_token(eos_id), eval_fraction=eval_fraction,
                         sft={"examples": len(encoded), "chat_template": chat, "target_tokens": targets},
                         inputs={"files": len(files), "bytes": sum(f.stat().st_size for f in files)})
