#!/usr/bin/env python
"""Generate text from a run's checkpoint or a Hugging Face model dir, with a KV cache, in one compiled loop.

  python scripts/generate.py --run-dir RUN [--step N] --prompt TEXT [--max-new-tokens 32] [--temperature 0] [--top-k 0] [--seed 0]
  python scripts/generate.py --hf-dir DIR --prompt TEXT ...

Temperature 0 (the default) decodes greedily; otherwise tokens are sampled from softmax(logits / T),
restricted to the top k when --top-k > 0. The tokenizer is the run's (framework/runs.py) or DIR/tokenizer.json.
"""
from __future__ import annotations

import argparse
import json
import sys

import _cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run-dir", help="a meshpilot run dir (config.yaml + checkpoints)")
    src.add_argument("--hf-dir", help="a Hugging Face model dir (config.json, safetensors, tokenizer.json)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step of --run-dir (default: the newest good one)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print {prompt_ids, ids, text} as JSON")
    p.add_argument("--cpu-devices", type=int, default=8, help="devices to emulate on the CPU platform (default 8)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. mesh.tensor=2")
    return p.parse_intermixed_args(argv)


def load(args):
    """(config, mesh, params, tokenizer, eos id) from --run-dir or --hf-dir."""
    from pathlib import Path

    from framework import generate, hf, runs, sharding
    from framework.config import ConfigError
    from framework.mesh import MeshManager
    from framework.state import abstract_state

    if args.hf_dir:
        cfg = hf.run_config(args.hf_dir, None, args.overrides)
        mesh = MeshManager(cfg.mesh).build()
        abstract = abstract_state(cfg, dict(zip(mesh.axis_names, mesh.axis_sizes)))
        params = hf.load_params(args.hf_dir, cfg.model, abstract.shapes.params, abstract.logical_axes,
                                sharding.named(mesh, abstract.specs.params))
        tok_file = Path(args.hf_dir) / "tokenizer.json"
        if not tok_file.is_file():
            raise ConfigError(f"--hf-dir {args.hf_dir}: no tokenizer.json")
        ids = {k: hf.read_hf_config(args.hf_dir).get(k) for k in hf.TOKEN_IDS}
    else:
        if args.step is not None and args.step < 0:
            raise ConfigError(f"--step {args.step}: expected a checkpoint step >= 0")
        cfg = runs.load_run_config(args.run_dir, args.overrides)
        mesh = MeshManager(cfg.mesh).build()
        params, _, _ = runs.restore_params(cfg, args.run_dir, args.step, mesh)
        tok_file = runs.tokenizer_file(args.run_dir, cfg)
        if tok_file is None and not (cfg.data.source == "text" and cfg.model.vocab_size >= 256):
            raise ConfigError(f"--run-dir {args.run_dir}: no tokenizer (data.source={cfg.data.source}, no tokenizer.json)")
        ids = runs.token_ids(args.run_dir, cfg)
    tokenizer = generate.FileTokenizer(tok_file) if tok_file is not None else generate.ByteTokenizer()
    eos = ids.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos  # Llama 3 lists several; the first ends a reply
    return cfg, mesh, params, tokenizer, eos


def main(argv=None) -> None:
    args = parse_args(argv)
    _cli.emulate_cpu_devices(args.cpu_devices)
    with _cli.user_errors():
        from framework import generate
        from framework.config import ConfigError

        if args.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: expected a positive integer")
        cfg, mesh, params, tokenizer, eos = load(args)
        dcfg, params, graphdef = generate.unstacked(cfg, params, mesh)
        prompt = tokenizer.encode(args.prompt)
        ids = generate.Generator(dcfg, graphdef, mesh)(params, prompt, args.max_new_tokens, temperature=args.temperature,
                                                        top_k=args.top_k, seed=args.seed, eos_id=eos)[0].tolist()
        if args.json:
            json.dump({"prompt_ids": prompt, "ids": ids, "text": tokenizer.decode(ids)}, sys.stdout)
            print()
        else:
            print(tokenizer.decode(prompt + ids))  # decoded whole: word boundaries come out right


if __name__ == "__main__":
    main()
