"""Tokenized data: the token store (written, read across shards), its grain windows (an epoch visits
every window once; a global batch depends only on (seed, position)), prepare_data (inputs, EOS,
splits, workers, one-line errors) and model.vocab_size against the store."""
import glob
import json
import sys
import sysconfig

import grain
import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tokenizers import Tokenizer, models, pre_tokenizers

from framework.config import ConfigError, DataConfig, load_config
from framework.data import BatchLoader, Prefetcher, TokenSource, TokenStore
from framework.data.prepare import prepare
from framework.data.store import StoreWriter
from framework.data.tokenizer import train_bpe
from tests.helpers import ROOT, TINY, run_script
from tests.test_distributed import run

SEQ = 32
DEMO = str(ROOT / "configs" / "gpt2_bpe_demo.yaml")


def word_tokenizer(vocab: int) -> Tokenizer:
    """Words w0..w{vocab-2} and <|endoftext|>: any ids a test needs, with a real tokenizer.json."""
    words = {f"w{i}": i for i in range(vocab - 1)}
    tok = Tokenizer(models.WordLevel({**words, "<|endoftext|>": vocab - 1}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def make_store(path, train: np.ndarray, eval_: np.ndarray, vocab: int, shard_tokens: int) -> None:
    writer = StoreWriter(path, word_tokenizer(vocab).to_str(), vocab, vocab - 1, shard_tokens)
    writer.write("train", train)
    writer.write("eval", eval_)
    writer.finish()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Train tokens 0..9999 in shards of 777 tokens (window i starts with token i*SEQ), eval 20000..20999."""
    path = tmp_path_factory.mktemp("store")
    make_store(path, np.arange(10_000), 20_000 + np.arange(1000), vocab=21_001, shard_tokens=777)
    return path


def source(path, split="train", seed=3, vocab=1 << 16):
    return TokenSource(DataConfig(source="tokens", path=str(path), seed=seed), SEQ, vocab, split)


def test_store_reads_across_shard_ends(store):
    s = TokenStore(store, "train")
    assert s.tokens == 10_000 and len(s.fds) == 13 and s.dtype == np.uint16
    np.testing.assert_array_equal(s.read(770, 20), np.arange(770, 790))  # spans shards 0 and 1
    np.testing.assert_array_equal(s.read(0, 10_000), np.arange(10_000))
    with pytest.raises(IndexError):
        s.read(9990, 11)
    meta = json.loads((store / "metadata.json").read_text())
    assert meta["tokens"] == {"train": 10_000, "eval": 1000} and meta["vocab_size"] == 21_001
    assert meta["eos_id"] == 21_000 and meta["dtype"] == "uint16"


def test_an_epoch_visits_every_window_once_in_a_seeded_order(store):
    src = source(store)
    windows = (10_000 - 1) // SEQ  # 312: 26 batches of 12 rows are exactly one epoch
    epoch = [src.rows(p, np.arange(12), 12) for p in range(26)]
    rows = np.concatenate(epoch)
    np.testing.assert_array_equal(rows[:, 1:] - rows[:, :-1], 1)  # each row is a contiguous window ...
    assert rows.dtype == np.int32 and rows.shape == (windows, SEQ + 1)
    assert sorted(rows[:, 0] // SEQ) == list(range(windows)) and (rows[:, 0] % SEQ == 0).all()  # ... each once
    assert not np.array_equal(rows[:, 0], np.sort(rows[:, 0]))  # shuffled
    second = np.concatenate([src.rows(p, np.arange(12), 12) for p in range(26, 52)])
    assert sorted(second[:, 0]) == sorted(rows[:, 0]) and not np.array_equal(second, rows)  # epoch 2: a new order
    other_seed = np.concatenate([source(store, seed=4).rows(p, np.arange(12), 12) for p in range(26)])
    assert not np.array_equal(other_seed, rows)
    # any subset of rows, in any order, is those rows of the batch: what a process builds
    np.testing.assert_array_equal(src.rows(5, np.array([11, 0, 7]), 12), epoch[5][[11, 0, 7]])
    # the windows are a grain random-access source: the same pipeline through grain's own source gives the same rows
    through_grain = grain.MapDataset.source(src.windows).shuffle(seed=3).repeat()
    np.testing.assert_array_equal(np.stack([through_grain[5 * 12 + r] for r in range(12)]), epoch[5])
    held_out = np.concatenate([source(store, "eval").rows(p, np.arange(12), 12) for p in range(4)])
    assert held_out.min() >= 20_000 and held_out.max() < 21_000


def loader_on(src, n_devices, shape, grad_accum=1, global_batch=16):
    mesh = Mesh(np.array(jax.devices()[:n_devices]).reshape(shape), ("data", "fsdp", "tensor"))
    return BatchLoader(src, global_batch, grad_accum, NamedSharding(mesh, P(None, ("data", "fsdp"))))


def test_global_batches_do_not_depend_on_devices_accumulation_or_resume(store):
    src = source(store)
    want = [src.rows(p, np.arange(16), 16) for p in range(6)]
    for n, shape, accum in ((8, (8, 1, 1), 1), (4, (2, 2, 1), 1), (8, (2, 2, 2), 2), (4, (4, 1, 1), 4)):
        loader = loader_on(src, n, shape, accum)
        for p in range(6):
            got = np.asarray(loader.batch(p)["tokens"])
            assert got.shape == (accum, 16 // accum, SEQ + 1)
            np.testing.assert_array_equal(got.reshape(16, SEQ + 1), want[p], err_msg=f"{n} devices accum {accum} pos {p}")
    prefetch = Prefetcher(loader_on(src, 8, (8, 1, 1)), start=3, depth=2)  # resuming at data position 3
    try:
        for p in (3, 4, 5):
            pos, batch = prefetch.next()
            assert pos == p
            np.testing.assert_array_equal(np.asarray(batch["tokens"])[0], want[p])
    finally:
        prefetch.close()


@pytest.mark.slow
def test_two_processes_read_the_global_batches_of_one(store, tmp_path):
    """2 processes x 4 devices (gloo), each building only its rows, give the batches 1 process computes."""
    out = tmp_path / "batches.npy"
    r = run([sys.executable, str(ROOT / "scripts" / "launch_local.py"), "--processes", "2", "--devices-per-process", "4",
             "--", str(ROOT / "tests" / "data_worker.py"), "--store", str(store), "--out", str(out), "--seq-len", str(SEQ),
             "--global-batch", "16", "--grad-accum", "2", "--seed", "3", "--start", "2", "--positions", "4"], timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "[p0] process 0 built rows 0:4 of 8" in r.stdout and "[p1] process 1 built rows 4:8 of 8" in r.stdout
    got = np.load(out)
    src = source(store)
    want = np.stack([src.rows(p, np.arange(16), 16).reshape(2, 8, SEQ + 1) for p in range(2, 6)])
    np.testing.assert_array_equal(got, want)


def test_store_errors(store, tmp_path):
    with pytest.raises(ConfigError, match=r"^model.vocab_size=21000: the token store at data.path=.* has vocab 21001"):
        source(store, vocab=21_000)
    with pytest.raises(ConfigError, match=r"the eval split has 1000 tokens, need at least train.seq_len\+1=1025 "
                                          r"\(prepare it with a larger --eval-fraction, or set train.eval_every=0\)$"):
        TokenSource(DataConfig(source="tokens", path=str(store)), 1024, 1 << 16, "eval")
    with pytest.raises(ConfigError, match=r"^data.path=.*: no metadata.json \(write a token store with scripts/prepare_data.py\)$"):
        source(tmp_path)
    broken = tmp_path / "broken"
    make_store(broken, np.arange(100), np.arange(10), vocab=200, shard_tokens=1000)
    (broken / "train-00000.bin").write_bytes(b"\0" * 10)
    with pytest.raises(ConfigError, match=r"shard train-00000.bin has 10 bytes, metadata.json says 200 \(an unfinished"):
        source(broken)
    (broken / "tokenizer.json").write_text(word_tokenizer(300).to_str())
    with pytest.raises(ConfigError, match=r"tokenizer.json is missing or is not the tokenizer that made these tokens"):
        source(broken)


def test_vocab_size_auto_pads_the_store_vocab_and_an_int_is_checked(store):
    tokens = ["data.source=tokens", f"data.path={store}"]
    assert load_config(TINY, [*tokens, "model.vocab_size=auto"]).model.vocab_size == 21_120  # 21001 -> 165 * 128
    assert load_config(TINY, [*tokens, "model.vocab_size=21001"]).model.vocab_size == 21_001
    for overrides, message in (
        ([*tokens, "model.vocab_size=256"], f"model.vocab_size=256 is smaller than the token store's vocab 21001 "
                                            f"(data.path={store}); use at least 21001, or auto"),
        (["model.vocab_size=auto"], "model.vocab_size=auto needs data.source=tokens (the vocabulary comes from the "
                                    "token store); data.source='text' needs an integer"),
        (["data.source=tokens"], "data.path is empty: data.source=tokens needs a token store "
                                 "(scripts/prepare_data.py --out DIR)"),
    ):
        with pytest.raises(ConfigError) as e:
            load_config(TINY, overrides)
        assert str(e.value) == message


# ---------------------------------------------------------------- prepare_data


DOCS = ["def f(x):\n    return x + 1\n", "Héllo, wörld! ünïcode ☃\n\nsecond paragraph", "import os\nprint(os.sep)\n",
        "a jsonl document", "another one\nwith lines", "parquet row one", "parquet row two", "last"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """DOCS spread over .txt, .jsonl and .parquet files (two row groups), and a byte-level BPE trained on them."""
    d = tmp_path_factory.mktemp("corpus")
    (d / "in" / "sub").mkdir(parents=True)
    (d / "in" / "a.txt").write_text(DOCS[0])
    (d / "in" / "b.txt").write_text(DOCS[1])
    (d / "in" / "sub" / "c.txt").write_text(DOCS[2])
    (d / "in" / "d.jsonl").write_text("\n".join(json.dumps({"id": i, "text": t}) for i, t in enumerate(DOCS[3:5])) + "\n\n")
    pq.write_table(pa.table({"text": DOCS[5:8], "n": [1, 2, 3]}), d / "in" / "e.parquet", row_group_size=2)
    (d / "in" / "ignored.md").write_text("not an input in a directory")
    train_bpe(DOCS * 3, 300).save(str(d / "tokenizer.json"))
    return d


def documents_of(out, split="train") -> list[str]:
    """Decode a split's stream document by document (EOS-separated), with the store's own tokenizer."""
    meta = json.loads((out / "metadata.json").read_text())
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    stream = TokenStore(out, split).read(0, meta["tokens"][split])
    ends = np.flatnonzero(stream == meta["eos_id"])
    assert len(ends) == meta["documents"][split] and (not len(stream) or ends[-1] == len(stream) - 1)
    return [tok.decode(stream[a + 1:b].tolist()) for a, b in zip([-1, *ends], ends)]


def test_prepare_reads_every_input_kind_with_eos_between_documents(corpus, tmp_path):
    meta = prepare([str(corpus / "in")], tmp_path / "out", tokenizer=str(corpus), progress=False)
    # byte-level BPE decodes exactly; files in sorted path order: a.txt b.txt d.jsonl e.parquet sub/c.txt
    assert documents_of(tmp_path / "out") == [*DOCS[:2], *DOCS[3:], DOCS[2]]
    assert meta["documents"] == {"train": 8, "eval": 0} and meta["vocab_size"] == 300 and meta["eos_id"] == 0
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (corpus / "tokenizer.json").read_bytes()
    # a glob takes any suffix; the eval split gets about its fraction of the tokens, whole documents
    meta = prepare([str(corpus / "in" / "**" / "*.txt"), str(corpus / "in" / "ignored.md")], tmp_path / "glob",
                   tokenizer=str(corpus / "tokenizer.json"), eval_fraction=0.3, progress=False)
    train, held_out = documents_of(tmp_path / "glob"), documents_of(tmp_path / "glob", "eval")
    assert sorted(train + held_out) == sorted([*DOCS[:3], "not an input in a directory"]) and held_out
    assert 0.1 < meta["tokens"]["eval"] / sum(meta["tokens"].values()) < 0.6


def test_prepare_is_the_same_for_any_number_of_workers(corpus, tmp_path):
    """Real worker processes over byte ranges of a .jsonl cut mid-line: the same bytes as one process."""
    big = tmp_path / "big.jsonl"
    big.write_text("".join(json.dumps({"text": f"{DOCS[i % 8]} {i}"}) + "\n" for i in range(300)))
    kwargs = dict(tokenizer=str(corpus), eval_fraction=0.1, progress=False, task_bytes=1000, shard_tokens=500)
    one = prepare([str(big)], tmp_path / "one", workers=1, **kwargs)
    three = prepare([str(big)], tmp_path / "three", workers=3, **kwargs)
    assert one == three and one["documents"]["train"] + one["documents"]["eval"] == 300
    for f in sorted((tmp_path / "one").glob("*.bin")):
        assert f.read_bytes() == (tmp_path / "three" / f.name).read_bytes(), f.name
    assert len(one["shards"]["train"]) > 2
    train, held_out = documents_of(tmp_path / "one"), documents_of(tmp_path / "one", "eval")
    expected = [f"{DOCS[i % 8]} {i}" for i in range(300)]
    assert held_out and train == [d for d in expected if d not in set(held_out)]  # whole documents, in order


def test_prepare_errors_name_the_file_and_what_is_wrong(corpus, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "late.jsonl").write_text('{"text": "ok"}\n{"text": "ok"}\n{"body": "x"}\n')
    (bad / "first.jsonl").write_text('{"content": "x", "id": 1}\n')
    (bad / "notjson.jsonl").write_text('{"text": "ok"}\nnot json\n')
    pq.write_table(pa.table({"body": ["x"]}), bad / "col.parquet")
    (bad / "binary.txt").write_bytes(b"ok \xff\xfe")
    (bad / "corrupt.parquet").write_bytes(b"not a parquet file")
    tok = str(corpus)
    cases = {
        "late.jsonl": f"{bad}/late.jsonl line 3: no field 'text' (fields: body); choose one with --text-field",
        "first.jsonl": f"{bad}/first.jsonl line 1: no field 'text' (fields: content, id); choose one with --text-field",
        "notjson.jsonl": f"{bad}/notjson.jsonl line 2: not valid JSON",
        "col.parquet": f"{bad}/col.parquet: no column 'text' (columns: body); choose one with --text-field",
        "binary.txt": f"{bad}/binary.txt: not UTF-8 text (byte 3)",
        "missing.txt": f"--input {bad}/missing.txt: no such file or directory",
        "*.nothing": f"--input '{bad}/*.nothing': no file matches",
    }
    for name, message in cases.items():
        with pytest.raises(ConfigError) as e:
            prepare([str(bad / name)], tmp_path / f"out-{name}", tokenizer=tok, progress=False)
        assert str(e.value) == message
    with pytest.raises(ConfigError, match=rf"^{bad}/corrupt.parquet: cannot read it as parquet \("):
        prepare([str(bad / "corrupt.parquet")], tmp_path / "o", tokenizer=tok, progress=False)
    with pytest.raises(ConfigError, match=r"^--tokenizer .*: the directory holds no tokenizer.json$"):
        prepare([str(bad / "late.jsonl")], tmp_path / "o", tokenizer=str(bad), progress=False)
    with pytest.raises(ConfigError, match=r"^--train-bpe 100: expected at least 257"):
        prepare([str(bad / "late.jsonl")], tmp_path / "o", train_bpe=100, progress=False)
    # the script: exit 2 and one line, also when the bad line is met by a worker process mid-run
    r = run_script("prepare_data.py", "--tokenizer", tok, "--input", str(corpus / "in" / "a.txt"), str(bad / "late.jsonl"),
                   "--out", str(tmp_path / "s"), "--workers", "2", "--no-progress")
    assert r.returncode == 2 and r.stderr == f"error: {cases['late.jsonl']}\n", r.stderr
    r = run_script("prepare_data.py", "--tokenizer", tok, "--input", str(bad / "first.jsonl"), "--out", str(corpus))
    assert r.returncode == 2 and r.stderr == f"error: --out {corpus}: exists and is not an empty directory\n", r.stderr


@pytest.mark.slow
def test_real_data_demo_prepares_and_trains_offline(tmp_path):
    """README "Real data", smaller: a byte-level BPE trained on standard-library modules, then the demo config."""
    stdlib = sysconfig.get_paths()["stdlib"]
    data, run_dir = tmp_path / "data", tmp_path / "run"
    r = run_script("prepare_data.py", "--train-bpe", "512", "--eval-fraction", "0.1", "--workers", "2",
                   "--input", f"{stdlib}/[a-c]*.py", "--out", str(data))
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads((data / "metadata.json").read_text())
    assert meta["vocab_size"] == 512 and meta["tokens"]["train"] > 100_000 and meta["tokens"]["eval"] > 5_000
    first = sorted(glob.glob(f"{stdlib}/[a-c]*.py"))[0]
    assert documents_of(data)[0] == open(first, encoding="utf-8").read()  # the generation script's detokenizer
    r = run_script("train.py", "--config", DEMO, "--run-dir", str(run_dir), f"data.path={data}", "train.steps=8",
                   "train.eval_every=4", "model.n_layers=2", "logging.progress=false")
    assert r.returncode == 0, r.stderr[-2000:]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["vocab_size"] == 512  # auto, resolved
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [rec["loss"] for rec in records if "loss" in rec]
    assert [rec["step"] for rec in records if "eval_loss" in rec] == [4, 8]
    assert abs(losses[0] - np.log(512)) < 0.5 and losses[-1] < losses[0] - 0.5, losses
    # the generation script detokenizes with the data's tokenizer.json (framework/runs.py)
    r = run_script("generate.py", "--run-dir", str(run_dir), "--prompt", "import os", "--max-new-tokens", "6", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    tok = Tokenizer.from_file(str(data / "tokenizer.json"))
    assert out["prompt_ids"] == tok.encode("import os").ids and 1 <= len(out["ids"]) <= 6
    assert out["text"] == tok.decode(out["ids"])
    r = run_script("plan.py", "--config", DEMO, "--devices", "16", "--json", f"data.path={data}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert {p["name"]: p["shape"] for p in json.loads(r.stdout)["params"]}["embed"] == [512, 128]
