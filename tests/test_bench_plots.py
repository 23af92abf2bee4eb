"""bench/plots.py: a PNG for every family's result JSON in bench/results, the plotted numbers against the JSON
(ours, the baselines rescaled to the same work, the rooflines), and ``moe-kernels bench`` writing the PNG."""
import glob
import importlib.util
import json
import math
import os
import shutil
import struct
import textwrap

import pytest

pytest.importorskip("matplotlib")

from moe_kernels import cli, plan  # noqa: E402

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
RESULTS = os.path.join(BENCH, "results")
_spec = importlib.util.spec_from_file_location("bench_plots", os.path.join(BENCH, "plots.py"))
plots = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plots)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REAL = sorted(f for f in glob.glob(os.path.join(RESULTS, "*.json")) if plots.family(f))


def env(device):
    return {"device": device, "date": "2026-12-01T10:00:00+00:00", "command": "python bench/x.py"}


def write(d, name, payload):
    path = os.path.join(d, name)
    with open(path, "w") as f:
        json.dump(payload, f)
    return path


def draw(path):
    import matplotlib.pyplot as plt

    fig = plots.figure(path)
    return fig, plt


def axis(fig, title):
    [ax] = [a for a in fig.axes if a.get_title() == title]
    return ax


def line(ax, gid):
    [ln] = [ln for ln in ax.get_lines() if ln.get_gid() == gid]
    return list(ln.get_xdata()), list(ln.get_ydata())


def roofs(ax):
    return sorted(float(ln.get_ydata()[0]) for ln in ax.get_lines() if ln.get_gid() == "roofline")


def bars(ax, label):
    [c] = [c for c in ax.containers if c.get_label() == label]
    return [b.get_height() for b in c]


def same(a, b):
    return len(a) == len(b) and all((math.isnan(x) and math.isnan(y)) or x == pytest.approx(y) for x, y in zip(a, b))


# ---- the measured results ------------------------------------------------------------------------------------------
def test_every_family_with_a_result_is_covered():
    assert {plots.family(f) for f in REAL} >= {"routing", "grouped_gemm", "mla", "moe_layer", "placement"}


@pytest.mark.parametrize("src", REAL, ids=os.path.basename)
def test_real_result_gives_a_png(src, tmp_path):
    path = shutil.copy(src, tmp_path)
    out = plots.plot_result(path)
    assert out == str(tmp_path / os.path.basename(src).replace(".json", ".png"))
    with open(out, "rb") as f:
        head = f.read(24)
    assert head[:8] == PNG_MAGIC and head[12:16] == b"IHDR"
    width, height = struct.unpack(">II", head[16:24])
    assert width >= 800 and height >= 300, (width, height)
    assert os.path.getsize(out) > 30_000


def test_family_from_the_file_name():
    assert plots.family("a/routing-cudagraph-NVIDIA_H200.json") == "routing"
    assert plots.family("placement-repeats3-cpu_x86_64.json") == "placement"
    assert plots.family("all_to_all-NVIDIA_H100_80GB_HBM3.json") == "all_to_all"
    for other in ("grouped_gemm_probe-NVIDIA_H200.json", "routing_sweep-hwcvt-NVIDIA_H200.json",
                  "grouped_gemm_tune_fp8-NVIDIA_H200.json", "mla-NVIDIA_H200.png", "soak-NVIDIA_H200.json"):
        assert plots.family(other) is None, other


def test_other_files_get_no_plot(tmp_path, capsys):
    assert plots.plot_result(write(tmp_path, "soak-X.json", {"ok": True})) is None
    assert "no plot" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.png"))


def test_without_matplotlib_a_note_and_none(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(plots, "_pyplot", lambda: None)
    assert plots.mla(write(tmp_path, "mla-X.json", {})) is None
    assert "matplotlib not installed" in capsys.readouterr().out


# ---- the plotted numbers, from small synthetic results ------------------------------------------------------------
def routing_result(d):
    rows = []
    for s, f in (("softmax", 1.0), ("deepseek", 10.0)):
        for k in (2, 8):
            for T in (4096, 512):  # out of order on purpose
                rows.append(dict(scoring=s, k=k, T=T, permute_gbps=f * (1000 + T / 8 + k), permute_us=50.0 + k,
                                 permute_torch_us=120.0 + T / 100, permute_fp8_gbps=f * (900 + k),
                                 permute_fp8_us=40.0, unpermute_gbps=f * (1500 + k), unpermute_us=30.0 + k,
                                 unpermute_torch_us=300.0 + T / 50, route_permute_us=f * (100 + T / 64),
                                 composition_us=f * (250 + T / 32)))
    return write(d, "routing-Test.json", {"environment": env("NVIDIA Test GPU"), "shape": {"H": 7168, "E": 256},
                                          "timing": "cudagraph", "copy": {"gbps": 3210.0, "bytes": 1, "ms": 1.0},
                                          "rows": rows}), rows


def test_routing_lines_baselines_and_copy_roofline(tmp_path):
    path, rows = routing_result(tmp_path)
    fig, plt = draw(path)
    try:
        for k in (2, 8):
            soft = sorted((r for r in rows if r["scoring"] == "softmax" and r["k"] == k), key=lambda r: r["T"])
            ax = axis(fig, f"permute / unpermute, top-{k}")
            assert line(ax, "permute") == ([512, 4096], [r["permute_gbps"] for r in soft])
            assert line(ax, "permute_fp8")[1] == [r["permute_fp8_gbps"] for r in soft]
            for ours, base in (("permute", "permute_torch"), ("unpermute", "unpermute_torch")):
                nbytes = [r[f"{ours}_gbps"] * 1e3 * r[f"{ours}_us"] for r in soft]  # GB/s * µs * 1e3 = bytes
                want = [b / r[f"{base}_us"] / 1e3 for b, r in zip(nbytes, soft)]
                assert same(line(ax, base)[1], want)
            assert roofs(ax) == [3210.0]
            ax = axis(fig, f"route + permute time, top-{k}")
            deep = sorted((r for r in rows if r["scoring"] == "deepseek" and r["k"] == k), key=lambda r: r["T"])
            assert line(ax, "composition deepseek")[1] == [r["composition_us"] for r in deep]
            assert line(ax, "route_permute softmax")[1] == [r["route_permute_us"] for r in soft]
    finally:
        plt.close(fig)


def grouped_gemm_result(d, device):
    keys = ("ours_tflops", "scaled_grouped_mm_tflops", "scaled_grouped_mm_fast_tflops", "ours_bf16_tflops",
            "grouped_mm_bf16_tflops")
    rows = [dict(case=f"{proj} {c}", proj=proj, G=G, M=M, **{key: 100.0 * i + M / 1000 + (proj == "down")
                                                             for i, key in enumerate(keys)})
            for proj in ("gate_up", "down")
            for c, G, M in (("G=8 m=4096", 8, 32768), ("G=8 m=512", 8, 4096), ("G=32 m=256", 32, 8192),
                            ("zipf32 m=skewed", 32, 8192))]
    for r in rows:
        if "zipf" in r["case"]:
            r["ours_tflops"] = 7.0
    mlp = [dict(case=c, G=G, M=M, mlp_ours_tflops=M / 10, mlp_composition_tflops=M / 20)
           for c, G, M in (("G=8 m=512", 8, 4096), ("G=8 m=4096", 8, 32768), ("zipf32 m=skewed", 32, 8192))]
    return write(d, "grouped_gemm-Test.json", {"environment": env(device), "summary": {}, "rows": rows,
                                               "mlp_rows": mlp, "sass": {}}), rows


def test_grouped_gemm_lines_zipf_apart_and_spec_peaks(tmp_path):
    path, rows = grouped_gemm_result(tmp_path, "NVIDIA H200")
    fig, plt = draw(path)
    try:
        ax = axis(fig, "gate_up, FP8")
        g8 = sorted((r for r in rows if r["proj"] == "gate_up" and r["G"] == 8), key=lambda r: r["M"])
        assert line(ax, "ours_tflops G=8") == ([4096, 32768], [r["ours_tflops"] for r in g8])
        assert line(ax, "ours_tflops zipf") == ([8192], [7.0])
        g32 = [r for r in rows if r["proj"] == "gate_up" and r["case"].endswith("G=32 m=256")]
        assert line(ax, "ours_tflops G=32") == ([8192], [g32[0]["ours_tflops"]])
        assert line(ax, "scaled_grouped_mm_fast_tflops G=8")[1] == [r["scaled_grouped_mm_fast_tflops"] for r in g8]
        assert roofs(ax) == [1979.0]
        ax = axis(fig, "down, bf16")
        d8 = sorted((r for r in rows if r["proj"] == "down" and r["G"] == 8), key=lambda r: r["M"])
        assert line(ax, "grouped_mm_bf16_tflops G=8")[1] == [r["grouped_mm_bf16_tflops"] for r in d8]
        assert roofs(ax) == [989.0]
        ax = axis(fig, "fused expert MLP (gate_up, SwiGLU, down), FP8")
        assert line(ax, "mlp_composition_tflops G=8") == ([4096, 32768], [204.8, 1638.4])
        assert line(ax, "mlp_ours_tflops zipf") == ([8192], [819.2])
    finally:
        plt.close(fig)
    path, _ = grouped_gemm_result(tmp_path, "NVIDIA Test GPU")  # no spec for this device: no roofline
    fig, plt = draw(path)
    try:
        assert all(roofs(ax) == [] for ax in fig.axes)
    finally:
        plt.close(fig)


def test_mla_decode_copy_roofline_and_baselines(tmp_path):
    rows = [dict(op="decode", B=B, S=S, GBps=S / 4 + B, ours_us=100.0 + S / 100, torch_us=150.0 + S / 20)
            for B in (128, 32) for S in (4096, 1024)]
    rows.append(dict(op="decode_paged", B=128, S=4096, GBps=900.0, ours_us=600.0, torch_us=1000.0))
    rows += [dict(op="down_proj", dtype=dt, T=T, TFLOPS=T / 20 + (dt == "fp8") * 50, ours_us=T / 10,
                  baseline_us=T / 10 * (3 if dt == "fp8" else 1.25)) for dt in ("bf16", "fp8") for T in (8192, 1024)]
    path = write(tmp_path, "mla-Test.json", {"environment": env("NVIDIA H100 80GB HBM3"),
                                             "summary": {"copy_GBps": 2500.5}, "rows": rows})
    fig, plt = draw(path)
    try:
        ax = axis(fig, "absorbed decode (+ W_UV), 128 heads")
        assert roofs(ax) == [2500.5]
        b32 = sorted((r for r in rows if r["op"] == "decode" and r["B"] == 32), key=lambda r: r["S"])
        assert line(ax, "decode B=32") == ([1024, 4096], [r["GBps"] for r in b32])
        assert same(line(ax, "torch B=32")[1], [r["GBps"] * r["ours_us"] / r["torch_us"] for r in b32])
        assert line(ax, "torch paged B=128") == ([4096], [540.0])
        ax = axis(fig, "latent down-projection (+ RMSNorm, RoPE)")
        fp8 = sorted((r for r in rows if r.get("dtype") == "fp8"), key=lambda r: r["T"])
        assert line(ax, "down_proj fp8") == ([1024, 8192], [r["TFLOPS"] for r in fp8])
        assert same(line(ax, "baseline fp8")[1], [r["TFLOPS"] / 3 for r in fp8])
        assert roofs(ax) == [989.0, 1979.0]
    finally:
        plt.close(fig)


def test_mla_decode_graph_flashmla_and_fp8_lines(tmp_path):
    """A run with CUDA-graph timings, FlashMLA and the FP8 cache: each line is ours' rate rescaled by its time."""
    rows = [dict(op="decode", B=32, S=S, GBps=1000.0, ours_us=200.0, ours_graph_us=100.0, flashmla_us=90.0,
                 flashmla_graph_us=80.0, torch_us=400.0) for S in (1024, 4096)]
    rows += [dict(op="decode_fp8", B=32, S=S, GBps=600.0, ours_us=250.0, ours_graph_us=125.0, torch_us=400.0)
             for S in (1024, 4096)]
    path = write(tmp_path, "mla-Test.json", {"environment": env("NVIDIA H100 80GB HBM3"),
                                             "summary": {"copy_GBps": 3000.0}, "rows": rows})
    fig, plt = draw(path)
    try:
        ax = axis(fig, "absorbed decode (+ W_UV), 128 heads")
        assert line(ax, "decode B=32") == ([1024, 4096], [1000.0, 1000.0])
        assert same(line(ax, "graph B=32")[1], [2000.0, 2000.0])
        assert same(line(ax, "flashmla B=32")[1], [2500.0, 2500.0])  # the graph time where both exist
        assert same(line(ax, "fp8 B=32")[1], [1600.0, 1600.0])  # the bf16 work over the FP8 graph time
    finally:
        plt.close(fig)


def test_moe_layer_panels_and_the_matching_peak(tmp_path):
    rows = [dict(case=c, precision=p, T=T, ours_tflops=T / 20 + (p == "fp8") * 100, composition_tflops=T / 40,
                 naive_tflops=T / 80) for c in ("mixtral-like", "deepseek") for p in ("fp8", "bf16")
            for T in (16384, 4096)]
    path = write(tmp_path, "moe_layer-Test.json", {"environment": env("NVIDIA H200"), "summary": {}, "rows": rows})
    fig, plt = draw(path)
    try:
        assert len(fig.axes) == 4
        for prec, peak in (("fp8", 1979.0), ("bf16", 989.0)):
            ax = axis(fig, f"deepseek, {prec}")
            assert roofs(ax) == [peak]
            assert line(ax, "ours_tflops") == ([4096, 16384], [204.8 + (prec == "fp8") * 100,
                                                               819.2 + (prec == "fp8") * 100])
            assert line(ax, "naive_tflops")[1] == [51.2, 204.8]
    finally:
        plt.close(fig)


def test_training_is_plotted_as_the_layer(tmp_path):
    rows = [dict(case="mixtral-like", precision="bf16", T=T, ours_tflops=T / 10, composition_tflops=T / 20,
                 naive_tflops=T / 40) for T in (8192, 4096)]
    path = write(tmp_path, "training-Test.json", {"environment": env("NVIDIA H200"), "summary": {}, "rows": rows})
    assert plots.family(path) == "training"
    fig, plt = draw(path)
    try:
        ax = axis(fig, "mixtral-like, bf16")
        assert roofs(ax) == [989.0]
        assert line(ax, "ours_tflops") == ([4096, 8192], [409.6, 819.2])
        assert line(ax, "composition_tflops")[1] == [204.8, 409.6]
    finally:
        plt.close(fig)


def test_placement_bars_per_case(tmp_path):
    rows = []
    for i, (load, k, G) in enumerate((("zipf-0.8", 2, 16), ("clustered", 8, 256))):
        r = dict(load=load, k=k, G=G, repeat=0)
        for j, p in enumerate(("round_robin", "greedy", "eplb_h", "eplb_g", "ours")):
            r[f"fresh_{p}_gpu"] = None if (p == "eplb_h" and G == 256) else 1.0 + j + i / 10
            r[f"fresh_{p}_link_us"] = None if (p == "eplb_h" and G == 256) else 500.0 + 10 * j + i
        rows.append(r)
    path = write(tmp_path, "placement-cpu.json", {"environment": env("cpu-x86_64"), "summary": {}, "rows": rows,
                                                  "repeats": 1, "tokens_per_sample": 1024})
    fig, plt = draw(path)
    try:
        gpu, link = fig.axes[:2]
        assert same(bars(gpu, f"{plots.OURS} place_experts"), [5.0, 5.1])
        assert same(bars(gpu, "EPLB hierarchical"), [3.0, float("nan")])
        assert same(bars(link, "round-robin"), [500.0, 501.0])
        assert same(bars(link, "EPLB global"), [530.0, 531.0])
        assert roofs(gpu) == [1.0]
        assert [t.get_text() for t in link.get_xticklabels()] == ["zipf-0.8 k=2 G=16", "clustered k=8 G=256"]
    finally:
        plt.close(fig)


def all_to_all_rows():
    """Rows as bench/bench_all_to_all.py writes them: per (k, dtype), ours per backend and partials dtype, naive."""
    rows = []
    for k in (2, 8):
        for dtype in ("bf16", "fp8"):
            for n, impl in enumerate(("ours-nccl", "ours-p2p")):
                for m, partials in enumerate(("float32", "bfloat16")):
                    rows.append(dict(impl=impl, k=k, dtype=dtype, partials=partials, dispatch_ms=1.0, combine_ms=1.0,
                                     dispatch_MB=1.0, combine_MB=1.0, dispatch_GBps=100.0 * (n + 1) + k + m,
                                     combine_GBps=50.0 * (n + 1) + k + 10 * m))
            rows.append(dict(impl="naive", k=k, dtype=dtype, partials="bf16 rows", dispatch_ms=2.0, combine_ms=2.0,
                             dispatch_MB=2.0, combine_MB=2.0, dispatch_GBps=20.0 + k, combine_GBps=10.0 + k))
    return rows


def test_all_to_all_bars_and_nvlink_spec(tmp_path):
    rows = all_to_all_rows()
    cfg = dict(tokens_per_rank=4096, hidden=7168, intermediate=2048, experts=256, topk=[2, 8], world_size=2,
               backend_group="nccl", smoke=False, p2p=True)
    path = write(tmp_path, "all_to_all-Test.json", {"environment": env("NVIDIA H200"), "config": cfg, "rows": rows,
                                                    "overlap": []})
    fig, plt = draw(path)
    try:
        dispatch, combine = axis(fig, "dispatch"), axis(fig, "combine")
        assert bars(dispatch, "ours-p2p") == [202.0, 202.0, 208.0, 208.0]  # the first row of each (impl, k, dtype)
        assert bars(dispatch, "naive") == [22.0, 22.0, 28.0, 28.0]
        assert bars(combine, "ours-nccl, partials bfloat16") == [62.0, 62.0, 68.0, 68.0]
        assert roofs(dispatch) == roofs(combine) == [450.0]
        assert [t.get_text() for t in dispatch.get_xticklabels()][:2] == ["top-2, bf16 rows", "top-2, fp8 rows"]
    finally:
        plt.close(fig)
    assert plots.all_to_all(path) == path.replace(".json", ".png")


def test_cli_writes_and_prints_paths(tmp_path, capsys):
    path, _ = routing_result(tmp_path)
    assert plots.main([path]) == 0
    assert capsys.readouterr().out.strip() == path.replace(".json", ".png")
    bad = write(tmp_path, "mla-Broken.json", {"rows": []})  # no summary.copy_GBps
    assert plots.main([bad, path]) == 1
    out = capsys.readouterr()
    assert "mla-Broken.json" in out.err and path.replace(".json", ".png") in out.out


# ---- moe-kernels bench ---------------------------------------------------------------------------------------------
def test_moe_kernels_bench_writes_the_png(tmp_path, monkeypatch, capsys):
    bench = tmp_path / "bench"
    (bench / "results").mkdir(parents=True)
    shutil.copy(os.path.join(BENCH, "plots.py"), bench)
    src, _ = routing_result(tmp_path)
    (bench / "bench_fake.py").write_text(textwrap.dedent(f"""
        import os, shutil
        results = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
        shutil.copy({src!r}, os.path.join(results, "routing-fake.json"))
        with open(os.path.join(results, "mla-fake.json"), "w") as f:
            f.write('{{"rows": []}}')  # a result the plot cannot read: reported, not fatal
    """))
    monkeypatch.setattr(plan, "bench_dir", lambda: str(bench))
    assert cli.main(["bench", "fake"]) == 0
    out = capsys.readouterr().out
    png = bench / "results" / "routing-fake.png"
    assert f"PNG written: {png}" in out and png.read_bytes()[:8] == PNG_MAGIC
    assert f"no plot for {bench / 'results' / 'mla-fake.json'}: KeyError" in out
