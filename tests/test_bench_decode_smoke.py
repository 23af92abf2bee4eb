"""bench_moe_decode.py's non-timing parts on the CPU at toy sizes: the transformers block it builds, our layer
from it and the torch composition agree (a script error would otherwise first show on a device run)."""
import pytest
import torch

from _helpers import import_bench


@pytest.mark.parametrize("case", ["deepseek", "mixtral-like"])
def test_decode_bench_baselines_agree(monkeypatch, case):
    pytest.importorskip("transformers")
    b = import_bench("bench_moe_decode")
    monkeypatch.setitem(b.CASES, "deepseek", dict(b.CASES["deepseek"], num_experts=16))
    block = b.hf_block(case, 256, 128, device="cpu")
    layer = b.mk.MoELayer.from_hf(block, precision="bf16")
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = block(x[None])[0].float()
        for got in (layer(x), b.Composition(layer, case, fp8=False)(x)):
            err = float((got.float() - ref).norm() / ref.norm())
            assert err < 2e-2, err
    per_expert, shared = b.expert_bytes(layer)
    assert per_expert == 3 * 256 * 128 * 2 and shared == (per_expert if case == "deepseek" else 0)
