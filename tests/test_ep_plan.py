"""The planner's expert tensor parallelism (``expert_tp``) and low-latency mode (``ep_mode``): the quantities the
model adds, checked against their closed forms at small sizes (no rates files: hardware defaults)."""
import pytest

from moe_kernels import plan


def _predict(**kw):
    base = dict(gpus=16, gpus_per_node=8, num_experts=16, top_k=2, tokens_per_gpu=256, hidden=1024,
                intermediate=512, layers=4, dense_layers=1, load_imbalance=1.0, micro_batches=2)
    base.update(kw)
    return plan.predict(plan.Deployment(**base), plan.Rates(), place=False)


def test_defaults_unchanged_by_the_new_fields():
    a, b = _predict(), _predict(expert_tp=1, ep_mode="normal")
    assert a["per_moe_layer_ms"] == b["per_moe_layer_ms"] and a["step_ms"] == b["step_ms"]
    assert "tp_allreduce" not in a["per_moe_layer_ms"]


def test_expert_tp():
    one, two = _predict(), _predict(expert_tp=2)
    T, H = 256, 1024
    t = two["traffic_per_gpu_per_layer"]["tp_allreduce"]
    assert t["nvlink_MB"] == pytest.approx(2 * (2 - 1) / 2 * T * H * 4 / 1e6) and t["infiniband_MB"] == 0
    L = two["per_moe_layer_ms"]
    assert L["tp_allreduce"] > 0
    assert L["communication"] == pytest.approx(L["dispatch"] + L["combine"] + L["tp_allreduce"])
    # each GPU holds half of twice the experts: the same expert bytes
    assert two["memory_gb"]["routed experts"] == pytest.approx(one["memory_gb"]["routed experts"])
    # an EP group = the 8 GPUs with the same slice, 4 per node: destinations 3/8 NVLink, 4/8 InfiniBand
    D = two["distinct_gpus_per_token"]
    assert two["destinations_per_token"]["nvlink"] == pytest.approx(D * 3 / 8)
    assert two["destinations_per_token"]["infiniband"] == pytest.approx(D * 4 / 8)
    # a TP group's GPUs share their tokens: 8 groups of T tokens per step
    assert two["tokens_per_s"] == pytest.approx(8 * T / two["step_ms"] * 1e3)


@pytest.mark.parametrize("kw,match", [
    (dict(expert_tp=3), "divide the GPUs of a node"),
    (dict(expert_tp=8, intermediate=512), "whole 128-blocks"),
    (dict(expert_tp=0), "expert_tp must be an int >= 1"),
    (dict(ep_mode="fast"), "ep_mode"),
])
def test_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        _predict(**kw)


def test_low_latency_records():
    """One record per (token, expert) pair: an e4m3 row + 1x128 scales (16-byte padded) + 16 bytes out, a bf16 row
    back; the traffic is k records per token over the uniform destinations."""
    p = _predict(ep_mode="low_latency")
    H, k, T, G, g = 1024, 2, 256, 16, 8
    assert p["record_bytes"] == {"dispatch": H + 32 + 16, "combine": 2 * H}
    t = p["traffic_per_gpu_per_layer"]
    assert t["dispatch"]["nvlink_MB"] == pytest.approx(T * k * (g - 1) / G * (H + 48) / 1e6)
    assert t["combine"]["infiniband_MB"] == pytest.approx(T * k * (G - g) / G * 2 * H / 1e6)
    assert p["memory_gb"]["low-latency buffers"] > 0
    assert any(u["rate"] == "low-latency phase latency" for u in p["rates_used"])
    assert "low-latency phase latency" in plan.format_prediction(p)
