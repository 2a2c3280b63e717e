"""The broadcast planner on its own: pins, patterns, infeasible modes, transitions, crossing points (no compiling)."""
import pytest

from framework.broadcast import LayerShape, make_plan, mode_costs
from framework.config import BroadcastConfig, ConfigError, load_config


def dense(name, c_in, c_out, batch, chained=False, group=None):
    return LayerShape(name=name, kind="dense", kernel_shape=(c_in, c_out), out_axis=1, in_shape=(batch, c_in),
                      out_shape=(batch, c_out), act_bytes=4, param_bytes=4, bias=True, input_grad=True,
                      chained=chained, input_group=hash(name) if group is None else group)


def test_cost_formulas():
    c = mode_costs(dense("a", 64, 64, 48), 8)
    assert c["kernel"].forward == c["kernel"].backward == round(7 / 8 * (64 * 64 + 64) * 4)
    assert c["map"].forward == c["map"].backward == round(7 / 8 * 48 * 64 * 4)
    assert mode_costs(dense("a", 64, 10, 48), 8)["map"] is None  # 10 channels do not split over 8
    assert mode_costs(dense("a", 64, 10, 48), 8)["kernel"].forward == 0  # replicated: gradients all-reduced
    int8 = mode_costs(dense("a", 64, 64, 48), 8, "int8")["kernel"]
    assert int8.forward == round(7 / 8 * (64 * 64 + 64 * 4 + 64 * 4))


def test_mode_flips_with_p():
    """Kernel mode moves 2(P-1)/P*K, map mode 2(P-1)/P*X*(1 + 1/P) (gather, reduce-scatter, all-to-all back).

    A 64x64 dense at batch 56: K=16,640 B, X=14,336 B; K vs X(1+1/P): P=2 -> 21,504 > 16,640 (kernel),
    P=16 -> 15,232 < 16,640 (map). The flip on measured bytes (batch crossing) is in test_broadcast_layers.
    """
    layer = dense("a", 64, 64, 64 * 7 // 8)
    assert make_plan([layer], 2, ("fsdp",), BroadcastConfig(mode="auto")).layers[0].mode == "kernel"
    assert make_plan([layer], 16, ("fsdp",), BroadcastConfig(mode="auto")).layers[0].mode == "map"


def test_pins_patterns_and_fallback():
    layers = [dense("blocks.0.fc", 64, 64, 8), dense("blocks.1.fc", 64, 64, 8), dense("head", 64, 10, 8)]
    cfg = BroadcastConfig(mode="map", overrides={"blocks.1.*": "kernel", "re:head|nothing": "map"})
    plan = make_plan(layers, 8, ("fsdp",), cfg)
    assert [layer.mode for layer in plan.layers] == ["map", "kernel", "kernel"]
    assert plan.layers[0].pinned == "broadcast.mode"
    assert plan.layers[1].pinned == "broadcast.overrides.blocks.1.*"
    assert "map impossible" in plan.layers[2].pinned
    table = plan.table()
    assert "blocks.1.fc" in table and "predicted total" in table


def test_transition_cost_keeps_a_map_chain_together():
    """Two chained layers whose maps are cheap: map->map hands on channel-split, no all-to-all between them."""
    a, b = dense("a", 256, 256, 8, chained=True), dense("b", 256, 256, 8)
    plan = make_plan([a, b], 8, ("fsdp",), BroadcastConfig(mode="auto"))
    assert [layer.mode for layer in plan.layers] == ["map", "map"]
    assert (plan.layers[0].out_layout, plan.layers[1].in_layout) == ("channel", "channel")
    assert plan.layers[0].predicted_bytes == plan.layers[0].map_mode_bytes  # no transition paid
    assert plan.layers[1].predicted_bytes == plan.layers[1].map_mode_bytes + plan.layers[1].transition_bytes


def test_transition_cost_changes_the_choice():
    """A layer whose map mode alone is cheaper, but whose big output would need an all-to-all: kernel wins."""
    wide = LayerShape(name="wide", kind="dense", kernel_shape=(64, 64), out_axis=1, in_shape=(56, 64),
                      out_shape=(56, 64 * 64), act_bytes=4, param_bytes=4, bias=False, input_grad=True, chained=False)
    costs = mode_costs(wide, 8)
    assert costs["map"].total < costs["kernel"].total
    assert make_plan([wide], 8, ("fsdp",), BroadcastConfig(mode="auto")).layers[0].mode == "kernel"


def test_shared_input_gathered_once():
    q, k, v = (dense(n, 128, 128, 64, group=1) for n in "qkv")
    plan = make_plan([q, k, v], 8, ("fsdp",), BroadcastConfig(mode="map"))
    gather = mode_costs(q, 8)["map"].forward
    assert [layer.shared_gather_bytes for layer in plan.layers] == [gather, gather, 0]


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="broadcast.mode='fast'"):
        load_config(None, ["broadcast.mode=fast"])
    with pytest.raises(ConfigError, match="broadcast.compress='int4'"):
        load_config(None, ["broadcast.compress=int4"])
    with pytest.raises(ConfigError, match=r"broadcast.overrides.fc='both'"):
        load_config(None, ["broadcast.overrides={fc: both}"])
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        make_plan([dense("a", 8, 8, 8)], 8, ("fsdp",), BroadcastConfig(overrides={"re:(": "map"}))


def test_auto_falls_back_where_the_micro_batch_does_not_split(capsys):
    """16 samples over 6 devices (an elastic restart): auto leaves every layer to XLA and says so in one line;
    an explicit mode refuses with that line. On 8 devices the same config is planned."""
    from framework.state import abstract_state
    from tests.helpers import SMALLER, tiny_config

    six = {"data": 1, "fsdp": 6, "tensor": 1}
    abstract = abstract_state(tiny_config(*SMALLER, "broadcast.mode=auto"), six)
    assert abstract.broadcast_plan is None
    out = capsys.readouterr().err.strip().splitlines()
    assert out == ["broadcast.mode=auto: micro-batch 16 (train.global_batch / train.grad_accum) does not split over "
                   "the 6 devices of mesh axes data*fsdp: no plan, XLA's propagation decides every layer (as "
                   "broadcast.mode=none)"]
    with pytest.raises(ConfigError, match=r"^broadcast.mode=kernel: micro-batch 16 .* does not split over the 6 devices"):
        abstract_state(tiny_config(*SMALLER, "broadcast.mode=kernel"), six)
    assert abstract_state(tiny_config(*SMALLER, "broadcast.mode=auto"), {"data": 1, "fsdp": 8, "tensor": 1}).broadcast_plan


def test_bf16_with_an_automatic_axis_is_not_planned_on_cpu(capsys):
    """bf16 compute with tensor=2 outside the batch axes would abort XLA:CPU's compiler: auto falls back, kernel refuses."""
    from framework.state import abstract_state
    from tests.helpers import SMALLER, tiny_config

    mesh = {"data": 1, "fsdp": 4, "tensor": 2}
    assert abstract_state(tiny_config(*SMALLER, "train.dtype=bfloat16", "broadcast.mode=auto"), mesh).broadcast_plan is None
    assert "train.dtype=bfloat16 with mesh axis tensor=2 outside the batch axes data*fsdp" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="aborts XLA:CPU's compiler"):
        abstract_state(tiny_config(*SMALLER, "train.dtype=bfloat16", "broadcast.mode=kernel"), mesh)
    assert abstract_state(tiny_config(*SMALLER, "broadcast.mode=auto"), mesh).broadcast_plan  # float32 compiles
