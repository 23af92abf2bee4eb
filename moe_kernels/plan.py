"""The deployment planner: predicts a large expert-parallel deployment from measured kernel rates.

Model (per GPU, per MoE layer; ``docs/planner.md`` has the derivation and its limits):

    T tokens on each GPU, k experts per token, E experts over G GPUs (g per node), hidden H, expert width I,
    m micro-batches of T/m tokens. c = E/G expert copies per GPU (1 when E <= G: spare GPUs hold replicas).
    A token's k experts land on D distinct GPUs, D = G * (1 - C(E - c, k) / C(E, k)) (uniform routing; D = k
    when E <= G). Of the D destinations D/G is the own GPU, D(g-1)/G cross NVLink, D(G-g)/G InfiniBand.
    ExpertParallel sends one record per (token, destination GPU): the row (FP8: H bytes, bf16: 2H) + k positions,
    k weights (+ H/128 scales with FP8) as int32, padded to 16 bytes; combine returns one row of partial sums
    per record (fp32 by default: 4H bytes).

    compute   C = route + permute + experts + shared experts + unpermute + EP record copies + MLA
              experts = T k lambda pad 6 H I / R_mlp(rows per expert), lambda = max/mean GPU load of the placement,
              pad = the row-tile padding of the grouped GEMMs (``tile_padding``: Poisson rows per expert)
    comm      M = dispatch + combine, each phase = max(NVLink bytes / B_nvl, IB bytes / B_ib) x lambda
              + m x latency
    layer     t = max(C, M) + min(C, M) / m        (m = 1: C + M; the shorter one hidden up to 1 - 1/m)

    step      = dense_layers x (MLA + dense MLP) + moe_layers x t;   tokens/s = G T / step
    MFU       = forward FLOPs per token x tokens/s / (G x dense peak of the precision used)

Expert tensor parallelism (``expert_tp`` = P): the above over one EP group of G/P GPUs (g/P per node), expert
FLOPs / P, a fp32 ring all-reduce of [T, H] over NVLink added to M, tokens/s = (G/P) T / step. The low-latency
mode (``ep_mode="low_latency"``): k records per token (one per pair) of e4m3 row + scales + 16 bytes out and a
bf16 row back, an assumed 5 us per phase. ``docs/planner.md`` says what neither has measured.

Every rate is looked up at the size the kernel runs at (tokens or rows per expert of one micro-batch) in the
benchmark JSON files under ``bench/results`` (grouped GEMM / expert-MLP TFLOP/s, route / permute / unpermute
GB/s, the MLA down-projection TFLOP/s, the copy bandwidth), interpolated in log(size) between measured points and
held flat outside them; a rate without a measurement takes the hardware default. ``predict`` names, per rate,
the file and field it came from (``rates_used``).
"""
from __future__ import annotations

import datetime
import functools
import glob
import json
import math
import numbers
import os
import re
from dataclasses import asdict, dataclass, field

__all__ = ["Deployment", "Rates", "predict", "load_rates", "validate", "format_prediction", "format_validation",
           "bench_dir", "default_results_dir"]

# ---- hardware defaults (used for any rate no benchmark file provides) ------------------------------------------
DEFAULT_PEAK_TFLOPS = 400.0   # dense FP8 peak taken by default; bf16 at half of it (Hopper's ratio)
DEFAULT_MFU = 0.6             # achieved fraction of the peak for GEMMs
DEFAULT_HBM_GBPS = 1800.0     # memory bandwidth
DEFAULT_HBM_EFF = 0.8         # achieved fraction of it
DEFAULT_GPU_MEMORY_GB = 64.0
DEFAULT_NVLINK_GBPS = 900.0   # NVLink 4 datasheet figure, both directions: 450 GB/s each way
DEFAULT_IB_GBITS = 400.0      # one 400 Gb/s NIC per GPU: 50 GB/s each way
DEFAULT_LATENCY_US = 10.0     # fixed cost of one all-to-all phase of one micro-batch (assumed, not measured)
ATTN_FRACTION = 0.6           # prefill attention at this fraction of the bf16 peak (no attention benchmark)
DEFAULTS_TEXT = ("hardware defaults: 400 TFLOP/s at 60%, 1.8 TB/s at 80%, 64 GB per GPU, NVLink 900 GB/s, "
                 "InfiniBand 400 Gb/s")

# dense (no sparsity) peaks from NVIDIA's datasheets, TFLOP/s: bf16, fp8; first matching pattern wins
DATASHEET_PEAKS = (
    (r"h100.*pcie", 756.0, 1513.0),
    (r"h100.*nvl", 835.0, 1671.0),
    (r"h100|h800", 989.0, 1979.0),  # SXM5 ("NVIDIA H100 80GB HBM3")
    (r"h200", 989.0, 1979.0),
    (r"\bh20\b", 148.0, 296.0),
)

RATE_FAMILIES = ("grouped_gemm", "routing", "mla")  # bench/results/<family>-<device>.json read for rates


def bench_dir() -> str | None:
    """The repository's ``bench/`` next to the package source (an editable install or a checkout), else None."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    d = os.path.join(root, "bench")
    return d if glob.glob(os.path.join(d, "bench_*.py")) else None


def default_results_dir() -> str | None:
    d = bench_dir()
    return os.path.join(d, "results") if d and os.path.isdir(os.path.join(d, "results")) else None


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", str(name).lower()).strip("_")


def _num(v) -> float | None:
    """A finite positive number, else None (bools, strings, NaN, <= 0 are not rates)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        return None
    return float(v)


def _show(path: str) -> str:
    """A path relative to the working directory when it lies below it."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


# ---- the deployment ----------------------------------------------------------------------------------------------
@dataclass
class Deployment:
    gpus: int = 256
    gpus_per_node: int = 8
    num_experts: int = 256
    top_k: int = 8
    tokens_per_gpu: int = 4096
    hidden: int = 7168
    intermediate: int = 2048
    n_shared_experts: int = 1
    layers: int = 61
    dense_layers: int = 3
    dense_intermediate: int = 18432
    precision: str = "fp8"
    scoring: str = "sigmoid"  # "sigmoid" (DeepSeek-V3 group-limited) or "softmax": picks the routing rows
    micro_batches: int = 2
    combine_dtype: str = "fp32"  # partial sums on the way back (ExpertParallel's default)
    context: int = 4096  # sequence length: a causal query attends (context + 1) / 2 keys on average
    num_heads: int = 128
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope: int = 128
    qk_rope: int = 64
    v_head: int = 128
    vocab: int = 129280
    gpu_memory_gb: float = DEFAULT_GPU_MEMORY_GB
    load_imbalance: float | None = None  # max/mean GPU load; None: from place_experts (1.0 without it)
    expert_load: tuple | None = None  # expected per-expert load (relative counts, E entries) for place_experts
    expert_tp: int = 1  # expert tensor parallelism: each expert's width split over this many GPUs of a node
    ep_mode: str = "normal"  # "normal" (ExpertParallel) or "low_latency" (LowLatencyEP: per-pair records)

    def validate(self) -> None:
        ints = ("gpus", "gpus_per_node", "num_experts", "top_k", "tokens_per_gpu", "hidden", "intermediate",
                "layers", "micro_batches", "context", "num_heads", "q_lora_rank", "kv_lora_rank", "qk_nope",
                "qk_rope", "v_head", "vocab", "dense_intermediate")
        for name in ints + ("n_shared_experts", "dense_layers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name} must be an int, got {v!r}")
        for name in ints:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_shared_experts < 0:
            raise ValueError(f"n_shared_experts must be >= 0, got {self.n_shared_experts}")
        G, g, E, k = self.gpus, self.gpus_per_node, self.num_experts, self.top_k
        if G > g and G % g:
            raise ValueError(f"gpus ({G}) must be a multiple of gpus_per_node ({g}) (fewer than one node's worth "
                             f"is a single partial node)")
        if k > E:
            raise ValueError(f"top_k ({k}) must be <= num_experts ({E}): a token picks k distinct experts")
        if E > G and E % G:
            raise ValueError(f"num_experts ({E}) must be a multiple of gpus ({G}) when num_experts > gpus: every GPU "
                             f"holds the same number of experts (balanced memory)")
        if self.precision not in ("fp8", "bf16"):
            raise ValueError(f"precision must be 'fp8' or 'bf16', got {self.precision!r}")
        if self.precision == "fp8" and self.hidden % 128:
            raise ValueError(f"fp8 needs hidden % 128 == 0 (1x128 activation scales), got hidden={self.hidden}")
        if self.scoring not in ("sigmoid", "softmax"):
            raise ValueError(f"scoring must be 'sigmoid' or 'softmax', got {self.scoring!r}")
        if self.combine_dtype not in ("fp32", "bf16"):
            raise ValueError(f"combine_dtype must be 'fp32' or 'bf16', got {self.combine_dtype!r}")
        if not 0 <= self.dense_layers <= self.layers:
            raise ValueError(f"dense_layers must lie in [0, layers={self.layers}], got {self.dense_layers}")
        if _num(self.gpu_memory_gb) is None:
            raise ValueError(f"gpu_memory_gb must be a positive number, got {self.gpu_memory_gb!r}")
        if self.load_imbalance is not None and (_num(self.load_imbalance) is None or self.load_imbalance < 1):
            raise ValueError(f"load_imbalance (max/mean GPU load) must be >= 1, got {self.load_imbalance!r}")
        tp = self.expert_tp
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise ValueError(f"expert_tp must be an int >= 1, got {tp!r}")
        if tp > 1:
            if min(g, G) % tp:
                raise ValueError(f"expert_tp ({tp}) must divide the GPUs of a node ({min(g, G)}): TP stays in a node")
            if self.intermediate % tp or (self.precision == "fp8" and (self.intermediate // tp) % 128):
                raise ValueError(f"expert_tp ({tp}) must split intermediate ({self.intermediate}) into slices of "
                                 f"whole 128-blocks with fp8 (a multiple of tp otherwise)")
            if E > G // tp and E % (G // tp):
                raise ValueError(f"num_experts ({E}) must be a multiple of the EP group size gpus / expert_tp "
                                 f"({G // tp}) when larger")
        if self.ep_mode not in ("normal", "low_latency"):
            raise ValueError(f"ep_mode must be 'normal' or 'low_latency', got {self.ep_mode!r}")
        if self.expert_load is not None:
            load = list(self.expert_load)
            if len(load) != E:
                raise ValueError(f"expert_load must have one entry per expert ({E}), got {len(load)}")
            if any(isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0
                   for v in load) or sum(load) <= 0:
                raise ValueError("expert_load must hold finite, non-negative counts with a positive sum")


# ---- rates -------------------------------------------------------------------------------------------------------
def _interp(points, x: float):
    """points [(x, y, label)] -> (y at x, which points). Linear in log(x) between the measured points around x;
    outside the measured range the nearest end's value (a rate is held flat beyond what was measured)."""
    merged: dict[float, list] = {}
    for px, py, label in points:
        merged.setdefault(px, []).append((py, label))
    pts = sorted((px, sum(v for v, _ in vs) / len(vs), " + ".join(lb for _, lb in vs)) for px, vs in merged.items())
    lo, hi = pts[0], pts[-1]
    if x <= lo[0]:
        return lo[1], lo[2] + ("" if x == lo[0] else f", held flat from {lo[0]:g} down to {x:g}")
    if x >= hi[0]:
        return hi[1], hi[2] + ("" if x == hi[0] else f", held flat from {hi[0]:g} to {x:g}")
    for a, b in zip(pts, pts[1:]):
        if a[0] <= x <= b[0]:
            if x == a[0]:
                return a[1], a[2]
            f = (math.log(x) - math.log(a[0])) / (math.log(b[0]) - math.log(a[0]))
            return a[1] + f * (b[1] - a[1]), f"{a[2]} .. {b[2]}, interpolated at {x:g}"
    raise AssertionError("unreachable")


@dataclass
class Curve:
    """Measured points of one rate against one size (tokens, or rows per expert), from one file's field."""

    path: str
    field: str
    axis: str
    points: list  # [(x, y, label)]

    def at(self, x: float):
        y, how = _interp(self.points, x)
        return y, f"measured: {_show(self.path)}: {self.field} of {how} ({self.axis})"


@dataclass
class Rates:
    """Achieved rates per GPU: hardware-default scalars plus the measured curves of the chosen results files.

    Lookups return (value, source); ``source`` maps each scalar to where it came from, ``notes`` says which files
    were read, which skipped and why."""

    gemm_tflops_fp8: float = DEFAULT_PEAK_TFLOPS * DEFAULT_MFU
    gemm_tflops_bf16: float = DEFAULT_PEAK_TFLOPS * DEFAULT_MFU / 2
    peak_tflops_fp8: float = DEFAULT_PEAK_TFLOPS
    peak_tflops_bf16: float = DEFAULT_PEAK_TFLOPS / 2
    mem_gbps: float = DEFAULT_HBM_GBPS * DEFAULT_HBM_EFF
    nvlink_gbps: float = DEFAULT_NVLINK_GBPS / 2  # one direction
    ib_gbps: float = DEFAULT_IB_GBITS / 8  # one direction, per GPU
    latency_us: float = DEFAULT_LATENCY_US
    attn_tflops: float = DEFAULT_PEAK_TFLOPS / 2 * ATTN_FRACTION
    curves: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)  # family -> (path, device)
    device: str | None = None  # the device the compute rates were measured on
    source: dict = field(default_factory=lambda: {
        "gemm_tflops": "default: 400 TFLOP/s fp8 peak x 60% (bf16: half)",
        "peak_tflops": "default: 400 TFLOP/s fp8, 200 bf16",
        "mem_gbps": "default: 1.8 TB/s x 80%",
        "nvlink_gbps": "default: NVLink 900 GB/s (450 each way)",
        "ib_gbps": "default: InfiniBand 400 Gb/s per GPU (50 GB/s each way)",
        "latency_us": f"assumed: {DEFAULT_LATENCY_US:g} us per all-to-all phase and micro-batch",
        "attn_tflops": f"assumed: {ATTN_FRACTION:.0%} of the bf16 peak (no attention benchmark)",
    })
    notes: list = field(default_factory=list)

    def gemm_default(self, precision: str):
        v = self.gemm_tflops_fp8 if precision == "fp8" else self.gemm_tflops_bf16
        return v, self.source["gemm_tflops"]

    def curve(self, name: str, x: float):
        c = self.curves.get(name)
        return c.at(x) if c else None

    def keyed(self, prefix: str, k: int, x: float, scoring: str | None = None):
        """The curve ``prefix[/scoring]/k=K`` at x, K = k when measured, else the nearest measured k."""
        best = None
        for name in self.curves:
            parts = name.split("/")
            if parts[0] != prefix:
                continue
            kk = int(parts[-1][2:])
            mismatch = (scoring is not None and len(parts) == 3 and parts[1] != scoring, abs(kk - k))
            if best is None or mismatch < best[0]:
                best = (mismatch, name, kk)
        if best is None:
            return None
        v, src = self.curves[best[1]].at(x)
        if best[2] != k:
            src += f" [measured at k={best[2]}, used for k={k}]"
        if best[0][0]:
            src += f" [scoring {best[1].split('/')[1]}, used for {scoring}]"
        return v, src

    def mlp_tflops(self, precision: str, rows_per_expert: float):
        """The fused expert MLP (gate_up + SwiGLU + down), TFLOP/s over its 6 H I FLOPs per row."""
        if precision == "fp8":
            hit = self.curve("mlp_fp8", rows_per_expert)
            if hit:
                return hit
        gu, dn = self.curve(f"gate_up_{precision}", rows_per_expert), self.curve(f"down_{precision}", rows_per_expert)
        if gu and dn:  # gate_up has 2/3 of the FLOPs, down 1/3
            return 1.0 / (2 / 3 / gu[0] + 1 / 3 / dn[0]), f"gate_up {gu[1]}; down {dn[1]}; 2/3 : 1/3 of the FLOPs"
        return self.gemm_default(precision)

    def dense_tflops(self, precision: str, rows: float):
        """A dense GEMM of ``rows`` rows: the grouped GEMM with one group (the gate_up shape's rate)."""
        return self.curve(f"gate_up_{precision}", rows) or self.gemm_default(precision)

    def mla_proj_tflops(self, precision: str, tokens: float):
        return self.curve(f"mla_proj_{precision}", tokens) or self.dense_tflops(precision, tokens)


def _current_gpu() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else None
    except Exception:  # no torch / a broken driver: no current GPU to prefer
        return None


def _date(entry) -> float:
    env = entry["data"].get("environment") if isinstance(entry["data"].get("environment"), dict) else {}
    try:
        return datetime.datetime.fromisoformat(str(env.get("date"))).timestamp()
    except ValueError:
        return os.path.getmtime(entry["path"])


def _results(results_dir: str, family: str, notes: list) -> list[dict]:
    """The readable, GPU-measured ``<family>-*.json`` files of results_dir."""
    out = []
    for path in sorted(glob.glob(os.path.join(results_dir, f"{family}-*.json"))):
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            notes.append(f"skipped {_show(path)}: unreadable ({type(e).__name__}: {e})")
            continue
        if not isinstance(data, dict):
            notes.append(f"skipped {_show(path)}: not a JSON object")
            continue
        env = data.get("environment") if isinstance(data.get("environment"), dict) else {}
        device = str(env.get("device") or data.get("device") or os.path.basename(path)[len(family) + 1:-5])
        if device.lower().startswith("cpu") or env.get("triton_interpret") is True:
            notes.append(f"skipped {_show(path)}: measured on {device} (a smoke run through the interpreter "
                         f"only shows the script runs)")
            continue
        out.append({"path": path, "data": data, "device": device})
    return out


def _select(entries: list[dict], family: str, device: str | None, notes: list) -> dict | None:
    """``device`` given: its newest file (exact name first, then a substring match), else none. Not given: the
    current GPU's file when there is one, else the newest file."""
    if not entries:
        return None
    if device:
        want = _slug(device)
        hits = [e for e in entries if _slug(e["device"]) == want] or [e for e in entries if want in _slug(e["device"])]
        if not hits:
            notes.append(f"{family}: no result for device {device!r} (have: "
                         f"{', '.join(sorted({e['device'] for e in entries}))}): its rates take the defaults")
            return None
        return max(hits, key=_date)
    gpu = _current_gpu()
    mine = [e for e in entries if gpu and _slug(e["device"]) == _slug(gpu)]
    pick = max(mine or entries, key=_date)
    if len(entries) > 1:
        why = "this GPU's" if mine else "the newest"
        notes.append(f"{family}: {len(entries)} files, used {why}: {_show(pick['path'])}")
    return pick


def _rows(data: dict, key: str) -> list:
    rows = data.get(key)
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def _add(curves: dict, name: str, path: str, fld: str, axis: str, x, y, label: str) -> bool:
    x, y = _num(x), _num(y)
    if x is None or y is None:
        return False
    curves.setdefault(name, Curve(path, fld, axis, [])).points.append((x, y, label))
    return True


def _parse_grouped_gemm(path: str, data: dict, notes: list) -> dict:
    curves, skipped = {}, 0
    for i, r in enumerate(_rows(data, "rows")):
        proj, G, M = r.get("proj"), _num(r.get("G")), _num(r.get("M"))
        if proj not in ("gate_up", "down") or G is None or M is None:
            skipped += 1
            continue
        label = f"rows[{i}] ({r.get('case', proj)})"
        if re.search(r"zipf|skew", str(r.get("case", "")), re.I):
            skipped += 1  # skewed group sizes: the model's rows per expert is a uniform mean
            continue
        added = [_add(curves, f"{proj}_{prec}", path, fld, "rows per group", M / G, r.get(fld), label)
                 for prec, fld in (("fp8", "ours_tflops"), ("bf16", "ours_bf16_tflops"))]
        skipped += not any(added)
    for i, r in enumerate(_rows(data, "mlp_rows")):
        G, M = _num(r.get("G")), _num(r.get("M"))
        if G is None or M is None or re.search(r"zipf|skew", str(r.get("case", "")), re.I):
            skipped += 1
            continue
        skipped += not _add(curves, "mlp_fp8", path, "mlp_ours_tflops", "rows per group", M / G,
                            r.get("mlp_ours_tflops"), f"mlp_rows[{i}] ({r.get('case', '')})")
    if skipped:
        notes.append(f"{_show(path)}: {skipped} rows not used (skewed group sizes, or no proj/G/M/TFLOP/s)")
    return curves


def _parse_routing(path: str, data: dict, notes: list) -> dict:
    curves, skipped = {}, 0
    for i, r in enumerate(_rows(data, "rows")):
        k, T, scoring = r.get("k"), r.get("T"), r.get("scoring")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or _num(T) is None:
            skipped += 1
            continue
        label = f"rows[{i}] ({scoring}, k={k}, T={T})"
        scoring = "sigmoid" if scoring in ("deepseek", "sigmoid") else "softmax"
        fields = ((f"route/{scoring}", "route_gbps"), ("permute_bf16", "permute_gbps"),
                  ("permute_fp8", "permute_fp8_gbps"), ("unpermute", "unpermute_gbps"))
        added = [_add(curves, f"{name}/k={k}", path, fld, "tokens", T, r.get(fld), label) for name, fld in fields]
        skipped += not any(added)
    copy = data.get("copy") if isinstance(data.get("copy"), dict) else {}
    _add(curves, "copy", path, "gbps", "device-to-device copy", 1, copy.get("gbps"), "copy")
    if skipped:
        notes.append(f"{_show(path)}: {skipped} rows not used (no k/T or no GB/s)")
    return curves


def _parse_mla(path: str, data: dict, notes: list) -> dict:
    curves, skipped = {}, 0
    for i, r in enumerate(_rows(data, "rows")):
        if r.get("op") != "down_proj":
            continue  # decode rows: a memory-bound kernel the prefill model does not use
        if r.get("dtype") not in ("fp8", "bf16") or not _add(curves, f"mla_proj_{r['dtype']}", path, "TFLOPS", "tokens",
                                                             r.get("T"), r.get("TFLOPS"),
                                                             f"rows[{i}] (down_proj {r.get('dtype')}, T={r.get('T')})"):
            skipped += 1
    summary = data.get("summary") if isinstance(data.get("summary"), dict) else {}
    _add(curves, "copy", path, "summary.copy_GBps", "device-to-device copy", 1, summary.get("copy_GBps"), "copy")
    if skipped:
        notes.append(f"{_show(path)}: {skipped} down_proj rows not used (no dtype/T/TFLOPS)")
    return curves


_PARSERS = {"grouped_gemm": _parse_grouped_gemm, "routing": _parse_routing, "mla": _parse_mla}


def _datasheet(device: str | None):
    for pattern, bf16, fp8 in DATASHEET_PEAKS:
        if device and re.search(pattern, device.lower()):
            return bf16, fp8
    return None


def load_rates(results_dir: str | None = None, nvlink_gbps: float | None = None, ib_gbps: float | None = None,
               device: str | None = None) -> Rates:
    """Rates from the benchmark JSON files in ``results_dir`` (default: the repository's bench/results), one file
    per family (``device``: that device's; else the current GPU's, else the newest), else the defaults.
    ``nvlink_gbps``: NVLink GB/s, both directions (the datasheet figure; the model uses half each way);
    ``ib_gbps``: InfiniBand Gb/s per GPU (bits: the NIC's figure)."""
    rates = Rates()
    if nvlink_gbps is not None:
        if _num(nvlink_gbps) is None:
            raise ValueError(f"nvlink_gbps must be a positive number, got {nvlink_gbps!r}")
        rates.nvlink_gbps = nvlink_gbps / 2
        rates.source["nvlink_gbps"] = f"given: NVLink {nvlink_gbps:g} GB/s ({nvlink_gbps / 2:g} each way)"
    if ib_gbps is not None:
        if _num(ib_gbps) is None:
            raise ValueError(f"ib_gbps must be a positive number, got {ib_gbps!r}")
        rates.ib_gbps = ib_gbps / 8
        rates.source["ib_gbps"] = f"given: InfiniBand {ib_gbps:g} Gb/s per GPU ({ib_gbps / 8:g} GB/s each way)"
    if results_dir is None:
        results_dir = default_results_dir()
        if results_dir is None:
            rates.notes.append("no bench/results directory next to the package: every rate is a default")
            return rates
    if not results_dir:
        rates.notes.append("no results directory: every rate is a default")
        return rates
    if not os.path.isdir(results_dir):
        rates.notes.append(f"results directory {results_dir} does not exist: every rate is a default")
        return rates
    for family in RATE_FAMILIES:
        entry = _select(_results(results_dir, family, rates.notes), family, device, rates.notes)
        if entry is None:
            continue
        curves = _PARSERS[family](entry["path"], entry["data"], rates.notes)
        if not curves:
            rates.notes.append(f"{_show(entry['path'])}: nothing usable in it: {family} rates take the defaults")
            continue
        if "copy" in curves and "copy" in rates.curves:
            curves.pop("copy")  # the first family's copy measurement (routing's) stays
        rates.curves.update(curves)
        rates.files[family] = (entry["path"], entry["device"])
    if not rates.files:
        rates.notes.append(f"no usable {'/'.join(RATE_FAMILIES)} results in {_show(results_dir)}: every rate is a "
                           f"default")
        return rates
    rates.device = (rates.files.get("grouped_gemm") or next(iter(rates.files.values())))[1]
    peaks = _datasheet(rates.device)
    if peaks:
        rates.peak_tflops_bf16, rates.peak_tflops_fp8 = peaks
        rates.source["peak_tflops"] = (f"datasheet of {rates.device}: {peaks[0]:g} bf16 / {peaks[1]:g} fp8 dense "
                                       f"TFLOP/s")
        rates.attn_tflops = ATTN_FRACTION * peaks[0]
        rates.source["attn_tflops"] = (f"assumed: {ATTN_FRACTION:.0%} of the {rates.device} bf16 peak "
                                       f"(no attention benchmark)")
    else:
        rates.notes.append(f"no datasheet peak known for {rates.device}: MFU against the default peaks")
    if "copy" in rates.curves:
        rates.mem_gbps, rates.source["mem_gbps"] = rates.curves["copy"].at(1)
    devices = {d for _, d in rates.files.values()}
    if len(devices) > 1:
        rates.notes.append("rates come from different devices: " + ", ".join(
            f"{fam} from {d}" for fam, (_, d) in rates.files.items()))
    return rates


# ---- the model ---------------------------------------------------------------------------------------------------
def _distinct_gpus(E: int, G: int, k: int) -> float:
    """Expected number of distinct GPUs among a token's k distinct experts (uniform routing, E/G experts per GPU;
    E <= G: one expert copy per GPU, so k GPUs)."""
    if E <= G:
        return float(k)
    per = E // G
    miss = math.comb(E - per, k) / math.comb(E, k) if E - per >= k else 0.0
    return G * (1.0 - miss)


def _record_bytes(H: int, k: int, fp8: bool, combine_dtype: str) -> tuple[int, int]:
    """Bytes of one dispatch record and of one combine row, as ExpertParallel lays them out."""
    ncols = 2 * k + (H // 128 if fp8 else 0)  # int32 metadata: k positions, k weights (+ the 1x128 scales)
    dispatch = (H if fp8 else 2 * H) + 4 * (ncols + (-ncols % 4))
    return dispatch, H * (4 if combine_dtype == "fp32" else 2)


def _ep_gpus(dep: Deployment) -> tuple[int, int]:
    """(G_ep, g_ep): the GPUs of one EP group and those of it in one node. With expert TP of degree P, an EP group
    is the G / P GPUs holding the same slice (P per node share a node's NVLink)."""
    return dep.gpus // dep.expert_tp, max(1, min(dep.gpus_per_node, dep.gpus) // dep.expert_tp)


LL_LATENCY_US = 5.0  # assumed fixed cost of one low-latency phase (a launch and a flag round trip): not measured


def _wire(dep: Deployment, D: float) -> tuple[float, int, int]:
    """(records per token, dispatch bytes per record, combine bytes per record) of the EP mode. Normal: one record
    per (token, destination GPU); low-latency: one per (token, expert) pair, e4m3 row + 1x128 scales + 16 bytes
    out (bf16 row + 16 without fp8), a bf16 row back."""
    H, k, fp8 = dep.hidden, dep.top_k, dep.precision == "fp8"
    if dep.ep_mode == "low_latency":
        scales = -(-(4 * (H // 128)) // 16) * 16 if fp8 else 0
        return float(k), (H if fp8 else 2 * H) + scales + 16, 2 * H
    disp, comb = _record_bytes(H, k, fp8, dep.combine_dtype)
    return D, disp, comb


def _route_bytes(T, H, E, k):  # what bench/bench_routing.py counts for its GB/s (bf16 activations)
    return T * H * 2 + E * H * 2 + T * k * 8 + E * 4


def _permute_bytes(T, H, k, fp8):
    return T * H * 2 + (T * k * (H + H // 128 * 4) if fp8 else T * k * H * 2) + T * k * 12


def _unpermute_bytes(T, H, k):
    return T * k * H * 2 + T * k * 8 + T * H * 2


class _Use:
    """Collects the rates a prediction used: name -> (value, unit, source)."""

    def __init__(self):
        self.used: dict[str, dict] = {}

    def __call__(self, name: str, hit, unit: str) -> float:
        value, source = hit
        self.used.setdefault(name, {"rate": name, "value": value, "unit": unit, "source": source})
        return value


# row tiles (BLOCK_M) of the w13 (SwiGLU) and w2 grouped GEMMs in the shipped tuned tables: from 128 rows per
# expert up (the lookup's nearest bucket is 256 or more), and below (the 64-row bucket)
TILE_ROWS = (128, 64)
TILE_ROWS_FEW = (64, 64)


@functools.lru_cache(maxsize=4096)
def tile_padding(mean_rows: float, block_m: int) -> float:
    """E[ceil(n / block_m) * block_m] / E[n] for n ~ Poisson(mean_rows): the rows a grouped GEMM computes (each
    expert's last row tile is computed whole) per real row, when tokens pick experts independently. The kernel
    rates come from equal groups of whole tiles (bench_grouped_gemm), which have none of this padding."""
    lam = float(mean_rows)
    if lam <= 0:
        return 1.0
    sd = math.sqrt(lam)
    lo, hi = max(0, int(lam - 12 * sd) - 5), int(lam + 12 * sd) + 5
    tot = pad = 0.0
    for n in range(lo, hi + 1):
        w = math.exp(n * math.log(lam) - lam - math.lgamma(n + 1))
        tot += w
        pad += w * (-(-n // block_m) * block_m)
    return pad / tot / lam


def _moe_compute(dep: Deployment, r: Rates, use: _Use, T: float, imb: float, D: float) -> dict:
    """ms of the compute of one MoE layer for T tokens on one GPU (one micro-batch), without MLA."""
    H, I, E, k, fp8 = dep.hidden, dep.intermediate, dep.num_experts, dep.top_k, dep.precision == "fp8"
    G, tp = _ep_gpus(dep)[0], dep.expert_tp  # with expert TP: the EP group's GPUs, each expert's 1/tp slice
    copies = E / G if E >= G else 1.0  # expert copies per GPU (E <= G: one, spare GPUs hold replicas)
    rows_per_expert = T * k / copies
    mem = lambda nbytes, gbps: nbytes / (gbps * 1e9) * 1e3  # noqa: E731
    flop = lambda n, tflops: n / (tflops * 1e12) * 1e3  # noqa: E731
    rb = r.keyed("route", k, T, dep.scoring) or (r.mem_gbps, r.source["mem_gbps"])
    pb = r.keyed("permute_fp8" if fp8 else "permute_bf16", k, T) or (r.mem_gbps, r.source["mem_gbps"])
    ub = r.keyed("unpermute", k, T) or (r.mem_gbps, r.source["mem_gbps"])
    # the w13 GEMM is 2/3 of the MLP's FLOPs, w2 1/3; each pads its experts' last row tile
    bm13, bm2 = TILE_ROWS if rows_per_expert >= 128 else TILE_ROWS_FEW
    pad = (2 * tile_padding(rows_per_expert, bm13) + tile_padding(rows_per_expert, bm2)) / 3
    out = {
        "routing": mem(_route_bytes(T, H, E, k), use(f"route GB/s at T={T:g}, k={k}", rb, "GB/s")),
        "permute": mem(_permute_bytes(T, H, k, fp8), use(f"permute {dep.precision} GB/s at T={T:g}, k={k}", pb,
                                                         "GB/s")),
        "experts": flop(T * k * imb * pad * 6 * H * I / tp,
                        use(f"expert MLP {dep.precision} at {rows_per_expert:g} rows/expert",
                            r.mlp_tflops(dep.precision, rows_per_expert), "TFLOP/s")),
        "shared_experts": 0.0,
        "unpermute": mem(_unpermute_bytes(T, H, k), use(f"unpermute GB/s at T={T:g}, k={k}", ub, "GB/s")),
        "ep_copies": 0.0,
    }
    if dep.n_shared_experts:
        out["shared_experts"] = flop(T * dep.n_shared_experts * 6 * H * I,
                                     use(f"shared expert MLP {dep.precision} at {T:g} rows",
                                         r.mlp_tflops(dep.precision, T), "TFLOP/s"))
    if G > 1:  # records written by the sender and read by the receiver, both ways
        recs, disp, comb = _wire(dep, D)
        cb = r.curves["copy"].at(1) if "copy" in r.curves else (r.mem_gbps, r.source["mem_gbps"])
        out["ep_copies"] = mem(2 * T * recs * imb * (disp + comb), use("copy GB/s (EP records)", cb, "GB/s"))
    return out


def _mla_ms(dep: Deployment, r: Rates, use: _Use, T: float) -> tuple[float, float]:
    """(ms, FLOPs) of one MLA block for T tokens."""
    H, nh = dep.hidden, dep.num_heads
    down = 2 * T * H * (dep.q_lora_rank + dep.kv_lora_rank + dep.qk_rope)
    up = 2 * T * (dep.q_lora_rank * nh * (dep.qk_nope + dep.qk_rope)
                  + dep.kv_lora_rank * nh * (dep.qk_nope + dep.v_head) + nh * dep.v_head * H)
    attn = 2 * T * nh * (dep.context + 1) / 2 * (dep.qk_nope + dep.qk_rope + dep.v_head)
    p = dep.precision
    ms = (down / (use(f"MLA down-projection {p} at T={T:g}", r.mla_proj_tflops(p, T), "TFLOP/s") * 1e9)
          + up / (use(f"dense GEMM {p} at {T:g} rows", r.dense_tflops(p, T), "TFLOP/s") * 1e9)
          + attn / (use("attention (bf16)", (r.attn_tflops, r.source["attn_tflops"]), "TFLOP/s") * 1e9))
    return ms, down + up + attn


def _placement(dep: Deployment, r: Rates, notes: list) -> dict | None:
    """moe_kernels.dist.place_experts' plan for the deployment, when that function exists and succeeds."""
    if _ep_gpus(dep)[0] == 1:
        return None
    try:
        from . import dist as _dist

        place_experts = getattr(_dist, "place_experts", None)
    except Exception as e:  # dist/ mid-edit or missing: plan without it
        place_experts, why = None, f"moe_kernels.dist does not import ({type(e).__name__}: {e})"
    else:
        why = "moe_kernels.dist.place_experts does not exist"
    if place_experts is None:
        notes.append(f"placement: {why}; assumed balanced (max/mean GPU load 1.0)")
        return None
    (G, g), E, k, T = _ep_gpus(dep), dep.num_experts, dep.top_k, dep.tokens_per_gpu  # one EP group
    pairs = G * T * k  # (token, expert) pairs per step over the deployment
    if dep.expert_load is not None:
        s = float(sum(dep.expert_load))
        load, what = [v / s * pairs for v in dep.expert_load], "the given per-expert load"
    else:
        load, what = [pairs / E] * E, "uniform expected load"
    disp, _ = _record_bytes(dep.hidden, k, dep.precision == "fp8", dep.combine_dtype)
    try:
        p = place_experts(E, G, min(g, G), load=load, top_k=k,
                          link_bandwidth=(r.nvlink_gbps, r.ib_gbps), bytes_per_token=disp)
        rep = p.report() if hasattr(p, "report") else dict(getattr(p, "stats", None) or {})
    except Exception as e:  # a planner bug or an unsupported shape must not stop the prediction
        notes.append(f"placement: place_experts failed ({type(e).__name__}: {e}); assumed balanced")
        return None
    # the report's names have changed while place_experts evolved: read what is there
    imb = _num(rep.get("max_over_mean_gpu_load")) or _num(rep.get("max_over_mean"))
    if imb is None and _num(rep.get("max_gpu_load")) and _num(rep.get("mean_gpu_load")):
        imb = rep["max_gpu_load"] / rep["mean_gpu_load"]
    if imb is None and isinstance(rep.get("gpu_load"), list) and rep["gpu_load"] and sum(rep["gpu_load"]) > 0:
        imb = max(rep["gpu_load"]) / (sum(rep["gpu_load"]) / len(rep["gpu_load"]))
    if imb is None:
        notes.append(f"placement: place_experts reported no max/mean GPU load (keys: {sorted(rep)}); assumed 1.0")
    copies = rep.get("copies_per_gpu")
    if isinstance(copies, (list, tuple)):
        copies = max(copies) if copies else None
    out = {"source": f"moe_kernels.dist.place_experts ({what})", "max_over_mean_gpu_load": imb,
           "copies_per_gpu": copies}
    for key in ("max_link_load", "max_link_us", "max_link", "replicated_experts", "max_nvlink_tokens",
                "max_ib_tokens"):
        v = rep.get(key)
        out[key] = v if isinstance(v, (int, float, str)) and not isinstance(v, bool) else None
    return out


def _memory_gb(dep: Deployment, D: float, imb: float) -> dict:
    H, I, E, G, k = dep.hidden, dep.intermediate, dep.num_experts, _ep_gpus(dep)[0], dep.top_k
    wb = 1 + 4 / (128 * 128) if dep.precision == "fp8" else 2  # bytes per weight (fp8: + 128x128 block scales)
    ab = 1 + 4 / 128 if dep.precision == "fp8" else 2
    moe = dep.layers - dep.dense_layers
    copies = max(1.0, E / G) / dep.expert_tp  # expert TP: each GPU holds a 1/tp slice of its copies
    nh = dep.num_heads
    mla = (H * (dep.q_lora_rank + dep.kv_lora_rank + dep.qk_rope) + dep.q_lora_rank * nh * (dep.qk_nope + dep.qk_rope)
           + dep.kv_lora_rank * nh * (dep.qk_nope + dep.v_head) + nh * dep.v_head * H)
    recs, disp, comb = _wire(dep, D)
    T = dep.tokens_per_gpu
    parts = {
        "routed experts": moe * copies * 3 * H * I * wb,
        "shared experts": moe * dep.n_shared_experts * 3 * H * I * wb,
        "dense MLPs": dep.dense_layers * 3 * H * dep.dense_intermediate * wb,
        "MLA weights": dep.layers * mla * wb,
        "routers": moe * E * H * 2,
        "embedding + head (bf16)": 2 * dep.vocab * H * 2,
        "latent KV cache (bf16)": dep.layers * T * (dep.kv_lora_rank + dep.qk_rope) * 2,
        "activations of one MoE layer": T * k * imb * H * (ab + 2) + T * recs * imb * (disp + comb),
    }
    if dep.ep_mode == "low_latency" and G > 1:  # fixed slots: [local experts][G][T/m] records (2 buffers) + combine
        N = -(-T // max(1, dep.micro_batches))
        parts["low-latency buffers"] = 2 * (max(1.0, E / G) * G * N * disp + N * k * comb)
    return {name: v / 1e9 for name, v in parts.items()}


def predict(dep: Deployment, rates: Rates | None = None, place: bool = True) -> dict:
    """Per-layer times (ms), step time, tokens/s, MFU and memory for ``dep``; the module docstring has the model.
    ``place``: ask moe_kernels.dist.place_experts for the max/mean GPU load (when it exists)."""
    dep.validate()
    r = rates if rates is not None else Rates()
    use, notes = _Use(), list(r.notes)
    (G, g), E, k, H = _ep_gpus(dep), dep.num_experts, dep.top_k, dep.hidden  # one EP group (all GPUs at tp=1)
    tp, fp8 = dep.expert_tp, dep.precision == "fp8"
    m = dep.micro_batches if G * tp > 1 else 1
    if G * tp == 1 and dep.micro_batches > 1:
        notes.append("one GPU: no communication to hide, micro-batching off")

    placement = _placement(dep, r, notes) if place else None
    if dep.load_imbalance is not None:
        imb, imb_src = dep.load_imbalance, "given"
    elif placement and placement["max_over_mean_gpu_load"]:
        imb, imb_src = placement["max_over_mean_gpu_load"], placement["source"]
    else:
        imb, imb_src = 1.0, "assumed balanced" + ("" if G > 1 else " (one GPU)")
    D = _distinct_gpus(E, G, k)

    # compute of one MoE layer: m micro-batches of T/m tokens, each kernel at its micro-batch size's rate
    Tm = dep.tokens_per_gpu / m
    mb = _moe_compute(dep, r, use, Tm, imb, D)
    mla_mb, mla_flops_mb = _mla_ms(dep, r, use, Tm)
    layer = {name: v * m for name, v in mb.items()}
    layer["mla"] = mla_mb * m

    # communication of one MoE layer
    T = dep.tokens_per_gpu
    recs, disp_rec, comb_rec = _wire(dep, D)  # records per token: D (normal) or k (low-latency)
    nvl_dest, ib_dest = recs * (g - 1) / G, recs * (G - g) / G
    nvl_b = use("NVLink GB/s (each way)", (r.nvlink_gbps, r.source["nvlink_gbps"]), "GB/s")
    ib_b = use("InfiniBand GB/s per GPU (each way)", (r.ib_gbps, r.source["ib_gbps"]), "GB/s") if ib_dest else 0
    traffic = {}

    def phase(name, rec):
        nvl, ib = T * nvl_dest * rec * imb, T * ib_dest * rec * imb
        traffic[name] = {"nvlink_MB": nvl / 1e6, "infiniband_MB": ib / 1e6}
        if G == 1:
            return 0.0
        wire = max(nvl / (nvl_b * 1e9), ib / (ib_b * 1e9) if ib else 0.0) * 1e3
        if dep.ep_mode == "low_latency":
            lat = m * use("low-latency phase latency", (LL_LATENCY_US, f"assumed: {LL_LATENCY_US:g} us per phase "
                                                        "and micro-batch (not measured)"), "us") / 1e3
        else:
            lat = m * use("all-to-all latency per phase", (r.latency_us, r.source["latency_us"]), "us") / 1e3
        return wire + lat

    layer["dispatch"] = phase("dispatch", disp_rec)
    layer["combine"] = phase("combine", comb_rec)
    comm = ("dispatch", "combine")
    if tp > 1:  # the slices' partial outputs added: a ring all-reduce of fp32 [T, H] over the node's NVLink
        comm += ("tp_allreduce",)
        nbytes = 2 * (tp - 1) / tp * T * H * 4
        traffic["tp_allreduce"] = {"nvlink_MB": nbytes / 1e6, "infiniband_MB": 0.0}
        layer["tp_allreduce"] = nbytes / (nvl_b * 1e9) * 1e3 + m * use(
            "all-to-all latency per phase", (r.latency_us, r.source["latency_us"]), "us") / 1e3
    C = sum(v for name, v in layer.items() if name not in comm)
    M = sum(layer[name] for name in comm)
    pipelined = C + M if m <= 1 else max(C, M) + min(C, M) / m
    order = ("routing", "permute", "dispatch", "experts", "shared_experts", "combine") + \
        (("tp_allreduce",) if tp > 1 else ()) + ("unpermute", "ep_copies", "mla")
    per_layer = {name: layer[name] for name in order}
    per_layer.update(compute=C, communication=M, overlap=C + M - pipelined, layer=pipelined)

    # dense layers (no communication: attention data-parallel, the dense MLP replicated), the step, throughput
    mla_T, mla_flops_T = _mla_ms(dep, r, use, T)
    dense_mlp = T * 6 * H * dep.dense_intermediate / (
        use(f"dense MLP {dep.precision} at {T:g} rows", r.mlp_tflops(dep.precision, T), "TFLOP/s") * 1e9)
    dense = mla_T + dense_mlp if dep.dense_layers else 0.0
    moe_layers = dep.layers - dep.dense_layers
    step = dep.dense_layers * dense + moe_layers * pipelined
    tokens_per_s = G * T / step * 1e3  # the tp GPUs of a TP group hold the same tokens
    mla_per_token = mla_flops_T / T
    flops_per_token = (dep.layers * mla_per_token + dep.dense_layers * 6 * H * dep.dense_intermediate
                       + moe_layers * ((k + dep.n_shared_experts) * 6 * H * dep.intermediate + 2 * H * E))
    peak = use(f"{dep.precision} dense peak", ((r.peak_tflops_fp8 if fp8 else r.peak_tflops_bf16),
                                                r.source["peak_tflops"]), "TFLOP/s")
    mfu = flops_per_token * tokens_per_s / (G * tp) / (peak * 1e12)
    memory = _memory_gb(dep, D, imb)
    total_mem = sum(memory.values())
    if total_mem > dep.gpu_memory_gb:
        notes.append(f"memory: {total_mem:.1f} GB per GPU does not fit in {dep.gpu_memory_gb:g} GB")
    if G > 1 and C < M:
        notes.append("communication-bound: compute hides under the transfers, not the other way round")
    return {
        "deployment": asdict(dep),
        "micro_batches_used": m,
        "placement": placement,
        "load_imbalance": {"value": imb, "source": imb_src},
        "per_moe_layer_ms": per_layer,
        "dense_layer_ms": dense,
        "distinct_gpus_per_token": D,
        "destinations_per_token": {"own": recs / G, "nvlink": nvl_dest, "infiniband": ib_dest},  # records/token
        "record_bytes": {"dispatch": disp_rec, "combine": comb_rec},
        "traffic_per_gpu_per_layer": traffic,
        "step_ms": step,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_gpu": tokens_per_s / (G * tp),
        "flops_per_token": flops_per_token,
        "peak_tflops": peak,
        "mfu": mfu,
        "memory_gb": {**memory, "total": total_mem, "capacity": dep.gpu_memory_gb,
                      "fits": total_mem <= dep.gpu_memory_gb},
        "rates_used": list(use.used.values()),
        "rate_files": {fam: {"path": _show(p), "device": d} for fam, (p, d) in r.files.items()},
        "notes": notes,
    }


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    w = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(n) for c, n in zip(cells, w)) + " |"  # noqa: E731
    return [line(header), "|" + "|".join("-" * (n + 2) for n in w) + "|"] + [line(r) for r in rows]


_LAYER_LABELS = {
    "routing": "routing (router GEMM + top-k)", "permute": "permute (+ fp8 quantisation)",
    "dispatch": "dispatch (all-to-all)", "experts": "routed experts (grouped MLP)",
    "shared_experts": "shared experts", "combine": "combine (all-to-all)", "unpermute": "unpermute (weighted sum)",
    "ep_copies": "EP record copies", "mla": "MLA attention", "compute": "compute C",
    "communication": "communication M", "overlap": "overlap hidden", "layer": "MoE layer (pipelined)",
    "tp_allreduce": "expert TP all-reduce (fp32)",
}


def format_prediction(p: dict) -> str:
    d = p["deployment"]
    G, g = d["gpus"], min(d["gpus_per_node"], d["gpus"])
    dest, m = p["destinations_per_token"], p["micro_batches_used"]
    L = p["per_moe_layer_ms"]
    lines = [
        f"deployment: {G} GPUs ({G // g} node{'s' if G // g > 1 else ''} x {g}), {d['num_experts']} experts "
        f"top-{d['top_k']} ({d['scoring']}), {d['tokens_per_gpu']} tokens/GPU, {d['precision']}, "
        f"{m} micro-batch{'es' if m > 1 else ''}",
        f"model: {d['layers']} layers ({d['dense_layers']} dense + {d['layers'] - d['dense_layers']} MoE), hidden "
        f"{d['hidden']}, expert width {d['intermediate']}, {d['n_shared_experts']} shared, MLA {d['num_heads']} heads, "
        f"context {d['context']}",
    ]
    pl = p["placement"]
    if pl:
        imb = pl["max_over_mean_gpu_load"]
        n = pl["copies_per_gpu"]
        text = [f"{n} expert cop{'y' if n == 1 else 'ies'} per GPU" if n else None,
                f"max/mean GPU load {imb:.3f}" if imb else "no max/mean GPU load reported",
                f"replicated experts {pl['replicated_experts']}" if pl["replicated_experts"] else None]
        if pl["max_link"] is not None:
            text.append(f"busiest link {pl['max_link']}: {pl['max_link_load'] or 0:,.0f} tokens, "
                        f"{pl['max_link_us'] or 0:,.0f} us per step (its own link model: InfiniBand once per node)")
        lines.append(f"placement: {pl['source']}: " + ", ".join(t for t in text if t))
    lines.append(f"load imbalance used: {p['load_imbalance']['value']:.3f} ({p['load_imbalance']['source']})")
    if G > 1:
        lines.append(f"a token reaches {p['distinct_gpus_per_token']:.2f} GPUs: {dest['own']:.2f} own, "
                     f"{dest['nvlink']:.2f} over NVLink, {dest['infiniband']:.2f} over InfiniBand; records "
                     f"{p['record_bytes']['dispatch']} B out, {p['record_bytes']['combine']} B back")
    lines.append("")
    rows = []
    for name, v in L.items():
        note = ""
        if name in ("dispatch", "combine"):
            t = p["traffic_per_gpu_per_layer"][name]
            note = f"NVLink {t['nvlink_MB']:.0f} MB, IB {t['infiniband_MB']:.0f} MB per GPU" if G > 1 else "no EP"
        elif name == "overlap":
            note = f"min(C, M) x (1 - 1/{m})" if m > 1 else "no micro-batches: C + M"
        elif name == "layer":
            note = "max(C, M) + min(C, M) / m" if m > 1 else "C + M"
        rows.append([_LAYER_LABELS.get(name, name), f"{v:.3f}", f"{v / L['layer'] * 100:.0f}%" if v else "", note])
    lines += _table(["per MoE layer", "ms", "of layer", "note"], rows)
    mem = p["memory_gb"]
    other = sum(mem[key] for key in ("shared experts", "dense MLPs", "MLA weights", "routers",
                                     "embedding + head (bf16)"))
    lines += [
        "",
        f"dense layer: {p['dense_layer_ms']:.3f} ms; step ({d['layers']} layers): {p['step_ms']:.2f} ms",
        f"throughput: {p['tokens_per_s']:,.0f} tokens/s ({p['tokens_per_s_per_gpu']:,.0f} per GPU); "
        f"MFU {p['mfu'] * 100:.1f}% of the {d['precision']} peak ({p['peak_tflops']:g} TFLOP/s; "
        f"{p['flops_per_token'] / 1e9:.1f} GFLOP per token forward)",
        f"memory per GPU: {mem['total']:.1f} GB of {mem['capacity']:g} GB ({'fits' if mem['fits'] else 'DOES NOT FIT'}"
        f"; experts {mem['routed experts']:.1f}, other weights {other:.1f}, KV cache "
        f"{mem['latent KV cache (bf16)']:.1f}, activations {mem['activations of one MoE layer']:.1f})",
        "",
        "rates used:",
    ]
    lines += _table(["rate", "value", "source"],
                    [[u["rate"], f"{u['value']:.4g} {u['unit']}", u["source"]] for u in p["rates_used"]])
    if p["notes"]:
        lines += ["", "notes:"] + [f"- {n}" for n in p["notes"]]
    return "\n".join(lines)


# ---- measured vs predicted ---------------------------------------------------------------------------------------
NO_MULTI_GPU = "no multi-GPU run measured: error against 2-/4-GPU runs not established"


def _int(v) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return v if isinstance(v, int) and v > 0 else None


def _single_gpu_cases(results_dir: str, nvlink_gbps, ib_gbps, notes: list) -> tuple[list, list, list]:
    cases, skipped, files = [], [], []
    for entry in _results(results_dir, "moe_layer", notes):
        path, data = entry["path"], entry["data"]
        rates = load_rates(results_dir, nvlink_gbps, ib_gbps, device=entry["device"])
        if not rates.files:  # nothing from this device: the other devices' files, saying so
            rates = load_rates(results_dir, nvlink_gbps, ib_gbps)
        files.append({"path": _show(path), "device": entry["device"],
                      "rates_from": {fam: dev for fam, (_, dev) in rates.files.items()}, "notes": rates.notes})
        rows = data.get("rows")
        if not isinstance(rows, list):
            skipped.append(f"{_show(path)}: no 'rows' list")
            continue
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                skipped.append(f"{_show(path)} rows[{i}]: not an object")
                continue
            E, k, T = _int(row.get("experts")), _int(row.get("top_k")), _int(row.get("T"))
            # the model predicts GPU time: CUDA-graph replays when the run has them, else the eager time
            graph = _num(row.get("ours_graph_ms"))
            prec, meas = row.get("precision"), graph if graph is not None else _num(row.get("ours_ms"))
            missing = [n for n, v in (("experts", E), ("top_k", k), ("T", T), ("ours_ms", meas)) if v is None]
            if prec not in ("fp8", "bf16"):
                missing.append("precision")
            if missing:
                skipped.append(f"{_show(path)} rows[{i}]: no usable {', '.join(missing)}")
                continue
            scoring = row.get("scoring") or ("sigmoid" if "deepseek" in str(row.get("case", "")).lower() else "softmax")
            scoring = "sigmoid" if scoring in ("sigmoid", "deepseek") else "softmax"
            H, I = _int(row.get("H")) or 7168, _int(row.get("I")) or 2048  # bench_moe_layer.py's fixed shapes
            try:
                dep = Deployment(gpus=1, gpus_per_node=1, num_experts=E, top_k=k, tokens_per_gpu=T, hidden=H,
                                 intermediate=I, n_shared_experts=_int(row.get("n_shared_experts")) or 0,
                                 precision=prec, scoring=scoring, micro_batches=1)
                dep.validate()
            except ValueError as e:
                skipped.append(f"{_show(path)} rows[{i}]: {e}")
                continue
            use = _Use()
            parts = _moe_compute(dep, rates, use, T, 1.0, 1.0)
            pred = sum(parts.values())
            cases.append({"file": _show(path), "row": i, "case": row.get("case", ""), "experts": E, "top_k": k,
                          "precision": prec, "T": T, "measured_ms": meas, "timing": "graph" if graph else "eager",
                          "predicted_ms": pred,
                          "error": (pred - meas) / meas, "parts_ms": parts, "rates_used": list(use.used.values())})
    return cases, skipped, files


def _multi_gpu_cases(results_dir: str, nvlink_gbps, ib_gbps, notes: list) -> tuple[list, list, list]:
    cases, skipped, files = [], [], []
    rates = load_rates(results_dir, nvlink_gbps, ib_gbps)
    for entry in _results(results_dir, "all_to_all", notes):
        path, data = entry["path"], entry["data"]
        cfg = data.get("config") if isinstance(data.get("config"), dict) else {}
        W, T = _int(cfg.get("world_size")), _int(cfg.get("tokens_per_rank"))
        H, E = _int(cfg.get("hidden")), _int(cfg.get("experts"))
        if cfg.get("smoke") or None in (W, T, H, E) or W < 2:
            skipped.append(f"{_show(path)}: not a multi-GPU measurement (smoke run, or no world_size/"
                           f"tokens_per_rank/hidden/experts >= 2 GPUs in 'config')")
            continue
        files.append({"path": _show(path), "device": entry["device"], "world_size": W})
        g = W if W <= 8 else 8  # the file does not say how many nodes: torchrun --nproc-per-node is one node
        for i, row in enumerate(_rows(data, "rows")):
            k, impl, dtype = _int(row.get("k")), str(row.get("impl", "")), row.get("dtype")
            if not impl.startswith("ours") or k is None or dtype not in ("fp8", "bf16"):
                skipped.append(f"{_show(path)} rows[{i}]: {impl or 'no impl'} (the model describes ExpertParallel: "
                               f"ours-*, with k and dtype)")
                continue
            combine = "bf16" if "bf" in str(row.get("partials", "float32")) else "fp32"
            try:
                dep = Deployment(gpus=W, gpus_per_node=g, num_experts=E, top_k=k, tokens_per_gpu=T, hidden=H,
                                 precision=dtype, combine_dtype=combine, micro_batches=1, load_imbalance=1.0)
                p = predict(dep, rates, place=False)
            except ValueError as e:
                skipped.append(f"{_show(path)} rows[{i}]: {e}")
                continue
            for phase in ("dispatch", "combine"):
                meas = _num(row.get(f"{phase}_ms"))
                if meas is None:
                    skipped.append(f"{_show(path)} rows[{i}]: no {phase}_ms")
                    continue
                pred = p["per_moe_layer_ms"][phase]
                cases.append({"file": _show(path), "row": i, "what": f"{impl} {phase} {dtype} k={k} ({combine} back)",
                              "gpus": W, "measured_ms": meas, "predicted_ms": pred, "error": (pred - meas) / meas})
        for i, row in enumerate(_rows(data, "overlap")):
            lay, comp, comm = (_num(row.get(key)) for key in ("layer_ms", "compute_ms", "comm_ms"))
            if None in (lay, comp, comm):
                skipped.append(f"{_show(path)} overlap[{i}]: no layer_ms/compute_ms/comm_ms")
                continue
            pred = max(comp, comm) + min(comp, comm) / 2  # ExpertParallel.forward: two micro-batches
            cases.append({"file": _show(path), "row": i, "gpus": W, "measured_ms": lay, "predicted_ms": pred,
                          "what": f"{row.get('impl', '')} overlap {row.get('precision', '')} k={row.get('k', '')}: "
                                  f"max(C,M) + min(C,M)/2 from measured C, M", "error": (pred - lay) / lay})
    return cases, skipped, files


def _summary(cases: list) -> dict | None:
    if not cases:
        return None
    errs = sorted(abs(c["error"]) for c in cases)
    return {"cases": len(errs), "median_abs_error": errs[len(errs) // 2] if len(errs) % 2 else
            (errs[len(errs) // 2 - 1] + errs[len(errs) // 2]) / 2, "max_abs_error": errs[-1]}


def validate(results_dir: str | None = None, nvlink_gbps: float | None = None, ib_gbps: float | None = None) -> dict:
    """The planner against measurements: one MoE layer on one GPU (``moe_layer-*.json``: route, permute, experts,
    unpermute; no communication) and, where they exist, multi-GPU dispatch/combine and overlap runs
    (``all_to_all-*.json``). Relative error (predicted - measured) / measured per case; rows that cannot be
    interpreted are listed under ``skipped``."""
    results_dir = results_dir if results_dir is not None else default_results_dir()
    notes: list = []
    out = {"results_dir": results_dir, "notes": notes}
    if not results_dir or not os.path.isdir(results_dir):
        notes.append(f"no results directory ({results_dir}): nothing measured to compare with")
        out["single_gpu"] = {"cases": [], "skipped": [], "files": [], "summary": None,
                             "status": "no single-GPU MoE layer measured (bench/results/moe_layer-*.json)"}
        out["multi_gpu"] = {"cases": [], "skipped": [], "files": [], "summary": None, "status": NO_MULTI_GPU}
        return out
    cases, skipped, files = _single_gpu_cases(results_dir, nvlink_gbps, ib_gbps, notes)
    out["single_gpu"] = {"cases": cases, "skipped": skipped, "files": files, "summary": _summary(cases),
                         "status": "measured" if cases else
                         "no single-GPU MoE layer measured (bench/results/moe_layer-*.json)"}
    cases, skipped, files = _multi_gpu_cases(results_dir, nvlink_gbps, ib_gbps, notes)
    out["multi_gpu"] = {"cases": cases, "skipped": skipped, "files": files, "summary": _summary(cases),
                        "status": "measured" if cases else NO_MULTI_GPU}
    return out


def format_validation(v: dict) -> str:
    lines = ["## one MoE layer on one GPU (EP=1, no communication): route + permute + experts + unpermute", ""]
    s = v["single_gpu"]
    for f in s["files"]:
        rf = ", ".join(f"{fam} from {dev}" for fam, dev in f["rates_from"].items()) or "hardware defaults"
        lines.append(f"measured: {f['path']} ({f['device']}); rates: {rf}")
        if any(dev != f["device"] for dev in f["rates_from"].values()):
            lines.append("  (rates measured on another device than the layer: part of the error is the device)")
    if s["cases"]:
        lines += [""] + _table(
            ["case", "experts", "top-k", "precision", "T", "measured ms", "timing", "predicted ms", "error"],
            [[c["case"], c["experts"], c["top_k"], c["precision"], c["T"], f"{c['measured_ms']:.3f}", c["timing"],
              f"{c['predicted_ms']:.3f}", f"{c['error'] * 100:+.1f}%"] for c in s["cases"]])
        sm = s["summary"]
        lines += ["", f"{sm['cases']} cases: median |error| {sm['median_abs_error'] * 100:.1f}%, max "
                      f"{sm['max_abs_error'] * 100:.1f}%"]
    else:
        lines.append(s["status"])
    if s["skipped"]:
        lines += ["", f"skipped {len(s['skipped'])} rows:"] + [f"- {x}" for x in s["skipped"]]
    lines += ["", "## multi-GPU (dispatch / combine / overlap)", ""]
    mg = v["multi_gpu"]
    if mg["cases"]:
        lines += _table(["file", "GPUs", "what", "measured ms", "predicted ms", "error"],
                        [[c["file"], c["gpus"], c["what"], f"{c['measured_ms']:.3f}", f"{c['predicted_ms']:.3f}",
                          f"{c['error'] * 100:+.1f}%"] for c in mg["cases"]])
        sm = mg["summary"]
        lines += ["", f"{sm['cases']} cases: median |error| {sm['median_abs_error'] * 100:.1f}%, max "
                      f"{sm['max_abs_error'] * 100:.1f}%"]
    else:
        lines.append(mg["status"])
    if mg["skipped"]:
        lines += ["", f"skipped {len(mg['skipped'])}:"] + [f"- {x}" for x in mg["skipped"]]
    notes = v["notes"] + [n for f in s["files"] for n in f.get("notes", [])]
    if notes:
        lines += ["", "notes:"] + [f"- {n}" for n in dict.fromkeys(notes)]
    return "\n".join(lines)
