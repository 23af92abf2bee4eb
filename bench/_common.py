"""Shared benchmark plumbing: timing, the measured copy bandwidth, environment facts, JSON + markdown output.

    from _common import bench_ms, copy_bandwidth, gbps, save, markdown
    ms = bench_ms(lambda: op(x))          # median of triton.testing.do_bench: warm-up first, L2 flushed between runs
    roof = copy_bandwidth()               # {"gbps", "bytes", "ms"}: a large device-to-device copy, this run
    save("routing", rows, summary)        # bench/results/routing-<device>.json, with environment()
    print(markdown(rows, ["T", "us"], {"us": ".1f"}))

Importing this module sets MOE_KERNELS_VALUE_CHECKS=0: value checks are host syncs, which do not belong in a timed
region (torch.compile and CUDA graphs skip them too). On a CPU (interpreter smoke runs) timing falls back to a
wall clock and the copy to a host memcpy: those numbers only show that a script runs.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import sys
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
os.environ.setdefault("MOE_KERNELS_VALUE_CHECKS", "0")  # no host syncs inside timed regions


def bench_ms(fn, warmup=25, rep=100, cudagraph: bool = False) -> float:
    """Median time of one call in ms. CUDA: triton.testing.do_bench (CUDA events, warm-up first, L2 flushed
    between runs), or with ``cudagraph`` do_bench_cudagraph (the calls replayed from a CUDA graph: GPU time
    without the host's launch overhead). CPU: the median wall clock of 3 calls after one warm-up call."""
    if torch.cuda.is_available():
        import triton.testing

        if cudagraph:
            return float(triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median"))
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / ms / 1e6


def copy_bandwidth(nbytes: int = 1 << 30) -> dict:
    """A large device-to-device copy (bytes read + bytes written): {"gbps", "bytes", "ms"}. The roofline every
    memory-bound kernel of the same run is compared against."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        nbytes = min(nbytes, 64 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    del src, dst
    return {"gbps": gbps(2 * nbytes, ms), "bytes": 2 * nbytes, "ms": ms}


def copy_bandwidth_gbps(nbytes: int = 1 << 30) -> float:
    return copy_bandwidth(nbytes)["gbps"]


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu-{platform.machine()}"


def environment() -> dict:
    """What a result depends on: device, library versions, date, command line."""
    import triton

    return {
        "device": device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
    }


def write_json(name: str, payload: dict, results_dir: str | None = None) -> str:
    """payload + environment() -> <results_dir or bench/results>/<name>-<device>.json; returns the path."""
    env = environment()
    slug = re.sub(r"[^A-Za-z0-9]+", "_", env["device"]).strip("_")
    results_dir = results_dir or RESULTS
    os.makedirs(results_dir, exist_ok=True)
    path = os.path.join(results_dir, f"{name}-{slug}.json")
    with open(path, "w") as f:
        json.dump({"environment": env, **payload}, f, indent=1)
    print(f"wrote {path}")
    return path


def wall_us(fn, steps: int) -> float:
    """Microseconds of wall clock a call of fn() over ``steps`` calls, the device synchronised before and once after
    (a host-bound step shows a wall time above its kernels' time)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1e6


def write_text(name: str, text: str) -> str:
    """A profile's text report -> bench/results/<name>-<device>.txt, its first line the environment (device,
    versions, date, command) as JSON; returns the path."""
    env = environment()
    slug = re.sub(r"[^A-Za-z0-9]+", "_", env["device"]).strip("_")
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}-{slug}.txt")
    with open(path, "w") as f:
        f.write("# " + json.dumps(env) + "\n" + text)
    print(f"wrote {path}")
    return path


def save(name: str, rows: list[dict], summary: dict, extra: dict | None = None) -> str:
    return write_json(name, {"summary": summary, "rows": rows, **(extra or {})})


def markdown(rows: list[dict], cols: list[str], formats: dict | None = None) -> str:
    """rows -> a markdown table of cols; formats maps a column to a format spec (".1f"); other floats get .3g."""
    formats = formats or {}

    def fmt(col, v):
        if isinstance(v, float):
            return format(v, formats.get(col, ".3g"))
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(c, r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
