"""Supervised fine-tuning data: prepare_data.py --sft (prompt/completion and chat messages through a chat template)
writes the loss mask beside the tokens; bad input is one line, exit 2, nothing written; and the whole path at tiny
size: a Hugging Face model imported, fine-tuned on the masked targets only, generate.py on the result."""
import json

import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

from framework.config import DataConfig
from framework.data import TokenSource, TokenStore
from framework.data.sft import prepare_sft
from tests import hf_fixtures as fx
from tests.helpers import run_script

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB = SPECIAL + ["system", "user", "assistant"] + [f"w{i}" for i in range(58)]  # 64, as the HF fixtures' vocab
ID = {t: i for i, t in enumerate(VOCAB)}
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHAT = {"messages": [{"role": "system", "content": "w1 w2"}, {"role": "user", "content": "w3"},
                     {"role": "assistant", "content": "w4 w5"}, {"role": "user", "content": "w6"},
                     {"role": "assistant", "content": "w7"}]}


def tokenizer_dir(path, template: str | None = TEMPLATE):
    """A word-level tokenizer.json with chat special tokens and, unless None, a tokenizer_config.json chat template."""
    tok = Tokenizer(models.WordLevel(ID, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "bos_token": None}
    if template is not None:
        config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_chat_and_prompt_completion_examples_get_their_loss_masks(tmp_path):
    tok = tokenizer_dir(tmp_path / "tok")
    inputs = jsonl(tmp_path / "a.jsonl", [CHAT, {"prompt": "w1 w2", "completion": "w3"}])
    meta = prepare_sft([str(inputs)], tmp_path / "store", tokenizer=str(tok))
    assert meta["loss_mask"] and meta["sft"] == {"examples": 2, "chat_template": True, "target_tokens": 8}
    store = TokenStore(tmp_path / "store", "train")
    turn = lambda role, *words: ["<|im_start|>", role, *words, "<|im_end|>"]
    words = [*turn("system", "w1", "w2"), *turn("user", "w3"), *turn("assistant", "w4", "w5"), *turn("user", "w6"),
             *turn("assistant", "w7"), "<|endoftext|>", "w1", "w2", "w3", "<|endoftext|>"]
    np.testing.assert_array_equal(store.read(0, store.tokens), [ID[w] for w in words])
    # the targets: what each assistant message adds (its words and end of turn), the completion, each EOS
    want = np.zeros(len(words), np.uint8)
    want[[11, 12, 13, 20, 21, 22, 25, 26]] = 1
    np.testing.assert_array_equal(store.read(0, store.tokens, mask=True), want)
    # a training row carries the mask beside its tokens, segment ids and positions
    src = TokenSource(DataConfig(source="tokens", path=str(tmp_path / "store")), 26, 64)
    row = src.field_rows(0, np.arange(1), 1)
    np.testing.assert_array_equal(row["loss_mask"][0], want[:27])
    np.testing.assert_array_equal(row["segment_ids"][0], [1] * 23 + [2] * 4)


@pytest.mark.parametrize("case", ["no tokenizer_config.json", "no chat_template", "no fields", "eos inside"])
def test_bad_sft_input_is_one_line_exit_2_and_nothing_written(tmp_path, case):
    tok = tokenizer_dir(tmp_path / "tok", None if case == "no chat_template" else TEMPLATE)
    if case == "no tokenizer_config.json":
        (tok / "tokenizer_config.json").unlink()
    rows = {"no fields": [{"prompt": "w1", "completion": "w2"}, {"text": "w1 w2"}],
            "eos inside": [{"prompt": "w1 <|endoftext|>", "completion": "w2"}]}.get(case, [CHAT])
    inputs = jsonl(tmp_path / "in.jsonl", rows)
    r = run_script("prepare_data.py", "--sft", "--tokenizer", str(tok), "--input", str(inputs), "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and r.stdout == "", r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and line.startswith("error: ")
    assert {"no tokenizer_config.json": f"{tok}/tokenizer_config.json does not exist",
            "no chat_template": "tokenizer_config.json has no chat_template",
            "no fields": f"{inputs} line 2: no prompt/completion or messages fields (fields: text)",
            "eos inside": f"{inputs} line 1: holds the end-of-document token '<|endoftext|>'"}[case] in line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # three scripts, each compiling on 8 emulated devices: 1-3 min on 2 cores
def test_import_fine_tune_and_generate_at_tiny_size(tmp_path):
    """hf.py import of a tiny Llama (its tokenizer with a chat template) -> prepare_data.py --sft -> train.py: the loss
    counts the assistant tokens only (trained_tokens by hand) -> generate.py on the fine-tuned run."""
    hf_dir = fx.write(tmp_path / "hf", fx.LLAMA_CONFIG, fx.llama_tensors(fx.LLAMA_CONFIG))
    tokenizer_dir(hf_dir)
    rng = np.random.default_rng(0)
    chats = []
    for _ in range(120):
        a, b = rng.integers(0, 58, 2)
        chats.append({"messages": [{"role": "user", "content": f"w{a} w{b}"}, {"role": "assistant", "content": f"w{b} w{a}"}]})
    store = tmp_path / "store"
    r = run_script("prepare_data.py", "--sft", "--tokenizer", str(hf_dir), "--input", str(jsonl(tmp_path / "c.jsonl", chats)),
                   "--out", str(store), "--eval-fraction", "0.1")
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    overrides = ["data.source=tokens", f"data.path={store}", "train.steps=2", "train.global_batch=8", "train.eval_every=2",
                 "train.eval_batches=1", "logging.progress=false", "logging.tensorboard=false"]
    r = run_script("hf.py", "import", "--hf-dir", str(hf_dir), "--run-dir", str(run), *overrides)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_script("train.py", "--config", str(run / "config.yaml"), "--run-dir", str(run))
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [rec for rec in records if "loss" in rec]
    rows = TokenSource(DataConfig(source="tokens", path=str(store)), 32, 64).field_rows(0, np.arange(8), 8)
    tokens, mask = rows["tokens"], rows["loss_mask"]
    by_hand = int(((mask[:, 1:] == 1) & (tokens[:, :-1] != ID["<|endoftext|>"])).sum())
    assert steps[0]["trained_tokens"] == by_hand < 8 * 32  # only assistant turns (and EOS) are targets
    assert any(np.isfinite(rec.get("eval_loss", np.nan)) for rec in records)
    r = run_script("generate.py", "--run-dir", str(run), "--prompt", "<|im_start|>user\nw3 w4<|im_end|>\n<|im_start|>assistant\n",
                   "--max-new-tokens", "4", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["prompt_ids"][:2] == [ID["<|im_start|>"], ID["user"]] and 1 <= len(out["ids"]) <= 4
