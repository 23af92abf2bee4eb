"""The seesaw schedule of the Gluon sm_90 MLA decode kernel (mla_decode_sm90, PIPE=1), without a GPU:

  * its arithmetic, step by step as the two warpgroups do it (two partial row sums, the running max passed between
    them, the factors each side applies, the peeled last pair with a missing odd tile, masks), in float64 against
    the (float32) reference over many lengths, splits and 1 or 2 query tokens;
  * the kernel compiled offline for sm_90a (Triton's own ptxas): shared memory within Hopper's 227 KiB, no wgmma
    serialised by ptxas, spills bounded; the serial kernel still without spills;
  * which kernel the launcher starts ($MOE_KERNELS_MLA_PIPE, the config's pipe, FP8 cache, C) and with what.

Its GPU tests (outputs against the reference, NaN past the lengths, paged, splits, MTP) are
tests/test_mla_decode.py::test_gluon_sm90_kernel_gpu[*-pipe]; tools/gpu/mla_pipe.sh runs and times them.
"""
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from moe_kernels.ops import mla as ops_mla  # noqa: E402
from moe_kernels.reference import mla_decode as RD  # noqa: E402

sm90 = ops_mla.mla_decode_sm90  # None without Gluon
BN = 64  # keys per tile


def seesaw_model(q, qr, cache, lens, scale, num_splits, s_q):
    """float64 model of the seesaw kernel: q [B, rows, C], qr [B, rows, R] (rows = s_q x h), cache [B, S, C + R]
    -> per split the output [B, rows, splits, C] and log-sum-exp (base 2) [B, rows, splits], as the kernel
    writes them (l = 0: output 0, lse -inf)."""
    B, rows, C = q.shape
    h = rows // s_q
    HC = C // 2
    qk = torch.cat([q, qr], -1).double()
    out = torch.zeros(B, rows, num_splits, C, dtype=torch.float64)
    lse = torch.full((B, rows, num_splits), -math.inf, dtype=torch.float64)
    c = scale * 1.4426950408889634
    ninf = torch.tensor(-math.inf, dtype=torch.float64)

    def factor(m_old, m_new):  # _ss_factor
        return torch.exp2(m_old - torch.where(m_new == ninf, 0.0, m_new))

    for b in range(B):
        seqlen = int(lens[b])
        per_split = -(-(-(-seqlen // num_splits)) // BN) * BN
        kv = cache[b].double()
        for split in range(num_splits):
            start = split * per_split
            end = min(start + per_split, seqlen)
            n_tiles = max(-(-(end - start) // BN), 0)
            lim = torch.clamp(seqlen - (s_q - 1 - torch.arange(rows) // h), max=end)

            def scores(t):  # S of tile t; rows past the cache (a missing tile) read as zeros, as never computed
                keys = torch.arange(start + t * BN, start + (t + 1) * BN)
                k = torch.zeros(BN, kv.shape[1], dtype=torch.float64)
                ok = keys < kv.shape[0]
                k[ok] = kv[keys[ok]]
                return qk[b] @ k.T, keys

            def softmax(t, s, m_i):  # _ss_softmax
                keys = torch.arange(start + t * BN, start + (t + 1) * BN)
                s = torch.where(keys[None, :] < lim[:, None], s * c, ninf)
                m_new = torch.maximum(m_i, s.max(1).values)
                m_use = torch.where(m_new == ninf, 0.0, m_new)
                return torch.exp2(s - m_use[:, None]), m_new, torch.exp2(m_i - m_use)

            def values(t, col0):  # V rows of tile t in columns [col0, col0 + HC), rows past the end zeroed
                keys = torch.arange(start + t * BN, start + (t + 1) * BN)
                v = torch.zeros(BN, HC, dtype=torch.float64)
                ok = keys < end
                v[ok] = kv[keys[ok], col0:col0 + HC]
                return v

            m0 = torch.full((rows,), -math.inf, dtype=torch.float64)  # warpgroup 0: running max, sum, O_L
            m1 = m0.clone()
            l0 = torch.zeros(rows, dtype=torch.float64)
            l1 = l0.clone()
            o_l = torch.zeros(rows, HC, dtype=torch.float64)
            o_r = o_l.clone()
            for i in range((n_tiles + 1) // 2):
                ta, tb = 2 * i, 2 * i + 1
                # warpgroup 0: its tile
                p_a, m_a, alpha = softmax(ta, scores(ta)[0], m0)
                l0 = l0 * alpha + p_a.sum(1)
                o_l = o_l * alpha[:, None] + p_a @ values(ta, 0)
                # warpgroup 1: m_a -> its tile (missing: all masked, p = 0)
                alpha1 = factor(m1, m_a)
                s_b = scores(tb)[0] if tb < n_tiles else torch.zeros(rows, BN, dtype=torch.float64)
                p_b, m_b, beta1 = softmax(tb, s_b, m_a)
                l1 = l1 * (alpha1 * beta1) + p_b.sum(1)
                o_r = o_r * (alpha1 * beta1)[:, None]
                if tb < n_tiles:
                    o_r = o_r + p_b @ values(tb, HC)
                # warpgroup 0: m_b -> P_a rescaled for warpgroup 1, its own O_L rescaled, P_b V_b[:, :C/2]
                beta = factor(m_a, m_b)
                p_a_shared = p_a * beta[:, None]
                l0 = l0 * beta
                o_l = o_l * beta[:, None]
                if tb < n_tiles:
                    o_l = o_l + p_b @ values(tb, 0)
                # warpgroup 1: P_a V_a[:, C/2:]
                o_r = o_r + p_a_shared @ values(ta, HC)
                m0 = m1 = m_b
            l_tot = l0 + l1
            has = l_tot > 0
            o = torch.cat([o_l, o_r], 1) / torch.where(has, l_tot, 1.0)[:, None]
            out[b, :, split] = o
            lse[b, :, split] = torch.where(has, m0 + torch.log2(torch.where(has, l_tot, 1.0)), ninf)
    return out, lse


def merge_splits(out, lse):
    """The split merge (mla._mla_decode_reduce_kernel's arithmetic) in float64."""
    m = lse.max(-1, keepdim=True).values
    w = torch.where(lse == -math.inf, 0.0, torch.exp2(lse - torch.where(m == -math.inf, 0.0, m)))
    den = w.sum(-1)
    return (out * w[..., None]).sum(2) / torch.where(den > 0, den, 1.0)[..., None]


# lengths: no key, a partial tile, one whole tile (no odd partner), a partial odd tile, odd and even tile counts
# whose last tile is partial (then a or b), several splits of a long row, splits without keys
@pytest.mark.parametrize("lens,splits,s_q", [
    ([0, 1, 63, 64, 65, 128, 191, 777, 1000], 1, 1),
    ([0, 1, 63, 64, 65, 128, 191, 777, 1000], 3, 1),
    ([65, 300, 1000], 7, 1),
    ([1, 2, 65, 191, 640], 2, 2),
])
def test_seesaw_arithmetic_matches_reference(lens, splits, s_q):
    torch.manual_seed(0)
    B, h, C, R = len(lens), 3, 128, 64
    S = max(lens)
    q, qr = torch.randn(B, s_q, h, C), torch.randn(B, s_q, h, R)
    cache = torch.randn(B, S, C + R) * 1.5
    scale = 1 / math.sqrt(C)
    ref = RD.mla_decode(q.double(), qr.double(), cache.double(), torch.tensor(lens), scale)
    out, lse = seesaw_model(q.reshape(B, s_q * h, C), qr.reshape(B, s_q * h, R), cache, lens, scale, splits, s_q)
    got = merge_splits(out, lse).reshape(B, s_q, h, C)
    err = float((got - ref.double()).norm() / ref.norm())
    assert err < 2e-6, err  # the reference computes in float32 (~2e-7); a wrong factor or mask gives > 1e-2
    assert (got[torch.tensor(lens) == 0] == 0).all()


# ---------------------------------------------------------------------------------------------------------------
# offline sm_90a compile (a process of its own: this one may run Triton's interpreter)

_COMPILE = r'''
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from moe_kernels.ops import mla_decode_sm90 as m
from moe_kernels.ops._sm90_offline import ptxas_report

res = []
for cfg in json.loads(sys.argv[1]):
    pipe, C = cfg.pop("PIPE"), cfg.pop("C", 512)
    if pipe == 2:  # the FP8 cache's seesaw with e4m3 products
        from moe_kernels.ops import mla_decode_sm90_fp8 as m8
        k = m8._mla_decode_sm90_fp8_kernel
    else:
        k = m._mla_decode_sm90_seesaw_kernel if pipe else m._mla_decode_sm90_kernel
    const = dict(C=C, R=64, PAGED=cfg["PAGED"], SPLIT=cfg["SPLIT"])
    const.update(dict(WG_REGS=m.WG_REGS, num_warps=4) if pipe else
                 dict(MULTI_Q=1, STAGES=2, FP8=0, num_warps=8, LOOKAHEAD=cfg.get("LOOKAHEAD", 0)))
    l16 = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    l8 = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
    sig = {}
    for n in k.arg_names:
        if n in const:
            sig[n] = "constexpr"
        elif n == "kc_desc" and pipe == 2:
            sig[n] = f"tensordesc<fp8e4nv[64,128],{l8!r}>"
        elif n.endswith("_desc"):
            sig[n] = f"tensordesc<bf16[64,64],{l16!r}>"
        elif n in ("q_ptr", "qr_ptr"):
            sig[n] = "*bf16"
        elif n == "o_ptr":
            sig[n] = "*fp32" if const["SPLIT"] else "*bf16"
        elif n in ("seqlens_ptr", "block_table_ptr"):
            sig[n] = "*i32"
        elif n.endswith("_ptr"):
            sig[n] = "*fp32"
        else:
            sig[n] = "fp32" if n == "qk_scale" else "i32"
    names = list(k.arg_names)
    src = GluonASTSource(k, sig, constexprs={(names.index(a),): v for a, v in const.items()})
    kk = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": const["num_warps"]})
    ptx = kk.asm["ptx"]
    rep = ptxas_report(ptx)
    res.append(dict(PIPE=pipe, C=C, **cfg, shared=kk.metadata.shared, warps=kk.metadata.num_warps,
                    regs=rep["regs"], spill_bytes=rep["spill_stores"], ptxas_codes=rep["codes"],
                    wgmma=len(re.findall(r"wgmma\.mma_async", ptx)), setmaxnreg=len(re.findall("setmaxnreg", ptx)),
                    wgmma_kinds=sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)\.f32\.(\w+)\.",
                                                      ptx))),
                    named_barriers=sorted(set(re.findall(r"bar\.sync\s+(\d+),\s*128", ptx))),
                    triton=triton.__version__))
print(json.dumps(res))
'''

HOPPER_SMEM = 232448  # bytes of shared memory one program may take on sm_90
# spills of the seesaw kernel: none on Triton 3.6 and 3.8 since each pair rebuilds its shared-memory descriptors
# from a loop-variant zero (``z`` in _ss_wg0_pair). Before, LLVM kept the descriptors of the 36 q K^T steps live
# across the loop and ptxas spilled them: 320 B (Triton 3.8), 428 / 544 B (3.6), with both warpgroups at 255
# registers (output half 128, S 32, the rope queries 16)
PIPE_SPILL_BOUND = 0
# the FP8-product seesaw (mla_decode_sm90_fp8, not yet timed): 232-256 B of spills at 255 registers on Triton 3.8,
# 132-208 B on 3.6 (2026-12-08, eleventh session). The SASS (cuobjdump) shows scalars only, ~20 4-byte stores and
# loads a pair of tiles, no tensor registers; bounded so that a change that makes it worse is seen
FP8_SPILL_BOUND = 320


@pytest.mark.skipif(sm90 is None, reason="this Triton has no Gluon Hopper API")
def test_kernels_compile_for_sm90():
    import json
    import subprocess
    import sys

    cfgs = [dict(PIPE=1, PAGED=1, SPLIT=1), dict(PIPE=1, PAGED=0, SPLIT=0), dict(PIPE=0, PAGED=1, SPLIT=1),
            dict(PIPE=0, PAGED=1, SPLIT=1, LOOKAHEAD=1), dict(PIPE=2, PAGED=1, SPLIT=1), dict(PIPE=2, PAGED=0, SPLIT=0)]
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _COMPILE, json.dumps(cfgs)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    print(res)
    for r in res:
        assert r["shared"] <= HOPPER_SMEM, r
        # C7510-C7520: ptxas serialised the wgmmas (an accumulator in flight copied, registers short, ...)
        assert not [c for c in r["ptxas_codes"] if c.startswith("C75")], r
        if r["PIPE"] == 2:
            assert r["warps"] == 8 and r["setmaxnreg"] > 0 and len(r["named_barriers"]) == 2, r
            # q K^T: 16 m64n64k32 e4m3 + 4 m64n64k16 bf16 (rope) per tile; P V: 2 m64n256k32 e4m3 per product
            assert ["m64n256k32", "e4m3"] in r["wgmma_kinds"] and ["m64n64k32", "e4m3"] in r["wgmma_kinds"], r
            assert ["m64n64k16", "bf16"] in r["wgmma_kinds"], r
            assert r["spill_bytes"] <= FP8_SPILL_BOUND, r
        elif r["PIPE"]:
            assert r["warps"] == 8 and r["setmaxnreg"] > 0, r  # 4 + 4 warps, registers moved between them
            # two partitions, each its own named barrier for its 128 threads (0: warpgroup 0, another: 1)
            assert len(r["named_barriers"]) == 2, r
            # q K^T: 36 m64n64k16 per tile (prologue, loop, of each warpgroup); P V: 4 m64n256k16 per product
            assert r["wgmma"] >= 2 * (36 + 36 + 8 + 8), r
            assert r["spill_bytes"] <= PIPE_SPILL_BOUND, r
        else:
            assert r["spill_bytes"] == 0, r
            if r.get("LOOKAHEAD"):  # S of the next tile in flight beside P V: the same wgmmas, issued earlier
                assert r["wgmma"] >= 2 * (9 + 9 + 4), r


# ---------------------------------------------------------------------------------------------------------------
# the launcher's choice


class _Recorder:
    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        return lambda *args, **kw: self.calls.append((self.name, grid, kw))


@pytest.mark.skipif(sm90 is None, reason="this Triton has no Gluon Hopper API")
@pytest.mark.parametrize("env,pipe,fp8,C,want", [
    (None, 0, False, 512, "serial"),
    (None, 1, False, 512, "seesaw"),
    ("1", 0, False, 512, "seesaw"),  # the env var overrides the config
    ("0", 1, False, 512, "serial"),
    ("1", 0, True, 512, "fp8 seesaw"),  # FP8 cache: the seesaw with e4m3 products (mla_decode_sm90_fp8)
    (None, 1, True, 256, "fp8 seesaw"),
    ("1", 0, True, 128, "serial"),  # FP8 cache, C / 2 not whole 128-column TMA copies
    (None, 0, True, 512, "serial"),  # the FP8 cache's default
    ("1", 0, False, 192, "serial"),  # C / 2 not whole 64-column blocks
    ("1", 0, False, 256, "seesaw"),
    ("2", 0, False, 512, "lookahead"),  # the serial kernel, S of the next tile under this one's softmax
    (None, 2, False, 192, "lookahead"),
    ("2", 0, True, 512, "serial"),  # FP8 cache: one widened tile, no lookahead
])
def test_launcher_picks_the_kernel(env, pipe, fp8, C, want, monkeypatch):
    calls = []
    monkeypatch.setattr(sm90, "_mla_decode_sm90_kernel", _Recorder("serial", calls))
    monkeypatch.setattr(sm90, "_mla_decode_sm90_seesaw_kernel", _Recorder("seesaw", calls))
    from moe_kernels.ops import mla_decode_sm90_fp8 as sm90_fp8
    monkeypatch.setattr(sm90_fp8, "_mla_decode_sm90_fp8_kernel", _Recorder("fp8 seesaw", calls))
    if env is None:
        monkeypatch.delenv("MOE_KERNELS_MLA_PIPE", raising=False)
    else:
        monkeypatch.setenv("MOE_KERNELS_MLA_PIPE", env)
    B, s_q, h, splits = 3, 2, 40, 4
    rows = s_q * h
    q2, qr2 = torch.zeros(B, rows, C, dtype=torch.bfloat16), torch.zeros(B, rows, 64, dtype=torch.bfloat16)
    D = RD.fp8_row_bytes(C, 64) if fp8 else C + 64
    cache = torch.zeros(10, 64, D, dtype=torch.uint8 if fp8 else torch.bfloat16)
    table = torch.zeros(B, 5, dtype=torch.int32)
    o_part = torch.zeros(B, rows, splits, C)
    lse = torch.zeros(B, rows, splits)
    sm90.launch(q2, qr2, cache, torch.zeros(B, dtype=torch.int32), table, 0.1, splits, h, s_q, o_part, lse,
                (lse.stride(0), lse.stride(1)), pipe=pipe)
    (name, grid, kw), = calls
    assert name == ("serial" if want == "lookahead" else want)
    assert kw.get("LOOKAHEAD", False) == (want == "lookahead")
    assert grid == (2, splits, B)  # 80 query rows: two head blocks of 64
    assert kw["C"] == C and kw["PAGED"] and kw["SPLIT"]
    if want in ("seesaw", "fp8 seesaw"):
        assert kw["num_warps"] == 4 and kw["WG_REGS"] == sm90.WG_REGS  # the second warpgroup: a worker partition
    else:
        assert kw["num_warps"] == 8 and kw["FP8"] == fp8 and kw["MULTI_Q"]
    assert sm90.uses_pipe(cache, C, pipe) == (want == "seesaw")


@pytest.mark.skipif(sm90 is None, reason="this Triton has no Gluon Hopper API")
@pytest.mark.parametrize("env,want", [(None, "serial schedule)"), ("1", "seesaw schedule)"),
                                      ("2", "serial schedule with lookahead)")])
def test_decode_kernel_name_says_the_schedule(env, want, monkeypatch):
    """`moe-kernels info` names the sm_90 schedule the bf16 cache gets ($MOE_KERNELS_MLA_PIPE); the FP8 cache's is
    the serial one, or with $MOE_KERNELS_MLA_PIPE=1 the seesaw with e4m3 products."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(ops_mla, "get_mla_config", lambda kind, size, device: {"GLUON": 1})
    if env is None:
        monkeypatch.delenv("MOE_KERNELS_MLA_PIPE", raising=False)
    else:
        monkeypatch.setenv("MOE_KERNELS_MLA_PIPE", env)
    bf16, fp8 = ops_mla.decode_kernel_name(torch.device("cuda", 0)).split("; ")
    assert bf16.startswith("bf16 cache: Gluon sm_90 kernel") and bf16.endswith(want)
    assert fp8.endswith("(mla_decode_sm90, seesaw schedule, e4m3 products)" if env == "1" else
                        "(mla_decode_sm90, serial schedule)")


@pytest.mark.skipif(sm90 is None, reason="this Triton has no Gluon Hopper API")
def test_the_bf16_cache_defaults_to_the_seesaw(monkeypatch):
    """The shipped decode config (DEFAULTS, no tuned file overriding GLUON) runs the seesaw over a bf16 cache on
    sm_90 and the serial kernel over the FP8 cache; $MOE_KERNELS_MLA_PIPE=0 still forces serial."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(ops_mla, "_device_facts", lambda index: ("NVIDIA H100 80GB HBM3", 132))
    monkeypatch.delenv("MOE_KERNELS_MLA_PIPE", raising=False)
    assert ops_mla.get_mla_config("decode", 128, torch.device("cuda", 0))["GLUON"] == 2
    bf16, fp8 = ops_mla.decode_kernel_name(torch.device("cuda", 0)).split("; ")
    assert bf16.endswith("(mla_decode_sm90, seesaw schedule)"), bf16
    assert fp8.endswith("(mla_decode_sm90, serial schedule)"), fp8  # the e4m3-product seesaw is opt-in
    monkeypatch.setenv("MOE_KERNELS_MLA_PIPE", "0")
    assert ops_mla.decode_kernel_name(torch.device("cuda", 0)).split("; ")[0].endswith("serial schedule)")
