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
