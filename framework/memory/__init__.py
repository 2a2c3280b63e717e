"""Memory tiers: where each category of training data lives, how many bytes it takes, and the device's memory state.

policy.py   categories, memory kinds, the placement policy, remat/offload policies, transfer checks
planner.py  bytes per device per category and memory kind (exact, compiled or estimated)
host.py     the optimizer update on the host where pinned_host state lives, gradients in host memory
monitor.py  the devices' memory state while training runs (MemoryMonitor) and the budget it gives
nvme.py     the NVMe tier: the optimizer state (and float32 master parameters) in files on local disk, streamed
            through the update in chunks
nvme_rules.py  the NVMe tier's rules: the optimizers it streams, its files, what it refuses, optax's formulas on a chunk

Everything is re-exported here: ``from framework import memory`` and ``memory.X`` work.
"""
from framework.memory.host import HostUpdateCheck, check_host_update, on_host
from framework.memory.monitor import MemoryMonitor, MemoryReading, host_memory, needs_budget, resolve_budget
from framework.memory.nvme import NvmeOptimizer, NvmeStateError, disk_bytes, held_abstract
from framework.memory.planner import (MemoryNeeds, MemoryPlan, category_bytes, compiled_argument_bytes, compiled_device_bytes,
                                      device_bytes_by_category, device_share, estimate_needs, format_plan,
                                      host_state_bytes, make_plan, pipeline_plan, plan_memory, residual_bytes, shard_bytes,
                                      state_needs, with_compiled_activations)
from framework.memory.policy import (ACTIVATION_MODES, CATEGORIES, DEVICE, HOST, KINDS, NVME, OFFLOAD_ORDER, OffloadCheck,
                                     Placement, PlacementPolicy, activation_choices, activation_policy, check_auto_offload,
                                     count_transfers, has_auto, layer_policy, loop_body_transfers,
                                     model_options, model_tags, tagged_names, verify_offload, with_memory_kinds)
