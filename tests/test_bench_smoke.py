"""Benchmark scripts that only a GPU times, run once on the CPU at toy sizes: a script error would otherwise first
show on a device run (they are few and short), not in CI."""
import pytest

from _helpers import import_bench


@pytest.fixture
def bench_modules(monkeypatch):
    """bench_moe_layer and bench_training at H=256, I=128, 4 experts; timing replaced by one call."""
    layer, training = import_bench("bench_moe_layer"), import_bench("bench_training")
    for mod in (layer, training):
        monkeypatch.setattr(mod, "H", 256)
        monkeypatch.setattr(mod, "I", 128)
    monkeypatch.setitem(layer.CASES, "mixtral-like", dict(num_experts=4, top_k=2, scoring="softmax"))
    monkeypatch.setattr(training, "bench_ms", lambda fn, **kw: (fn(), 1.0)[1])
    return layer, training


def test_bench_training_step_on_the_cpu(bench_modules):
    _, training = bench_modules
    (row,) = training.run_case("mixtral-like", [24], device="cpu")
    assert row["T"] == 24 and row["ours_ms"] == 1.0
    # our gradients against the naive loop's (bf16 both; the same routing up to rounding ties)
    for key in ("err_grad_x", "err_grad_w13", "err_grad_w2"):
        assert row[key] < 5e-2, (key, row[key])


@pytest.mark.parametrize("name", ["deepseek", "qwen3"])
def test_bench_hf_model_on_the_cpu(monkeypatch, name):
    """bench_hf_model.py's variants of a toy DeepSeek-V3 / Qwen3-MoE model: prefill, greedy decode, errors
    against the fp32 copy and the ratios to HF grouped_mm (timing replaced by one call)."""
    pytest.importorskip("transformers")
    hf_model = import_bench("bench_hf_model")
    monkeypatch.setattr(hf_model, "bench_ms", lambda fn, **kw: (fn(), 1.0)[1])
    rows = hf_model.run_model(name, 1, 16, ((1, 32),), device="cpu", tiny=True)  # 16: 2 experts a group
    mla = ["ours_fp8_attn", "ours_fp8_kv8"] if name == "deepseek" else []  # FP8 projections and cache: MLA's
    assert [r["variant"] for r in rows] == ["hf_eager", "hf_grouped_mm", "ours_bf16", "ours_fp8"] + mla
    for r in rows:
        assert r["decode_ms_per_step"] > 0 and r["prefill_1x32_vs_hf_grouped_mm"] == 1.0
    errs = {r["variant"]: r["logits_err_vs_fp32"] for r in rows}
    assert errs["ours_bf16"] < 2 * errs["hf_grouped_mm"] + 1e-2, errs
    assert errs["ours_fp8"] < 0.15, errs
    if mla:
        assert errs["ours_fp8"] < errs["ours_fp8_attn"] < 0.2, errs  # more FP8 GEMMs: a larger error
        assert errs["ours_fp8_kv8"] < 0.2, errs


def test_profile_hf_prefill_on_the_cpu():
    """profile_hf_prefill.py's report of a toy DeepSeek-V3 model (CPU op times stand in for the kernels')."""
    pytest.importorskip("transformers")
    prefill = import_bench("profile_hf_prefill")
    lines = prefill.run("deepseek", 32, layers=1, experts=16, top=5, device="cpu", tiny=True)
    heads = [line for line in lines if line.startswith("## ")]
    assert [h.split()[2] for h in heads] == ["hf_grouped_mm", "ours_fp8"]
    assert all(float(h.split("kernels ")[1].split()[0]) > 0 for h in heads)
    assert prefill.category("_grouped_gemm_decode_kernel") == "ours: expert GEMMs"
    assert prefill.category("nvjet_sm90_tst_64x32") == "torch GEMMs"
