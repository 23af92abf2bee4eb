"""Soak test: many iterations of route -> permute -> expert MLP -> unpermute with a varying number of tokens.

    python tests/soak.py                          # 10000 iterations on the GPU, FP8 experts
    python tests/soak.py --iters 20 --hidden 128 --intermediate 128 --experts 4 --max-tokens 16 --device cpu

Checks (the run fails, exit status 1, when one does):
  * no NaN/inf in any output (counted on the device, read at the check points and at the end);
  * no memory growth: after the warm-up, torch.cuda.memory_allocated() after every iteration (all temporaries
    freed) stays within --mem-slack bytes of its value at the end of the warm-up (CUDA only);
  * determinism: a fixed input, re-run every --check-every iterations, gives the first run's output bit for bit;
    that first output is also compared once with moe_kernels.reference.moe_layer.
Progress lines ("[soak] ...") come about every 10% of the iterations; --json writes the summary.
Not a pytest test: tests/test_soak.py runs it briefly on the CPU (Triton interpreter).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU: the Triton kernels run through the interpreter

import moe_kernels as mk  # noqa: E402
from moe_kernels import reference as R  # noqa: E402

REF_TOL = {"fp8": 0.1, "bf16": 3e-2}  # relative error of the fixed input's output vs the reference layer


class Pipeline:
    """The routed part of one MoE layer, from the public ops; the experts are a GroupedExperts (``layer``)."""

    def __init__(self, hidden, intermediate, experts, top_k, precision, path, device, seed):
        dev = torch.device(device)
        g = torch.Generator().manual_seed(seed)
        H, I, E = hidden, intermediate, experts
        self.E, self.k, self.fp8, self.path = E, top_k, precision == "fp8", path
        self.router = (torch.randn(E, H, generator=g) * H**-0.5).to(torch.bfloat16).to(dev)
        self.layer = mk.GroupedExperts(E, H, I, precision=precision, device=dev)
        w13, w2 = torch.randn(E, 2 * I, H, generator=g) * H**-0.5, torch.randn(E, H, I, generator=g) * I**-0.5
        dt = torch.float32 if self.fp8 else torch.bfloat16
        self.layer.load_weights(w13.to(dt).to(dev), w2.to(dt).to(dev))

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids, _ = mk.ops.route(x, self.router, self.k)
        p = mk.ops.permute(x, ids, self.E, fp8=self.fp8)
        ex = self.layer
        if self.path == "module":
            y = ex(p.x, p.offsets, p.scale)
        else:
            y = mk.ops.expert_mlp(p.x, p.scale, p.offsets, ex.w13, ex.w13_scale, ex.w2, ex.w2_scale)
        return mk.ops.unpermute(y, p, weights)

    @torch.no_grad()
    def reference(self, x: torch.Tensor) -> torch.Tensor:
        ex, cpu = self.layer, (lambda t: None if t is None else t.detach().cpu())  # noqa: E731
        return R.moe_layer(x.cpu(), self.router.cpu(), cpu(ex.w13), cpu(ex.w2), self.k, w13_scale=cpu(ex.w13_scale),
                           w2_scale=cpu(ex.w2_scale))


def run(iters: int = 10000, *, hidden: int = 1024, intermediate: int = 512, experts: int = 32, top_k: int = 2,
        max_tokens: int = 512, fixed_tokens: int | None = None, precision: str = "fp8", path: str = "module",
        check_every: int = 100, warmup: int | None = None, mem_slack: int = 0, device: str | None = None,
        seed: int = 0, quiet: bool = False, on_iter=None, mem_fn=None) -> dict:
    """The soak loop; returns the summary (``ok`` and the counts behind it).

    on_iter(i, layer): called before iteration i (0-based) with the GroupedExperts (tests inject faults with it).
    mem_fn(): bytes in use, read at the end of the warm-up and after every later iteration; default
    torch.cuda.memory_allocated on CUDA, no memory check on the CPU.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if mem_fn is None and dev.type == "cuda":
        mem_fn = lambda: torch.cuda.memory_allocated(dev)  # noqa: E731
    warmup = warmup if warmup is not None else max(1, min(100, iters // 10))
    say = (lambda msg: None) if quiet else (lambda msg: print(f"[soak] {msg}", flush=True))  # noqa: E731
    pipe = Pipeline(hidden, intermediate, experts, top_k, precision, path, dev, seed)
    rng = random.Random(seed)
    gen = torch.Generator(device=dev).manual_seed(seed + 1)
    x_fixed = torch.randn(fixed_tokens or max(1, max_tokens // 2), hidden, generator=gen, device=dev).bfloat16()
    first = pipe(x_fixed)
    ref = pipe.reference(x_fixed).float()
    ref_error = float((first.float().cpu() - ref).norm() / ref.norm().clamp(min=1e-30))
    say(f"{iters} iterations on {dev}: {precision} experts via {path}, H={hidden}, I={intermediate}, E={experts}, "
        f"k={top_k}, T in 1..{max_tokens}; fixed input T={x_fixed.shape[0]}, relative error vs the reference "
        f"{ref_error:.2e}")

    s = dict(ok=False, iters=0, pairs=0, nonfinite_elements=0, first_nonfinite_by_iter=None, fixed_checks=0,
             fixed_mismatches=0, first_mismatch=None, memory_checked=False, memory_baseline_bytes=None,
             memory_growth_bytes=0, memory_growth_first_iter=None, ref_error=ref_error,
             ref_ok=ref_error < REF_TOL[precision], seconds=0.0)
    nonfinite = torch.zeros((), dtype=torch.int64, device=dev)  # counted on the device: no sync per iteration
    seen = 0  # nonfinite count already attributed to an iteration
    progress = max(1, iters // 10)
    t0 = time.perf_counter()

    def read_nonfinite(i):
        nonlocal seen
        n = int(nonfinite)
        if n > seen and s["first_nonfinite_by_iter"] is None:
            s["first_nonfinite_by_iter"] = i  # the first non-finite output came at or before iteration i
        seen = n

    for i in range(iters):
        if on_iter is not None:
            on_iter(i, pipe.layer)
        T = rng.randint(1, max_tokens)
        x = torch.randn(T, hidden, generator=gen, device=dev).bfloat16()
        out = pipe(x)
        nonfinite += (~torch.isfinite(out)).sum()
        s["pairs"] += T * top_k
        del x, out
        done = i + 1
        if mem_fn is not None:
            if done == warmup:
                s["memory_baseline_bytes"] = mem_fn()
                s["memory_checked"] = True
            elif done > warmup:
                growth = mem_fn() - s["memory_baseline_bytes"]
                if growth > s["memory_growth_bytes"]:
                    s["memory_growth_bytes"] = growth
                if growth > mem_slack and s["memory_growth_first_iter"] is None:
                    s["memory_growth_first_iter"] = i
        if check_every and done % check_every == 0:
            again = pipe(x_fixed)
            s["fixed_checks"] += 1
            if not torch.equal(again, first):
                s["fixed_mismatches"] += 1
                if s["first_mismatch"] is None:
                    differ = int((again != first).sum()) if again.shape == first.shape else -1
                    s["first_mismatch"] = dict(iter=i, elements=differ)
            del again
            read_nonfinite(i)
        if done % progress == 0 or done == iters:
            read_nonfinite(i)
            dt = time.perf_counter() - t0
            mem = ""
            if s["memory_checked"]:
                mem = f", memory +{s['memory_growth_bytes']} B over the warm-up"
            say(f"{done}/{iters} ({100 * done // iters}%) {dt:.1f} s, {done / dt:.1f} it/s, {seen} non-finite, "
                f"{s['fixed_mismatches']}/{s['fixed_checks']} fixed-input mismatches{mem}")
    read_nonfinite(iters - 1)
    s["iters"] = iters
    s["nonfinite_elements"] = seen
    s["seconds"] = time.perf_counter() - t0
    s["ok"] = (seen == 0 and s["fixed_mismatches"] == 0 and s["ref_ok"]
               and (s["memory_growth_first_iter"] is None))
    return s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=10000)
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--precision", choices=("fp8", "bf16"), default="fp8")
    p.add_argument("--path", choices=("module", "ops"), default="module",
                   help="the experts through GroupedExperts (module) or mk.ops.expert_mlp (ops)")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=512, help="T is drawn from 1..max-tokens each iteration")
    p.add_argument("--fixed-tokens", type=int, default=None, help="T of the fixed input (default max-tokens/2)")
    p.add_argument("--check-every", type=int, default=100, help="re-run the fixed input every N iterations")
    p.add_argument("--warmup", type=int, default=None, help="iterations before the memory baseline")
    p.add_argument("--mem-slack", type=int, default=0, help="bytes of growth tolerated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the summary here")
    a = p.parse_args(argv)
    if a.device and a.device.startswith("cuda") and not torch.cuda.is_available():
        print("[soak] --device cuda, but no CUDA GPU is available", file=sys.stderr)
        return 2
    s = run(a.iters, hidden=a.hidden, intermediate=a.intermediate, experts=a.experts, top_k=a.top_k,
            max_tokens=a.max_tokens, fixed_tokens=a.fixed_tokens, precision=a.precision, path=a.path,
            check_every=a.check_every, warmup=a.warmup, mem_slack=a.mem_slack, device=a.device, seed=a.seed)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(s, f, indent=1)
    problems = []
    if s["nonfinite_elements"]:
        problems.append(f"{s['nonfinite_elements']} non-finite output elements (first by iteration "
                        f"{s['first_nonfinite_by_iter']})")
    if s["fixed_mismatches"]:
        problems.append(f"the fixed input's output changed in {s['fixed_mismatches']} of {s['fixed_checks']} checks "
                        f"(first: {s['first_mismatch']})")
    if s["memory_growth_first_iter"] is not None:
        problems.append(f"memory grew by {s['memory_growth_bytes']} B after the warm-up (first at iteration "
                        f"{s['memory_growth_first_iter']})")
    if not s["ref_ok"]:
        problems.append(f"the fixed input's output is {s['ref_error']:.2e} from the reference")
    mem = f"memory +{s['memory_growth_bytes']} B" if s["memory_checked"] else "memory not checked (CPU)"
    if s["ok"]:
        print(f"[soak] OK: {s['iters']} iterations, {s['pairs']} (token, k) pairs, {s['fixed_checks']} fixed-input "
              f"checks bit-exact, no NaN/inf, {mem}, {s['seconds']:.1f} s")
        return 0
    print(f"[soak] FAILED after {s['iters']} iterations: " + "; ".join(problems))
    return 1


if __name__ == "__main__":
    sys.exit(main())
