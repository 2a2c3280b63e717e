#!/usr/bin/env python
"""Hugging Face checkpoints in and out (safetensors, no torch): GPT2LMHeadModel, LlamaForCausalLM,
Qwen2ForCausalLM, Qwen3ForCausalLM, MixtralForCausalLM, Qwen3MoeForCausalLM (framework/hf/).

  python scripts/hf.py import --hf-dir DIR --run-dir RUN [--config C] [key=value ...]
      a run dir holding the model as its step-0 checkpoint and config.yaml; fine-tune it with
      python scripts/train.py --config RUN/config.yaml --run-dir RUN
  python scripts/hf.py export --run-dir RUN [--step N] --out DIR [--max-shard-bytes B] [key=value ...]
      config.json + safetensors that transformers' from_pretrained loads
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import _cli

COMMANDS = ("import", "export")


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = [a for a in argv if a in COMMANDS]  # the command may stand anywhere among flags and overrides
    if not commands:
        argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).error(
            f"expected a command: {' or '.join(COMMANDS)}")
    cmd = commands[0]
    argv.remove(cmd)
    p = argparse.ArgumentParser(prog=f"hf.py {cmd}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="the meshpilot run dir (written by import, read by export)")
    p.add_argument("--cpu-devices", type=int, default=8, help="devices to emulate on the CPU platform (default 8)")
    if cmd == "import":
        p.add_argument("--hf-dir", required=True, help="Hugging Face model dir: config.json + model.safetensors[.index.json]")
        p.add_argument("--config", default=None, help="run config to check against config.json (default: built from it)")
    else:
        p.add_argument("--out", required=True, help="directory to write config.json and safetensors into")
        p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest good one)")
        p.add_argument("--max-shard-bytes", type=int, default=None,
                       help="split the safetensors above this size, with model.safetensors.index.json (default 5 GB)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. mesh.tensor=2")
    args = p.parse_intermixed_args(argv)
    args.cmd = cmd
    return args


def run_import(args) -> None:
    from framework import hf, runs
    from framework.config import ConfigError

    cfg = hf.run_config(args.hf_dir, args.config, args.overrides)  # checked before the heavy imports
    from framework.train import Trainer

    trainer = Trainer(cfg, run_dir=args.run_dir)
    if trainer.checkpointer.latest_good_step() is not None:
        raise ConfigError(f"--run-dir {args.run_dir} already holds checkpoints; import into a new run dir")
    trainer.checkpointer.save(0, trainer.init_state())  # params in their shardings, optimizer state fresh
    trainer.checkpointer.close()
    trainer.write_config()
    run_dir, hf_dir = Path(args.run_dir), Path(args.hf_dir)
    shutil.copyfile(hf_dir / "config.json", run_dir / runs.HF_CONFIG)  # provenance, token ids for export/generate
    if (hf_dir / "tokenizer.json").is_file():
        shutil.copyfile(hf_dir / "tokenizer.json", run_dir / "tokenizer.json")
    print(f"imported {hf_dir} ({hf.architecture(hf.read_hf_config(hf_dir), hf_dir)}) into {run_dir} as step 0; "
          f"fine-tune with: python scripts/train.py --config {run_dir}/config.yaml --run-dir {run_dir}")


def run_export(args) -> None:
    import jax

    from framework import hf, runs
    from framework.mesh import MeshManager

    cfg = runs.load_run_config(args.run_dir, args.overrides)
    mesh = MeshManager(cfg.mesh).build()
    params, abstract, step = runs.restore_params(cfg, args.run_dir, args.step, mesh)
    host = runs.gather(params)
    if jax.process_index() == 0:
        tensors = hf.hf_tensors(host, cfg.model, abstract.logical_axes)
        config = hf.hf_config(cfg.model, runs.token_ids(args.run_dir, cfg))
        files = hf.save(tensors, config, args.out, args.max_shard_bytes or hf.DEFAULT_MAX_SHARD_BYTES,
                        runs.tokenizer_file(args.run_dir, cfg))
        print(f"exported step {step} of {args.run_dir} to {args.out}: config.json, {len(files)} safetensors file(s), "
              f"{len(tensors)} tensors")


def main(argv=None) -> None:
    args = parse_args(argv)
    _cli.emulate_cpu_devices(args.cpu_devices)
    with _cli.user_errors():
        (run_import if args.cmd == "import" else run_export)(args)


if __name__ == "__main__":
    main()
