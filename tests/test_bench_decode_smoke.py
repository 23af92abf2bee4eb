"""bench_moe_decode.py's non-timing parts on the CPU at toy sizes: the transformers block it builds, our layer
from it and the torch composition agree (a script error would otherwise first show on a device run); the A/B
variants (--ab) and --no-baselines."""
import math
import os

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


def test_decode_bench_ab_parsing():
    b = import_bench("bench_moe_decode")
    assert b.parse_ab("") == {} and b.parse_ab(None) == {}
    assert b.parse_ab("pdl:MOE_KERNELS_PDL=1; both:MOE_KERNELS_PDL=1,MOE_KERNELS_DECODE_MAX_ROWS=64;") == {
        "pdl": {"MOE_KERNELS_PDL": "1"}, "both": {"MOE_KERNELS_PDL": "1", "MOE_KERNELS_DECODE_MAX_ROWS": "64"}}
    for bad in ("pdl", "pdl:", "pdl:MOE_KERNELS_PDL", "p-dl:A=1", ":A=1", "pdl:A=1;pdl:B=2", "pdl:A=1,=2", "x:1A=2"):
        with pytest.raises(ValueError, match="--ab"):
            b.parse_ab(bad)


def test_decode_bench_variants_on_the_cpu(monkeypatch):
    """A variant is timed with its variables set and checked against HF's block; afterwards the environment is as
    before (a variable unset before is unset again); without baselines their columns are NaN, never made up."""
    pytest.importorskip("transformers")
    b = import_bench("bench_moe_decode")
    monkeypatch.delenv("MOE_KERNELS_PDL", raising=False)
    monkeypatch.setenv("MOE_KERNELS_DECODE_MAX_ROWS", "7")
    timed = []

    def time_graph(fn, rep):
        fn()
        timed.append((os.environ.get("MOE_KERNELS_PDL"), os.environ.get("MOE_KERNELS_DECODE_MAX_ROWS")))
        return (0.5 if timed[-1][0] else 1.0), True

    monkeypatch.setattr(b, "time_graph", time_graph)
    variants = b.parse_ab("pdl:MOE_KERNELS_PDL=1,MOE_KERNELS_DECODE_MAX_ROWS=64")
    rows = b.run_case("mixtral-like", [1, 2], 256, 128, rep=1, gbps=1.0, precisions=["bf16"], variants=variants,
                      baselines=False, device="cpu")
    assert timed == [(None, "7"), ("1", "64")] * 2  # ours, then the variant, per T; no baseline timed
    assert "MOE_KERNELS_PDL" not in os.environ and os.environ["MOE_KERNELS_DECODE_MAX_ROWS"] == "7"
    for r in rows:
        assert r["ours_us"] == 1000.0 and r["ours_us_pdl"] == 500.0 and r["pdl_speedup"] == 2.0
        assert r["frac_weight_bound_pdl"] == 2 * r["frac_weight_bound"]
        assert r["err_vs_hf_pdl"] < 2e-2 and r["err_vs_hf"] < 2e-2, r
        assert math.isnan(r["hf_grouped_mm_us"]) and math.isnan(r["vs_composition"]) and r["hf_graph"] is None
    summary = b.summarize([dict(r, precision="fp8") for r in rows], variants)  # the fp8 keys' definitions
    assert summary["frac_weight_bound_T1_pdl"] == rows[0]["frac_weight_bound_pdl"]
    assert math.isnan(summary["min_frac_weight_bound_T_ge_8_pdl"]) and math.isnan(summary["min_vs_hf_grouped_mm"])
    assert "| ours_us_pdl | frac_weight_bound_pdl | pdl_speedup | err_vs_hf_pdl |" in b.table(rows, variants)
