"""Compile the grouped GEMM kernels for sm_90 without a GPU and report registers, spills and shared memory.

    python tools/compile_sm90.py BLOCK_M=128 BLOCK_N=128 num_warps=16 num_stages=4 PAIR_N=1 [USE_TMA=1] [SWIGLU=1]
    python tools/compile_sm90.py WGMMA=1 BLOCK_M=128 num_warps=8 STAGES=4 UNROLL=4 [SWIGLU=1] [WS=1] [PERSISTENT=1]

The WGMMA form compiles the Gluon kernel (grouped_gemm_wgmma) and also reports ptxas's wgmma warnings: C7514
(a register of a product in flight is read or copied) and C7512 (not enough registers) mean ptxas serialised every
wgmma, which undoes the kernel's point. ``order`` is the K loop's shape: M = wgmma, W1/W0 = waits, F = promotion
FMAs, T = TMA loads, B = CTA barriers.

Catches compile errors and register spills of a config before it costs device time (local Triton version, which
may differ from the device's).
"""
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from moe_kernels.ops._sm90_offline import ptxas_report
from moe_kernels.ops.grouped_gemm import _grouped_gemm_kernel


def compile_cfg(**kw):
    opts = {"num_warps": kw.pop("num_warps", 8), "num_stages": kw.pop("num_stages", 3)}
    tma = kw.pop("USE_TMA", 1)
    fp8 = kw.pop("FP8", 1)
    BM, BN, BK = kw.get("BLOCK_M", 128), kw.get("BLOCK_N", 128), kw.get("BLOCK_K", 128 if fp8 else 64)
    el = "fp8e4nv" if fp8 else "bf16"
    names = list(_grouped_gemm_kernel.arg_names)
    const = dict(FP8=fp8, SWIGLU=0, QUANT_OUT=0, ROW_WEIGHT=0, MASKED=0, USE_TMA=tma, EVEN_K=1, IEEE=0, UPCAST=0,
                 BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, GROUP_M=8, E_PAD=32, PAIR_N=0, NO_SCALE=0,
                 stride_wk=1, stride_wsk=1)  # 1 is specialised at run time (contiguous W), so here too
    const.update(kw)
    sig = {}
    for n in names:
        if n in const:
            sig[n] = "constexpr"
        elif n == "a_desc":
            sig[n] = f"tensordesc<{el}[{BM}, {BK}]>" if tma else f"*{el}"
        elif n == "w_desc":
            sig[n] = f"tensordesc<{el}[{BN}, {BK}]>" if tma else f"*{el}"
        elif n in ("a_ptr", "w_ptr"):
            sig[n] = f"*{el}"
        elif n == "out_ptr":
            sig[n] = "*fp8e4nv" if const["QUANT_OUT"] else "*bf16"
        elif n.endswith("_ptr"):
            sig[n] = "*i32" if n in ("offsets_ptr", "masked_m_ptr") else "*fp32"
        else:
            sig[n] = "i32"
    src = ASTSource(_grouped_gemm_kernel, sig, constexprs={(names.index(k),): v for k, v in const.items()})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    ptx = k.asm["ptx"]
    regs = spills = None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:  # registers and spills from the cubin's resource usage
        f.write(k.asm["cubin"])
        f.flush()
        try:
            tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
            usage = subprocess.run([tool if os.path.exists(tool) else "cuobjdump", "-res-usage", f.name], capture_output=True, text=True).stdout
            regs = int(re.search(r"REG:(\d+)", usage).group(1))
            spills = [int(x) for x in re.findall(r"(?:STACK|LOCAL):(\d+)", usage)]
        except (OSError, AttributeError):
            pass
    return dict(shared=k.metadata.shared, regs=regs, stack_local=spills,
                wgmma=len(re.findall(r"wgmma\.mma_async", ptx)),
                order="".join("M" if "mma_async" in m else "W" + m[-1] for m in re.findall(
                    r"wgmma\.mma_async|wgmma\.wait_group\.sync\.aligned \d+", ptx)))


def _ptxas(k):
    """ptxas -v on the kernel's PTX: (registers, spill bytes, wgmma warnings)."""
    r = ptxas_report(k.asm["ptx"])
    return r["regs"], r["spill_stores"], [c for c in r["codes"] if c.startswith("C75")]


def _shape(ptx):
    """The kernel's instruction stream in letters (runs counted): M wgmma, W<n> wait, F fma, T TMA, B barrier."""
    marks = []
    for line in ptx.splitlines():
        line = line.strip()
        mark = ("M" if "wgmma.mma_async" in line else "W" + line.rstrip(";")[-1] if "wgmma.wait_group" in line
                else "F" if line.startswith("fma.rn.f32") else "T" if "cp.async.bulk.tensor" in line
                else "B" if line.startswith("bar.sync") else "|" if line.startswith("$L__BB") else None)
        if mark is None:
            continue
        if marks and marks[-1][0] == mark:
            marks[-1][1] += 1
        else:
            marks.append([mark, 1])
    return " ".join(m + (str(n) if n > 1 else "") for m, n in marks)


def compile_wgmma(BLOCK_M=128, num_warps=8, STAGES=4, UNROLL=4, SWIGLU=0, ROW_WEIGHT=0, MASKED=0, WS=0, PERSISTENT=0):
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    from moe_kernels.ops.grouped_gemm_wgmma import LOADER_REGS, ws_maxnreg
    from moe_kernels.ops import grouped_gemm_wgmma as wg

    kernel = wg._grouped_gemm_fp8_wgmma_persistent_kernel if PERSISTENT else wg._grouped_gemm_fp8_wgmma_kernel

    names = list(kernel.arg_names)
    const = dict(SWIGLU=SWIGLU, ROW_WEIGHT=ROW_WEIGHT, MASKED=MASKED, BLOCK_M=BLOCK_M, GROUP_M=8,
                 E_PAD=32, STAGES=STAGES, UNROLL=UNROLL, WS=WS, LOADER_REGS=LOADER_REGS, num_warps=num_warps)
    a_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_M, 128], gl.float8e4nv)
    w_layout = gl.NVMMASharedLayout.get_default_for([128, 128], gl.float8e4nv)
    sig = {}
    for n in names:
        if n in const:
            sig[n] = "constexpr"
        elif n == "a_desc":
            sig[n] = f"tensordesc<fp8e4nv[{BLOCK_M},128],{a_layout!r}>"
        elif n == "w_desc":
            sig[n] = f"tensordesc<fp8e4nv[128,128],{w_layout!r}>"
        elif n == "out_ptr":
            sig[n] = "*fp8e4nv" if SWIGLU else "*bf16"
        elif n.endswith("_ptr"):
            sig[n] = "*i32" if n in ("offsets_ptr", "masked_m_ptr") else "*fp32"
        else:
            sig[n] = "i32"
    src = GluonASTSource(kernel, sig, constexprs={(names.index(k),): v for k, v in const.items()})
    opts = {"num_warps": num_warps, **({"maxnreg": ws_maxnreg(num_warps)} if WS else {})}
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    regs, spills, warns = _ptxas(k)
    if os.environ.get("COMPILE_SM90_PTX"):
        open(os.environ["COMPILE_SM90_PTX"], "w").write(k.asm["ptx"])
    return dict(shared=k.metadata.shared, regs=regs, spill_bytes=spills, ptxas_wgmma_warnings=warns,
                order=_shape(k.asm["ptx"]))


if __name__ == "__main__":
    kw = {}
    for a in sys.argv[1:]:
        k, v = a.split("=")
        kw[k] = int(v)
    print(compile_wgmma(**kw) if kw.pop("WGMMA", 0) else compile_cfg(**kw))
