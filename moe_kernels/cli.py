"""The ``moe-kernels`` command: ``info``, ``demo``, ``tune``."""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time


def progress(iterable, total: int, label: str, stream=sys.stderr):
    """A one-line progress bar for steps that take more than a few seconds."""
    start = time.perf_counter()
    for i, item in enumerate(iterable, 1):
        yield item
        frac = i / max(total, 1)
        bar = "#" * int(30 * frac)
        stream.write(f"\r{label:<28} [{bar:<30}] {i}/{total} {time.perf_counter() - start:5.1f}s")
        stream.flush()
    stream.write("\n")


def _nvshmem() -> str:
    """Where pip's nvidia-nvshmem wheel put libnvshmem_host, if anywhere."""
    spec = importlib.util.find_spec("nvidia.nvshmem")
    for root in (spec.submodule_search_locations or []) if spec else []:
        lib = os.path.join(root, "lib")
        if os.path.isdir(lib) and any(f.startswith("libnvshmem_host") for f in os.listdir(lib)):
            return f"found ({lib})"
    return "not found (optional: pip install nvidia-nvshmem-cu13)"


def cmd_info(_args) -> int:
    import torch

    from . import __version__
    from ._ext import extension_error, has_extension

    rows = [("moe-kernels", __version__), ("python", platform.python_version()), ("torch", torch.__version__)]
    try:
        import triton

        rows.append(("triton", triton.__version__))
    except ImportError:
        rows.append(("triton", "not installed"))
    rows.append(("torch CUDA build", torch.version.cuda or "no (CPU-only torch)"))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            rows.append((f"GPU {i}", f"{p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                                      f"{p.total_memory / 2**30:.0f} GiB"))
    else:
        rows.append(("GPU", "none: ops run their PyTorch references (or Triton's interpreter with TRITON_INTERPRET=1)"))
    rows.append(("extension moe_kernels._C", "built" if has_extension() else f"not built ({extension_error()})"))
    rows.append(("NVSHMEM", _nvshmem()))
    rows.append(("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0")))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def cmd_demo(args) -> int:
    import torch

    from . import MoELayer, reference
    from .ops._common import use_triton

    gpu = torch.cuda.is_available() and not args.cpu
    device = "cuda" if gpu else "cpu"
    if gpu:
        H, I, E, k, T = 7168, 2048, 256, 2, args.tokens or 4096
    else:
        H, I, E, k, T = 1024, 256, 16, 2, args.tokens or 64
    print(f"MoE layer: hidden {H}, intermediate {I}, {E} experts, top-{k}, fp8, {T} tokens on {device}"
          + ("" if gpu else " (reduced size: no GPU)"))
    torch.manual_seed(0)
    layer = MoELayer(hidden_size=H, intermediate_size=I, num_experts=E, top_k=k, precision="fp8",
                     device=device, dtype=torch.bfloat16)
    x = torch.randn(T, H, device=device, dtype=torch.bfloat16)
    path = "Triton kernels" if use_triton(x) else "PyTorch reference"

    with torch.no_grad():
        out = layer(x)  # first call compiles the kernels
        ex = layer.experts
        ref = torch.empty(T, H, device=device)
        chunk = max(1, T // 8)
        for lo in progress(range(0, T, chunk), -(-T // chunk), "checking vs reference"):
            ref[lo : lo + chunk] = reference.moe_layer(
                x[lo : lo + chunk], layer.gate.weight, ex.w13, ex.w2, k, w13_scale=ex.w13_scale,
                w2_scale=ex.w2_scale,
            ).float()
        err = float((out.float() - ref).norm() / ref.norm())

        saved = os.environ.get("MOE_KERNELS_VALUE_CHECKS")
        os.environ["MOE_KERNELS_VALUE_CHECKS"] = "0"  # time the kernels, not the validation syncs
        try:
            if gpu:
                import triton.testing

                ms = triton.testing.do_bench(lambda: layer(x), warmup=50, rep=200, return_mode="median")
            else:
                reps = 3
                t0 = time.perf_counter()
                for _ in range(reps):
                    layer(x)
                ms = (time.perf_counter() - t0) / reps * 1e3
        finally:
            if saved is None:
                os.environ.pop("MOE_KERNELS_VALUE_CHECKS")
            else:
                os.environ["MOE_KERNELS_VALUE_CHECKS"] = saved
    flops = 2 * T * k * 3 * H * I
    rows = [
        ("path", path),
        ("relative error vs fp32 reference", f"{err:.2e}"),
        ("time per forward", f"{ms:.3f} ms"),
        ("tokens/s", f"{T / ms * 1e3:,.0f}"),
        ("expert TFLOP/s", f"{flops / ms / 1e9:.1f}"),
    ]
    width = max(len(a) for a, _ in rows)
    print("| " + "metric".ljust(width) + " | value |\n|" + "-" * (width + 2) + "|-------|")
    for a, b in rows:
        print(f"| {a:<{width}} | {b} |")
    ok = err < 0.1
    print("OK" if ok else f"FAILED: relative error {err:.2e} >= 0.1")
    return 0 if ok else 1


def cmd_tune(args) -> int:
    from .tune import tune

    paths = tune(quick=args.quick, out_dir=args.out)
    for p in paths:
        print(f"wrote {p}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="moe-kernels", description="Fast Mixture-of-Experts kernels for Hopper.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, GPU, whether the extension and NVSHMEM are there")
    demo = sub.add_parser("demo", help="run a DeepSeek-V3-shaped MoE layer and check it against the reference")
    demo.add_argument("--tokens", type=int, default=None, help="tokens per forward (default 4096 GPU, 64 CPU)")
    demo.add_argument("--cpu", action="store_true", help="run the reduced CPU demo even when a GPU is present")
    tune = sub.add_parser("tune", help="sweep kernel configs on this GPU and rewrite the tuned-config files")
    tune.add_argument("--quick", action="store_true", help="fewer shapes and configs")
    tune.add_argument("--out", default=None, help="directory for the JSON files (default: the package's)")
    args = parser.parse_args(argv)
    return {"info": cmd_info, "demo": cmd_demo, "tune": cmd_tune}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
