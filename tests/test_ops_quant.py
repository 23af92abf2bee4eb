"""mk.ops.quantize_fp8 (Triton, 1x128 groups) and quantize_weight_fp8 against moe_kernels.reference.quant."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before moe_kernels: kernels run through the interpreter

import pytest  # noqa: E402

import moe_kernels as mk  # noqa: E402
from moe_kernels import reference as R  # noqa: E402
from _helpers import assert_close_rel  # noqa: E402
from test_ops_permute import assert_fp8_close  # noqa: E402


def special_rows(M, K, dtype, device):
    x = torch.randn(M, K) * torch.logspace(-3, 3, M)[:, None]  # scales over six decades
    if M > 4:
        x[1] = 0.0  # all-zero groups: the guarded (tiny, finite) scale
        x[2, 3] = 3e4  # beyond e4m3's range: absorbed by the scale, never inf
        x[3, :128] = 1e-3 * torch.randn(128)
        x[3, 0] = 10.0  # one large value: the rest of its group lands on e4m3 subnormals or 0
        x[4, :64] = 448.0  # exact maxima and halfway values
        x[4, 64:128] = torch.arange(64) * 0.5
    return x.to(dtype).to(device)


# name: M, K, dtype
CASES = {
    "odd_M_bf16": (37, 256, torch.bfloat16),
    "fp32_K384": (33, 384, torch.float32),
    "fp16": (16, 128, torch.float16),
    "M1": (1, 128, torch.bfloat16),
    "M0": (0, 128, torch.bfloat16),
}


@pytest.mark.parametrize("case", list(CASES))
def test_quantize_fp8_matches_reference(case, device):
    M, K, dtype = CASES[case]
    x = special_rows(M, K, dtype, device)
    q, s = mk.ops.quantize_fp8(x)
    qr, sr = R.quantize_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (M, K)
    assert s.dtype == torch.float32 and s.shape == (M, K // 128)
    if M:
        assert_close_rel(s, sr, 1e-6, "scales")
        assert torch.isfinite(s).all() and (s > 0).all()
    assert_fp8_close(q, qr)
    assert torch.isfinite(R.dequantize_fp8(q.cpu(), s.cpu())).all()


def test_quantize_fp8_rejects_bad_arguments():
    with pytest.raises(ValueError, match="128"):
        mk.ops.quantize_fp8(torch.randn(4, 200))
    with pytest.raises(ValueError, match="x"):
        mk.ops.quantize_fp8(torch.randn(4, 2, 128))
    with pytest.raises(TypeError, match="x"):
        mk.ops.quantize_fp8(torch.randint(0, 4, (4, 128)))
    with pytest.raises(ValueError, match="block"):
        mk.ops.quantize_fp8(torch.randn(4, 256), block=64)


def test_quantize_weight_fp8_is_the_reference(device):
    w = torch.randn(3, 300, 256, device=device)  # a ragged 128x128 block along N
    q, s = mk.ops.quantize_weight_fp8(w)
    qr, sr = R.quantize_weight_fp8(w)
    assert s.shape == (3, 3, 2) and torch.equal(s, sr)
    assert_fp8_close(q, qr)
    with pytest.raises(ValueError, match="block"):
        mk.ops.quantize_weight_fp8(w, block=(64, 128))


def test_quantize_fp8_is_a_custom_op(device):
    x = torch.randn(8, 256, device=device)
    torch.library.opcheck(torch.ops.moe_kernels.quantize_fp8.default, (x, 128),
                          test_utils=("test_schema", "test_faketensor"))
    got = torch.compile(lambda t: mk.ops.quantize_fp8(t), backend="aot_eager", fullgraph=True)(x)
    want = mk.ops.quantize_fp8(x)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8))


def test_reference_scale_is_the_ieee_quotient(device):
    """reference.quant.scale_of(amax) is fp32(amax / 448) correctly rounded on every device (a float64 quotient of
    two floats rounds to the correctly rounded float one). torch on CUDA computes ``t / 448.0`` as t times the
    rounded reciprocal, one ulp off for some amax: that was the reference's scale on the GPU until 2026-12-07."""
    from moe_kernels.reference.quant import MIN_AMAX, scale_of

    amax = (torch.rand(1 << 16, generator=torch.Generator().manual_seed(3)) * 50).clamp(min=MIN_AMAX)
    want = (amax.double() / 448.0).float()
    got = scale_of(amax.to(device)).cpu()
    assert torch.equal(got, want), f"{int((got != want).sum())} of {amax.numel()} scales are not the IEEE quotient"


@pytest.mark.gpu
def test_quantize_fp8_large():
    x = torch.randn(4096, 7168, device="cuda", dtype=torch.bfloat16) * 3
    q, s = mk.ops.quantize_fp8(x)
    qr, sr = R.quantize_fp8(x)
    # Both divide with IEEE rounding on the GPU (the reference by a tensor of 448s: reference.quant.scale_of), so
    # they agree bit for bit. (When the reference divided by the Python scalar 448, torch multiplied by its rounded
    # reciprocal: ~1 scale in 10^3 one fp32 ulp off, ~0.2% of the e4m3 values one step off.)
    assert torch.equal(s, sr), f"{int((s != sr).sum())} scales differ"
    n = assert_fp8_close(q, qr)
    assert n == 0, f"{n} e4m3 values one step from the reference"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantize_fp8_nan_spreads_through_its_group_only(dtype, device):
    """docs/numerics.md: a NaN spreads through its 1x128 group (NaN scale, every value NaN), as in the reference;
    the other groups match it as in test_quantize_fp8_matches_reference. (The kernel's max dropped NaNs: the group
    came out finite, about 0.)"""
    x = torch.randn(5, 384, dtype=dtype)
    x[1, 200] = float("nan")  # row 1, group 1
    x[3, 0] = float("nan")  # row 3, group 0
    x = x.to(device)
    qr, sr = (t.cpu() for t in R.quantize_fp8(x))  # the reference on the same device: the same IEEE division
    q, s = mk.ops.quantize_fp8(x)
    q, s = q.cpu(), s.cpu()
    nan_groups = torch.zeros(5, 3, dtype=torch.bool)
    nan_groups[1, 1] = nan_groups[3, 0] = True
    assert torch.equal(torch.isnan(sr), nan_groups)  # what the reference defines
    assert torch.equal(torch.isnan(s), nan_groups)
    assert torch.isnan(q.float().view(5, 3, 128)[nan_groups]).all()
    assert not torch.isnan(q.float().view(5, 3, 128)[~nan_groups]).any()
    assert_close_rel(s[~nan_groups], sr[~nan_groups], 1e-6, "scales of the groups without NaN")  # as above
    assert_fp8_close(q.view(5, 3, 128)[~nan_groups], qr.view(5, 3, 128)[~nan_groups])


def test_permute_fp8_nan_spreads_through_its_group_only(device):
    """The fused quantisation of permute(fp8=True) shares the kernel helper: the same rule."""
    x = torch.randn(4, 256)
    x[2, 130] = float("nan")
    ids = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2]], dtype=torch.int32)
    p = mk.ops.permute(x.to(device), ids.to(device), 3, fp8=True)
    rows_of_token2 = (p.token_index.cpu() == 2).nonzero().flatten()
    nan_scale = torch.isnan(p.scale.cpu())
    assert nan_scale.sum() == 2 and nan_scale[rows_of_token2, 1].all()  # token 2's group 1, in both its copies
    assert torch.isnan(p.x.cpu().float()[rows_of_token2, 128:]).all()
    assert not torch.isnan(p.x.cpu().float()[:, :128]).any()


_DIV_PTX = """
import re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from moe_kernels.ops import grouped_gemm as gg, quant
def ptx(k, types, constexprs, warps):
    names = list(k.arg_names)
    src = ASTSource(k, {n: types.get(n, "i32") for n in names},
                    constexprs={(names.index(c),): v for c, v in constexprs.items()})
    for c in constexprs:
        src.signature[c] = "constexpr"
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["ptx"]
rows = ptx(quant._quantize_rows_kernel, dict(x_ptr="*bf16", q_ptr="*fp8e4nv", s_ptr="*fp32"),
           dict(BLOCK_M=32, GROUP=128), 4)
master = ptx(gg._quantize_master_kernel, dict(w_ptr="*bf16", q_ptr="*fp8e4nv", s_ptr="*fp32", qt_ptr="*fp8e4nv",
                                              st_ptr="*fp32"), dict(TRANSPOSED=1, BLOCK=128), 8)
find = lambda p: sorted(set(re.findall(r"\\b(?:div|rcp)\\.[a-z.]*f32\\b", p)))
print(triton.__version__, find(rows), find(master))
"""


@pytest.mark.parametrize("triton_path", [None, "/tmp/tr36"], ids=["local", "triton36"])
def test_quantize_kernels_divide_with_ieee_rounding_on_sm90(triton_path):
    """The activation and master-weight quantisation kernels compile for sm_90a to div.rn.f32 only (the reference's
    IEEE divisions): Triton 3.6 drops tl.fdiv's ieee_rounding flag (div.full.f32, ~2 ulp), which on an H100 made
    e4m3 values fall on the other side of rounding ties while the interpreter (numpy division) matched."""
    import ast
    import os
    import subprocess
    import sys

    if triton_path and not os.path.isdir(triton_path):
        pytest.skip(f"no Triton 3.6 wheel at {triton_path}")
    pytest.importorskip("triton.backends.nvidia")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = [p for p in (triton_path, root, os.environ.get("PYTHONPATH")) if p]
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join(path))
    proc = subprocess.run([sys.executable, "-c", _DIV_PTX], capture_output=True, text=True, env=env, timeout=300,
                          cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[-1]
    version, rest = line.split(" ", 1)
    rows, master = rest.split("] [")
    rows, master = ast.literal_eval(rows + "]"), ast.literal_eval("[" + master)
    if triton_path:
        assert version.startswith("3.6"), version
    assert rows == ["div.rn.f32"] and master == ["div.rn.f32"], (rows, master)
