"""Grouped GEMM (FP8 block-scaled and bf16), the fused expert MLP and the masked decode layout vs the reference.

The reference is the dequantised fp32 product (moe_kernels.reference). Stated error bounds (relative Frobenius):
FP8 grouped GEMM <= 2e-2 (the kernel accumulates in fp32; the error is the bf16 rounding of the output, ~3e-3);
fused FP8 MLP <= 2e-2 (plus a few SwiGLU values landing on the other side of an e4m3 rounding boundary);
bf16 <= 1e-2. Outputs are poisoned with NaN before the launch wherever the API takes ``out=``, so rows that a
kernel forgets to write fail the test.
"""
import json
import warnings

import pytest
import torch

from _helpers import assert_close_rel, offsets_for as _offsets
from moe_kernels import reference as R
from moe_kernels.ops import grouped_gemm as gg
from moe_kernels.ops import grouped_gemm_configs as cfgs

FP8_TOL = 2e-2
BF16_TOL = 1e-2

# rows per expert: an empty expert, a single-row expert, sizes that are no multiple of any tile
COUNTS = {
    "mixed": [17, 0, 1, 33, 9],
    "one_expert": [45],
    "empty_then_one": [0, 0, 0, 23],
}


def _fp8_weights(E, N, K, device):
    w = torch.randn(E, N, K, device=device) / K**0.5
    return R.quantize_weight_fp8(w)


def _report(what, err):
    print(f"{what}: relative error {err:.2e}")


@pytest.mark.parametrize("name", list(COUNTS))
def test_grouped_gemm_fp8_matches_reference(device, name):
    counts = COUNTS[name]
    E, N, K = len(counts), 256, 256
    M = sum(counts)
    offsets = _offsets(counts, device)
    a, a_scale = R.quantize_fp8(torch.randn(M, K, device=device))
    w, w_scale = _fp8_weights(E, N, K, device)
    out = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device=device)
    got = gg.grouped_gemm_fp8(a, a_scale, w, w_scale, offsets, out=out)
    assert got is out
    ref = R.grouped_gemm_fp8(a, a_scale, w, w_scale, offsets, out_dtype=torch.float32)
    _report(f"grouped_gemm_fp8[{name}]", assert_close_rel(out.float(), ref, FP8_TOL, "grouped_gemm_fp8"))


@pytest.mark.parametrize("N", [384, 512])
@pytest.mark.parametrize("row_weight", [False, True])
def test_grouped_gemm_fp8_pair_n(device, N, row_weight):
    """PAIR_N programs (two adjacent column tiles): N = 384 leaves the last program's second tile past N."""
    counts = COUNTS["mixed"]
    E, K = len(counts), 256
    M = sum(counts)
    offsets = _offsets(counts, device)
    a, a_scale = R.quantize_fp8(torch.randn(M, K, device=device))
    w, w_scale = _fp8_weights(E, N, K, device)
    rw = torch.rand(M, device=device) if row_weight else None
    out = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device=device)
    cfg = dict(cfgs.get_config("fp8", N, K, 16, torch.device(device)), PAIR_N=1)
    gg._launch(a, a_scale, w, w_scale, out, offsets=offsets, row_weight=rw, cfg=cfg)
    ref = R.grouped_gemm_fp8(a, a_scale, w, w_scale, offsets, out_dtype=torch.float32)
    if row_weight:
        ref = ref * rw[:, None]
    _report(f"grouped_gemm_fp8 PAIR_N N={N}", assert_close_rel(out.float(), ref, FP8_TOL, "grouped_gemm_fp8 pair"))


@pytest.mark.parametrize("pair_n", [0, 1])
@pytest.mark.parametrize("swiglu", [False, True])
def test_grouped_gemm_fp8_column_major_scales(device, pair_n, swiglu):
    """Activation scales column-major ([M, K/128] with stride (1, M)): the kernel reads them by their strides."""
    counts = COUNTS["mixed"]
    E, N, K = len(counts), 384, 256
    M = sum(counts)
    offsets = _offsets(counts, device)
    a, a_scale = R.quantize_fp8(torch.randn(M, K, device=device))
    a_scale_mn = a_scale.t().contiguous().t()
    assert a_scale_mn.stride() == (1, M)
    w, w_scale = _fp8_weights(E, 2 * N if swiglu else N, K, device)
    out = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device=device)
    cfg = dict(cfgs.get_config("fp8", N, K, 16, torch.device(device)), PAIR_N=pair_n)
    gg._launch(a, a_scale_mn, w, w_scale, out, offsets=offsets, swiglu=swiglu, cfg=cfg)
    ref = R.grouped_gemm_fp8(a, a_scale, w, w_scale, offsets, out_dtype=torch.float32)
    if swiglu:
        ref = torch.nn.functional.silu(ref[:, :N]) * ref[:, N:]
    _report(f"grouped_gemm_fp8 column-major scales pair={pair_n} swiglu={swiglu}",
            assert_close_rel(out.float(), ref, FP8_TOL, "grouped_gemm_fp8 column-major scales"))


def test_grouped_gemm_fp8_unaligned_n_fp32_out(device):
    """N = 192: the last column tile and the last weight-scale block are partial; fp32 output, no out=."""
    counts = [5, 0, 20]
    E, N, K = 3, 192, 256
    offsets = _offsets(counts, device)
    a, a_scale = R.quantize_fp8(torch.randn(sum(counts), K, device=device))
    w, w_scale = _fp8_weights(E, N, K, device)
    got = gg.grouped_gemm_fp8(a, a_scale, w, w_scale, offsets, out_dtype=torch.float32)
    assert got.dtype == torch.float32 and got.shape == (sum(counts), N)
    ref = R.grouped_gemm_fp8(a, a_scale, w, w_scale, offsets, out_dtype=torch.float32)
    _report("grouped_gemm_fp8[N=192, fp32]", assert_close_rel(got, ref, 1e-3, "grouped_gemm_fp8 fp32 out"))


def test_grouped_gemm_fp8_no_rows(device):
    E, N, K = 3, 128, 128
    a, a_scale = R.quantize_fp8(torch.randn(0, K, device=device))
    w, w_scale = _fp8_weights(E, N, K, device)
    got = gg.grouped_gemm_fp8(a, a_scale, w, w_scale, torch.zeros(E + 1, dtype=torch.int32, device=device))
    assert got.shape == (0, N)


def test_grouped_gemm_bf16_matches_reference(device):
    counts = [17, 0, 1, 30]
    E, N, K = 4, 96, 200  # K no multiple of BLOCK_K: the masked K tail
    offsets = _offsets(counts, device)
    a = torch.randn(sum(counts), K, device=device).bfloat16()
    w = (torch.randn(E, N, K, device=device) / K**0.5).bfloat16()
    got = gg.grouped_gemm_bf16(a, w, offsets)
    assert got.dtype == torch.bfloat16
    ref = R.grouped_gemm(a.float(), w.float(), offsets)
    _report("grouped_gemm_bf16", assert_close_rel(got.float(), ref, BF16_TOL, "grouped_gemm_bf16"))


@pytest.mark.parametrize("routing_weight", [False, True], ids=["plain", "topk_weight"])
def test_expert_mlp_fp8_matches_reference(device, routing_weight):
    counts = [12, 0, 1, 26, 7]
    E, H, I = len(counts), 256, 128
    M = sum(counts)
    offsets = _offsets(counts, device)
    x, x_scale = R.quantize_fp8(torch.randn(M, H, device=device))
    w13, w13_scale = _fp8_weights(E, 2 * I, H, device)
    w2, w2_scale = _fp8_weights(E, H, I, device)
    tw = torch.rand(M, device=device) if routing_weight else None
    got = gg.expert_mlp(x, x_scale, offsets, w13, w13_scale, w2, w2_scale, topk_weight=tw)
    assert got.dtype == torch.bfloat16
    ref = R.expert_mlp(x, offsets, w13, w2, x_scale, w13_scale, w2_scale, out_dtype=torch.float32)
    if tw is not None:
        ref = ref * tw[:, None]
    _report(f"expert_mlp fp8 [{'topk_weight' if tw is not None else 'plain'}]",
            assert_close_rel(got.float(), ref, FP8_TOL, "expert_mlp fp8"))


def test_expert_mlp_bf16_matches_reference(device):
    counts = [9, 1, 0, 21]
    E, H, I = len(counts), 128, 96
    offsets = _offsets(counts, device)
    x = torch.randn(sum(counts), H, device=device).bfloat16()
    w13 = (torch.randn(E, 2 * I, H, device=device) / H**0.5).bfloat16()
    w2 = (torch.randn(E, H, I, device=device) / I**0.5).bfloat16()
    got = gg.expert_mlp(x, None, offsets, w13, None, w2, None)
    assert got.dtype == torch.bfloat16
    ref = R.expert_mlp(x, offsets, w13, w2, out_dtype=torch.float32)
    _report("expert_mlp bf16", assert_close_rel(got.float(), ref, BF16_TOL, "expert_mlp bf16"))


def _masked_problem(E, max_m, N, K, device):
    x = torch.randn(E * max_m, K, device=device)
    a, a_scale = R.quantize_fp8(x)
    w, w_scale = _fp8_weights(E, N, K, device)
    return a.view(E, max_m, K), a_scale.view(E, max_m, K // 128), w, w_scale


def _check_masked(out, a, a_scale, w, w_scale, masked_m, what):
    errs = []
    for e, m in enumerate(masked_m.tolist()):
        if m:
            one = torch.tensor([0, m], dtype=torch.int32, device=a.device)
            ref = R.grouped_gemm_fp8(a[e, :m], a_scale[e, :m], w[e : e + 1], w_scale[e : e + 1], one,
                                     out_dtype=torch.float32)
            errs.append(assert_close_rel(out[e, :m].float(), ref, FP8_TOL, f"{what} expert {e}"))
    return max(errs)


def test_grouped_gemm_fp8_masked(device):
    E, max_m, N, K = 3, 24, 128, 256
    a, a_scale, w, w_scale = _masked_problem(E, max_m, N, K, device)
    masked_m = torch.tensor([24, 0, 7], dtype=torch.int32, device=device)
    out = gg.grouped_gemm_fp8_masked(a, a_scale, w, w_scale, masked_m)
    assert out.shape == (E, max_m, N) and out.dtype == torch.bfloat16
    _report("grouped_gemm_fp8_masked", _check_masked(out, a, a_scale, w, w_scale, masked_m, "masked"))


@pytest.mark.gpu
def test_grouped_gemm_fp8_masked_cuda_graph():
    """Captured once, replayed with new per-expert counts: the grid must not depend on masked_m."""
    E, max_m, N, K = 4, 64, 256, 512
    a, a_scale, w, w_scale = _masked_problem(E, max_m, N, K, "cuda")
    masked_m = torch.tensor([64, 0, 1, 40], dtype=torch.int32, device="cuda")
    gg.grouped_gemm_fp8_masked(a, a_scale, w, w_scale, masked_m)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gg.grouped_gemm_fp8_masked(a, a_scale, w, w_scale, masked_m)
    for counts in ([64, 0, 1, 40], [3, 64, 0, 17], [0, 0, 0, 0], [64, 64, 64, 64]):
        masked_m.copy_(torch.tensor(counts, dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        if any(counts):
            _report(f"masked graph replay {counts}", _check_masked(out, a, a_scale, w, w_scale, masked_m, "replay"))


# every kernel variant the tuner may pick, on the GPU, at a size where each expert spans several tiles
GPU_CONFIGS = [
    dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, GROUP_M=8, num_warps=nw, num_stages=ns, USE_TMA=tma)
    for bm, bn, nw, ns, tma in [(64, 128, 4, 3, 0), (128, 128, 8, 4, 0), (64, 128, 4, 4, 1), (128, 128, 8, 5, 1),
                                (64, 256, 8, 3, 1), (128, 64, 4, 4, 1), (128, 128, 16, 4, 1)]
] + [dict(BLOCK_M=bm, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=nw, num_stages=ns, USE_TMA=tma, PAIR_N=1)
     for bm, nw, ns, tma in [(128, 16, 4, 1), (64, 8, 3, 1), (64, 4, 3, 0)]]
# the Gluon kernel (grouped_gemm_wgmma): tiles of 64/128 rows, 2-5 stages, groups of 1-4 unrolled K steps
WGMMA_CONFIGS = [dict(BLOCK_M=bm, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=bm // 16, num_stages=ns, USE_TMA=1,
                      WGMMA=1, UNROLL=u, WS=ws)
                 for bm, ns, u, ws in [(128, 4, 4, 0), (128, 2, 4, 0), (64, 5, 4, 0), (64, 3, 2, 0), (128, 3, 1, 0),
                                       (128, 4, 4, 1), (64, 2, 4, 1)]]


# its persistent form (one program per SM walking the tiles), with and without the loader warp
PERSISTENT_CONFIGS = [dict(BLOCK_M=bm, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=bm // 16, num_stages=ns,
                           USE_TMA=1, WGMMA=1, UNROLL=4, WS=ws, PERSISTENT=1)
                      for bm, ns, ws in [(128, 4, 0), (64, 3, 0), (128, 4, 1), (64, 2, 1)]]
WGMMA_KERNEL = "_grouped_gemm_fp8_wgmma_kernel"
PERSISTENT_KERNEL = "_grouped_gemm_fp8_wgmma_persistent_kernel"


def _cfg_id(c):
    return ("bm{BLOCK_M}_bn{BLOCK_N}_w{num_warps}_s{num_stages}_tma{USE_TMA}".format(**c)
            + ("_pair" if c.get("PAIR_N") else "") + ("_wgmma_u{}".format(c["UNROLL"]) if c.get("WGMMA") else "")
            + ("_ws" if c.get("WS") else "") + ("_persistent" if c.get("PERSISTENT") else ""))


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", GPU_CONFIGS + WGMMA_CONFIGS, ids=_cfg_id)
def test_grouped_gemm_fp8_configs_gpu(cfg):
    counts = [0, 1, 130, 255, 64, 300, 17, 500]
    E, N, K = len(counts), 640, 1024
    M = sum(counts)
    offsets = _offsets(counts, "cuda")
    a, a_scale = R.quantize_fp8(torch.randn(M, K, device="cuda"))
    w, w_scale = _fp8_weights(E, N, K, "cuda")
    out = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device="cuda")
    kernel = gg._launch(a, a_scale, w, w_scale, out, offsets=offsets, cfg=cfg)
    if cfg.get("WGMMA"):  # the Gluon kernel ran, not the Triton fallback
        assert kernel.name == WGMMA_KERNEL
    ref = R.grouped_gemm_fp8(a, a_scale, w, w_scale, offsets, out_dtype=torch.float32)
    _report(f"fp8 config {cfg}", assert_close_rel(out.float(), ref, FP8_TOL, "grouped_gemm_fp8 gpu config"))


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", WGMMA_CONFIGS[:3] + WGMMA_CONFIGS[-1:] + PERSISTENT_CONFIGS[:1]
                         + PERSISTENT_CONFIGS[-1:], ids=_cfg_id)
@pytest.mark.parametrize("layout", ["masked", "row_weight_fp32_out", "colmajor_scales"])
def test_grouped_gemm_fp8_wgmma_variants_gpu(cfg, layout):
    """The Gluon kernel's other paths: the masked decode layout, a per-row weight with fp32 output, column-major
    activation scales; K = 128 (one step: the loop body never runs) and K = 1152 (more steps than stages). A
    PERSISTENT config runs the persistent kernel only where it can (offsets layout, at least as many K steps as
    stages), the one-tile kernel elsewhere."""
    for K in (128, 1152):
        name = PERSISTENT_KERNEL if cfg.get("PERSISTENT") and layout != "masked" and K >= 128 * cfg["num_stages"] \
            else WGMMA_KERNEL
        E, N = 5, 384
        if layout == "masked":
            max_m = 200
            a, a_scale, w, w_scale = _masked_problem(E, max_m, N, K, "cuda")
            masked_m = torch.tensor([200, 0, 1, 129, 64], dtype=torch.int32, device="cuda")
            out = torch.full((E, max_m, N), float("nan"), dtype=torch.bfloat16, device="cuda")
            kernel = gg._launch(a.view(E * max_m, K), a_scale.view(E * max_m, -1), w, w_scale, out.view(-1, N),
                                masked_m=masked_m, max_m=max_m, cfg=cfg)
            assert kernel.name == name
            _report(f"wgmma masked K={K}", _check_masked(out, a, a_scale, w, w_scale, masked_m, "wgmma masked"))
            continue
        counts = [3, 0, 257, 128, 70]
        M = sum(counts)
        offsets = _offsets(counts, "cuda")
        a, a_scale = R.quantize_fp8(torch.randn(M, K, device="cuda"))
        if layout == "colmajor_scales":
            a_scale = a_scale.t().contiguous().t()
        w, w_scale = _fp8_weights(E, N, K, "cuda")
        rw = torch.rand(M, device="cuda") if layout == "row_weight_fp32_out" else None
        dtype = torch.float32 if rw is not None else torch.bfloat16
        out = torch.full((M, N), float("nan"), dtype=dtype, device="cuda")
        kernel = gg._launch(a, a_scale, w, w_scale, out, offsets=offsets, row_weight=rw, cfg=cfg)
        assert kernel.name == name
        ref = R.grouped_gemm_fp8(a, a_scale, w, w_scale, offsets, out_dtype=torch.float32)
        if rw is not None:
            ref = ref * rw[:, None]
        _report(f"wgmma {layout} K={K}", assert_close_rel(out.float(), ref, FP8_TOL, f"wgmma {layout}"))


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", PERSISTENT_CONFIGS, ids=_cfg_id)
@pytest.mark.parametrize("programs", [1, 3, None], ids=["1prog", "3progs", "per_sm"])
def test_grouped_gemm_fp8_persistent_gpu(cfg, programs, monkeypatch):
    """The persistent kernel on 1 and 3 programs (every program walks many tiles, its loads running on into the
    next tile, across experts and column tiles) and on its real grid (one per SM). K = 128 * STAGES: the first
    step's retire already loads the next tile; K = 1152: steps past the last unrolled group; a per-row weight."""
    if programs is not None:  # the grid is programs-per-SM x this
        monkeypatch.setattr(gg.grouped_gemm_wgmma, "_sm_count", lambda index: programs)
    counts = [3, 0, 257, 128, 70, 0, 1, 600]
    E, N, M = len(counts), 640, sum(counts)
    offsets = _offsets(counts, "cuda")
    for K, weighted in ((128 * cfg["num_stages"], False), (1152, True)):
        a, a_scale = R.quantize_fp8(torch.randn(M, K, device="cuda"))
        w, w_scale = _fp8_weights(E, N, K, "cuda")
        rw = torch.rand(M, device="cuda") if weighted else None
        out = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device="cuda")
        kernel = gg._launch(a, a_scale, w, w_scale, out, offsets=offsets, row_weight=rw, cfg=cfg)
        assert kernel.name == PERSISTENT_KERNEL
        ref = R.grouped_gemm_fp8(a, a_scale, w, w_scale, offsets, out_dtype=torch.float32)
        if rw is not None:
            ref = ref * rw[:, None]
        _report(f"persistent {programs} K={K}", assert_close_rel(out.float(), ref, FP8_TOL, "persistent"))


@pytest.mark.gpu
@pytest.mark.parametrize("tma", [0, 1, "wgmma", "wgmma_ws", "wgmma_persistent", "wgmma_persistent_ws"])
def test_expert_mlp_fp8_gpu_larger(tma, monkeypatch):
    counts = [0, 1, 200, 77, 513, 64, 3, 150]
    E, H, I = len(counts), 1024, 384
    M = sum(counts)
    offsets = _offsets(counts, "cuda")
    x, x_scale = R.quantize_fp8(torch.randn(M, H, device="cuda"))
    w13, w13_scale = _fp8_weights(E, 2 * I, H, "cuda")
    w2, w2_scale = _fp8_weights(E, H, I, "cuda")
    tw = torch.rand(M, device="cuda")
    h = torch.full((M, I), float("nan"), device="cuda").to(torch.float8_e4m3fn)
    hs = torch.full((M, I // 128), float("nan"), device="cuda")
    out = torch.full((M, H), float("nan"), dtype=torch.bfloat16, device="cuda")
    wg, ws, pers = int(str(tma).startswith("wgmma")), int(str(tma).endswith("_ws")), int("persistent" in str(tma))
    if pers:  # 2 programs per SM x 2: each walks many tiles (the SwiGLU one through both W blocks of each)
        monkeypatch.setattr(gg.grouped_gemm_wgmma, "_sm_count", lambda index: 2)
    cfg1 = dict(BLOCK_M=128 if wg else 64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3,
                USE_TMA=int(bool(tma)), WGMMA=wg, WS=ws, PERSISTENT=2 * pers)
    cfg2 = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4, USE_TMA=int(bool(tma)),
                WGMMA=wg, WS=ws, PERSISTENT=2 * pers)
    k1 = gg._launch(x, x_scale, w13, w13_scale, h, offsets=offsets, out_scale=hs, swiglu=True, cfg=cfg1)
    k2 = gg._launch(h, hs, w2, w2_scale, out, offsets=offsets, row_weight=tw, cfg=cfg2)
    if wg:  # I = 384: the down GEMM has 3 K steps, fewer than its 4 stages, so it runs the one-tile kernel
        assert k1.name == (PERSISTENT_KERNEL if pers else WGMMA_KERNEL) and k2.name == WGMMA_KERNEL
    ref = R.expert_mlp(x, offsets, w13, w2, x_scale, w13_scale, w2_scale, out_dtype=torch.float32) * tw[:, None]
    _report(f"expert_mlp fp8 gpu tma={tma}", assert_close_rel(out.float(), ref, FP8_TOL, "expert_mlp fp8 gpu"))


@pytest.mark.gpu
def test_grouped_gemm_bf16_gpu_larger():
    counts = [0, 1, 130, 255, 64, 300]
    E, N, K = len(counts), 384, 1024
    offsets = _offsets(counts, "cuda")
    a = torch.randn(sum(counts), K, device="cuda").bfloat16()
    w = (torch.randn(E, N, K, device="cuda") / K**0.5).bfloat16()
    got = gg.grouped_gemm_bf16(a, w, offsets)
    ref = R.grouped_gemm(a.float(), w.float(), offsets)
    _report("grouped_gemm_bf16 gpu", assert_close_rel(got.float(), ref, BF16_TOL, "grouped_gemm_bf16 gpu"))


# ---------------------------------------------------------------------------------------------------------------
# argument checks (raise before any launch), fake implementations, config lookup

def test_bad_arguments_raise_before_launch(monkeypatch):
    monkeypatch.setenv("MOE_KERNELS_VALUE_CHECKS", "1")  # the offsets / masked_m value checks
    E, N, K, M = 2, 128, 256, 6
    a, a_scale = R.quantize_fp8(torch.randn(M, K))
    w, w_scale = _fp8_weights(E, N, K, "cpu")
    offsets = torch.tensor([0, 2, 6], dtype=torch.int32)
    with pytest.raises(TypeError, match="a must have dtype"):
        gg.grouped_gemm_fp8(a.float(), a_scale, w, w_scale, offsets)
    with pytest.raises(ValueError, match="a_scale"):
        gg.grouped_gemm_fp8(a, a_scale[:, :1], w, w_scale, offsets)
    with pytest.raises(ValueError, match="w_scale"):
        gg.grouped_gemm_fp8(a, a_scale, w, w_scale[:, :, :1], offsets)
    with pytest.raises(ValueError, match="K"):
        gg.grouped_gemm_fp8(a[:, :200], a_scale, w, w_scale, offsets)
    with pytest.raises(ValueError, match="w must have shape"):
        gg.grouped_gemm_fp8(a, a_scale, w[:, :, :128].contiguous(), w_scale[:, :, :1], offsets)
    with pytest.raises(TypeError, match="offsets"):
        gg.grouped_gemm_fp8(a, a_scale, w, w_scale, offsets.long())
    with pytest.raises(ValueError, match="offsets"):
        gg.grouped_gemm_fp8(a, a_scale, w, w_scale, offsets[:2])
    with pytest.raises(ValueError, match="end at M"):
        gg.grouped_gemm_fp8(a, a_scale, w, w_scale, torch.tensor([0, 2, 5], dtype=torch.int32))
    with pytest.raises(TypeError, match="out must have dtype"):
        gg.grouped_gemm_fp8(a, a_scale, w, w_scale, offsets, out=torch.empty(M, N))
    with pytest.raises(ValueError, match="out must have shape"):
        gg.grouped_gemm_fp8(a, a_scale, w, w_scale, offsets, out=torch.empty(M, N + 1, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="out_dtype"):
        gg.grouped_gemm_fp8(a, a_scale, w, w_scale, offsets, out_dtype=torch.int32)
    with pytest.raises(TypeError, match="w must have dtype"):
        gg.grouped_gemm_bf16(a.bfloat16(), w.float(), offsets)
    with pytest.raises(ValueError, match="masked_m must lie"):
        gg.grouped_gemm_fp8_masked(a.view(E, 3, K), a_scale.view(E, 3, 2), w, w_scale,
                                   torch.tensor([3, 4], dtype=torch.int32))
    w13, w13_scale = _fp8_weights(E, 256, K, "cpu")
    w2, w2_scale = _fp8_weights(E, K, 128, "cpu")
    with pytest.raises(ValueError, match="w2 must have shape"):
        gg.expert_mlp(a, a_scale, offsets, w13, w13_scale, w2[:, :128], w2_scale[:, :1], None)
    with pytest.raises(ValueError, match="topk_weight"):
        gg.expert_mlp(a, a_scale, offsets, w13, w13_scale, w2, w2_scale, topk_weight=torch.ones(M + 1))
    with pytest.raises(ValueError, match="x_scale and w2_scale"):
        gg.expert_mlp(a.bfloat16(), a_scale, offsets, w13.bfloat16(), None, w2.bfloat16(), None)


def test_custom_ops_have_fake_implementations():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        a = torch.empty(10, 256, dtype=torch.float8_e4m3fn)
        a_scale = torch.empty(10, 2)
        w = torch.empty(3, 384, 256, dtype=torch.float8_e4m3fn)
        w_scale = torch.empty(3, 3, 2)
        offsets = torch.empty(4, dtype=torch.int32)
        out = torch.ops.moe_kernels.grouped_gemm_fp8(a, a_scale, w, w_scale, offsets, torch.bfloat16)
        assert out.shape == (10, 384) and out.dtype == torch.bfloat16
        y = torch.ops.moe_kernels.expert_mlp(a, a_scale, offsets, w, w_scale, torch.empty(3, 256, 192,
                                             dtype=torch.float8_e4m3fn), torch.empty(3, 2, 2), None)
        assert y.shape == (10, 256)


def test_config_files_parse_and_lookup(tmp_path):
    for path in cfgs.CONFIG_DIR.glob("grouped_gemm_*.json"):
        kind = path.name[len("grouped_gemm_"):].split("_N")[0]
        assert kind in cfgs.KINDS, path.name
        table = cfgs.load_table(str(path))
        assert table, f"{path.name} has no usable bucket"
        for cfg in table.values():
            assert cfg["BLOCK_K"] == 128 or not kind.startswith("fp8")
    p = tmp_path / "t.json"
    p.write_text(json.dumps({"64": dict(cfgs.DEFAULTS["fp8"], BLOCK_M=64), "1024": cfgs.DEFAULTS["fp8"]}))
    assert set(cfgs.load_table(str(p))) == {64, 1024}
    assert cfgs.load_table(str(tmp_path / "missing.json")) is None
    # no GPU: the interpreter's small tiles
    assert cfgs.get_config("fp8", 4096, 7168, 256, torch.device("cpu"))["BLOCK_M"] <= 32


def test_config_lookup_same_chip_and_default():
    """An H200 uses its own fp8 table, borrows the H100's bf16 table (warning once, it has none of its own); an
    H100 uses its own fp8 table (tuned 2026-12-07; it borrowed the H200's before), without a warning; an unknown GPU
    has no table and gets the defaults."""
    cfgs._table_for.cache_clear()
    with pytest.warns(UserWarning, match="same chip"):
        borrowed = cfgs._table_for("bf16", 4096, 7168, "NVIDIA H200")
    own = cfgs.load_table(str(cfgs.CONFIG_DIR / cfgs.config_filename("bf16", 4096, 7168, "NVIDIA H100 80GB HBM3")))
    assert borrowed == own and own
    h200 = cfgs.load_table(str(cfgs.CONFIG_DIR / cfgs.config_filename("fp8", 4096, 7168, "NVIDIA H200")))
    assert h200 and cfgs._table_for("fp8", 4096, 7168, "NVIDIA H200") == h200
    h100 = cfgs.load_table(str(cfgs.CONFIG_DIR / cfgs.config_filename("fp8", 4096, 7168, "NVIDIA H100 80GB HBM3")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # its own table: no "same chip" warning
        assert h100 and h100 != h200 and cfgs._table_for("fp8", 4096, 7168, "NVIDIA H100 80GB HBM3") == h100
    assert cfgs._table_for("fp8", 4096, 7168, "NVIDIA A100-SXM4-80GB") is None
    assert cfgs._table_for("fp8", 12345, 7168, "NVIDIA H200") is None  # no file for this shape anywhere


def test_decode_max_rows_switch_forces_the_decode_kernel(monkeypatch):
    """MOE_KERNELS_DECODE_MAX_ROWS=R: up to R rows per expert run the decode kernel whatever the tables hold (the H200
    fp8_swiglu table's bucket 64 is a Gluon config); unset, the table's bucket answers."""
    cuda = torch.device("cuda", 0)  # the switch answers before any CUDA call: no GPU needed
    monkeypatch.setenv("MOE_KERNELS_DECODE_MAX_ROWS", "64")
    for rows in (1, 32, 64):
        assert cfgs.get_config("fp8_swiglu", 2048, 7168, rows, cuda) == cfgs.DECODE_DEFAULT
    table = cfgs.load_table(str(cfgs.CONFIG_DIR / cfgs.config_filename("fp8_swiglu", 2048, 7168, "NVIDIA H200")))
    assert table and not table[64].get("DECODE"), "the table's own bucket 64 is what the switch overrides"


# The Gluon kernel cannot run on the CPU: compile it for sm_90 offline (Triton's own ptxas) and hold it to what it
# exists for. ptxas warnings C7514/C7512 mean it serialised every wgmma (a product in flight copied, or registers
# short), which leaves the kernel no faster than the Triton one; spills cost the same.
WGMMA_COMPILE = [dict(BLOCK_M=128, num_warps=8, STAGES=4), dict(BLOCK_M=64, num_warps=4, STAGES=4),
                 dict(BLOCK_M=128, num_warps=8, STAGES=4, SWIGLU=1), dict(BLOCK_M=64, num_warps=4, STAGES=3, SWIGLU=1),
                 dict(BLOCK_M=128, num_warps=8, STAGES=4, ROW_WEIGHT=1, MASKED=1),
                 dict(BLOCK_M=128, num_warps=8, STAGES=4, WS=1),
                 dict(BLOCK_M=128, num_warps=8, STAGES=4, SWIGLU=1, WS=1),
                 dict(BLOCK_M=128, num_warps=8, STAGES=4, ROW_WEIGHT=1, PERSISTENT=1),
                 dict(BLOCK_M=64, num_warps=4, STAGES=3, PERSISTENT=1),
                 dict(BLOCK_M=128, num_warps=8, STAGES=4, SWIGLU=1, PERSISTENT=1),
                 dict(BLOCK_M=128, num_warps=8, STAGES=4, PERSISTENT=1, WS=1),
                 dict(BLOCK_M=128, num_warps=8, STAGES=4, SWIGLU=1, PERSISTENT=1, WS=1)]


@pytest.mark.skipif(gg.grouped_gemm_wgmma is None, reason="this Triton has no Gluon")
@pytest.mark.parametrize("cfg", WGMMA_COMPILE, ids=lambda c: "_".join(f"{k}{v}" for k, v in c.items()))
def test_wgmma_kernel_compiles_for_sm90_unserialised(cfg):
    import ast
    import os
    import subprocess
    import sys

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
    # a process of its own: this one runs Triton's interpreter, where kernels are not compiled
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=root)
    args = [sys.executable, os.path.join(root, "tools", "compile_sm90.py"), "WGMMA=1"]
    proc = subprocess.run(args + [f"{k}={v}" for k, v in cfg.items()], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    print(cfg, r)
    assert r["ptxas_wgmma_warnings"] == [], r
    # the persistent SwiGLU kernel spills a few registers on Triton 3.8 (76 bytes, 2026-12-05; none on 3.6, the
    # devices' version): it keeps the next tile's coordinates through both passes
    allowed = 128 if cfg.get("PERSISTENT") and cfg.get("SWIGLU") and not cfg.get("WS") else 0
    assert r["spill_bytes"] <= allowed, r
    # every K step's promotion sits between a wait for one group (W1) and the next step's wgmma (M); with WS the
    # math warps issue no TMA load (the loader warp's sit after the math region)
    assert "W1 F64" in r["order"], r["order"]
    if cfg.get("WS"):
        math = r["order"].split("W0")[0]
        assert "T" not in math.split(), r["order"]


@pytest.mark.skipif(gg.grouped_gemm_wgmma is None, reason="this Triton has no Gluon")
@pytest.mark.parametrize("case,K,swiglu,masked,persistent,want", [
    ("8 K steps >= 4 stages", 1024, False, False, 2, "persistent"),
    ("3 K steps < 4 stages", 384, False, False, 1, "one-tile"),
    ("SwiGLU: 2 x 2 steps", 256, True, False, 1, "persistent"),
    ("SwiGLU: 2 x 1 steps", 128, True, False, 1, "one-tile"),
    ("masked layout", 1024, False, True, 1, "one-tile"),
    ("not asked", 1024, False, False, 0, "one-tile"),
])
def test_wgmma_launcher_picks_the_persistent_kernel(case, K, swiglu, masked, persistent, want, monkeypatch):
    """The Gluon launcher's choice and grid, on the CPU (the kernels replaced by recorders): the persistent kernel
    where it applies, on PERSISTENT x SMs programs at most, the one-tile kernel on the whole upper-bound grid."""
    wg = gg.grouped_gemm_wgmma
    calls = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kw: calls.append((self.name, grid, kw))

    monkeypatch.setattr(wg, "_grouped_gemm_fp8_wgmma_kernel", Recorder("one-tile"))
    monkeypatch.setattr(wg, "_grouped_gemm_fp8_wgmma_persistent_kernel", Recorder("persistent"))
    monkeypatch.setattr(wg, "_sm_count", lambda index: 3)
    E, N, max_m = 4, 256, 96
    M = E * max_m if masked else 300
    a, a_scale = torch.zeros(M, K, dtype=torch.float8_e4m3fn), torch.ones(M, K // 128)
    w_rows = 2 * N if swiglu else N
    w, w_scale = torch.zeros(E, w_rows, K, dtype=torch.float8_e4m3fn), torch.ones(E, w_rows // 128, K // 128)
    out = torch.empty(M, N, dtype=torch.float8_e4m3fn if swiglu else torch.bfloat16)
    out_scale = torch.empty(M, N // 128) if swiglu else None
    cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4, PERSISTENT=persistent,
               WS=1)
    kw = dict(masked_m=torch.full((E,), 50, dtype=torch.int32), max_m=max_m) if masked else \
        dict(offsets=torch.tensor([0, 100, 100, 250, 300], dtype=torch.int32))
    wg.launch(a, a_scale, w, w_scale, out, out_scale=out_scale, swiglu=swiglu, cfg=cfg, **kw)
    (name, grid, kwargs), = calls
    assert name == want, case
    upper = (E * -(-max_m // 128) if masked else -(-M // 128) + E) * (N // 128)  # every tile the schedule may hold
    assert grid == ((min(upper, persistent * 3),) if want == "persistent" else (upper,)), (case, grid)
    assert kwargs["STAGES"] == 4 and kwargs["SWIGLU"] == swiglu and kwargs["MASKED"] == masked
    assert kwargs["maxnreg"] == gg.grouped_gemm_wgmma.ws_maxnreg(8)  # WS: the register cap goes with it


@pytest.mark.skipif(gg.grouped_gemm_wgmma is None, reason="this Triton has no Gluon")
def test_wgmma_supports_only_its_tiles():
    """The configs the Gluon kernel builds (anything else runs the Triton kernel, with a warning on Hopper)."""
    base = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4)
    ok = gg.grouped_gemm_wgmma.supports
    assert ok(base, False, False) and ok(dict(base, BLOCK_M=64, num_warps=4), False, False)
    assert ok(base, True, True)  # SwiGLU with its e4m3 epilogue
    assert not ok(base, True, False)  # SwiGLU writing bf16: the Triton kernel's
    assert not ok(base, False, True)
    assert not ok(dict(base, num_warps=16), False, False)  # one warp per 16 rows, nothing else
    assert not ok(dict(base, BLOCK_N=256), False, False)
    assert not ok(dict(base, BLOCK_M=256, num_warps=16), False, False)
    assert not ok(dict(base, PAIR_N=1), False, False)
    # the defaults ask for it
    for kind in ("fp8", "fp8_swiglu"):
        cfg = cfgs.DEFAULTS[kind]
        assert cfg["WGMMA"] == 1 and ok(cfg, kind.endswith("swiglu"), kind.endswith("swiglu"))
