"""Documents -> token ids -> a token store (scripts/prepare_data.py).

Inputs: ``.txt`` files (any file not ``.jsonl``/``.parquet`` named or matched by a glob is read
as UTF-8 text; one file is one document), ``.jsonl`` (one JSON object per line, the document in
a text field), ``.parquet`` (a text column), and directories (their ``.txt``, ``.jsonl`` and
``.parquet`` files, recursively) and globs of them. Work is cut into tasks (a text file, a
byte range of a .jsonl, a row group of a .parquet) that worker processes read and tokenize;
the results come back in input order, so the store is the same for any number of workers.

Every document ends with the EOS id. A document goes to the eval split when the eval split
holds less than ``eval_fraction`` of the tokens written so far: deterministic, spread over
the whole input, and about ``eval_fraction`` of the tokens.
"""
from __future__ import annotations

import glob
import json
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from framework.config import ConfigError
from framework.data.store import SHARD_TOKENS, StoreWriter, check_out

DIR_SUFFIXES = (".txt", ".jsonl", ".parquet")
TASK_BYTES = 16 << 20  # a .jsonl is tokenized in byte ranges of about this size
ENCODE_CHARS = 1 << 20  # documents are encoded in batches of about this many characters


# ---------------------------------------------------------------- inputs and tasks


def expand_inputs(inputs: Iterable[str]) -> list[Path]:
    """The files of ``inputs`` (files, directories, globs), each once, in the given then sorted order."""
    files: list[Path] = []
    for given in inputs:
        if glob.has_magic(given):
            matches = sorted(Path(m) for m in glob.glob(given, recursive=True))
            found = [f for m in matches for f in ([m] if m.is_file() else _dir_files(m))]
            if not found:
                raise ConfigError(f"--input {given!r}: no file matches")
        elif Path(given).is_dir():
            found = _dir_files(Path(given))
            if not found:
                raise ConfigError(f"--input {given}: the directory holds no {', '.join(DIR_SUFFIXES)} file")
        elif Path(given).is_file():
            found = [Path(given)]
        else:
            raise ConfigError(f"--input {given}: no such file or directory")
        files.extend(found)
    return list(dict.fromkeys(files))


def _dir_files(d: Path) -> list[Path]:
    return sorted(f for f in d.rglob("*") if f.suffix in DIR_SUFFIXES and f.is_file())


def kind_of(path: Path) -> str:
    return {".jsonl": "jsonl", ".parquet": "parquet"}.get(path.suffix, "text")


@dataclass(frozen=True)
class Task:
    """Part of one input file: bytes [start, stop) of a text/.jsonl file, row groups [start, stop) of a .parquet."""

    path: str
    kind: str
    start: int
    stop: int
    size: int  # input bytes it stands for (the progress bar's unit)


def plan_tasks(files: list[Path], text_field: str, task_bytes: int = TASK_BYTES) -> list[Task]:
    """Tasks covering ``files`` in order; checks each file opens and has the text field before any work starts."""
    tasks = []
    for f in files:
        kind = kind_of(f)
        try:
            size = f.stat().st_size
            if kind == "parquet":
                import pyarrow.parquet as pq

                meta = pq.ParquetFile(f).metadata
                names = meta.schema.names
                if text_field not in names:
                    raise ConfigError(f"{f}: no column {text_field!r} (columns: {', '.join(names)}); choose one with --text-field")
                groups, rows = meta.num_row_groups, max(meta.num_rows, 1)
                tasks.extend(Task(str(f), kind, g, g + 1, size * meta.row_group(g).num_rows // rows) for g in range(groups))
                continue
            if kind == "jsonl":
                _check_first_line(f, text_field)
            cuts = list(range(0, size, task_bytes)) + [size] if kind == "jsonl" and size else [0, size]
            tasks.extend(Task(str(f), kind, a, b, b - a) for a, b in zip(cuts, cuts[1:]))
        except ConfigError:
            raise
        except Exception as e:  # OSError, pyarrow's ArrowInvalid, ...: the file cannot be read as its kind
            raise ConfigError(f"{f}: cannot read it as {kind} ({_reason(e)})") from None
    return tasks


def _reason(e: Exception) -> str:
    return (getattr(e, "strerror", None) or str(e) or type(e).__name__).splitlines()[0]


def _check_first_line(path: Path, text_field: str) -> None:
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    _text_of(line, text_field)
                except ValueError as e:
                    raise ConfigError(f"{path} line {n}: {e}") from None
                return


def _text_of(line: bytes, text_field: str) -> str:
    """The document in one .jsonl line; ValueError says what is wrong with it."""
    try:
        obj = json.loads(line)
    except ValueError:
        raise ValueError("not valid JSON") from None
    if not isinstance(obj, dict) or text_field not in obj:
        fields = ", ".join(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"no field {text_field!r} (fields: {fields}); choose one with --text-field")
    text = obj[text_field]
    if not isinstance(text, str):
        raise ValueError(f"field {text_field!r} is {type(text).__name__}, expected a string")
    return text


def documents(task: Task, text_field: str) -> Iterator[str]:
    """The documents of ``task``, in file order."""
    path = task.path
    try:
        if task.kind == "text":
            data = Path(path).read_bytes()
            try:
                yield data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
        elif task.kind == "jsonl":
            yield from _jsonl_documents(task, text_field)
        else:
            import pyarrow.parquet as pq

            batches = pq.ParquetFile(path).iter_batches(row_groups=range(task.start, task.stop), columns=[text_field])
            for batch in batches:
                for text in batch.column(0).to_pylist():
                    if text is not None and not isinstance(text, str):
                        raise ConfigError(f"{path}: column {text_field!r} holds {type(text).__name__}, expected strings")
                    if text:
                        yield text
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"{path}: cannot read it as {task.kind} ({_reason(e)})") from None


def _jsonl_documents(task: Task, text_field: str) -> Iterator[str]:
    """Lines that start in bytes [start, stop): ranges split a file between tasks without cutting a line."""
    with open(task.path, "rb") as f:
        pos = task.start
        if pos:
            f.seek(pos - 1)
            pos += len(f.readline()) - 1  # the rest of the line that began before this range
        while pos < task.stop:
            line = f.readline()
            if not line:
                break
            if line.strip():
                try:
                    text = _text_of(line, text_field)
                except ValueError as e:  # only now count the lines before this one
                    f.seek(0)
                    line_no = f.read(pos).count(b"\n") + 1
                    raise ConfigError(f"{task.path} line {line_no}: {e}") from None
                yield text
            pos += len(line)


# ---------------------------------------------------------------- tokenizing


def split_pieces(text: str, max_chars: int = ENCODE_CHARS) -> list[str]:
    """A long document cut into pieces at line starts that are not whitespace: byte-level (GPT-2-style)
    pre-tokenization never joins across such a point, so the pieces' tokens are the document's."""
    pieces, start = [], 0
    while len(text) - start > max_chars:
        cut = start + max_chars
        while cut < len(text) and not (text[cut - 1] == "\n" and not text[cut].isspace()):
            cut += 1
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def encode_documents(tokenizer, docs: Iterable[str], eos: int) -> tuple[np.ndarray, list[int]]:
    """Token ids of ``docs``, each followed by ``eos`` (empty documents are dropped), and each one's length."""
    parts: list[list[int]] = []
    lengths: list[int] = []
    batch: list[list[str]] = []
    chars = 0

    def flush() -> None:
        encodings = tokenizer.encode_batch_fast([p for pieces in batch for p in pieces], add_special_tokens=False)
        i = 0
        for pieces in batch:
            ids = [t for e in encodings[i:i + len(pieces)] for t in e.ids]
            i += len(pieces)
            if ids:
                ids.append(eos)
                parts.append(ids)
                lengths.append(len(ids))
        batch.clear()

    for doc in docs:
        batch.append(split_pieces(doc))
        chars += len(doc)
        if chars >= ENCODE_CHARS:
            flush()
            chars = 0
    if batch:
        flush()
    tokens = np.fromiter((t for ids in parts for t in ids), dtype=np.uint32, count=sum(lengths))
    return tokens, lengths


_worker: dict = {}  # a worker process's tokenizer, EOS id and text field (set once by _init_worker)


def _init_worker(tokenizer_json: str, eos: int, text_field: str) -> None:
    from tokenizers import Tokenizer

    _worker.update(tokenizer=Tokenizer.from_str(tokenizer_json), eos=eos, text_field=text_field)


def _tokenize(task: Task) -> tuple[np.ndarray, list[int]]:
    return encode_documents(_worker["tokenizer"], documents(task, _worker["text_field"]), _worker["eos"])


# ---------------------------------------------------------------- writing


class SplitAssigner:
    """Document -> "train" or "eval": eval while it holds less than ``eval_fraction`` of the tokens so far."""

    def __init__(self, eval_fraction: float):
        self.fraction, self.tokens = eval_fraction, {"train": 0, "eval": 0}

    def __call__(self, n_tokens: int) -> str:
        split = "eval" if self.tokens["eval"] < self.fraction * (self.tokens["train"] + self.tokens["eval"]) else "train"
        self.tokens[split] += n_tokens
        return split


# ---------------------------------------------------------------- the whole step


def prepare(inputs: list[str], out: str | Path, *, tokenizer: str | None = None, train_bpe: int | None = None,
            text_field: str = "text", eval_fraction: float = 0.0, workers: int = 1, eos: str | None = None,
            shard_tokens: int = SHARD_TOKENS, task_bytes: int = TASK_BYTES, progress: bool = True) -> dict:
    """Tokenize ``inputs`` into a token store at ``out``; returns its metadata."""
    from framework.data import tokenizer as tok

    if (tokenizer is None) == (train_bpe is None):
        raise ConfigError("give exactly one of --tokenizer and --train-bpe")
    if not 0 <= eval_fraction < 1:
        raise ConfigError(f"--eval-fraction {eval_fraction}: expected a fraction in [0, 1)")
    if workers < 1:
        raise ConfigError(f"--workers {workers}: expected at least 1")
    check_out(out)  # before the input is read
    files = expand_inputs(inputs)
    tasks = plan_tasks(files, text_field, task_bytes)
    total = sum(t.size for t in tasks)
    if train_bpe is not None:
        if train_bpe < tok.MIN_BPE_VOCAB:  # before reading the input
            raise ConfigError(f"--train-bpe {train_bpe}: expected at least {tok.MIN_BPE_VOCAB} (256 bytes and {tok.BPE_EOS})")
        with tqdm(total=total, unit="B", unit_scale=True, desc="train BPE", disable=not progress) as bar:
            model = tok.train_bpe(_docs_with_progress(tasks, text_field, bar), train_bpe)
        tokenizer_json = model.to_str()
    else:
        model = tok.load_tokenizer(tokenizer)
        tokenizer_json = tok.tokenizer_file(tokenizer).read_text(encoding="utf-8")
    eos_id = tok.eos_id(model, eos)
    writer = StoreWriter(out, tokenizer_json, model.get_vocab_size(), eos_id, shard_tokens)
    assign = SplitAssigner(eval_fraction)
    with tqdm(total=total, unit="B", unit_scale=True, desc="tokenize", disable=not progress) as bar:
        for task, (tokens, lengths) in zip(tasks, _run_tasks(tasks, tokenizer_json, eos_id, text_field, workers)):
            start = 0
            for n in lengths:
                writer.write(assign(n), tokens[start:start + n], documents=1)
                start += n
            bar.update(task.size)
    return writer.finish(eos_token=model.id_to_token(eos_id), eval_fraction=eval_fraction, text_field=text_field,
                         inputs={"files": len(files), "bytes": total})


def _docs_with_progress(tasks: list[Task], text_field: str, bar) -> Iterator[str]:
    for task in tasks:
        yield from documents(task, text_field)
        bar.update(task.size)


def _run_tasks(tasks, tokenizer_json: str, eos: int, text_field: str, workers: int):
    """Each task's (tokens, document lengths), in task order: in this process, or in ``workers`` processes."""
    if workers == 1 or len(tasks) < 2:
        _init_worker(tokenizer_json, eos, text_field)
        yield from map(_tokenize, tasks)
        return
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
    # spawn, not fork: the caller may have started threads (JAX's, tokenizers' own) that fork would copy mid-work
    with multiprocessing.get_context("spawn").Pool(workers, _init_worker, (tokenizer_json, eos, text_field)) as pool:
        yield from pool.imap(_tokenize, tasks)
