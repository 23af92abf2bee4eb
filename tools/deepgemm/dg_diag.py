"""DeepGEMM step by step, each call in its own subprocess (python -X faulthandler), so a segfault ends one step and
not the script. Works with either API: the mid-2025 pure-Python JIT (commit 8dfa329) or the 2.x C++ module.

    PYTHONPATH=<deep_gemm dir>:. python tools/deepgemm/dg_diag.py [--steps import,sf_layout,contiguous,masked]
        [--shapes quick|full|small] [--jobs 4] [--label NAME] [--timeout 150] [--json FILE]

Steps: ``import``; ``sf_layout`` (the TMA-aligned transpose of activation scales: in 2.x the first JIT kernel);
``contiguous`` / ``masked`` for each shape (G, m per group, N, K): the grouped FP8 GEMM on random data against
a float64 dequantised reference (relative error). The GEMM steps run ``--jobs`` at a time: their JIT compiles fill
DeepGEMM's on-disk cache, so a later process (the benchmark) with the same shapes finds its kernels compiled. With
``--time`` they run a second time, one after the other (kernels cached by then), timed with triton's do_bench
(TFLOP/s, real rows only). Each step's exit code and last lines are printed; with --json all of them
are written to FILE. Set LD_PRELOAD to tools/deepgemm/segv_bt.so for a native backtrace on a crash.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

PRELUDE = r"""
import os, sys, time, torch
import deep_gemm as dg
API = "2.x" if hasattr(dg, "m_grouped_fp8_gemm_nt_contiguous") else "2025"
def tma(s):
    return dg.get_mn_major_tma_aligned_tensor(s) if API == "2.x" else dg.get_col_major_tma_aligned_tensor(s)
def quant_rows(x):  # 1x128 blocks, scale = amax / 448 (dequantisation multiplier)
    M, K = x.shape
    xb = x.float().view(M, K // 128, 128)
    s = xb.abs().amax(-1).clamp(min=1e-10) / 448.0
    return (xb / s[..., None]).clamp(-448, 448).to(torch.float8_e4m3fn).view(M, K), s
def quant_blocks(w):  # [G, N, K], 128x128 blocks
    G, N, K = w.shape
    wb = w.float().view(G, N // 128, 128, K // 128, 128)
    s = wb.abs().amax(dim=(2, 4)).clamp(min=1e-10) / 448.0
    return (wb / s[:, :, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn).view(G, N, K), s
def deq_rows(q, s):
    return q.double() * s.double().repeat_interleave(128, -1)
def deq_blocks(q, s):
    return q.double() * s.double().repeat_interleave(128, -2).repeat_interleave(128, -1)
print("api", API, "version", getattr(dg, "__version__", "?"), "from", os.path.dirname(dg.__file__), flush=True)
"""

STEPS = {
    "import": "print('ok import')",
    "sf_layout": r"""
x = torch.rand(256, 16, device='cuda')
print('calling the scale-layout transform', flush=True)
y = tma(x); torch.cuda.synchronize()
assert torch.equal(y, x), 'values changed'
print('ok sf_layout strides', y.stride())
""",
    "gemm": r"""
G, m, N, K, layout = {G}, {m}, {N}, {K}, "{layout}"
torch.manual_seed(0)
x = torch.randn(G * m, K, device='cuda', dtype=torch.bfloat16)
w = (torch.randn(G, N, K, device='cuda') * K ** -0.5).bfloat16()
a, a_s = quant_rows(x); b, b_s = quant_blocks(w)
if layout == "contiguous":
    idx = torch.arange(G, device='cuda', dtype=torch.int32).repeat_interleave(m)
    out = torch.full((G * m, N), float('nan'), device='cuda', dtype=torch.bfloat16)
    s = tma(a_s)
    if API == "2.x":
        fn = lambda: dg.m_grouped_fp8_gemm_nt_contiguous((a, s), (b, b_s), out, idx, disable_ue8m0_cast=True)
    else:
        fn = lambda: dg.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous((a, s), (b, b_s), out, idx)
else:
    a3, s3 = a.view(G, m, K), tma(a_s.view(G, m, -1))
    mm = torch.full((G,), m, device='cuda', dtype=torch.int32)
    out = torch.full((G, m, N), float('nan'), device='cuda', dtype=torch.bfloat16)
    if API == "2.x":
        fn = lambda: dg.m_grouped_fp8_gemm_nt_masked((a3, s3), (b, b_s), out, mm, m, disable_ue8m0_cast=True)
    else:
        fn = lambda: dg.m_grouped_gemm_fp8_fp8_bf16_nt_masked((a3, s3), (b, b_s), out, mm, m)
t0 = time.time()
print('first call (JIT compile)', flush=True)
fn(); torch.cuda.synchronize()
print(f'first call done in {{time.time() - t0:.1f}} s', flush=True)
A = deq_rows(a, a_s).view(G, m, K); W = deq_blocks(b, b_s)
ref = torch.bmm(A, W.transpose(1, 2)).view(G * m, N)
got = out.view(G * m, N).double()
err = float((got - ref).norm() / ref.norm())
timing = ''
if os.environ.get('DG_DIAG_TIME') == '1':
    import triton.testing
    ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode='median')
    timing = f' ms={{ms:.4f}} TFLOP/s={{2 * G * m * N * K / ms / 1e9:.0f}}'
print(f'ok {{layout}} G={{G}} m={{m}} N={{N}} K={{K}} rel_err={{err:.2e}} nan={{bool(torch.isnan(got).any())}}' + timing)
assert err < 2e-2, 'wrong result'
""",
}

DONE = "\nprint('STEP_DONE', flush=True)\n"

SHAPES = {  # (G, m per group, N, K)
    "small": [(4, 256, 512, 1024)],
    "quick": [(8, 4096, 4096, 7168), (8, 4096, 7168, 2048)],
    "full": [(g, m, n, k) for g, m in ((8, 512), (32, 256), (32, 1024), (8, 4096))
             for n, k in ((4096, 7168), (7168, 2048))],
}


def run_step(name, code, timeout, timed=False):
    """One step in a fresh interpreter. ``done``: the step's code ran to its end (a crash after that happened while
    the process exited: static destructors, a CUDA teardown), which counts as a pass with ``exit_crash`` set."""
    t0 = time.time()
    env = dict(os.environ, DG_DIAG_TIME="1" if timed else "0", PYTHONUNBUFFERED="1")
    try:
        r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", PRELUDE + code + DONE], capture_output=True,
                           text=True, timeout=timeout, env=env)
        rc, text = r.returncode, (r.stdout + r.stderr)
    except subprocess.TimeoutExpired as e:
        rc, text = "timeout", ((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes)
                               else (e.stdout or "")) + f"\n(timed out after {timeout} s)"
    lines = text.strip().splitlines()
    done = any(x.startswith("STEP_DONE") for x in lines)
    return dict(step=name, rc=rc, ok=rc == 0 or done, exit_crash=rc != 0 and done, s=round(time.time() - t0, 1),
                tail=lines[-60:])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", default="import,sf_layout,contiguous,masked")
    ap.add_argument("--shapes", default="small", choices=sorted(SHAPES))
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--timeout", type=int, default=150)
    ap.add_argument("--label", default="")
    ap.add_argument("--json", default=None)
    ap.add_argument("--time", action="store_true", help="then time each GEMM step, one at a time")
    ap.add_argument("--stop-on-fail", action="store_true", help="skip the GEMM steps when import or sf_layout fail")
    args = ap.parse_args()
    steps = args.steps.split(",")
    results = []
    for name in ("import", "sf_layout"):
        if name in steps:
            results.append(run_step(name, STEPS[name], args.timeout))
    gemm = [(f"{lay} G={g} m={m} N={n} K={k}", STEPS["gemm"].format(G=g, m=m, N=n, K=k, layout=lay))
            for lay in ("contiguous", "masked") if lay in steps for g, m, n, k in SHAPES[args.shapes]]
    if gemm and not (args.stop_on_fail and not all(r["ok"] for r in results)):
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            results += list(pool.map(lambda s: run_step(s[0], s[1], args.timeout), gemm))
        if args.time:
            passed = {r["step"] for r in results if r["ok"]}
            results += [run_step("timed " + n, c, args.timeout, timed=True) for n, c in gemm if n in passed]
    for r in results:
        crash = " (crashed at process exit, after the step had finished)" if r["exit_crash"] else ""
        print(f"== [{args.label}] {r['step']}: exit {r['rc']} in {r['s']} s{crash}")
        print("\n".join("   | " + x for x in r["tail"][-(60 if not r["ok"] else 6):]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(label=args.label, results=results), f, indent=1)
    ok = all(r["ok"] for r in results)
    atexit = [r["step"] for r in results if r["exit_crash"]]
    note = f" (but crashed at exit: {', '.join(atexit)})" if atexit else ""
    print(f"== [{args.label}] {'ALL OK' + note if ok else 'FAILED: ' + ', '.join(r['step'] for r in results if not r['ok'])}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
