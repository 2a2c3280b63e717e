"""One run of tests/test_oom_retry.py in its own process (or, under scripts/launch_local.py, one of several that train
together over gloo): train from micro-batch ``--micro``; with ``--limit``, under
an address-space limit (``resource.setrlimit(RLIMIT_AS)``) sized between the device bytes of the step at that
micro-batch and at half of it, so that its first step really fails to allocate and the smaller one fits. Prints one
JSON line: the losses and the compiled steps' temp bytes. With ``--propose A,B,...`` (under scripts/launch_local.py)
process i proposes micro-batch i of the list twice to ``agree_micro_batch`` and prints what they agreed."""
from __future__ import annotations

import argparse
import json
import resource

import jax
import psutil

from framework import distributed
from framework.train import Trainer
from framework.train.microbatch import agree_micro_batch
from tests.helpers import tiny_config

# logits of 32768 classes: the step's temporaries grow with the micro-batch, ~2x from 8 to 16 rows of 128 tokens
CONFIG = ("model.n_layers=1", "model.d_model=64", "model.n_heads=4", "model.d_mlp=128", "model.vocab_size=32768",
          "train.seq_len=128", "model.max_seq_len=128", "train.global_batch=16", "data.source=synthetic",
          "optimizer.name=sgd")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--micro", type=int)
    p.add_argument("--limit", action="store_true")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--propose", default=None)
    distributed.add_arguments(p)
    args = p.parse_args()
    if args.propose is not None:
        distributed.initialize(distributed.args_from_namespace(args))
        mine = int(args.propose.split(",")[jax.process_index()])
        print(f"agreed {agree_micro_batch(mine)} then {agree_micro_batch(2 * mine)}", flush=True)
        distributed.shutdown()
        return
    distributed.initialize(distributed.args_from_namespace(args))  # (one process: nothing to join)
    trainer = Trainer(tiny_config(*CONFIG, f"train.micro_batch={args.micro}", steps=args.steps),
                      devices=jax.devices() if jax.process_count() > 1 else jax.devices()[:1])
    t = trainer.cfg.train
    temps = {}
    for micro in (args.micro, args.micro // 2):  # compiled before the limit: compiling is not what is tested
        compiled = trainer.layout.steps.compiled(t.global_batch, t.seq_len, t.global_batch // micro)
        temps[micro] = compiled.memory_analysis().temp_size_in_bytes
    trainer.state = trainer.init_state()
    if args.limit:
        room = psutil.Process().memory_info().vms + temps[args.micro] * 19 // 20  # the step at --micro cannot fit, half of it can
        resource.setrlimit(resource.RLIMIT_AS, (room, resource.RLIM_INFINITY))
    records = trainer.fit()
    print(json.dumps({"losses": [r["loss"] for r in records], "temp_bytes": temps,
                      "micro_batch": trainer.micro_batch}), flush=True)


if __name__ == "__main__":
    main()
