"""The deployment planner (moe_kernels.plan) and its commands (moe-kernels plan / bench): fast, CPU only."""
import json
import os
import textwrap

import pytest

from moe_kernels import cli, plan
from moe_kernels.plan import Deployment, load_rates, predict

GPU = "NVIDIA Test GPU 80GB"
ENV = {"device": GPU, "torch": "x", "triton": "x", "cuda": "x", "python": "x", "date": "2026-12-01T10:00:00+00:00",
       "command": "python bench/x.py", "triton_interpret": False}


def write(d, name, payload):
    path = os.path.join(d, name)
    with open(path, "w") as f:
        json.dump(payload, f)
    return path


def synthetic_results(d, env=ENV, slug="NVIDIA_Test_GPU_80GB", tflops=500.0):
    """Result files with the structure bench/bench_{grouped_gemm,routing,mla}.py write (fields the planner reads,
    plus some it must ignore)."""
    rows = [dict(case=f"{proj} G={G} m={m}", proj=proj, G=G, M=G * m, N=4096, K=7168, ours_tflops=tflops + m / 100,
                 ours_bf16_tflops=tflops / 2, ms={"ours": [1.0, 1.0]}, config="128x128")
            for proj in ("gate_up", "down") for G, m in ((8, 256), (8, 4096))]
    rows.append(dict(case="gate_up zipf32 m=skewed", proj="gate_up", G=32, M=8192, ours_tflops=1.0))
    mlp = [dict(case=f"G=8 m={m}", G=8, M=8 * m, mlp_ours_tflops=tflops, ms={}) for m in (256, 4096)]
    write(d, f"grouped_gemm-{slug}.json", {"environment": env, "summary": {"max_ours_fp8_tflops": 1.0},
                                           "rows": rows, "mlp_rows": mlp, "sass": {}})
    rrows = [dict(scoring=s, k=k, T=T, route_us=1.0, route_gbps=100.0, permute_gbps=1000.0, permute_fp8_gbps=900.0,
                  unpermute_gbps=2000.0) for s in ("softmax", "deepseek") for k in (2, 8) for T in (512, 16384)]
    write(d, f"routing-{slug}.json", {"environment": env, "shape": {"H": 7168}, "copy": {"gbps": 2500.0},
                                      "rows": rrows, "sweep": []})
    mrows = [dict(op="down_proj", dtype=dt, T=T, ours_us=100.0, TFLOPS=300.0) for dt in ("fp8", "bf16")
             for T in (1024, 8192)] + [dict(op="decode", B=32, S=1024, ours_us=50.0, TFLOPS=100.0)]
    write(d, f"mla-{slug}.json", {"environment": env, "summary": {"copy_GBps": 2600.0}, "rows": mrows})


def rates_used(p):
    return {u["rate"]: u for u in p["rates_used"]}


# ---- the model -----------------------------------------------------------------------------------------------
def test_more_nvlink_bandwidth_never_slower():
    dep = dict(gpus=16, gpus_per_node=8, tokens_per_gpu=2048)
    steps = [predict(Deployment(**dep), load_rates("", nvlink_gbps=bw), place=False)["step_ms"]
             for bw in (100, 300, 900, 1800, 3600)]
    assert all(a >= b for a, b in zip(steps, steps[1:])), steps


@pytest.mark.parametrize("gpus,gpus_per_node", [(8, 8), (64, 8)])
def test_micro_batches_overlap_up_to_the_bound(gpus, gpus_per_node):
    rates = load_rates(None)  # the repository's results when present: the measured, non-monotone curves
    prev = 0.0
    for m in (1, 2, 4, 8, 16):
        L = predict(Deployment(gpus=gpus, gpus_per_node=gpus_per_node, micro_batches=m), rates,
                    place=False)["per_moe_layer_ms"]
        C, M = L["compute"], L["communication"]
        assert L["layer"] >= max(C, M) - 1e-9 and L["layer"] <= C + M + 1e-9
        assert L["overlap"] == pytest.approx(min(C, M) * (1 - 1 / m))
        assert L["overlap"] >= prev - 1e-9
        prev = L["overlap"]
    assert prev > 0


def test_one_gpu_has_no_communication():
    p = predict(Deployment(gpus=1, gpus_per_node=1, num_experts=32, top_k=2, micro_batches=4), load_rates(""))
    L = p["per_moe_layer_ms"]
    assert L["dispatch"] == L["combine"] == L["ep_copies"] == 0 and L["layer"] == pytest.approx(L["compute"])
    assert p["micro_batches_used"] == 1 and p["placement"] is None


def test_experts_at_most_gpus_each_token_reaches_k_gpus():
    prev = 0.0
    for k in (1, 2, 4, 8):
        p = predict(Deployment(gpus=128, gpus_per_node=8, num_experts=64, top_k=k), load_rates(""), place=False)
        assert p["distinct_gpus_per_token"] == k
        d = p["destinations_per_token"]
        assert d["own"] + d["nvlink"] + d["infiniband"] == pytest.approx(k)
        assert p["per_moe_layer_ms"]["dispatch"] >= prev
        prev = p["per_moe_layer_ms"]["dispatch"]
    # E > G: two of a token's experts may share a GPU, so fewer than k destinations
    assert predict(Deployment(gpus=16, num_experts=256, top_k=8), place=False)["distinct_gpus_per_token"] < 8


def test_placement_used_when_available():
    import moe_kernels.dist

    if not hasattr(moe_kernels.dist, "place_experts"):
        pytest.skip("moe_kernels.dist.place_experts not there")
    p = predict(Deployment(gpus=16, gpus_per_node=8, tokens_per_gpu=1024), load_rates(""))
    assert p["placement"]["source"].startswith("moe_kernels.dist.place_experts")
    assert p["load_imbalance"]["value"] == pytest.approx(p["placement"]["max_over_mean_gpu_load"])
    assert "place_experts" in plan.format_prediction(p)
    # a skewed expected load makes the busiest GPU busier than the mean, and the prediction slower
    skew = predict(Deployment(gpus=16, gpus_per_node=8, tokens_per_gpu=1024,
                              expert_load=tuple(1.0 / (i + 1) for i in range(256))), load_rates(""))
    assert skew["load_imbalance"]["value"] > 1.0 and skew["step_ms"] > p["step_ms"]


@pytest.mark.parametrize("kwargs,match", [
    (dict(gpus=12, gpus_per_node=8), "multiple of gpus_per_node"),
    (dict(num_experts=4, top_k=8), "top_k"),
    (dict(gpus=16, num_experts=24), "multiple of gpus"),
    (dict(precision="fp16"), "precision"),
    (dict(micro_batches=0), "micro_batches"),
    (dict(dense_layers=62), "dense_layers"),
    (dict(load_imbalance=0.5), "load_imbalance"),
    (dict(expert_load=(1.0, 2.0)), "expert_load"),
])
def test_bad_deployments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        predict(Deployment(**kwargs), load_rates(""), place=False)


# ---- rates ---------------------------------------------------------------------------------------------------
def test_defaults_when_the_results_dir_is_empty(tmp_path):
    r = load_rates(str(tmp_path))
    assert not r.curves and any("default" in n for n in r.notes)
    p = predict(Deployment(gpus=16), r, place=False)
    for u in p["rates_used"]:
        assert u["source"].startswith(("default", "assumed")), u
    assert rates_used(p)["NVLink GB/s (each way)"]["value"] == 450.0
    assert rates_used(p)["InfiniBand GB/s per GPU (each way)"]["value"] == 50.0
    assert rates_used(p)["fp8 dense peak"]["value"] == 400.0
    assert p["memory_gb"]["capacity"] == 64.0


def test_measured_rates_are_used_and_named(tmp_path):
    synthetic_results(str(tmp_path))
    r = load_rates(str(tmp_path))
    assert r.device == GPU and set(r.files) == {"grouped_gemm", "routing", "mla"}
    p = predict(Deployment(gpus=1, gpus_per_node=1, num_experts=32, top_k=2, tokens_per_gpu=4096,
                           n_shared_experts=0), r)
    used = rates_used(p)
    mlp = used["expert MLP fp8 at 256 rows/expert"]
    assert mlp["value"] == pytest.approx(500.0)
    assert "grouped_gemm-NVIDIA_Test_GPU_80GB.json" in mlp["source"] and "mlp_ours_tflops" in mlp["source"]
    route = used["route GB/s at T=4096, k=2"]
    assert route["value"] == pytest.approx(100.0) and "route_gbps" in route["source"]
    assert "routing-NVIDIA_Test_GPU_80GB.json" in route["source"]
    assert used["unpermute GB/s at T=4096, k=2"]["value"] == pytest.approx(2000.0)
    assert "mla-NVIDIA_Test_GPU_80GB.json" in used["MLA down-projection fp8 at T=4096"]["source"]
    # the skewed row is not part of the uniform curve; the interpolation lies between the measured points
    assert all(y > 100 for _, y, _ in r.curves["gate_up_fp8"].points)
    y, src = r.curves["gate_up_fp8"].at(1024)
    assert 502.56 < y < 540.96 and "interpolated" in src
    # the experts' time is the FLOPs at that rate, with the row tiles' padding (256 rows per expert on average)
    pad = (2 * plan.tile_padding(256, 128) + plan.tile_padding(256, 64)) / 3
    ms = 4096 * 2 * 6 * 7168 * 2048 * pad / 500e12 * 1e3
    assert p["per_moe_layer_ms"]["experts"] == pytest.approx(ms)
    # an unknown device: MFU against the default peak, said in the notes
    assert any("no datasheet peak" in n for n in p["notes"])


def test_bf16_combines_gate_up_and_down(tmp_path):
    synthetic_results(str(tmp_path))
    used = rates_used(predict(Deployment(gpus=1, gpus_per_node=1, num_experts=32, top_k=2, precision="bf16",
                                         n_shared_experts=0), load_rates(str(tmp_path))))
    u = used["expert MLP bf16 at 256 rows/expert"]
    assert u["value"] == pytest.approx(250.0) and "ours_bf16_tflops" in u["source"]


def test_device_choice_and_cpu_runs_skipped(tmp_path):
    synthetic_results(str(tmp_path))
    newer = dict(ENV, device="NVIDIA H200", date="2026-12-05T00:00:00+00:00")
    synthetic_results(str(tmp_path), env=newer, slug="NVIDIA_H200", tflops=700.0)
    cpu = dict(ENV, device="cpu-x86_64", triton_interpret=True)
    write(str(tmp_path), "routing-cpu_x86_64.json", {"environment": cpu, "rows": [], "copy": {"gbps": 1.0}})
    write(str(tmp_path), "mla-broken.json", {})
    with open(tmp_path / "routing-garbage.json", "w") as f:
        f.write("{not json")
    newest = load_rates(str(tmp_path))
    assert newest.device == "NVIDIA H200" and newest.peak_tflops_fp8 == 1979.0  # datasheet peak
    assert any("cpu-x86_64" in n and "skipped" in n for n in newest.notes)
    assert any("unreadable" in n for n in newest.notes)
    picked = load_rates(str(tmp_path), device="Test GPU")
    assert picked.device == GPU and picked.curves["mlp_fp8"].points[0][1] == 500.0
    none = load_rates(str(tmp_path), device="B200")
    assert not none.files and any("no result for device 'B200'" in n for n in none.notes)


def test_tile_padding():
    """Rows computed per real row when each expert's last tile is computed whole (Poisson group sizes)."""
    assert plan.tile_padding(0, 128) == 1.0
    assert plan.tile_padding(0.01, 128) == pytest.approx(128, rel=1e-2)  # almost always one row in a whole tile
    big = [plan.tile_padding(m, 128) for m in (128, 512, 4096, 65536)]
    assert all(a > b > 1.0 for a, b in zip(big, big[1:])) and big[-1] < 1.002
    assert plan.tile_padding(512, 64) < plan.tile_padding(512, 128)
    # a Monte-Carlo estimate of the same expectation
    import numpy as np
    n = np.random.default_rng(0).poisson(300.0, 200000)
    mc = float((np.ceil(n / 128) * 128).mean() / 300.0)
    assert plan.tile_padding(300.0, 128) == pytest.approx(mc, rel=2e-3)


# ---- measured vs predicted -----------------------------------------------------------------------------------
def test_validate_single_gpu_and_no_multi_gpu(tmp_path):
    synthetic_results(str(tmp_path))
    rows = [dict(case="deepseek", experts=256, top_k=8, precision="fp8", T=8192, ours_ms=10.0),
            dict(case="mixtral-like", experts=32, top_k=2, precision="bf16", T=4096, ours_ms=2.0,
                 ours_graph_ms=1.5),  # graph replays, when measured, are what the model is compared with
            dict(case="broken", experts=32, precision="fp8", T=4096),
            "not a row"]
    write(str(tmp_path), "moe_layer-NVIDIA_Test_GPU_80GB.json", {"environment": ENV, "rows": rows, "summary": {}})
    v = plan.validate(str(tmp_path))
    s = v["single_gpu"]
    assert len(s["cases"]) == 2 and len(s["skipped"]) == 2
    for c in s["cases"]:
        assert c["error"] == pytest.approx((c["predicted_ms"] - c["measured_ms"]) / c["measured_ms"])
        assert c["predicted_ms"] == pytest.approx(sum(c["parts_ms"].values()))
    assert "top_k" in " ".join(s["skipped"])
    assert [(c["measured_ms"], c["timing"]) for c in s["cases"]] == [(10.0, "eager"), (1.5, "graph")]
    assert v["multi_gpu"]["status"] == plan.NO_MULTI_GPU and not v["multi_gpu"]["cases"]
    text = plan.format_validation(v)
    assert plan.NO_MULTI_GPU in text and "deepseek" in text and "skipped 2 rows" in text


def test_validate_with_multi_gpu_runs(tmp_path):
    synthetic_results(str(tmp_path))
    rows = [dict(impl=impl, k=8, dtype="fp8", partials=part, dispatch_ms=1.0, combine_ms=2.0)
            for impl, part in (("ours-nccl", "float32"), ("ours-p2p", "bfloat16"), ("naive", "bf16 rows"))]
    overlap = [dict(impl="ours-p2p", precision="fp8", k=8, layer_ms=5.0, compute_ms=4.0, comm_ms=2.0)]
    cfg = dict(tokens_per_rank=4096, hidden=7168, intermediate=2048, experts=256, topk=[8], world_size=2, smoke=False)
    write(str(tmp_path), "all_to_all-NVIDIA_Test_GPU_80GB.json",
          {"environment": ENV, "config": cfg, "rows": rows, "overlap": overlap})
    write(str(tmp_path), "all_to_all-smoke.json", {"environment": ENV, "config": dict(cfg, smoke=True), "rows": rows})
    mg = plan.validate(str(tmp_path))["multi_gpu"]
    assert mg["status"] == "measured" and len(mg["cases"]) == 5  # 2 impls x (dispatch, combine) + overlap
    over = [c for c in mg["cases"] if "overlap" in c["what"]][0]
    assert over["predicted_ms"] == pytest.approx(5.0) and over["error"] == pytest.approx(0.0)
    fp32, bf16 = (c["predicted_ms"] for c in mg["cases"] if "combine" in c["what"])
    assert fp32 > bf16  # fp32 partial sums move twice the bytes
    assert any("naive" in x for x in mg["skipped"]) and any("smoke" in x for x in mg["skipped"])


# ---- the commands --------------------------------------------------------------------------------------------
def test_cli_plan_table(capsys):
    assert cli.main(["plan", "--gpus", "16", "--tokens-per-gpu", "2048"]) == 0
    out = capsys.readouterr().out
    for word in ("dispatch", "combine", "routed experts", "MLA", "overlap", "tokens/s", "MFU", "rates used"):
        assert word in out


def test_cli_plan_json(capsys, tmp_path):
    synthetic_results(str(tmp_path))
    assert cli.main(["plan", "--json", "--results", str(tmp_path), "--gpus", "16", "--precision", "bf16",
                     "--nvlink-gbps", "1800", "--ib-gbps", "800", "--micro-batches", "4"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["deployment"]["precision"] == "bf16" and p["micro_batches_used"] == 4
    used = rates_used(p)
    nvl = used["NVLink GB/s (each way)"]
    assert nvl["value"] == 900.0 and nvl["source"].startswith("given")
    assert used["InfiniBand GB/s per GPU (each way)"]["value"] == 100.0
    assert any("grouped_gemm-NVIDIA_Test_GPU_80GB.json" in u["source"] for u in p["rates_used"])
    assert p["tokens_per_s"] > 0 and 0 < p["mfu"] < 1


def test_cli_plan_bad_deployment(capsys):
    assert cli.main(["plan", "--gpus", "12", "--gpus-per-node", "8"]) == 2
    assert "multiple of gpus_per_node" in capsys.readouterr().err
    assert cli.main(["plan", "--experts", "4", "--top-k", "8"]) == 2


def test_cli_plan_validate(capsys, tmp_path):
    assert cli.main(["plan", "--validate", "--results", str(tmp_path)]) == 0
    assert plan.NO_MULTI_GPU in capsys.readouterr().out
    assert cli.main(["plan", "--validate", "--json", "--results", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["multi_gpu"]["status"] == plan.NO_MULTI_GPU


def test_cli_bench_runs_the_script(capsys, tmp_path, monkeypatch):
    bench = tmp_path / "bench"
    (bench / "results").mkdir(parents=True)
    (bench / "bench_fake.py").write_text(textwrap.dedent("""
        import json, os, sys
        out = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else os.path.join(
            os.path.dirname(os.path.abspath(__file__)), "results")
        with open(os.path.join(out, "fake-x.json"), "w") as f:
            json.dump({"argv": sys.argv[1:]}, f)
    """))
    monkeypatch.setattr(plan, "bench_dir", lambda: str(bench))
    assert cli.main(["bench"]) == 0
    assert "fake" in capsys.readouterr().out
    assert cli.main(["bench", "fake", "--quick", "--tokens", "8"]) == 0
    assert "JSON written: " + str(bench / "results" / "fake-x.json") in capsys.readouterr().out
    assert json.load(open(bench / "results" / "fake-x.json"))["argv"] == ["--quick", "--tokens", "8"]
    other = tmp_path / "elsewhere"
    other.mkdir()
    assert cli.main(["bench", "fake", "--out", str(other)]) == 0
    assert str(other / "fake-x.json") in capsys.readouterr().out
    assert cli.main(["bench", "nothere"]) == 2


def test_cli_bench_without_the_scripts(capsys, monkeypatch):
    monkeypatch.setattr(plan, "bench_dir", lambda: None)
    assert cli.main(["bench", "routing"]) == 2
    assert "editable" in capsys.readouterr().err


def test_planner_works_without_place_experts(monkeypatch):
    import moe_kernels.dist

    monkeypatch.delattr(moe_kernels.dist, "place_experts", raising=False)
    p = predict(Deployment(gpus=16), load_rates(""))
    assert p["placement"] is None and p["load_imbalance"]["value"] == 1.0
    assert any("place_experts does not exist" in n for n in p["notes"])

    def broken(*a, **k):
        raise RuntimeError("mid-edit")

    monkeypatch.setattr(moe_kernels.dist, "place_experts", broken, raising=False)
    p = predict(Deployment(gpus=16), load_rates(""))
    assert p["placement"] is None and any("place_experts failed" in n for n in p["notes"])
