"""The Gluon (sm_90 wgmma) bf16 / fp16 forward grouped GEMM, ``moe_kernels.ops.grouped_gemm_bf16_wgmma``.

CPU: the kernel compiled offline for sm_90a (this Triton's ptxas): no spills, no wgmma serialisation notes, the
instruction mix the design needs; the launcher's grid and switches (kernel replaced by a recorder); which inputs
it takes; a float64 model of its schedule (tile walk, TMA boxes, clipped and masked stores). GPU (marked gpu,
sm_90 only): out against a float32 reference (per-expert fp32 matmul of the same 16-bit inputs) on fresh random
data, outputs NaN-filled before the launch: odd sizes, empty experts, every row in one expert, M = 0, SwiGLU on and
off, row weights, bf16 / fp16 operands, bf16 / fp16 / fp32 outputs, few programs (many tiles per program: the
stage ring runs across tiles); and the public ops with MOE_KERNELS_BF16_GLUON=1 taking this kernel.

Error bounds (relative Frobenius vs the fp32 reference): the products are exact in fp32 and accumulated in fp32, so
a 16-bit output is within its rounding (<= 1e-2 asked, ~3e-3 expected) and an fp32 output within 1e-4.
"""
import ast
import os
import subprocess
import sys

import pytest
import torch

from _helpers import assert_close_rel, offsets_for as _offsets, poison_allocator

try:
    from moe_kernels.ops import grouped_gemm_bf16_wgmma as gb
except ImportError:  # Triton without Gluon
    gb = None

needs_gluon = pytest.mark.skipif(gb is None, reason="this Triton has no Gluon")
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)


def _reference(a, w, offsets, swiglu=False, row_weight=None):
    """Per-expert A_e @ W_e^T in fp32 (float64 for float64 inputs; SwiGLU: silu(gate) * up), times the row
    weight; rows of no expert stay NaN."""
    o = offsets.tolist()
    N = w.shape[1] // 2 if swiglu else w.shape[1]
    dt = torch.promote_types(a.dtype, torch.float32)
    out = torch.full((a.shape[0], N), float("nan"), dtype=dt, device=a.device)
    for e, (lo, hi) in enumerate(zip(o, o[1:])):
        h = a[lo:hi].to(dt) @ w[e].to(dt).t()
        if swiglu:
            h = torch.nn.functional.silu(h[:, :N]) * h[:, N:]
        if row_weight is not None:
            h = h * row_weight[lo:hi, None]
        out[lo:hi] = h
    return out


# ---------------------------------------------------------------------------------------------------------------
# CPU

@needs_gluon
@pytest.mark.parametrize("in_dtype,out_dtype,swiglu,row_weight,stages,experts", [
    ("bf16", "bf16", 0, 0, 4, 32), ("bf16", "bf16", 1, 0, 4, 32), ("bf16", "bf16", 0, 1, 3, 32),
    ("fp16", "fp16", 1, 1, 4, 256), ("bf16", "fp32", 0, 1, 3, 8)])
def test_compiles_for_sm90_without_spills_or_serialised_wgmma(in_dtype, out_dtype, swiglu, row_weight, stages,
                                                              experts):
    """Offline sm_90a build: ptxas reports no spill and none of its wgmma-serialisation notes (C75xx: a register
    of a product in flight copied, or registers short); 16 wgmma m64n128k16 in the PTX (a tile's first step and
    the loop's step, each 2 halves x 4 k16); 3 TMA boxes loaded a step (A and the two W halves, 128 bytes a row),
    one TMA store a tile with SwiGLU, two without; fits in 227 KiB; the loader warp's registers handed to the
    math warps."""
    env = dict(os.environ, TRITON_INTERPRET="0",
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    args = [sys.executable, "-m", "moe_kernels.ops.grouped_gemm_bf16_wgmma", in_dtype, out_dtype, str(swiglu),
            str(row_weight), str(stages), str(experts)]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    if proc.returncode and "ptxas" in proc.stderr and "No such file" in proc.stderr:
        pytest.skip("no ptxas for an offline sm_90a build")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    print({k: v for k, v in r.items() if k != "ptxas_log"})
    assert r["spill_bytes"] == 0, r
    assert r["ptxas_wgmma_warnings"] == [], r
    assert r["wgmma"] == 16, r
    assert r["tma_loads"] == 3 and r["tma_stores"] == (1 if swiglu else 2), r
    assert r["shared"] <= gb.SMEM_LIMIT, r
    assert r["stages"] == stages, r
    assert gb.LOADER_REGS in r["setmaxnreg"] and max(r["setmaxnreg"]) >= 232, r  # loader shrinks, math grows


@needs_gluon
def test_plan_fits_shared_memory():
    """Stages and epilogue buffers: 16-bit outputs 4 + 1 (or 3 + 2), fp32 3 + 1; always within 227 KiB."""
    assert gb.plan(2) == (4, 1) and gb.plan(2, 3) == (3, 2) and gb.plan(4) == (3, 1) and gb.plan(4, 4) == (3, 1)
    for size in (2, 4):
        for stages in (None, 2, 3, 4, 5):
            st, bufs = gb.plan(size, stages)
            assert st * gb.STAGE_BYTES + bufs * 128 * 128 * size <= gb.SMEM_LIMIT - 2048


@needs_gluon
@pytest.mark.parametrize("swiglu,row_weight,out_dtype", [(False, False, torch.bfloat16), (True, True, torch.float16),
                                                         (False, True, torch.float32)])
@pytest.mark.parametrize("counts,N,K,programs", [([100, 0, 200], 384, 200, 132), ([5], 4096, 7168, 2),
                                                 ([0, 0], 256, 64, 132)])
def test_launcher_grid_and_switches(counts, N, K, programs, swiglu, row_weight, out_dtype, monkeypatch):
    """The persistent grid is min(an upper bound of the tiles, programs): (ceil(M / 128) + E) row tiles x the
    column tiles (256 columns, 128 with SwiGLU); the switches and sizes reach the kernel; stages by ``plan``."""
    monkeypatch.delenv("MOE_KERNELS_BF16_GLUON_STAGES", raising=False)
    calls = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kw: calls.append((grid, args, kw))

    monkeypatch.setattr(gb, "_grouped_gemm_bf16_wgmma_kernel", Recorder())
    dt = torch.float16 if out_dtype == torch.float16 else torch.bfloat16
    E, M = len(counts), max(sum(counts), 1)
    a = torch.zeros(M, K, dtype=dt)
    w = torch.zeros(E, 2 * N if swiglu else N, K, dtype=dt)
    out = torch.empty(M, N, dtype=out_dtype)
    rw = torch.ones(M) if row_weight else None
    assert gb.supports(a, w, out, swiglu=swiglu, row_weight=rw) is None
    gb.launch(a, w, out, _offsets(counts[:-1] + [M - sum(counts[:-1])]), swiglu=swiglu, row_weight=rw,
              cfg={"PROGRAMS": programs})
    (grid, args, kw), = calls
    col = 128 if swiglu else 256
    assert grid == (min((-(-M // 128) + E) * -(-N // col), programs),)
    assert args[6:12] == (N, E, w.shape[1], N if swiglu else 0, -(-K // 64), N)
    assert kw["SWIGLU"] == swiglu and kw["ROW_WEIGHT"] == row_weight and kw["num_warps"] == 8
    assert (kw["STAGES"], kw["EPI_BUFS"]) == gb.plan(out.element_size())
    assert kw["maxnreg"] * 32 * (8 + 4) <= 65536 and kw["E_PAD"] >= max(32, E)


@needs_gluon
def test_launch_without_rows_does_nothing(monkeypatch):
    monkeypatch.setattr(gb, "_grouped_gemm_bf16_wgmma_kernel", None)  # a launch would raise
    a = torch.zeros(0, 64, dtype=torch.bfloat16)
    assert gb.launch(a, torch.zeros(3, 256, 64, dtype=torch.bfloat16), torch.empty(0, 256, dtype=torch.bfloat16),
                     _offsets([0, 0, 0])) is None


@needs_gluon
def test_supports_only_what_it_builds():
    bf, z = torch.bfloat16, torch.zeros
    ok = gb.supports
    assert ok(z(64, 200, dtype=bf), z(2, 384, 200, dtype=bf), z(64, 384, dtype=bf)) is None
    assert ok(z(64, 64, dtype=bf), z(2, 512, 64, dtype=bf), z(64, 256, dtype=bf), swiglu=True) is None
    assert ok(z(64, 64, dtype=torch.float16), z(2, 256, 64, dtype=torch.float16), z(64, 256)) is None  # fp32 out
    assert ok(z(64, 64, dtype=bf), z(2, 256, 64, dtype=bf), z(64, 256, dtype=bf), row_weight=z(64)) is None
    assert "operands" in ok(z(64, 64), z(2, 256, 64), z(64, 256))  # fp32 operands: the Triton kernel's
    assert "operands" in ok(z(64, 64, dtype=bf), z(2, 256, 64, dtype=torch.float16), z(64, 256, dtype=bf))
    assert "output" in ok(z(64, 64, dtype=bf), z(2, 256, 64, dtype=bf), z(64, 256, dtype=torch.float64))
    assert "16-byte" in ok(z(64, 60, dtype=bf), z(2, 256, 60, dtype=bf), z(64, 256, dtype=bf))
    assert "out's rows" in ok(z(64, 64, dtype=bf), z(2, 100, 64, dtype=bf), z(64, 100, dtype=bf))
    assert "odd" in ok(z(64, 64, dtype=bf), z(2, 257, 64, dtype=bf), z(64, 128, dtype=bf), swiglu=True)
    assert "shapes" in ok(z(64, 64, dtype=bf), z(2, 256, 64, dtype=bf), z(64, 128, dtype=bf))
    assert "contiguous" in ok(z(64, 64, dtype=bf), z(2, 64, 256, dtype=bf).transpose(1, 2), z(64, 256, dtype=bf))
    assert "row_weight" in ok(z(64, 64, dtype=bf), z(2, 256, 64, dtype=bf), z(64, 256, dtype=bf),
                              row_weight=z(64, dtype=bf))


def _schedule_model(a, w, offsets, swiglu, row_weight, programs, group_m=8):
    """The kernel's schedule in float64 torch ops: the real row tiles counted from offsets, GROUP_M ordering, the
    persistent walk (program p: tiles p, p + grid, ...), the TMA boxes as the loader issues them (zero fill past
    the tensors; the second W half reloaded from the first where it lies wholly past N), the accumulator halves,
    then the stores: a TMA store (clipped at M and N) where all 128 rows are the expert's, else stores masked to
    the expert's rows and to N. Returns the output (NaN where nothing was written) and how often each element was
    written."""
    M, K = a.shape
    E, w_rows, _ = w.shape
    N = w_rows // 2 if swiglu else w_rows
    BM, HN, BK = gb.BLOCK_M, gb.HALF_N, gb.BLOCK_K
    out_n = HN if swiglu else 2 * HN
    o = offsets.tolist()
    tiles = [-(-(hi - lo) // BM) for lo, hi in zip(o, o[1:])]
    ends = [sum(tiles[:e + 1]) for e in range(E)]
    num_m, num_n = sum(tiles), -(-N // out_n)
    num_k = -(-K // BK)
    kp = num_k * BK
    ap = torch.nn.functional.pad(a.double(), (0, kp - K, 0, BM))
    wp = torch.nn.functional.pad(w.double().reshape(E * w_rows, K), (0, kp - K, 0, 2 * HN))
    out = torch.full((M, N), float("nan"), dtype=torch.float64)
    writes = torch.zeros(M, N, dtype=torch.int32)
    grid = max(1, min((-(-M // BM) + E) * num_n, programs))
    for pid in range(grid):
        for t in range(pid, num_m * num_n, grid):
            in_group = group_m * num_n
            first_m = t // in_group * group_m
            rows_in_group = min(num_m - first_m, group_m)
            tile_m, tile_n = first_m + t % in_group % rows_in_group, t % in_group // rows_in_group
            e = sum(end <= tile_m for end in ends)
            row0 = o[e] + (tile_m - (ends[e] - tiles[e])) * BM
            row_end = o[e + 1]
            col0 = tile_n * out_n
            w0 = e * w_rows + col0
            w1 = w0 + N if swiglu else (w0 + HN if col0 + HN < N else w0)
            a_t = ap[row0:row0 + BM]
            halves = [a_t @ wp[w0:w0 + HN].t(), a_t @ wp[w1:w1 + HN].t()]
            if swiglu:
                g, u = halves
                halves = [g / (1 + torch.exp(-g)) * u]
            for i, h in enumerate(halves):
                c0 = col0 + i * HN
                if c0 >= N:
                    continue  # the second half wholly past N: not stored
                if row_weight is not None:
                    h = h * torch.nn.functional.pad(row_weight.double(), (0, BM))[row0:row0 + BM, None]
                rows = min(BM, row_end - row0)  # a TMA store of a full tile, or the masked rows
                cols = min(HN, N - c0)
                out[row0:row0 + rows, c0:c0 + cols] = h[:rows, :cols]
                writes[row0:row0 + rows, c0:c0 + cols] += 1
    return out, writes


@needs_gluon
@pytest.mark.parametrize("swiglu,row_weight", [(False, False), (True, True), (False, True)])
@pytest.mark.parametrize("counts,N,K,programs", [([17, 0, 1, 129, 9, 0, 300, 127], 384, 200, 7),
                                                 ([0, 0, 260, 0], 256, 64, 3), ([1], 640, 136, 132),
                                                 ([128, 256, 1, 0], 128, 72, 1), ([33, 70], 200, 136, 2)])
def test_schedule_model_matches_float64(counts, N, K, programs, swiglu, row_weight):
    """The schedule and boundary handling the kernel implements (a float64 model of it) writes every row of every
    expert exactly once with A_e W_e^T (SwiGLU: silu(gate) * up; times the row weight) and nothing else, whatever
    the next expert's rows hold (NaN here, computed in a tile's tail rows but never stored)."""
    g = torch.Generator().manual_seed(5)
    M = sum(counts) + 3  # 3 rows of no expert after the last
    E = len(counts)
    a = torch.randn(M, K, generator=g)
    a[sum(counts):] = float("nan")
    w = torch.randn(E, 2 * N if swiglu else N, K, generator=g)
    rw = torch.rand(M, generator=g) if row_weight else None
    offsets = _offsets(counts)
    got, writes = _schedule_model(a, w, offsets, swiglu, rw, programs)
    want = _reference(a.double(), w.double(), offsets, swiglu, rw)
    n = sum(counts)
    assert (writes[:n] == 1).all() and (writes[n:] == 0).all()
    assert_close_rel(got[:n], want[:n], 1e-12, "schedule model")


# ---------------------------------------------------------------------------------------------------------------
# GPU

def _sm90():
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


needs_sm90 = pytest.mark.skipif(not _sm90(), reason="needs an sm_90 GPU")

CASES = {  # name: (rows per expert, N, K)
    "odd_and_empty": ([17, 0, 1, 127, 129, 0, 1000, 64], 384, 200),
    "one_row": ([1], 4096, 2048),
    "one_expert_all_rows": ([0, 0, 1000, 0], 384, 2048),
    "gate_up_k7168": ([129, 0, 383, 256], 4096, 7168),
    "down_k2048": ([300, 127, 0, 513], 7168, 2048),
    "k_tail": ([40, 90, 31], 256, 72),  # K = 72: the second K step mostly TMA's zero fill
    "many_experts": ([int(c) for c in torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(1))],
                     512, 640),
}


def _inputs(counts, N, K, swiglu, dtype, row_weight):
    E = len(counts)
    M = sum(counts)
    a = torch.randn(M, K, device="cuda", dtype=dtype)
    w = (torch.randn(E, 2 * N if swiglu else N, K, device="cuda") * K**-0.5).to(dtype)
    rw = torch.rand(M, device="cuda") if row_weight else None
    return a, w, rw, _offsets(counts, "cuda")


@pytest.mark.gpu
@needs_gluon
@needs_sm90
@pytest.mark.parametrize("programs", [None, 3])
@pytest.mark.parametrize("swiglu,row_weight", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("name", list(CASES))
def test_bf16_wgmma_matches_fp32(name, swiglu, row_weight, programs):
    counts, N, K = CASES[name]
    a, w, rw, offsets = _inputs(counts, N, K, swiglu, torch.bfloat16, row_weight)
    out = torch.full((a.shape[0], N), float("nan"), device="cuda", dtype=torch.bfloat16)
    assert gb.supports(a, w, out, swiglu=swiglu, row_weight=rw) is None
    gb.launch(a, w, out, offsets, swiglu=swiglu, row_weight=rw, cfg={"PROGRAMS": programs})
    assert_close_rel(out, _reference(a, w, offsets, swiglu, rw), 1e-2,
                     f"{name} swiglu={swiglu} row_weight={row_weight} programs={programs}")


@pytest.mark.gpu
@needs_gluon
@needs_sm90
@pytest.mark.parametrize("in_dtype,out_dtype,stages,tol", [(torch.float16, torch.float16, None, 1e-2),
                                                           (torch.bfloat16, torch.float32, None, 1e-4),
                                                           (torch.float16, torch.float32, None, 1e-4),
                                                           (torch.bfloat16, torch.bfloat16, 3, 1e-2)])
@pytest.mark.parametrize("swiglu", [False, True])
def test_bf16_wgmma_dtypes_and_stages(in_dtype, out_dtype, stages, tol, swiglu):
    counts, N, K = [100, 0, 37, 300, 1, 129], 384, 392
    a, w, rw, offsets = _inputs(counts, N, K, swiglu, in_dtype, True)
    out = torch.full((a.shape[0], N), float("nan"), device="cuda", dtype=out_dtype)
    gb.launch(a, w, out, offsets, swiglu=swiglu, row_weight=rw, cfg={"PROGRAMS": 4, "STAGES": stages})
    assert_close_rel(out, _reference(a, w, offsets, swiglu, rw), tol, f"{in_dtype} -> {out_dtype}")


@pytest.mark.gpu
@needs_gluon
@needs_sm90
def test_rows_of_no_expert_stay_untouched():
    """Rows past offsets[E] are not any expert's: never written (the NaN fill stays), and NaN in them (read by
    the last expert's tail tile) reaches no written row."""
    counts, N, K = [37, 0, 130], 256, 128
    a, w, _, offsets = _inputs(counts, N, K, False, torch.bfloat16, False)
    a = torch.cat([a, torch.full((20, K), float("nan"), device="cuda", dtype=a.dtype)])
    out = torch.full((a.shape[0], N), float("nan"), device="cuda", dtype=torch.bfloat16)
    gb.launch(a, w, out, offsets)
    assert torch.isnan(out[sum(counts):]).all()
    assert_close_rel(out[:sum(counts)], _reference(a, w, offsets)[:sum(counts)], 1e-2, "beside foreign rows")


@pytest.mark.gpu
@needs_gluon
@needs_sm90
@pytest.mark.parametrize("case", ["skewed", "m0", "one_expert"])
def test_public_ops_dispatch_to_gluon(case, monkeypatch):
    """By default (and with MOE_KERNELS_BF16_GLUON=1) grouped_gemm_bf16 and the bf16 expert_mlp run this kernel
    (a spy counts its launches: the MLP's w13 with SwiGLU, then w2 with the routing weight) and match fp32; M = 0
    launches nothing; MOE_KERNELS_BF16_GLUON=0: the Triton kernel runs."""
    from moe_kernels import ops
    from moe_kernels.ops import grouped_gemm as gg

    launches = []
    real = gb.launch
    monkeypatch.setattr(gb, "launch", lambda *a, **k: (launches.append(k.get("swiglu", False)), real(*a, **k))[1])
    monkeypatch.setenv("MOE_KERNELS_BF16_GLUON", "1")
    counts = {"skewed": [2000, 3, 0, 517, 1, 0, 700], "m0": [0, 0, 0], "one_expert": [0, 1029, 0]}[case]
    E, H, I = len(counts), 1024, 384
    M = sum(counts)
    offsets = _offsets(counts, "cuda")
    x = torch.randn(M, H, device="cuda", dtype=torch.bfloat16)
    w13 = (torch.randn(E, 2 * I, H, device="cuda") * H**-0.5).bfloat16()
    w2 = (torch.randn(E, H, I, device="cuda") * I**-0.5).bfloat16()
    rw = torch.rand(M, device="cuda")
    poison_allocator((M, 2 * I), torch.bfloat16, "cuda")
    y = ops.grouped_gemm_bf16(x, w13, offsets)
    poison_allocator((M, H), torch.bfloat16, "cuda")
    z = ops.expert_mlp(x, None, offsets, w13, None, w2, None, rw)
    assert not gb.FAILED, gb.FAILED
    if case == "m0":
        assert launches == [] and y.shape == (0, 2 * I) and z.shape == (0, H)
        return
    assert launches == [False, True, False]
    assert_close_rel(y, _reference(x, w13, offsets), 1e-2, "grouped_gemm_bf16 via gluon")
    h = _reference(x, w13, offsets, swiglu=True).bfloat16()  # the MLP rounds h to bf16 between the GEMMs
    assert_close_rel(z, _reference(h, w2, offsets, row_weight=rw), 2e-2, "expert_mlp via gluon")
    monkeypatch.setenv("MOE_KERNELS_BF16_GLUON", "0")
    y2 = gg.grouped_gemm_bf16(x, w13, offsets)
    assert len(launches) == 3  # off: the Triton kernel
    assert_close_rel(y, y2.float(), 1e-2, "gluon vs triton")


@pytest.mark.gpu
@needs_gluon
@needs_sm90
def test_default_takes_gluon_from_256_rows_an_expert(monkeypatch):
    """Unset MOE_KERNELS_BF16_GLUON: the Gluon kernel where the experts average >= BF16_GLUON_MIN_ROWS rows (where
    it was timed), the Triton kernel below; both match fp32."""
    from moe_kernels.ops import grouped_gemm as gg

    launches = []
    real = gb.launch
    monkeypatch.setattr(gb, "launch", lambda *a, **k: (launches.append(1), real(*a, **k))[1])
    monkeypatch.delenv("MOE_KERNELS_BF16_GLUON", raising=False)
    E, H, N = 4, 512, 384
    w = (torch.randn(E, N, H, device="cuda") * H**-0.5).bfloat16()
    for per_expert, want in [(gg.BF16_GLUON_MIN_ROWS - 1, 0), (gg.BF16_GLUON_MIN_ROWS, 1)]:
        launches.clear()
        counts = [per_expert] * E
        offsets = _offsets(counts, "cuda")
        x = torch.randn(sum(counts), H, device="cuda", dtype=torch.bfloat16)
        y = gg.grouped_gemm_bf16(x, w, offsets)
        assert len(launches) == want, (per_expert, launches)
        assert_close_rel(y, _reference(x, w, offsets), 1e-2, f"default dispatch at {per_expert} rows an expert")
