"""Config loading, overrides and one-line errors (exit code 2 from the scripts)."""
import pytest

from framework.config import ConfigError, config_to_dict, load_config
from tests.helpers import TINY, run_script


def test_yaml_and_overrides_typed():
    cfg = load_config(TINY, ["train.steps=50", "mesh.fsdp=-1", "optimizer.lr=1e-3", "checkpoint.async=false",
                             "data.paths=[a.txt, b.txt]", "model.tie_embeddings=null"])
    assert cfg.train.steps == 50 and cfg.mesh.fsdp == -1
    assert cfg.optimizer.lr == pytest.approx(1e-3) and isinstance(cfg.optimizer.lr, float)
    assert cfg.checkpoint.async_ is False and cfg.data.paths == ["a.txt", "b.txt"]
    assert config_to_dict(cfg)["checkpoint"]["async"] is False
    assert load_config(None, ["optimizer.lr=1"]).optimizer.lr == 1.0  # ints widen to floats


@pytest.mark.parametrize("override, message", [
    ("train.stepz=5", "unknown config key 'train.stepz'; did you mean 'train.steps'?"),
    ("trian.steps=5", "unknown config key 'trian'; did you mean 'train'?"),
    ("train.steps=five", "train.steps='five': expected int"),
    ("train.steps=1.5", "train.steps=1.5: expected int"),
    ("checkpoint.resume=maybe", "checkpoint.resume='maybe': expected bool or 'auto'"),
    ("optimizer.name=adamx", "optimizer.name='adamx': expected 'adamw' or 'adam' or 'sgd' or 'lion' or 'adafactor'"),
    ("train.dtype=float8", "train.dtype='float8': expected one of float32, bfloat16, float16"),
    ("train.steps", "override 'train.steps': expected key=value, e.g. train.steps=50"),
])
def test_errors_are_one_line(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    assert str(e.value) == message


def test_missing_file():
    with pytest.raises(ConfigError, match="config file 'nope.yaml' not found"):
        load_config("nope.yaml")


@pytest.mark.parametrize("args, message", [
    (["train.stepz=5"], "error: unknown config key 'train.stepz'; did you mean 'train.steps'?"),
    (["mesh.data=3", "mesh.fsdp=1"], "error: mesh: mesh.data=3 mesh.fsdp=1 mesh.tensor=1 multiplies to 3, expected the device count 8 (set one axis to -1 to fill it)"),
    (["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=-1", "train.global_batch=6"],
     "error: train.global_batch=6 (micro-batch 6 with train.grad_accum=1) is not divisible by the data-parallel size 4 (mesh.data*mesh.fsdp)"),
    (["data.paths=[/no/such/dir]"], "error: data.paths[0]='/no/such/dir': no such file or directory"),
    (["mesh.fsdp=-1", "mesh.tensor=-1"], "error: mesh: at most one axis may be -1, got mesh.fsdp, mesh.tensor"),
])
def test_train_script_exit_code_2(tmp_path, args, message):
    r = run_script("train.py", "--config", TINY, "--run-dir", str(tmp_path), *args, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == message
    assert "Traceback" not in r.stderr
