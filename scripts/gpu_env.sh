# Source before a GPU run:  source scripts/gpu_env.sh && python scripts/bench/bench.py --config configs/llama_1b_gpu.yaml
#
# XLA GPU flags for overlapping communication with compute (from JAX's "GPU performance tips";
# each flag was checked to be known to this jaxlib's XLA, which rejects unknown ones at start-up):
#   latency_hiding_scheduler      schedule async collectives early so they run under compute
#   pipelined_*                   in scanned layers (model.scan_layers), gather layer i+1's weights
#                                 and reduce-scatter layer i-1's gradients while layer i computes
#   while_loop_double_buffering   the same overlap across loop iterations
#   *_combine_threshold_bytes     fewer, larger collectives (128 MiB) for FSDP gathers/scatters
#   highest_priority_async_stream collectives first on the GPU's stream scheduler
# Flags already in XLA_FLAGS are kept; these are appended.
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }\
--xla_gpu_enable_latency_hiding_scheduler=true \
--xla_gpu_enable_pipelined_all_gather=true \
--xla_gpu_enable_pipelined_reduce_scatter=true \
--xla_gpu_enable_pipelined_all_reduce=true \
--xla_gpu_enable_while_loop_double_buffering=true \
--xla_gpu_all_gather_combine_threshold_bytes=134217728 \
--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728 \
--xla_gpu_all_reduce_combine_threshold_bytes=134217728 \
--xla_gpu_enable_highest_priority_async_stream=true"
# Let XLA take most of GPU memory up front (JAX's default is 75%).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
