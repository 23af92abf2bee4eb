"""The FP8 weight gradient as a K-grouped GEMM, ``moe_kernels.ops.grouped_wgrad_fp8``.

CPU: the quantisation pass (Triton interpreter) against the torch formulation of the recipe, value for value (odd
and empty experts, one expert, M = 0, columns not a multiple of the program's block, NaN-filled outputs before the
launch, a NaN inside one group); its group offsets; a float64 model of the GEMM kernel's walk (persistent
programs, expert-major tiles, the expert's padded groups, TMA's zero fill past K, stores clipped at K) over the
pass's outputs against ``grouped_gemm._wgrad_fp8_reference`` (the contract); the GEMM kernel compiled offline for
sm_90a (Triton 3.8 here, and the 3.6 wheel at /tmp/tr36 when present): no spills, no wgmma serialisation notes,
the instruction mix the design needs; the launcher's grid and switches (kernel replaced by a recorder); which
inputs it takes.

GPU (marked gpu, sm_90 only): the full path (pass + GEMM) against ``_wgrad_fp8_reference`` and against float64,
with odd / empty / single-expert cases, M = 0, K tails, few programs, stage and unroll variants, bf16 / fp32
outputs NaN-filled before the launch; non-finite rows kept inside their expert; ``grouped_wgrad(fp8=True)``
taking this path by default (MOE_KERNELS_WGRAD_FP8=triton opts out); a training-sized skewed call against the
Triton FP8 kernel.

Error bounds (relative Frobenius): against its torch formulation the products differ only by Hopper's FP8
tensor-core accumulation inside one 128-deep product (4.5e-4 measured for the Triton FP8 kernel on an H200; 2e-3
asked, as tests/test_autograd.py does) plus the output's rounding (bf16: ~2e-3 more); against float64 the FP8
quantisation itself (8e-2, as tests/test_autograd.py).
"""
import ast
import os
import subprocess
import sys

import pytest
import torch

from _helpers import assert_close_rel, grouped_dw_f64 as _exact, offsets_for as _offsets, poison_allocator, zipf_counts

try:
    from moe_kernels.ops import grouped_wgrad_fp8 as gf
except ImportError:  # Triton without Gluon
    gf = None

from moe_kernels import reference
from moe_kernels.ops import grouped_gemm as gg

needs_gluon = pytest.mark.skipif(gf is None, reason="this Triton has no Gluon")
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
TRITON36 = "/tmp/tr36"


def _nan_outputs(M, N, K, E, device="cpu"):
    """The pass's five outputs, filled with NaN (e4m3: 0x7F) / -1 before the launch."""
    G = gf.padded_groups(M, E)
    def q(rows):
        return torch.full((rows, G * 128), 0x7F, dtype=torch.uint8, device=device).view(torch.float8_e4m3fn)

    def s(cols):
        return torch.full((G, cols), float("nan"), device=device)

    return q(N), s(N), q(K), s(K), torch.full((E + 1,), -1, dtype=torch.int32, device=device)


def _check_pass(dy, x, offsets, out):
    """Every used group of the pass's outputs against the torch formulation (reference.quantize_fp8 on the group's
    transposed rows: one 1x128 group per column), the zero padding of each expert's last group, the offsets."""
    dyq, dys, xq, xs, gofs = out
    o = offsets.tolist()
    want = [0]
    for lo, hi in zip(o, o[1:]):
        want.append(want[-1] + -(-(hi - lo) // 128))
    assert gofs.tolist() == want
    for e, (lo, hi) in enumerate(zip(o, o[1:])):
        for j, m0 in enumerate(range(lo, hi, 128)):
            m1 = min(m0 + 128, hi)
            g = want[e] + j
            for name, src, q, s in (("dy", dy, dyq, dys), ("x", x, xq, xs)):
                rq, rs = reference.quantize_fp8(src[m0:m1].t().float(), m1 - m0)
                # values, not bytes: the interpreter's e4m3 rounding gives +0 where the cast gives -0
                torch.testing.assert_close(q[:, g * 128:g * 128 + m1 - m0].float(), rq.float(), rtol=0, atol=0,
                                           equal_nan=True, msg=f"{name} expert {e} group {j}")
                torch.testing.assert_close(s[g], rs[:, 0], rtol=0, atol=0, equal_nan=True,
                                           msg=f"{name} scales, expert {e} group {j}")
                pad = q[:, g * 128 + m1 - m0:(g + 1) * 128].float()
                assert (pad == 0).all(), f"{name} expert {e}: padded tokens of its last group not zero"


# ---------------------------------------------------------------------------------------------------------------
# CPU: the quantisation pass (interpreter on CPU; the same test runs on CUDA)

PASS_CASES = {  # name: (rows per expert, N, K)
    "odd_and_empty": ([130, 0, 7, 1, 256, 129], 200, 72),
    "one_expert": ([0, 300, 0], 128, 136),
    "all_empty": ([0, 0, 0], 128, 64),  # M = 0
    "single_row": ([1], 64, 16),
}


@needs_gluon
@pytest.mark.parametrize("name", list(PASS_CASES))
def test_quantize_transposed_matches_the_recipe(name, device):
    from _helpers import skip_unless_cuda

    skip_unless_cuda(device)
    counts, N, K = PASS_CASES[name]
    M = sum(counts)
    offsets = _offsets(counts, device)
    dy = torch.randn(M + 3, N, device=device).to(torch.bfloat16)
    x = (torch.randn(M + 3, K, device=device) * 100).to(torch.bfloat16)
    dy[M:] = float("nan")  # rows of no expert: never read
    x[M:] = float("inf")
    if M > 2:
        dy[M - 2, 5] = float("nan")  # a NaN in the last expert: its group's column 5 only (scale and values NaN)
        x[1] *= 1e4  # one large row: its group's scales are its own
    out = _nan_outputs(M + 3, N, K, len(counts), device)
    res = gf.quantize_transposed(dy, x, offsets, len(counts), out=out, block_c=64 if device == "cpu" else None)
    assert all(a is b for a, b in zip(res, out))
    _check_pass(dy.cpu(), x.cpu(), offsets.cpu(), [t.cpu() for t in out])
    if M > 2:
        e = max(i for i, c in enumerate(counts) if c)  # the last expert with rows holds row M - 2
        j = (counts[e] - 2) // 128  # in its group j
        g = out[4][e].item() + j
        in_group = min(128, counts[e] - 128 * j)
        assert torch.isnan(out[1][g, 5]) and torch.isfinite(out[1][g, :5]).all()
        assert torch.isnan(out[0][5, g * 128:g * 128 + in_group].float()).all()
        assert (out[0][5, g * 128 + in_group:(g + 1) * 128].float() == 0).all()


@needs_gluon
def test_quantize_transposed_default_buffers_and_shape_check():
    counts = [3, 0, 140]
    offsets = _offsets(counts)
    dy = torch.randn(sum(counts), 128, dtype=torch.bfloat16)
    x = torch.randn(sum(counts), 8, dtype=torch.bfloat16)
    out = gf.quantize_transposed(dy, x, offsets, 3)
    G = gf.padded_groups(sum(counts), 3)
    assert [tuple(t.shape) for t in out] == [(128, G * 128), (G, 128), (8, G * 128), (G, 8), (4,)]
    assert G >= out[4][-1].item() == 3
    _check_pass(dy, x, offsets, out)
    with pytest.raises(ValueError, match="out"):
        gf.quantize_transposed(dy, x, offsets, 3, out=tuple(t[:1] for t in out))


@needs_gluon
@pytest.mark.parametrize("counts", [[0], [128, 129, 0, 1, 255, 256, 257], [5] * 300])
def test_group_offsets(counts):
    """gofs = prefix sums of ceil(rows / 128), for E from 1 to 300 (E_PAD past one block); padded_groups bounds
    the total."""
    offsets = _offsets(counts)
    gofs = torch.full((len(counts) + 1,), -7, dtype=torch.int32)
    e_pad = max(16, 1 << len(counts).bit_length())
    gf._group_offsets_kernel[(1,)](offsets, gofs, len(counts), E_PAD=e_pad)
    want = [0]
    for c in counts:
        want.append(want[-1] + -(-c // 128))
    assert gofs.tolist() == want
    assert want[-1] <= gf.padded_groups(sum(counts), len(counts))


def _gemm_model(out, N, K, E, programs):
    """The GEMM kernel's walk in float64 over the pass's outputs: persistent programs taking tiles p, p + grid, ...;
    tile t = (expert, 128-row block of dW, 128-column block); the expert's padded groups g in gofs[e]:gofs[e+1], one
    product each of the dYt box and the Xt box (rows past K: TMA's zero fill, scales too), promoted with sa x sb;
    the tile stored with columns past K clipped. Every element of dW is written once."""
    dyq, dys, xq, xs, gofs = out
    num_kb = -(-K // 128)
    tiles_per_e = (N // 128) * num_kb
    num_tiles = E * tiles_per_e
    grid = min(num_tiles, programs)
    kp = num_kb * 128
    xq = torch.nn.functional.pad(xq.double(), (0, 0, 0, kp - K))
    xs = torch.nn.functional.pad(xs.double(), (0, kp - K))
    dyq, dys = dyq.double(), dys.double()
    g = gofs.tolist()
    dw = torch.full((E, N, K), float("nan"), dtype=torch.float64)
    written = torch.zeros(E, N, K, dtype=torch.int32)
    for pid in range(grid):
        for j in range(-(-(num_tiles - pid) // grid)):
            e, r = divmod(pid + j * grid, tiles_per_e)
            nb, kb = divmod(r, num_kb)
            n0, k0 = nb * 128, kb * 128
            acc = torch.zeros(128, 128, dtype=torch.float64)
            for gi in range(g[e], g[e + 1]):
                a = dyq[n0:n0 + 128, gi * 128:(gi + 1) * 128]
                b = xq[k0:k0 + 128, gi * 128:(gi + 1) * 128]
                acc += (a @ b.t()) * (dys[gi, n0:n0 + 128][:, None] * xs[gi, k0:k0 + 128][None, :])
            w = min(128, K - k0)
            dw[e, n0:n0 + 128, k0:k0 + w] = acc[:, :w]
            written[e, n0:n0 + 128, k0:k0 + w] += 1
    assert (written == 1).all()
    return dw


@needs_gluon
@pytest.mark.parametrize("counts,N,K,programs", [([130, 0, 7, 1, 256], 256, 200, 7), ([0, 0, 300, 0], 128, 136, 2),
                                                 ([64, 65], 384, 64, 100)])
def test_gemm_model_over_the_pass_matches_the_reference(counts, N, K, programs):
    """The layout contract between the two kernels: the GEMM's walk (modelled in float64) over the pass's outputs
    (interpreter) is ``_wgrad_fp8_reference`` (torch, fp32) to fp32 rounding; empty experts give zeros; rows of no
    expert (NaN / inf here) are never read."""
    M = sum(counts)
    E = len(counts)
    offsets = _offsets(counts)
    dy = torch.randn(M + 5, N).to(torch.bfloat16)
    x = torch.randn(M + 5, K).to(torch.bfloat16)
    dy[M:] = float("nan")
    x[M:] = float("inf")
    out = gf.quantize_transposed(dy, x, offsets, E, out=_nan_outputs(M + 5, N, K, E), block_c=64)
    got = _gemm_model(out, N, K, E, programs)
    want = gg._wgrad_fp8_reference(dy[:M], x[:M], offsets, E)
    for e, c in enumerate(counts):
        if c == 0:
            assert (got[e] == 0).all()
    assert_close_rel(got, want, 1e-6, "GEMM model over the pass vs _wgrad_fp8_reference")
    assert_close_rel(got, _exact(dy[:M], x[:M], offsets), 8e-2, "FP8 vs float64")


# ---------------------------------------------------------------------------------------------------------------
# CPU: offline compile, launcher, supports

def _compile(args, pythonpath_extra=None):
    path = [p for p in (pythonpath_extra, ROOT, os.environ.get("PYTHONPATH")) if p]
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join(path))
    proc = subprocess.run([sys.executable, "-m", "moe_kernels.ops.grouped_wgrad_fp8", *args], capture_output=True,
                          text=True, env=env, timeout=300, cwd=ROOT)
    if proc.returncode and "ptxas" in proc.stderr and "No such file" in proc.stderr:
        pytest.skip("no ptxas for an offline sm_90a build")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ast.literal_eval(proc.stdout.strip().splitlines()[-1])


@needs_gluon
@pytest.mark.parametrize("triton_path", [None, pytest.param(TRITON36, id="triton36")])
@pytest.mark.parametrize("out_dtype,stages,unroll,epi", [("bf16", 4, 4, 2), ("fp32", 4, 4, 1), ("bf16", 5, 4, 1),
                                                         ("bf16", 4, 2, 2)])
def test_compiles_for_sm90_without_spills_or_serialised_wgmma(out_dtype, stages, unroll, epi, triton_path):
    """Offline sm_90a build: no spill, none of ptxas's wgmma-serialisation notes (C75xx), e4m3 x e4m3 wgmma only, 4
    m64n128k32 per product and UNROLL + 1 product sites (the unrolled group and the one-at-a-time remainder), waits
    of 1 (a product in flight while the one before is promoted) and 0, 4 TMA loads a step (dYt, Xt, two scale
    rows) and 1 TMA store a tile, shared memory within sm_90's 227 KiB, the loader warp's registers handed to the
    math warps."""
    if triton_path and not os.path.isdir(triton_path):
        pytest.skip(f"no Triton 3.6 wheel at {triton_path}")
    r = _compile([out_dtype, str(stages), str(unroll)], triton_path)
    print(r)
    if triton_path:
        assert r["triton"].startswith("3.6"), r["triton"]
    assert r["stages"] == stages and r["epi_bufs"] == epi, r
    assert r["spill_bytes"] == 0, r
    assert r["ptxas_wgmma_warnings"] == [], r
    assert r["wgmma"] == 4 * (unroll + 1) and r["wgmma_e4m3"] == r["wgmma"], r
    assert r["wgmma_waits"] == ([0, 1] if unroll > 1 else [0]), r
    assert r["tma_loads"] == 4 and r["tma_stores"] == 1, r
    assert r["shared"] <= gf.SMEM_LIMIT, r
    assert gf.LOADER_REGS in r["setmaxnreg"] and max(r["setmaxnreg"]) >= 232, r


_QUANT_PTX = """
import re, sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from moe_kernels.ops import grouped_wgrad_fp8 as gf
k = gf._quantize_transposed_kernel
names = list(k.arg_names)
types = dict(dy_ptr="*bf16", x_ptr="*bf16", offsets_ptr="*i32", gofs_ptr="*i32", dyq_ptr="*fp8e4nv",
             xq_ptr="*fp8e4nv", dys_ptr="*fp32", xs_ptr="*fp32", E_PAD="constexpr", BLOCK_C="constexpr")
src = ASTSource(k, {n: types.get(n, "i32") for n in names},
                constexprs={(names.index("E_PAD"),): 16, (names.index("BLOCK_C"),): gf.QUANT_BLOCK_C})
ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": gf.QUANT_WARPS}).asm["ptx"]
print(triton.__version__, re.findall(r"\\b(?:div|rcp)\\.[a-z.]*f32\\b", ptx))
"""


def _sm90_divisions(script: str, triton_path: str | None) -> list[str]:
    """The fp32 divisions (div.* / rcp.*) in the sm_90a PTX that ``script`` prints, compiled offline with the Triton
    at ``triton_path`` (None: this one; skips when that wheel is absent)."""
    if triton_path and not os.path.isdir(triton_path):
        pytest.skip(f"no Triton 3.6 wheel at {triton_path}")
    path = [p for p in (triton_path, ROOT, os.environ.get("PYTHONPATH")) if p]
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join(path))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    version, ops = proc.stdout.strip().splitlines()[-1].split(" ", 1)
    if triton_path:
        assert version.startswith("3.6"), version
    return ast.literal_eval(ops)


@needs_gluon
@pytest.mark.parametrize("triton_path", [None, pytest.param(TRITON36, id="triton36")])
def test_quantize_pass_divides_with_ieee_rounding_on_sm90(triton_path):
    """The pass's sm_90a PTX divides with div.rn.f32 only (the reference's IEEE divisions, which the interpreter's
    numpy division also gives): no div.full / div.approx / rcp.approx. Triton 3.6 compiles tl.fdiv(...,
    ieee_rounding=True) to div.full.f32 (the flag is dropped, ~2 ulp): scales one ulp off and e4m3 values across a
    rounding tie, which failed the pass's GPU tests on an H100 while the interpreter passed them."""
    ops = _sm90_divisions(_QUANT_PTX, triton_path)
    assert ops and set(ops) == {"div.rn.f32"}, sorted(set(ops))


_MASTER_PTX = """
import re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from moe_kernels.ops import grouped_gemm as gg
k = gg._quantize_master_kernel
names = list(k.arg_names)
types = dict(w_ptr="*bf16", q_ptr="*fp8e4nv", s_ptr="*fp32", qt_ptr="*fp8e4nv", st_ptr="*fp32")
aligned = ("w_ptr", "q_ptr", "s_ptr", "qt_ptr", "st_ptr", "N", "K")  # what a real launch specialises
src = ASTSource(k, {n: "constexpr" if n in ("TRANSPOSED", "BLOCK") else types.get(n, "i32") for n in names},
                constexprs={(names.index("TRANSPOSED"),): True, (names.index("BLOCK"),): 128},
                attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["ptx"]
print(triton.__version__, re.findall(r"\\b(?:div|rcp)\\.[a-z.]*f32\\b", ptx))
"""


@pytest.mark.parametrize("triton_path", [None, pytest.param(TRITON36, id="triton36")])
def test_master_quantisation_divides_once_an_element_on_sm90(triton_path):
    """FP8 training's weight quantisation with its transposed copy (grouped_gemm._quantize_master_kernel, 8 warps,
    a 128 x 128 block: 64 values a thread) divides once a value plus once for the scale, IEEE-rounded: 65 div.rn.f32
    in the sm_90a PTX. Storing the e4m3 tile transposed straight from registers made Triton 3.6 rebuild it in a
    second layout from the bf16 input, divisions included (129: the 4.4-4.9 ms a training step on an H100,
    2026-12-07, for ~2 ms of memory traffic); the copy is now read back from the codes just stored."""
    ops = _sm90_divisions(_MASTER_PTX, triton_path)
    assert set(ops) == {"div.rn.f32"} and len(ops) == 65, (len(ops), sorted(set(ops)))


@needs_gluon
@pytest.mark.parametrize("out_dtype,env,want", [(torch.bfloat16, {}, (4, 4, 2)), (torch.float32, {}, (4, 4, 1)),
                                                (torch.bfloat16, {"STAGES": "5"}, (5, 4, 1)),
                                                (torch.float32, {"STAGES": "6"}, (4, 4, 1)),
                                                (torch.bfloat16, {"UNROLL": "2", "STAGES": "3"}, (3, 2, 2)),
                                                (torch.bfloat16, {"STAGES": "1", "UNROLL": "0"}, (2, 1, 2))])
@pytest.mark.parametrize("E,N,K,programs", [(4, 256, 384, 132), (3, 128, 200, 2), (1, 640, 4096, 5)])
def test_launcher_grid_and_tiles(E, N, K, programs, out_dtype, env, want, monkeypatch):
    """The persistent grid is min(tiles, programs); tiles per expert = N/128 x ceil(K/128); stages and unroll from
    MOE_KERNELS_WGRAD_FP8_STAGES / _UNROLL (4 / 4 by default), stages lowered until the ring and one epilogue
    buffer fit and at least 2 (the math warps wait for the next stage before they free the one before), unroll at
    least 1, two epilogue buffers where they fit; the register cap leaves room for the loader's warpgroup."""
    for k in ("STAGES", "UNROLL"):
        monkeypatch.delenv(f"MOE_KERNELS_WGRAD_FP8_{k}", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(f"MOE_KERNELS_WGRAD_FP8_{k}", v)
    calls = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kw: calls.append((grid, args, kw))

    monkeypatch.setattr(gf, "_wgrad_fp8_kernel", Recorder())
    M = 300
    G = gf.padded_groups(M, E)
    dw = torch.empty(E, N, K, dtype=out_dtype)
    bufs = (torch.zeros(N, G * 128, dtype=torch.float8_e4m3fn), torch.zeros(G, N),
            torch.zeros(K, G * 128, dtype=torch.float8_e4m3fn), torch.zeros(G, K),
            torch.zeros(E + 1, dtype=torch.int32))
    gf.gemm(*bufs, dw, programs=programs)
    (grid, args, kw), = calls
    tiles_per_e = (N // 128) * -(-K // 128)
    assert args[5] is bufs[4] and args[6:10] == (N, tiles_per_e, -(-K // 128), E * tiles_per_e)
    assert grid == (min(E * tiles_per_e, programs),)
    assert (kw["STAGES"], kw["UNROLL"], kw["EPI_BUFS"]) == want and kw["num_warps"] == 8
    assert gf.smem_bytes(kw["STAGES"], kw["EPI_BUFS"], dw.element_size()) <= gf.SMEM_LIMIT - 1024
    assert kw["maxnreg"] * 32 * (8 + 4) <= 65536


@needs_gluon
def test_supports_only_what_it_builds():
    bf = torch.bfloat16
    ok = gf.supports
    z = torch.zeros
    assert ok(z(64, 256, dtype=bf), z(64, 200, dtype=bf), z(2, 256, 200, dtype=bf)) is None
    assert ok(z(64, 256), z(64, 64), z(2, 256, 64)) is None  # fp32 operands and output
    assert "no rows" in ok(z(0, 256, dtype=bf), z(0, 64, dtype=bf), z(2, 256, 64, dtype=bf))
    assert "multiple of 128" in ok(z(64, 200, dtype=bf), z(64, 64, dtype=bf), z(2, 200, 64, dtype=bf))
    assert "multiple of 8" in ok(z(64, 256, dtype=bf), z(64, 60, dtype=bf), z(2, 256, 60, dtype=bf))
    assert "operands" in ok(z(64, 256, dtype=bf), z(64, 64, dtype=torch.float16), z(2, 256, 64, dtype=bf))
    assert "output" in ok(z(64, 256, dtype=bf), z(64, 64, dtype=bf), z(2, 256, 64, dtype=torch.float64))
    assert "contiguous" in ok(z(64, 512, dtype=bf)[:, :256], z(64, 64, dtype=bf), z(2, 256, 64, dtype=bf))


# ---------------------------------------------------------------------------------------------------------------
# GPU

def _sm90():
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


needs_sm90 = pytest.mark.skipif(not _sm90(), reason="needs an sm_90 GPU")

CASES = {  # name: (rows per expert, N, K)
    "odd_and_empty": ([17, 0, 1, 33, 9, 64, 65, 0, 200, 129], 256, 384),
    "one_expert_all_rows": ([0, 0, 523, 0], 128, 512),
    "single_expert": ([300], 256, 256),
    "k_tail": ([40, 90, 31], 128, 200),  # the last column tile partly past K
    "k_small": ([50, 77], 256, 72),  # K < 128: one column tile, mostly zero fill
    "many_experts": ([int(c) for c in torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(1))],
                     256, 640),
}


def _run_case(name, out_dtype, programs=None, stages=None, unroll=None):
    counts, N, K = CASES[name]
    M = sum(counts)
    offsets = _offsets(counts, "cuda")
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    dw = torch.full((len(counts), N, K), float("nan"), device="cuda", dtype=out_dtype)
    assert gf.supports(dy, x, dw) is None
    gf.launch(dy, x, offsets, dw, programs=programs, stages=stages, unroll=unroll)
    for e, c in enumerate(counts):
        if c == 0:  # an expert without rows: exactly zero, written (the NaN fill is gone)
            assert (dw[e] == 0).all(), f"expert {e} has no rows but a nonzero gradient"
    return dy, x, offsets, dw


@pytest.mark.gpu
@needs_gluon
@needs_sm90
@pytest.mark.parametrize("programs,stages,unroll", [(None, None, None), (3, 4, 4), (5, 5, 2), (2, 3, 1)])
@pytest.mark.parametrize("name", list(CASES))
def test_fp8_wgrad_matches_its_reference_and_float64(name, programs, stages, unroll):
    dy, x, offsets, dw = _run_case(name, torch.float32, programs, stages, unroll)
    E = dw.shape[0]
    what = f"{name} programs={programs} stages={stages} unroll={unroll}"
    assert_close_rel(dw, gg._wgrad_fp8_reference(dy, x, offsets, E), 2e-3, f"{what} vs _wgrad_fp8_reference")
    assert_close_rel(dw, _exact(dy, x, offsets), 8e-2, f"{what} vs float64")


@pytest.mark.gpu
@needs_gluon
@needs_sm90
@pytest.mark.parametrize("name", ["odd_and_empty", "k_tail", "many_experts"])
def test_fp8_wgrad_bf16_output(name):
    dy, x, offsets, dw = _run_case(name, torch.bfloat16)
    ref = gg._wgrad_fp8_reference(dy, x, offsets, dw.shape[0])
    assert_close_rel(dw, ref, 5e-3, f"{name} bf16 output vs _wgrad_fp8_reference")
    assert_close_rel(dw, _exact(dy, x, offsets), 8e-2, f"{name} bf16 output vs float64")


@pytest.mark.gpu
@needs_gluon
@needs_sm90
def test_quantize_transposed_on_cuda_matches_the_interpreter_contract():
    """The pass on the GPU (hardware e4m3 cast) against the torch formulation, value for value."""
    counts = [130, 0, 7, 1, 256, 129]
    offsets = _offsets(counts, "cuda")
    M = sum(counts)
    dy = torch.randn(M, 384, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(M, 200, device="cuda", dtype=torch.bfloat16)
    out = _nan_outputs(M, 384, 200, len(counts), "cuda")
    gf.quantize_transposed(dy, x, offsets, len(counts), out=out)
    _check_pass(dy.cpu(), x.cpu(), offsets.cpu(), [t.cpu() for t in out])


@pytest.mark.gpu
@needs_gluon
@needs_sm90
def test_nonfinite_rows_stay_in_their_expert():
    """inf / nan in an expert's rows reach that expert's gradient only (each expert's groups are its own in the
    padded token axis); rows past offsets[E] are never read."""
    counts, N, K = [37, 50, 0, 29], 256, 256
    offsets = _offsets(counts, "cuda")
    M = sum(counts) + 11
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    want = gg._wgrad_fp8_reference(dy[:M - 11], x[:M - 11], offsets, 4)
    x[37:40] = float("inf")  # expert 1's first rows
    dy[40:45] = float("nan")
    x[M - 11:] = float("nan")
    dy[M - 11:] = float("inf")
    dw = torch.full((4, N, K), float("nan"), device="cuda", dtype=torch.float32)
    gf.launch(dy, x, offsets, dw)
    assert not torch.isfinite(dw[1]).all()
    assert (dw[2] == 0).all()
    for e in (0, 3):
        assert_close_rel(dw[e], want[e], 2e-3, f"expert {e} beside non-finite rows")


@pytest.mark.gpu
@needs_gluon
@needs_sm90
@pytest.mark.parametrize("case", ["skewed", "m0"])
def test_grouped_wgrad_fp8_dispatches_to_gluon(case, monkeypatch):
    """MOE_KERNELS_WGRAD_FP8=gluon: grouped_wgrad(fp8=True) runs this path (a spy counts its launches) and matches
    the reference; M = 0 gives zeros without a launch; unset (auto) it runs too; =triton, the Triton FP8 kernel."""
    from moe_kernels import ops

    launches = []
    real = gf.launch
    monkeypatch.setattr(gf, "launch", lambda *a, **k: (launches.append(a[0].shape), real(*a, **k))[1])
    monkeypatch.setenv("MOE_KERNELS_WGRAD_FP8", "gluon")
    counts = [2000, 3, 0, 517, 1, 0, 700] if case == "skewed" else [0, 0, 0]
    E, N, K = len(counts), 512, 768
    offsets = _offsets(counts, "cuda")
    dy = torch.randn(sum(counts), N, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(sum(counts), K, device="cuda", dtype=torch.bfloat16)
    poison_allocator((E, N, K), torch.float32, "cuda")
    dw = ops.grouped_wgrad(dy, x, offsets, E, out_dtype=torch.float32, fp8=True)
    assert dw.dtype == torch.float32 and dw.shape == (E, N, K)
    assert not gf.FAILED, gf.FAILED
    if case == "m0":
        assert launches == [] and (dw == 0).all()
        return
    assert launches == [(sum(counts), N)]
    ref = gg._wgrad_fp8_reference(dy, x, offsets, E)
    assert_close_rel(dw, ref, 2e-3, "grouped_wgrad(fp8) via gluon")
    poison_allocator((E, N, K), torch.bfloat16, "cuda")
    dw16 = ops.grouped_wgrad(dy, x, offsets, E, fp8=True)
    assert len(launches) == 2 and dw16.dtype == torch.bfloat16
    assert_close_rel(dw16, ref, 5e-3, "grouped_wgrad(fp8) via gluon, bf16 out")
    monkeypatch.delenv("MOE_KERNELS_WGRAD_FP8")
    assert torch.equal(ops.grouped_wgrad(dy, x, offsets, E, out_dtype=torch.float32, fp8=True), dw)
    assert len(launches) == 3  # default (auto): the Gluon kernel
    monkeypatch.setenv("MOE_KERNELS_WGRAD_FP8", "triton")
    triton_dw = ops.grouped_wgrad(dy, x, offsets, E, out_dtype=torch.float32, fp8=True)
    assert len(launches) == 3  # opted out: the Triton kernel
    assert_close_rel(dw, triton_dw, 3e-3, "gluon vs the Triton FP8 kernel")


@pytest.mark.gpu
@needs_gluon
@needs_sm90
def test_fp8_wgrad_real_size_skewed(monkeypatch):
    """A training-sized call (16384 rows, 32 experts, Zipf-like skew with empty experts), against float64 and the
    reference on a few experts and against the Triton FP8 kernel everywhere."""
    from moe_kernels import ops

    counts = zipf_counts(16384)  # 32 experts, 5 and 17 empty
    N, K = 1024, 2048
    offsets = _offsets(counts, "cuda")
    dy = torch.randn(16384, N, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(16384, K, device="cuda", dtype=torch.bfloat16)
    dw = torch.full((32, N, K), float("nan"), device="cuda", dtype=torch.float32)
    gf.launch(dy, x, offsets, dw)
    o = offsets.tolist()
    for e in (0, 5, 1, 31):
        sub = torch.tensor([0, o[e + 1] - o[e]], dtype=torch.int32)
        ref = gg._wgrad_fp8_reference(dy[o[e]:o[e + 1]], x[o[e]:o[e + 1]], sub, 1)[0]
        if counts[e]:
            assert_close_rel(dw[e], ref, 2e-3, f"expert {e} ({counts[e]} rows) vs reference")
            assert_close_rel(dw[e], _exact(dy[o[e]:o[e + 1]], x[o[e]:o[e + 1]], sub)[0], 8e-2, f"expert {e} vs f64")
        else:
            assert (dw[e] == 0).all()
    monkeypatch.setenv("MOE_KERNELS_WGRAD_FP8", "triton")
    triton_dw = ops.grouped_wgrad(dy, x, offsets, 32, out_dtype=torch.float32, fp8=True)  # the Triton kernel
    assert_close_rel(dw, triton_dw, 3e-3, "gluon vs triton (FP8)")
