"""Programmatic dependent launch of the decode chain (on by default on sm_90+, MOE_KERNELS_PDL=0 off): when it is
on; the chain's kernels compiled offline for sm_90a with and without it (griddepcontrol in the PTX only with it, the
wait before any memory access); on a GPU, the MoE layer's decode steps eager and in a CUDA graph give the same bits
with it as without."""
import ast
import os
import subprocess
import sys

import pytest
import torch

import moe_kernels as mk
from moe_kernels.ops import _common

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
TRITON36 = "/tmp/tr36"
CUDA0 = torch.device("cuda", 0)  # an index: pdl() then asks no CUDA runtime for the current device


def test_pdl_on_by_default_off_on_the_cpu_and_interpreted(monkeypatch):
    monkeypatch.setattr(_common, "_capability_major", lambda index: 9)  # as an H100 would say, without one
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("MOE_KERNELS_PDL", raising=False)
    assert _common.pdl(CUDA0) == (_common.gdc_wait is not None)  # unset: on (sm_90+)
    monkeypatch.setenv("MOE_KERNELS_PDL", "0")
    assert not _common.pdl(CUDA0) and _common.pdl_kwargs(CUDA0) == {}
    monkeypatch.setenv("MOE_KERNELS_PDL", "1")
    assert not _common.pdl(torch.device("cpu"))
    assert _common.pdl(CUDA0) == (_common.gdc_wait is not None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read at each call, as the switch is
    assert not _common.pdl(CUDA0) and _common.pdl_kwargs(CUDA0) == {}
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(_common, "_capability_major", lambda index: 8)  # Ampere: no griddepcontrol
    assert not _common.pdl(CUDA0)


def test_pdl_kwargs_when_on(monkeypatch):
    if _common.gdc_wait is None:
        pytest.skip("this Triton has no gdc_wait")
    monkeypatch.setattr(_common, "_capability_major", lambda index: 9)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("MOE_KERNELS_PDL", "1")
    assert _common.pdl_kwargs(CUDA0) == dict(PDL=True, launch_pdl=True)


# ---------------------------------------------------------------------------------------------------------------
# offline sm_90a compile (a process of its own: this one may run Triton's interpreter)

_COMPILE = r'''
import importlib, re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from moe_kernels.ops import grouped_gemm_decode as gd, routing as rt
pm = importlib.import_module("moe_kernels.ops.permute")  # the module (ops.permute is the op)

# the decode step's forms: T = 1 at top-8 of 256 experts (route: a GEMV split 28 x 8 ways; permute: the inline scatter,
# fp8), the index and scan kernels of longer batches, the FP8 decode GEMM (SwiGLU + e4m3, split-K; pointers and TMA).
# Pointers not named are *i32, other arguments i32.
F32 = "*fp32"
KERNELS = {
    "route": (rt._route_kernel, dict(x_ptr="*bf16", w_ptr="*bf16", bias_ptr=F32, escale_ptr=F32, weights_ptr=F32,
                                      ws_ptr=F32, routed_scaling_factor="fp32"),
              dict(TOP_K=8, K_PAD=8, SIGMOID=1, N_GROUP=8, TOPK_GROUP=4, G_PAD=8, HAS_BIAS=1, HAS_ESCALE=0, NORM=1,
                   FP32_DOT=0, EVEN_K=1, GROUPS_AS_AXIS=1, BLOCK_M=1, BLOCK_E=256, BLOCK_K=256, SPLIT_K=28,
                   E_SPLIT=8), 4),
    "index": (pm._index_kernel, {}, dict(SINGLE=1, CHUNK=128, BLOCK_E=256), 8),
    "scan": (pm._scan_kernel, {}, dict(ROWS=32, BLOCK_E=256), 8),
    "scatter": (pm._scatter_kernel, dict(x_ptr="*bf16", out_ptr="*fp8e4nv", scale_ptr=F32),
                dict(TOP_K=8, BLOCKED=0, FP8=1, BLOCK_H=2048, GROUP=128, INLINE=1, N_PAD=16, BLOCK_E=256), 4),
    "unpermute": (pm._unpermute_kernel, dict(y_ptr="*bf16", w_ptr=F32, out_ptr="*bf16", add_ptr="*bf16"),
                  dict(TOP_K=8, BLOCK_H=1024, ADD=1), 4),
    "decode_gemm": (gd._grouped_gemm_decode_kernel,
                    dict(a_ptr="*fp8e4nv", a_desc="*fp8e4nv", w_ptr="*fp8e4nv", w_desc="*fp8e4nv", a_scale_ptr=F32,
                         w_scale_ptr=F32, row_weight_ptr=F32, out_ptr="*fp8e4nv", out_scale_ptr=F32, ws_ptr=F32),
                    dict(FP8=1, SWIGLU=1, QUANT_OUT=1, ROW_WEIGHT=0, MASKED=0, EVEN_K=1, IEEE=0, UPCAST=0,
                         BLOCK_N=128, BLOCK_T=16, BLOCK_K=128, E_PAD=256, SPLIT_K=4, USE_TMA=0), 4),
}
KERNELS["decode_gemm_tma"] = (gd._grouped_gemm_decode_kernel, dict(
    KERNELS["decode_gemm"][1], a_desc="tensordesc<fp8e4nv[16, 128]>", w_desc="tensordesc<fp8e4nv[128, 128]>"),
    dict(KERNELS["decode_gemm"][2], USE_TMA=1), 4)
MEMORY = re.compile(r"\b(?:ld\.global|st\.global|atom\.|red\.|cp\.async|prefetch)")
for name, (k, types, const, warps) in KERNELS.items():
    names = list(k.arg_names)
    for on in (True, False):
        c = dict(const, PDL=on)
        sig = {n: "constexpr" if n in c else types.get(n, "*i32" if n.endswith("_ptr") else "i32") for n in names}
        src = ASTSource(k, sig, constexprs={(names.index(a),): v for a, v in c.items()})
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["ptx"]
        wait, launch = ptx.find("griddepcontrol.wait"), ptx.find("griddepcontrol.launch_dependents")
        first = MEMORY.search(ptx)
        print(repr((name, on, wait >= 0, launch >= 0, wait < first.start() if first and wait >= 0 else None)))
print(triton.__version__)
'''


@pytest.fixture(scope="module", params=[None, pytest.param(TRITON36, id="triton36")])
def sm90_ptx(request):
    """(kernel, PDL, has the wait, has launch_dependents, the wait before the first global memory access) per kernel
    and PDL, compiled offline for sm_90a with the local Triton or the wheel at /tmp/tr36 (skips where absent)."""
    triton_path = request.param
    if triton_path and not os.path.isdir(triton_path):
        pytest.skip(f"no Triton 3.6 wheel at {triton_path}")
    pytest.importorskip("triton.backends.nvidia")
    path = [p for p in (triton_path, ROOT, os.environ.get("PYTHONPATH")) if p]
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join(path))
    proc = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True, env=env, timeout=600,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    *rows, version = proc.stdout.strip().splitlines()
    if triton_path:
        assert version.startswith("3.6"), version
    return [ast.literal_eval(r) for r in rows]


def test_decode_chain_compiles_griddepcontrol_only_with_pdl(sm90_ptx):
    assert {r[0] for r in sm90_ptx} == {"route", "index", "scan", "scatter", "unpermute", "decode_gemm",
                                         "decode_gemm_tma"}
    for name, on, wait, launch, wait_first in sm90_ptx:
        if on:
            assert wait and launch and wait_first, (name, on, wait, launch, wait_first)
        else:
            assert not wait and not launch, (name, on, wait, launch)


# ---------------------------------------------------------------------------------------------------------------
# on a GPU: the same bits with and without PDL, eager and replayed


def _hopper():
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90+")
    if _common.gdc_wait is None:
        pytest.skip("this Triton has no gdc_wait")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp8", "bf16"])
@pytest.mark.parametrize("T", [1, 8])
def test_decode_chain_same_bits_with_pdl(precision, T, monkeypatch):
    _hopper()
    monkeypatch.setenv("MOE_KERNELS_VALUE_CHECKS", "0")
    monkeypatch.delenv("MOE_KERNELS_PDL", raising=False)
    torch.manual_seed(0)
    layer = mk.MoELayer(hidden_size=512, intermediate_size=256, num_experts=64, top_k=8, scoring="sigmoid",
                        n_group=8, topk_group=4, routed_scaling_factor=2.5, n_shared_experts=1, precision=precision,
                        device="cuda", dtype=torch.bfloat16).eval()
    layer.cuda_graphs = False  # the graph below is this test's own

    def step(x, on):
        monkeypatch.setenv("MOE_KERNELS_PDL", "1" if on else "0")
        return layer(x)

    with torch.no_grad():
        x = torch.randn(T, 512, device="cuda", dtype=torch.bfloat16)
        want = step(x, False)
        assert torch.equal(step(x, True), want), "eager"
        static_x = x.clone()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        monkeypatch.setenv("MOE_KERNELS_PDL", "1")
        with torch.cuda.graph(graph):
            static_y = layer(static_x)
        for i in range(3):  # new tokens: new routing, new experts hit
            static_x.copy_(torch.randn(T, 512, device="cuda", dtype=torch.bfloat16))
            graph.replay()
            assert torch.equal(static_y, step(static_x, False)), f"replay {i}"


@pytest.mark.gpu
def test_decode_gemm_launches_with_pdl(monkeypatch):
    """The switch reaches the launch: the compiled decode kernel carries launch_pdl."""
    _hopper()
    from moe_kernels import reference as R
    from moe_kernels.ops import grouped_gemm as gg
    from moe_kernels.ops import grouped_gemm_configs as cfgs

    E, N, K = 4, 256, 256
    offsets = torch.tensor([0, 1, 1, 3, 3], dtype=torch.int32, device="cuda")
    a, a_scale = R.quantize_fp8(torch.randn(3, K, device="cuda"))
    w, w_scale = R.quantize_weight_fp8(torch.randn(E, N, K, device="cuda") / K**0.5)
    outs = {}
    for on in (False, True):
        monkeypatch.setenv("MOE_KERNELS_PDL", "1" if on else "0")
        outs[on] = torch.empty(3, N, dtype=torch.bfloat16, device="cuda")
        k = gg._launch(a, a_scale, w, w_scale, outs[on], offsets=offsets, cfg=dict(cfgs.DECODE_DEFAULT, BLOCK_T=16))
        assert bool(k.metadata.launch_pdl) == on
    assert torch.equal(outs[True], outs[False])
