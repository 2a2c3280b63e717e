"""The HLO collective counter on text shaped like XLA's CPU and GPU output (sync and async forms)."""
from framework.collectives import parse_collectives

HLO = """
  %all-gather-start = (f32[8,4]{1,0}, f32[64,4]{1,0}) all-gather-start(f32[8,4]{1,0} %p), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}, use_global_device_ids=true, metadata={op_name="jit(f)/layer__fc1/all_gather"}
  %all-gather-done = f32[64,4]{1,0} all-gather-done((f32[8,4]{1,0}, f32[64,4]{1,0}) %all-gather-start)
  %all-reduce-start = f32[1024]{0} all-reduce-start(f32[1024]{0} %x), channel_id=2, replica_groups={{0,1},{2,3},{4,5},{6,7}}, to_apply=%add
  %all-reduce-done = f32[1024]{0} all-reduce-done(f32[1024]{0} %all-reduce-start)
  %reduce_scatter.7 = bf16[2,64]{1,0} reduce-scatter(%fusion), channel_id=3, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}, to_apply=%region_0.0, metadata={op_name="jit(f)/transpose(jvp())/layer__blocks.0.mlp.fc_in/shard_map/reduce_scatter"}
  %all-to-all = (s8[2,4]{1,0}, s8[2,4]{1,0}, s8[2,4]{1,0}, s8[2,4]{1,0}) all-to-all(%a, %b, %c, %d), channel_id=4, replica_groups=[2,4]<=[4,2]T(1,0)
  %collective-permute-start = (f32[16]{0}, f32[16]{0}, u32[], u32[]) collective-permute-start(f32[16]{0} %y), source_target_pairs={{0,1},{1,0}}
  ROOT %all-reduce.1 = f32[] all-reduce(f32[] %loss), replica_groups={}, to_apply=%add
"""


def test_counts_each_op_once_with_group_sizes():
    ops = parse_collectives(HLO, n_devices=8)
    assert [(o.kind, o.bytes, o.group_size, o.layer) for o in ops] == [
        ("all-gather", 64 * 4 * 4 * 7 // 8, 8, "fc1"),  # the -done half is not counted again
        ("all-reduce", 2 * 4096 // 2, 2, None),
        ("reduce-scatter", 2 * 64 * 2 * 7, 8, "blocks.0.mlp.fc_in"),
        ("all-to-all", 4 * 8 * 3 // 4, 4, None),
        ("collective-permute", 64, 8, None),  # no replica groups: the whole buffer to one peer
        ("all-reduce", 2 * 4 * 7 // 8, 8, None),  # replica_groups={}: all 8 devices
    ]
    assert ops[2].dtype == "bf16" and ops[3].dtype == "s8"
