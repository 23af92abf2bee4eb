"""The ``moe-kernels`` command: ``info``, ``demo``, ``tune``, ``plan``, ``bench``."""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import platform
import subprocess
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


def _fail(command: str, message: str) -> int:
    """A usage error: one line on stderr, exit status 2 (as argparse's own), no traceback."""
    print(f"moe-kernels {command}: error: {message}", file=sys.stderr)
    return 2


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
    rows.append(("FP8 grouped GEMM kernel", _grouped_gemm_kernel()))
    rows.append(("bf16 grouped GEMM kernel", _bf16_grouped_gemm_kernel()))
    from .ops.grouped_gemm_configs import DECODE_MAX_ROWS  # noqa: PLC0415
    rows.append(("decode grouped GEMM", f"Triton weight-streaming kernel (grouped_gemm_decode, split-K) at <= "
                                        f"{DECODE_MAX_ROWS} rows per expert on CUDA, unless a tuned table says"))
    from .ops._common import pdl_enabled  # noqa: PLC0415
    from .ops.mla import decode_kernel_name  # noqa: PLC0415
    rows.append(("MLA decode kernel", decode_kernel_name()))
    latent = os.environ.get("MOE_KERNELS_HF_LATENT_DECODE", "1").strip() != "0"
    rows.append(("HF generate, patched MLA", "decode steps over the latent rows in HF's cache (the MLA decode kernel; "
                 "MOE_KERNELS_HF_LATENT_DECODE=0: off)" if latent else
                 "every step through the expanded keys (MOE_KERNELS_HF_LATENT_DECODE=0)"))
    rows.append(("extension moe_kernels._C", "built" if has_extension() else f"not built ({extension_error()})"))
    rows.append(("NVSHMEM", _nvshmem()))
    rows.append(("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0")))
    checks = os.environ.get("MOE_KERNELS_VALUE_CHECKS", "1") != "0"
    graphs = os.environ.get("MOE_KERNELS_CUDA_GRAPHS", "1") != "0"
    rows.append(("value checks", "on (a host sync each; MOE_KERNELS_VALUE_CHECKS=0 for serving)" if checks else "off"))
    rows.append(("MoELayer's own CUDA graphs", "off (MOE_KERNELS_CUDA_GRAPHS=0)" if not graphs else
                 "on for inference steps of <= 256 tokens" + (", but not while value checks are on" if checks else "")))
    rows.append(("programmatic dependent launch", "on for the decode chain's kernels on sm_90+ (MOE_KERNELS_PDL=0: off)"
                 if pdl_enabled() else "off (MOE_KERNELS_PDL=0; unset: the decode chain's kernels on sm_90+)"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def _grouped_gemm_kernel() -> str:
    """Which kernel the FP8 grouped GEMM configs run here, and why."""
    import torch

    from .ops import grouped_gemm

    if grouped_gemm.grouped_gemm_wgmma is None:
        return "Triton (this Triton has no Gluon: the sm_90 wgmma kernel is off)"
    if not torch.cuda.is_available():
        return "Triton on the interpreter, or the reference (no GPU); the sm_90 wgmma kernel needs Hopper"
    majors = {torch.cuda.get_device_capability(i)[0] for i in range(torch.cuda.device_count())}
    if majors == {9}:
        return "Gluon wgmma kernel for sm_90 (grouped_gemm_wgmma), where a config sets WGMMA"
    return "Triton (the Gluon wgmma kernel is for sm_90 only)"


def _bf16_grouped_gemm_kernel() -> str:
    """Which kernel the bf16 / fp16 grouped GEMM runs here, and when."""
    import torch

    from .ops import grouped_gemm

    setting = os.environ.get("MOE_KERNELS_BF16_GLUON", "auto")
    if setting == "0":
        return "Triton (MOE_KERNELS_BF16_GLUON=0)"
    if grouped_gemm.grouped_gemm_bf16_wgmma is None:
        return "Triton (this Triton has no Gluon: the sm_90 wgmma kernel is off)"
    if not torch.cuda.is_available():
        return "Triton on the interpreter, or the reference (no GPU); the sm_90 wgmma kernel needs Hopper"
    majors = {torch.cuda.get_device_capability(i)[0] for i in range(torch.cuda.device_count())}
    if majors != {9}:
        return "Triton (the Gluon wgmma kernel is for sm_90 only)"
    when = "at any row count (MOE_KERNELS_BF16_GLUON=1)" if setting == "1" else \
        f"from {grouped_gemm.BF16_GLUON_MIN_ROWS} rows an expert (MOE_KERNELS_BF16_GLUON=0 / 1: never / always)"
    return f"Gluon wgmma kernel for sm_90 (grouped_gemm_bf16_wgmma) {when}; Triton below"


def cmd_demo(args) -> int:
    import torch

    from . import MoELayer, reference
    from .ops._common import use_triton

    if args.tokens is not None and args.tokens < 1:
        return _fail("demo", f"--tokens must be >= 1, got {args.tokens}")
    gpu = torch.cuda.is_available() and not args.cpu
    device = "cuda" if gpu else "cpu"
    if gpu:
        H, I, E, k, T = 7168, 2048, 256, 2, args.tokens if args.tokens is not None else 4096
    else:
        H, I, E, k, T = 1024, 256, 16, 2, args.tokens if args.tokens is not None else 64
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
    import torch

    from .tune import SHAPES, tune

    kinds = [k.strip() for k in args.kinds.split(",")] if args.kinds else None
    unknown = [k for k in kinds or () if k not in SHAPES]
    if unknown:
        return _fail("tune", f"--kinds: unknown {', '.join(map(repr, unknown))} (choose from {', '.join(SHAPES)})")
    if not torch.cuda.is_available():
        return _fail("tune", "needs a CUDA GPU, and torch sees none: it times kernel configs on the device "
                             "(`moe-kernels info` shows what was found)")
    paths = tune(quick=args.quick, out_dir=args.out, kinds=kinds, challenge=args.challenge)
    for p in paths:
        print(f"wrote {p}")
    return 0


def _read_load(path: str) -> list:
    """Per-expert load from a JSON list, a JSON object with "load" or "counts", or whitespace-separated numbers."""
    with open(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except ValueError:
        data = text.split()
    if isinstance(data, dict):
        data = data.get("load", data.get("counts"))
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of per-expert counts (or an object with 'load' / 'counts')")
    try:
        return [float(v) for v in data]
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: per-expert counts must be numbers ({e})") from None


def cmd_plan(args) -> int:
    from . import plan

    if args.results is not None and not os.path.isdir(args.results):
        return _fail("plan", f"--results {args.results}: no such directory")
    try:
        if args.validate:
            v = plan.validate(args.results, nvlink_gbps=args.nvlink_gbps, ib_gbps=args.ib_gbps)
            print(json.dumps(v, indent=1, default=str) if args.json else plan.format_validation(v))
            return 0
        dep = plan.Deployment(
            gpus=args.gpus, gpus_per_node=args.gpus_per_node, num_experts=args.experts, top_k=args.top_k,
            tokens_per_gpu=args.tokens_per_gpu, hidden=args.hidden, intermediate=args.intermediate,
            n_shared_experts=args.shared_experts, layers=args.layers, dense_layers=args.dense_layers,
            precision=args.precision, scoring=args.scoring, micro_batches=args.micro_batches,
            combine_dtype=args.combine_dtype, context=args.context, gpu_memory_gb=args.gpu_memory_gb,
            load_imbalance=args.imbalance, expert_load=tuple(_read_load(args.load)) if args.load else None)
        dep.validate()  # a bad deployment fails before the rate files are read
        rates = plan.load_rates(args.results, nvlink_gbps=args.nvlink_gbps, ib_gbps=args.ib_gbps,
                                device=args.device)
        if args.device is not None and not rates.files:  # refuse rather than predict from defaults
            have = next((n.split("(have: ", 1)[1].split(")", 1)[0] for n in rates.notes if "(have: " in n), None)
            return _fail("plan", f"--device {args.device!r}: no benchmark results for it in "
                                 f"{args.results or 'bench/results'}"
                                 + (f" (have: {have})" if have else " (no GPU results there at all)"))
        p = plan.predict(dep, rates)
    except (ValueError, OSError) as e:
        return _fail("plan", str(e))
    print(json.dumps(p, indent=1, default=str) if args.json else plan.format_prediction(p))
    return 0


def _bench_families(bench: str) -> list[str]:
    return sorted(os.path.basename(f)[len("bench_"):-3] for f in glob.glob(os.path.join(bench, "bench_*.py")))


def _out_dirs(extra: list[str], default: str) -> list[str]:
    """Where a bench script may write its JSON: bench/results and any --out / --results-dir / --out-dir given."""
    dirs = [default]
    for i, a in enumerate(extra):
        for flag in ("--out", "--results-dir", "--out-dir"):
            if a == flag and i + 1 < len(extra):
                dirs.append(extra[i + 1])
            elif a.startswith(flag + "="):
                dirs.append(a.split("=", 1)[1])
    return dirs


def _json_state(dirs: list[str]) -> dict:
    return {f: os.path.getmtime(f) for d in dirs for f in glob.glob(os.path.join(d, "*.json"))}


def _plot_results(bench: str, written: list[str]) -> None:
    """The PNG of each result JSON written, by bench/plots.py (in the repository, not the package). A plot that
    fails is reported, never fatal: the JSON is the result."""
    path = os.path.join(bench, "plots.py")
    if not os.path.isfile(path):
        print(f"no plots: {path} not found")
        return
    try:
        spec = importlib.util.spec_from_file_location("moe_kernels_bench_plots", path)
        plots = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(plots)
    except Exception as e:  # a broken plots.py must not fail the run
        print(f"no plots: {path} did not load ({type(e).__name__}: {e})")
        return
    for f in written:
        try:
            png = plots.plot_result(f)
        except Exception as e:  # reported, not raised: the JSON is the result
            print(f"no plot for {f}: {type(e).__name__}: {e}")
            continue
        if png:
            print(f"PNG written: {png}")


def cmd_bench(args) -> int:
    from . import plan

    if args.nproc is not None and args.nproc < 1:
        return _fail("bench", f"--nproc must be >= 1, got {args.nproc}")
    bench = plan.bench_dir()
    if bench is None:
        here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
        print(f"moe-kernels bench: error: no bench/bench_*.py next to the package (looked in {here}). The benchmark "
              f"scripts live in the repository, not in the installed package: install it editable "
              f"(pip install --no-build-isolation -e .) from a checkout, or run bench/bench_<family>.py there.",
              file=sys.stderr)
        return 2
    families = _bench_families(bench)
    if args.family is None or args.family not in families:
        if args.family is not None:
            print(f"moe-kernels bench: error: no family {args.family!r}", file=sys.stderr)
        print(f"families (in {bench}): {', '.join(families)}")
        return 0 if args.family is None else 2
    script = os.path.join(bench, f"bench_{args.family}.py")
    extra = list(args.args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    cmd = [sys.executable, script, *extra]
    if args.nproc is not None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc), script, *extra]
    env = dict(os.environ)
    root = os.path.dirname(bench)
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    dirs = [os.path.abspath(d) for d in _out_dirs(extra, os.path.join(bench, "results"))]
    before = _json_state(dirs)
    print(f"running: {' '.join(cmd)}", flush=True)
    rc = subprocess.call(cmd, env=env, cwd=root)
    written = sorted(f for f, t in _json_state(dirs).items() if before.get(f) != t)
    if written:
        for f in written:
            print(f"JSON written: {f}")
        _plot_results(bench, written)
    else:
        print(f"no JSON written in {', '.join(dict.fromkeys(dirs))}" + (f" (exit status {rc})" if rc else ""))
    return rc


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
    tune.add_argument("--kinds", default=None, help="comma-separated subset of fp8,fp8_swiglu,bf16,bf16_swiglu")
    tune.add_argument("--challenge", choices=["wgmma", "untried"], default=None,
                      help="time only the Gluon (WGMMA) configs against this GPU's current table entries; untried: "
                           "with its variants not yet run on a GPU (WS, PERSISTENT; run their GPU tests first)")
    plan = sub.add_parser("plan", help="predict a large expert-parallel deployment (per-layer times, tokens/s, MFU)",
                          description="Predict one forward step of an expert-parallel deployment from the kernel "
                                      "rates in bench/results (else hardware defaults); docs/planner.md has the "
                                      "model. --validate compares the model with measured runs instead.")
    d = plan.add_argument_group("deployment")
    d.add_argument("--gpus", type=int, default=256)
    d.add_argument("--gpus-per-node", type=int, default=8)
    d.add_argument("--experts", type=int, default=256)
    d.add_argument("--top-k", type=int, default=8)
    d.add_argument("--tokens-per-gpu", type=int, default=4096)
    d.add_argument("--layers", type=int, default=61)
    d.add_argument("--dense-layers", type=int, default=3, help="of --layers, the dense ones (the rest are MoE)")
    d.add_argument("--hidden", type=int, default=7168)
    d.add_argument("--intermediate", type=int, default=2048, help="expert width")
    d.add_argument("--shared-experts", type=int, default=1)
    d.add_argument("--precision", choices=("fp8", "bf16"), default="fp8")
    d.add_argument("--scoring", choices=("sigmoid", "softmax"), default="sigmoid")
    d.add_argument("--micro-batches", type=int, default=2, help="pipelined micro-batches (comm hidden under compute)")
    d.add_argument("--combine-dtype", choices=("fp32", "bf16"), default="fp32", help="partial sums sent back")
    d.add_argument("--context", type=int, default=4096, help="sequence length attended over (causal)")
    d.add_argument("--load", default=None, help="file of expected per-expert loads for place_experts")
    d.add_argument("--imbalance", type=float, default=None, help="max/mean GPU load (default: from the placement)")
    h = plan.add_argument_group("hardware and rates")
    h.add_argument("--nvlink-gbps", type=float, default=None, help="NVLink GB/s, both directions (default 900)")
    h.add_argument("--ib-gbps", type=float, default=None, help="InfiniBand Gb/s per GPU (default 400)")
    h.add_argument("--gpu-memory-gb", type=float, default=64.0)
    h.add_argument("--results", default=None, help="directory of benchmark JSON files (default: bench/results)")
    h.add_argument("--device", default=None, help="use this device's results (default: this GPU's, else newest)")
    plan.add_argument("--json", action="store_true", help="print the prediction as JSON")
    plan.add_argument("--validate", action="store_true",
                      help="compare the model with bench/results/moe_layer-*.json and all_to_all-*.json")
    bench = sub.add_parser("bench", help="run bench/bench_FAMILY.py (from a checkout) with this python",
                           description="Run bench/bench_FAMILY.py with the same python, passing ARGS on; "
                                       "prints the families when FAMILY is left out.")
    bench.add_argument("--nproc", type=int, default=None, help="run under torch.distributed.run with N processes")
    bench.add_argument("family", nargs="?", default=None)
    bench.add_argument("args", nargs=argparse.REMAINDER, help="passed to the script")
    args = parser.parse_args(argv)
    return {"info": cmd_info, "demo": cmd_demo, "tune": cmd_tune, "plan": cmd_plan,
            "bench": cmd_bench}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
