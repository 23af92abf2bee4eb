"""The deployment planner: predicts a large expert-parallel deployment from measured kernel rates.

Model (per GPU, per MoE layer; every GPU does the same work when the placement balances load):

    T tokens on each GPU, k experts per token, E experts over G GPUs (g per node), hidden H, expert width I.
    A token's k experts land on D distinct GPUs, D = G * (1 - C(E - E/G, k) / C(E, k)) for uniform routing;
    of those, the ones outside the own GPU inside the node cross NVLink, those outside the node cross
    InfiniBand. Dispatch moves one row of H (FP8: H + H/128*4 bytes) per destination, combine one bf16 row back.

    compute  C = routing + permute + expert GEMMs (x max/mean GPU load of the placement) + unpermute
                 + shared experts + MLA (projections and attention over ``context`` tokens)
    comm     M = max(NVLink bytes / NVLink bandwidth, IB bytes / IB bandwidth) for dispatch + combine
    layer    with m micro-batches pipelined: t = max(C, M) + min(C, M) / m   (m = 1: C + M)

    step     = dense_layers * (MLA + dense MLP) + moe_layers * t;  tokens/s = G * T / step
    MFU      = model FLOPs per token * tokens/s / (G * peak of the precision used)

Rates come from ``bench/results`` when present (grouped GEMM TFLOP/s, copy GB/s, all-to-all GB/s), else from
the hardware defaults below; the prediction says which were used.
"""
from __future__ import annotations

import glob
import json
import math
import os
from dataclasses import asdict, dataclass, field

__all__ = ["Deployment", "Rates", "predict", "load_rates"]


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
    micro_batches: int = 2
    context: int = 4096  # tokens each query attends over (MLA attention FLOPs)
    num_heads: int = 128
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope: int = 128
    qk_rope: int = 64
    v_head: int = 128
    load_imbalance: float = 1.0  # max/mean GPU load of the placement (place_experts reports it)

    def validate(self) -> None:
        for name in ("gpus", "gpus_per_node", "num_experts", "top_k", "tokens_per_gpu", "hidden", "layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.gpus % self.gpus_per_node and self.gpus > self.gpus_per_node:
            raise ValueError(f"gpus ({self.gpus}) must be a multiple of gpus_per_node ({self.gpus_per_node})")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        if self.precision not in ("fp8", "bf16"):
            raise ValueError(f"precision must be 'fp8' or 'bf16', got {self.precision!r}")
        if not 0 <= self.dense_layers <= self.layers:
            raise ValueError(f"dense_layers must lie in [0, layers], got {self.dense_layers}")


@dataclass
class Rates:
    """Achieved rates, per GPU. ``source`` says where each came from."""

    gemm_tflops_fp8: float = 400.0 * 0.6
    gemm_tflops_bf16: float = 400.0 * 0.6 / 2
    peak_tflops_fp8: float = 400.0
    peak_tflops_bf16: float = 200.0
    mem_gbps: float = 1800.0 * 0.8
    nvlink_gbps: float = 900.0 / 2  # one direction
    ib_gbps: float = 400.0 / 8  # 400 Gb/s NIC per GPU
    latency_us: float = 10.0  # per all-to-all phase
    source: dict = field(default_factory=lambda: {"all": "hardware defaults (400 TFLOP/s at 60%, 1.8 TB/s at 80%, "
                                                          "NVLink 900 GB/s, IB 400 Gb/s)"})


def _best(values):
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v) and v > 0]
    return max(values) if values else None


def load_rates(results_dir: str | None = None, nvlink_gbps: float | None = None, ib_gbps: float | None = None):
    """Rates from the benchmark JSON files in ``results_dir`` (each file's ``summary`` block), else defaults."""
    rates = Rates()
    if nvlink_gbps:
        rates.nvlink_gbps = nvlink_gbps / 2
    if ib_gbps:
        rates.ib_gbps = ib_gbps / 8
    if not results_dir or not os.path.isdir(results_dir):
        return rates
    found = {}
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError):
            continue
        summary = data.get("summary") or {}
        for key in ("gemm_tflops_fp8", "gemm_tflops_bf16", "mem_gbps", "nvlink_gbps"):
            v = _best([summary.get(key)])
            if v is not None and (key not in found or v > found[key][0]):
                found[key] = (v, os.path.basename(path))
    source = {}
    for key, (v, fname) in found.items():
        setattr(rates, key, v)
        source[key] = f"measured ({fname})"
    if found:
        rates.peak_tflops_fp8, rates.peak_tflops_bf16 = 1979.0, 989.0  # H100 SXM dense peaks
        source["peaks"] = "H100 SXM datasheet (989 bf16 / 1979 fp8 dense TFLOP/s)"
        source["rest"] = "hardware defaults"
        rates.source = source
    return rates


def _distinct_gpus(E: int, G: int, k: int) -> float:
    """Expected number of distinct GPUs among a token's k experts (uniform routing, E/G experts per GPU)."""
    per = max(E // G, 1) if E >= G else 1
    span = min(E, G)
    miss = math.comb(E - per, k) / math.comb(E, k) if E - per >= k else 0.0
    return span * (1.0 - miss)


def predict(dep: Deployment, rates: Rates | None = None) -> dict:
    """Per-layer times (ms), step time, tokens/s and MFU for ``dep``; see the module docstring for the model."""
    dep.validate()
    r = rates or Rates()
    T, H, I, k = dep.tokens_per_gpu, dep.hidden, dep.intermediate, dep.top_k
    fp8 = dep.precision == "fp8"
    tflops = r.gemm_tflops_fp8 if fp8 else r.gemm_tflops_bf16
    act_bytes = (1 + 4 / 128) if fp8 else 2
    ms = lambda flop_or_bytes, rate: flop_or_bytes / rate * 1e3  # noqa: E731  (rate in units per second)

    # compute, per MoE layer
    route = ms(T * H * 2 + dep.num_experts * H * 2, r.mem_gbps * 1e9)
    permute = ms(T * H * 2 + T * k * H * act_bytes, r.mem_gbps * 1e9)
    unpermute = ms(T * k * H * 2 + T * H * 2, r.mem_gbps * 1e9)
    expert_flops = T * k * 3 * 2 * H * I * dep.load_imbalance
    experts = ms(expert_flops, tflops * 1e12)
    shared = ms(T * 3 * 2 * H * I * dep.n_shared_experts, tflops * 1e12)
    mla_proj = 2 * T * (H * (dep.q_lora_rank + dep.kv_lora_rank + dep.qk_rope)
                        + dep.q_lora_rank * dep.num_heads * (dep.qk_nope + dep.qk_rope)
                        + dep.kv_lora_rank * dep.num_heads * (dep.qk_nope + dep.v_head)
                        + dep.num_heads * dep.v_head * H)
    mla_attn = 2 * T * dep.num_heads * dep.context * (dep.qk_nope + dep.qk_rope + dep.v_head)
    mla = ms(mla_proj, tflops * 1e12) + ms(mla_attn, r.gemm_tflops_bf16 * 1e12)
    compute = route + permute + experts + unpermute + shared + mla

    # communication, per MoE layer
    G, g = dep.gpus, min(dep.gpus_per_node, dep.gpus)
    D = _distinct_gpus(dep.num_experts, G, k)
    intra = D * (g - 1) / G
    inter = D * (G - g) / G
    row_disp, row_comb = H * act_bytes, H * 2
    nvl_bytes = T * intra * (row_disp + row_comb) * dep.load_imbalance
    ib_bytes = T * inter * (row_disp + row_comb) * dep.load_imbalance
    comm = max(ms(nvl_bytes, r.nvlink_gbps * 1e9), ms(ib_bytes, r.ib_gbps * 1e9) if inter else 0.0)
    comm += 4 * r.latency_us / 1e3 if D > 1 / G else 0.0

    m = dep.micro_batches
    layer = compute + comm if m <= 1 else max(compute, comm) + min(compute, comm) / m
    dense = mla + ms(T * 3 * 2 * H * dep.dense_intermediate, tflops * 1e12)
    moe_layers = dep.layers - dep.dense_layers
    step = dep.dense_layers * dense + moe_layers * layer
    tokens_per_s = G * T / step * 1e3
    flops_per_token = (dep.dense_layers * (mla_proj + mla_attn) / T + dep.dense_layers * 6 * H * dep.dense_intermediate
                       + moe_layers * ((mla_proj + mla_attn) / T + (k + dep.n_shared_experts) * 6 * H * I))
    peak = r.peak_tflops_fp8 if fp8 else r.peak_tflops_bf16
    mfu = flops_per_token * tokens_per_s / G / (peak * 1e12)
    return {
        "deployment": asdict(dep),
        "rates": asdict(r),
        "per_moe_layer_ms": {"routing": route, "permute": permute, "dispatch+combine": comm, "experts": experts,
                             "unpermute": unpermute, "shared_experts": shared, "mla": mla,
                             "compute": compute, "pipelined": layer},
        "dense_layer_ms": dense,
        "distinct_gpus_per_token": D,
        "bytes_per_gpu_per_layer": {"nvlink": nvl_bytes, "infiniband": ib_bytes},
        "step_ms": step,
        "tokens_per_s": tokens_per_s,
        "mfu": mfu,
    }


def format_prediction(p: dict) -> str:
    d = p["deployment"]
    lines = [
        f"deployment: {d['gpus']} GPUs ({d['gpus_per_node']}/node), {d['num_experts']} experts, top-{d['top_k']}, "
        f"{d['tokens_per_gpu']} tokens/GPU, {d['precision']}, {d['micro_batches']} micro-batches",
        "rates: " + "; ".join(f"{k}: {v}" for k, v in p["rates"]["source"].items()),
        f"a token reaches {p['distinct_gpus_per_token']:.2f} GPUs on average",
        "",
        "| per MoE layer | ms |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.3f} |" for k, v in p["per_moe_layer_ms"].items()]
    lines += [
        "",
        f"dense layer: {p['dense_layer_ms']:.3f} ms; step: {p['step_ms']:.2f} ms",
        f"tokens/s: {p['tokens_per_s']:,.0f} ({p['tokens_per_s'] / d['gpus']:,.0f} per GPU); MFU {p['mfu'] * 100:.1f}%",
    ]
    return "\n".join(lines)
