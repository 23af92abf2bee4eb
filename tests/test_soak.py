"""tests/soak.py on the CPU (Triton interpreter): a short clean run passes, and each of its checks catches what it
is there for (NaN outputs, a drifting result for the fixed input, memory growth)."""
import json

import pytest
import torch

import soak

SMALL = dict(hidden=128, intermediate=128, experts=4, top_k=2, max_tokens=16, device="cpu", quiet=True)


def test_clean_run_passes_and_writes_json(tmp_path, capsys):
    path = tmp_path / "soak.json"
    rc = soak.main(["--iters", "20", "--hidden", "128", "--intermediate", "128", "--experts", "4",
                    "--max-tokens", "16", "--check-every", "5", "--device", "cpu", "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    s = json.loads(path.read_text())
    assert s["ok"] and s["iters"] == 20
    assert s["nonfinite_elements"] == 0
    assert s["fixed_checks"] == 4 and s["fixed_mismatches"] == 0
    assert s["pairs"] >= 20 * 2
    assert out.count("[soak] ") >= 10  # progress about every 10%, then the verdict
    assert "OK: 20 iterations" in out


def test_nan_output_is_reported():
    def poison(i, layer):
        if i == 6:
            layer.w2_scale.fill_(float("nan"))

    s = soak.run(iters=10, check_every=4, on_iter=poison, **SMALL)
    assert not s["ok"]
    assert s["nonfinite_elements"] > 0 and s["first_nonfinite_by_iter"] is not None


def test_fixed_input_drift_is_reported():
    def drift(i, layer):
        if i == 5:
            layer.w2_scale.mul_(2.0)  # finite, but every output doubles

    s = soak.run(iters=8, check_every=4, on_iter=drift, **SMALL)
    assert s["nonfinite_elements"] == 0
    assert s["fixed_checks"] == 2 and s["fixed_mismatches"] == 1
    assert s["first_mismatch"]["iter"] == 7
    assert not s["ok"]


def test_memory_growth_is_reported():
    kept = []

    def leak(i, layer):
        if i >= 4:
            kept.append(torch.empty(16))

    s = soak.run(iters=8, check_every=0, warmup=3, on_iter=leak, mem_fn=lambda: 64 * len(kept), **SMALL)
    assert s["memory_checked"] and s["memory_baseline_bytes"] == 0
    assert s["memory_growth_bytes"] == 64 * 4 and s["memory_growth_first_iter"] == 4
    assert not s["ok"]


@pytest.mark.gpu
def test_cuda_short_soak_has_no_growth():
    s = soak.run(iters=300, hidden=1024, intermediate=512, experts=16, max_tokens=512, device="cuda", quiet=True)
    assert s["ok"], s
