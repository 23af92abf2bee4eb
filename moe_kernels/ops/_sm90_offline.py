"""Offline sm_90a checks of compiled kernels (no GPU needed): ptxas -v on a kernel's PTX. Used by the kernels'
``compile_sm90`` reports, tools/compile_sm90.py and the offline-compile tests."""
from __future__ import annotations

import os
import re
import subprocess
import tempfile


def ptxas_report(ptx: str) -> dict:
    """Assemble ``ptx`` for sm_90a with Triton's bundled ptxas (else the one on PATH) and read its -v log:
    ``regs``, ``spill_stores`` / ``spill_loads`` (bytes; None when ptxas printed none), ``codes`` (the C7xxx
    warning codes, e.g. C7514 / C7512: wgmma serialised), ``log``."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([tool if os.path.exists(tool) else "ptxas", "-arch=sm_90a", "-v", src, "-o",
                              os.path.join(d, "k.cubin")], capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    stores = [int(n) for n in re.findall(r"(\d+) bytes spill stores", log)]
    loads = [int(n) for n in re.findall(r"(\d+) bytes spill loads", log)]
    return dict(regs=int(regs.group(1)) if regs else None, spill_stores=max(stores) if stores else None,
                spill_loads=max(loads) if loads else None,
                codes=sorted(set(re.findall(r"\((C7\d\d\d)\)", log))), log=log)


def compile_gluon_report(kernel, sig: dict, const: dict, num_warps: int, maxnreg: int | None = None):
    """Compile a Gluon kernel for sm_90a (``sig``: a type string per non-constexpr argument; ``const``: the
    constexpr values) and report what the wgmma kernels' offline checks read: ``triton``, ``shared``, ``regs``,
    ``spill_bytes`` (stores or loads, the larger), ``ptxas_wgmma_warnings`` (C75xx: wgmma serialised), ``wgmma``
    (count), ``wgmma_waits`` (the wait depths), ``tma_loads`` / ``tma_stores``, ``setmaxnreg`` (the values set),
    ``ptxas_log`` (its end). Returns (report, the PTX's wgmma instructions), so that a caller can count its own
    kinds of them."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    names = list(kernel.arg_names)
    src = GluonASTSource(kernel, {n: "constexpr" if n in const else sig[n] for n in names},
                         constexprs={(names.index(k),): v for k, v in const.items()})
    opts = {"num_warps": num_warps, **({"maxnreg": maxnreg} if maxnreg else {})}
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    ptx = k.asm["ptx"]
    r = ptxas_report(ptx)
    spills = [b for b in (r["spill_stores"], r["spill_loads"]) if b is not None]
    wgmma = re.findall(r"wgmma\.mma_async[^;]*;", ptx)
    report = dict(triton=triton.__version__, shared=k.metadata.shared, regs=r["regs"],
                  spill_bytes=max(spills) if spills else None,
                  ptxas_wgmma_warnings=[c for c in r["codes"] if c.startswith("C75")], wgmma=len(wgmma),
                  wgmma_waits=sorted(set(int(n) for n in re.findall(
                      r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx))),
                  tma_loads=len(re.findall(r"cp\.async\.bulk\.tensor\.2d\.shared::\w+\.global", ptx)),
                  tma_stores=len(re.findall(r"cp\.async\.bulk\.tensor\.2d\.global\.shared", ptx)),
                  setmaxnreg=sorted(set(int(n) for n in re.findall(
                      r"setmaxnreg\.(?:inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx))),
                  ptxas_log=r["log"].strip()[-600:])
    return report, wgmma
