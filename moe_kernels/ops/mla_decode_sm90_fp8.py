"""Hopper (sm_90) MLA decode over the FP8 latent cache with FP8 tensor-core products, in Gluon: the seesaw schedule
of ``mla_decode_sm90`` (two warpgroups taking the key tiles in turn, each holding half of the output columns) with
q K^T and P V as e4m3 x e4m3 wgmmas, which run at twice the bf16 rate and read half the shared-memory bytes.

Why: with 128 heads a decode step is compute-bound in bf16 (FlashMLA reaches ~550 TFLOP/s on an H100, the bf16
seesaw ~480). The serial FP8 kernel of ``mla_decode_sm90`` widens each e4m3 tile to bf16 and then computes as the
bf16 cache does, so it reads half the bytes and still runs at the bf16 products' speed (0.45x FlashMLA's bf16
time at B 128, S 4096, ninth session). Issue 17 asks for 1.6x: that needs the products themselves in FP8.

Numerics (reference.mla_decode_fp8_products emulates them on the CPU; docs/numerics.md gives the errors):
  * the cache: e4m3 latent columns with one fp32 scale per token (reference.mla_decode's layout, unchanged), the
    rope columns in bf16;
  * q is quantised to e4m3 per query row (scale sq = amax / 448) once per program, in the prologue;
  * S = sq x sk x (q8 . k8) over the C latent columns (an FP8 wgmma, fp32 accumulation), plus q_rope . k_rope (a
    bf16 wgmma into the same accumulator);
  * the key scale sk is folded into the softmax weights instead of the values: with x = S x qk_scale (log2 units)
    the running max is taken over x + log2(sk), so P' = exp2(x + log2 sk - m) = P x sk lies in [0, 1] and is
    rounded to e4m3 for P V against the raw e4m3 values; the row sum adds P = P' / sk in fp32. The output
    sum_t P'_t v8_t / sum_t P_t is the softmax-weighted sum of v8 x sk, and the log-sum-exp of a split (base 2)
    is m + log2(sum), as with the bf16 cache.
  * so q, the cache's latent values and the weights are e4m3 (3 mantissa bits), each rounded once; the
    accumulations are fp32 (the FP8 wgmma's, docs/numerics.md).

Layout of one program (64 query rows; warpgroup 0 the default partition, warpgroup 1 a worker):
  * shared memory: q8 [64, C] e4m3 (32 KiB at C 512), q_rope [64, 64] bf16, two stages of a cache tile (C e4m3 +
    64 bf16 rope columns, 40 KiB), four transposed value tiles vT [C/2, 64] e4m3 (a's and b's value columns of
    each warpgroup's half), P_a and P_b [64, 64] e4m3: ~195 KiB.
  * FP8 wgmmas read both operands K-major; for P V the reduction runs over the keys, so each warpgroup transposes
    its half of every tile's values into vT (64 x 64 byte blocks through registers) while a wgmma runs. Keys past
    the split's end are zeroed there (their bits may be NaN).
  * the stage halves: "lo" the columns [0, C/2), read by warpgroup 0's transpositions and by the scores of the
    tile's owner; "hi" the columns [C/2, C) and the rope, read by warpgroup 1's transpositions and by the owner's
    scores. A half is refilled by the warpgroup that transposes it, once the owner's scores are done: warpgroup 0
    refills stage 0's lo right after S of its tile a (its own scores and transposition), stage 1's lo once
    warpgroup 1 has sent m_b (so S of b is done) and it has transposed b's lo; warpgroup 1 alike for the hi halves.
Per pair of tiles (a = 2i in stage 0, b = 2i + 1 in stage 1):
  wg0: softmax(S_a) -> m_a --> O_L = O_L alpha + P'_a vT_a,lo || transpose b's lo -> m_b --> P'_a exp2(m_a - m_b)
       to shared memory --> O_L = O_L beta + P'_b vT_b,lo || S of a + 2, transpose its lo, refill
  wg1: transpose a's hi -> m_a --> softmax(S_b) -> m_b, P'_b --> refill stage 0's hi -> O_R = O_R f + P'_b
       vT_b,hi -> P'_a --> O_R += P'_a vT_a,hi || S of b + 2, transpose its hi, refill
The output, the row sums' exchange and the split's log-sum-exp are the bf16 seesaw's.

Opt-in until timed on a GPU: config "decode_fp8" GLUON=2 or $MOE_KERNELS_MLA_PIPE=1 (``mla_decode_sm90.schedule``
says "fp8 seesaw"); the FP8 cache's default stays the serial kernel (widened tiles, bf16 products). C must be a
multiple of 256 (each warpgroup's half: whole 128-column TMA copies).
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

from .mla_decode_sm90 import _BH, _BN, _CH, _cta_barrier, _ss_factor, _ss_scale_rows, _tile_row

__all__ = ["FP8_CHUNK"]

FP8_CHUNK = 128  # e4m3 columns a TMA copy: one 128-byte swizzle block
_FCH = gl.constexpr(FP8_CHUNK)
E4M3_MAX = 448.0
_E4M3_MAX = gl.constexpr(E4M3_MAX)


@gluon.jit
def _f8_issue_half(t, n_tiles, row, kc_desc, kr_desc, kc_bufs, kr_bufs, ready, C: gl.constexpr, HALF: gl.constexpr):
    """TMA copies of one half of key tile t (cache row ``row``) into stage t % 2, when t < n_tiles: HALF 0 the e4m3
    columns [0, C/2), HALF 1 the columns [C/2, C) and the bf16 rope. ready: that half's barrier of each stage."""
    pred = t < n_tiles
    HC: gl.constexpr = C // 2
    st = t % 2
    bar = ready.index(st)
    kc = kc_bufs.index(st)
    if HALF == 0:
        mbarrier.expect(bar, kc_desc.block_type.nbytes * (HC // _FCH), pred=pred)
    else:
        mbarrier.expect(bar, kc_desc.block_type.nbytes * (HC // _FCH) + kr_desc.block_type.nbytes, pred=pred)
    for j in gl.static_range(HC // _FCH):
        tma.async_copy_global_to_shared(kc_desc, [row, HALF * HC + j * _FCH], bar,
                                        kc.slice(HALF * HC + j * _FCH, _FCH, dim=1), pred)
    if HALF == 1:
        tma.async_copy_global_to_shared(kr_desc, [row, 0], bar, kr_bufs.index(st), pred)


@gluon.jit
def _f8_scales(t, n_tiles, start, end, b, S_cap, block_table_ptr, stride_btb, ks_ptr, stride_ks,
               PAGED: gl.constexpr, layout: gl.constexpr):
    """The fp32 scales of key tile t's 64 keys (1 past the split's end: their weights are masked to 0 anyway)."""
    row = _tile_row(t, n_tiles, start, b, S_cap, block_table_ptr, stride_btb, PAGED)
    kk = gl.arange(0, _BN, layout=layout)
    valid = start + t * _BN + kk < end
    return gl.load(ks_ptr + (row + kk).to(gl.int64) * stride_ks, mask=valid, other=1.0)


@gluon.jit
def _f8_qk_issue(t, q8, kc_bufs, ready_lo, ready_hi, z, s_layout: gl.constexpr):
    """Wait for both halves of tile t and start q8 K8^T over the latent columns (async, a fresh accumulator)."""
    st = t % 2
    mbarrier.wait(ready_lo.index(st), (t // 2) & 1)
    mbarrier.wait(ready_hi.index(st), (t // 2) & 1)
    return warpgroup_mma(q8.index(z), kc_bufs.index(st + z).permute((1, 0)),
                         gl.zeros([_BH, _BN], gl.float32, s_layout), use_acc=False, is_async=True)


@gluon.jit
def _f8_qk_finish(s8, sq, qr_smem, kr_bufs, sk_smem, t, n_tiles, start, end, b, S_cap, block_table_ptr, stride_btb,
                  ks_ptr, stride_ks, z, PAGED: gl.constexpr):
    """S of tile t: the latent product (s8, in flight: waited for, with every older wgmma) times sq x sk, plus the
    rope product q_rope k_rope^T (bf16 wgmma into the same accumulator, q_rope from shared memory), waited for.
    The key scales sk go to sk_smem (this warpgroup's), where the softmax of tile t reads them."""
    s8_layout: gl.constexpr = s8.type.tensor_type.layout
    sk = _f8_scales(t, n_tiles, start, end, b, S_cap, block_table_ptr, stride_btb, ks_ptr, stride_ks, PAGED,
                    gl.SliceLayout(0, s8_layout))
    s = warpgroup_mma_wait(0, deps=(s8,))
    sk_smem.store(sk)
    _cta_barrier()  # the softmax's threads read other threads' scales
    # the same accumulator registers; the layout names the bf16 instruction's K (16) for the rope product
    s16_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, 64, 16])
    s = gl.convert_layout(s * sq[:, None] * sk[None, :], s16_layout)
    s = warpgroup_mma(qr_smem.index(z), kr_bufs.index(t % 2 + z).permute((1, 0)), s, is_async=True)
    return gl.convert_layout(warpgroup_mma_wait(0, deps=(s,)), s8_layout)


@gluon.jit
def _f8_transpose(kc, vt, t, start, end, COL0: gl.constexpr, NCOL: gl.constexpr):
    """vT[c, k] = kc[k, COL0 + c] for c < NCOL (the e4m3 values of tile t, keys on the contiguous axis, as the FP8
    wgmma's B operand must be), 64 x 128 blocks (one 128-byte swizzle column block of the stage) through registers
    (64 bytes a thread); on the tile that runs past the split's end the keys past it become 0. Then made visible to
    the tensor cores (fence + the warpgroup's barrier)."""
    tl_: gl.constexpr = gl.BlockedLayout([4, 4], [4, 8], [4, 1], [1, 0])
    keys = start + t * _BN + gl.arange(0, _BN, layout=gl.SliceLayout(1, tl_))
    tail = start + (t + 1) * _BN > end
    for j in gl.static_range(NCOL // _FCH):
        v = kc.slice(COL0 + j * _FCH, _FCH, dim=1).load(tl_)
        if tail:
            v = gl.where((keys < end)[:, None], v, gl.zeros_like(v))
        vt.slice(j * _FCH, _FCH, dim=0).store(gl.permute(v, (1, 0)))
    fence_async_shared()
    _cta_barrier()  # in a partition: its own warps


@gluon.jit
def _f8_softmax(s, sk_smem, t, start, lim, m_i, qk_scale, s_layout: gl.constexpr):
    """The weights of tile t in the frame of the scale-shifted running max (see the module's docstring): P' =
    exp2(x + log2 sk - m) in [0, 1] (fp32, for P V), the row sums of P = P' / sk it adds, the new max and the
    factor exp2(m_i - new max) (0 while a row has seen no key). Keys from lim on (per row) are masked."""
    keys = gl.arange(0, _BN, layout=gl.SliceLayout(0, s_layout))
    offs_n = start + t * _BN + keys
    sk = sk_smem.load(gl.SliceLayout(0, s_layout))
    x = gl.where(offs_n[None, :] < lim[:, None], s * qk_scale + gl.log2(sk)[None, :], float("-inf"))
    m_new = gl.maximum(m_i, gl.max(x, axis=1))
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)  # a row that sees no key yet: no -inf - -inf
    p = gl.exp2(x - m_use[:, None])
    l_add = gl.sum(p * (1.0 / sk)[None, :], axis=1)
    return p, l_add, m_new, gl.exp2(m_i - m_use)


@gluon.jit
def _f8_wg0_pair(i, s, m_i, l_i, acc, q8, sq, qr_smem, sk_smem, kc_bufs, kr_bufs, vt_bufs, p_a, p_b, m_a_smem, m_b_smem,
                 ready_lo, ready_hi, bar_a, bar_b, bar_pa, n_tiles, start, end, lim, b, S_cap, block_table_ptr,
                 stride_btb, ks_ptr, stride_ks, kc_desc, kr_desc, qk_scale, C: gl.constexpr, PAGED: gl.constexpr,
                 LAST: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr):
    """Warpgroup 0, pair i: holds S of tile a (and its key scales sk), a's value columns [0, C/2) already in vT 0,
    and the output columns [0, C/2). LAST: no next tiles; b may be missing."""
    HC: gl.constexpr = C // 2
    ta = 2 * i
    tb = ta + 1
    z = i >> 30  # 0, but not loop-invariant: the shared-memory descriptors are rebuilt each pair, not kept live
    if not LAST:  # paged: the block-table reads of the tiles loaded in this pair, early
        row_b2 = _tile_row(tb + 2, n_tiles, start, b, S_cap, block_table_ptr, stride_btb, PAGED)
        row_a4 = _tile_row(ta + 4, n_tiles, start, b, S_cap, block_table_ptr, stride_btb, PAGED)
    p, l_add, m_a, alpha = _f8_softmax(s, sk_smem, ta, start, lim, m_i, qk_scale, s_layout)
    l_i = l_i * alpha + l_add
    m_a_smem.store(m_a)
    _cta_barrier()
    mbarrier.arrive(bar_a)
    acc = _ss_scale_rows(acc, alpha, o_layout)
    pa_op = gl.convert_layout(p.to(gl.float8e4nv), gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4))
    p = p.to(gl.bfloat16)  # kept for P'_a exp2(m_a - m_b) below: half the registers across the transposition
    acc = warpgroup_mma(pa_op, vt_bufs.index(z).permute((1, 0)), acc, is_async=True)
    if tb < n_tiles:  # b's columns [0, C/2) -> vT 1 (read by P'_b V_b of the pair before: done) under P'_a V_a
        mbarrier.wait(ready_lo.index(1), i & 1)
        _f8_transpose(kc_bufs.index(1 + z), vt_bufs.index(1 + z), tb, start, end, 0, HC)
    # (P'_a's registers are not in deps: an 8-bit wait operand does not lower; ptxas keeps a wgmma's register
    # operands until its wait, or serialises it with a C75xx warning, which the offline checks refuse)
    acc = warpgroup_mma_wait(0, deps=(acc,))
    mbarrier.wait(bar_b, i & 1)
    m_b = m_b_smem.load(gl.SliceLayout(1, s_layout))
    beta = _ss_factor(m_a, m_b)
    p_a.store((p.to(gl.float32) * beta[:, None]).to(gl.float8e4nv))
    fence_async_shared()
    _cta_barrier()
    mbarrier.arrive(bar_pa)
    l_i = l_i * beta
    acc = _ss_scale_rows(acc, beta, o_layout)
    if LAST:
        if tb < n_tiles:
            acc = warpgroup_mma(p_b, vt_bufs.index(1 + z).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(0, deps=(acc,))
    else:
        # stage 1's columns [0, C/2): S of b (warpgroup 1, before it sent m_b) and their transposition are done
        _f8_issue_half(tb + 2, n_tiles, row_b2, kc_desc, kr_desc, kc_bufs, kr_bufs, ready_lo, C, 0)
        pv = warpgroup_mma(p_b, vt_bufs.index(1 + z).permute((1, 0)), acc, is_async=True)
        sn = _f8_qk_issue(ta + 2, q8, kc_bufs, ready_lo, ready_hi, z, s_layout)
        acc = warpgroup_mma_wait(1, deps=(pv,))
        _f8_transpose(kc_bufs.index(z), vt_bufs.index(z), ta + 2, start, end, 0, HC)  # vT 0 is free: P'_a V_a done
        s = _f8_qk_finish(sn, sq, qr_smem, kr_bufs, sk_smem, ta + 2, n_tiles, start, end, b, S_cap, block_table_ptr,
                          stride_btb, ks_ptr, stride_ks, z, PAGED)
        # stage 0's columns [0, C/2) are read (S of a + 2 and their transposition): a + 4's go in
        _f8_issue_half(ta + 4, n_tiles, row_a4, kc_desc, kr_desc, kc_bufs, kr_bufs, ready_lo, C, 0)
    return s, m_b, l_i, acc


@gluon.jit
def _f8_wg1_pair(i, s, m_i, l_i, acc, q8, sq, qr_smem, sk_smem, kc_bufs, kr_bufs, vt_bufs, p_a, p_b, m_a_smem, m_b_smem,
                 ready_lo, ready_hi, bar_a, bar_b, bar_pa, n_tiles, start, end, lim, b, S_cap, block_table_ptr,
                 stride_btb, ks_ptr, stride_ks, kc_desc, kr_desc, qk_scale, C: gl.constexpr, PAGED: gl.constexpr,
                 LAST: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr):
    """Warpgroup 1, pair i: holds S of tile b (and its key scales sk; b may be missing in the last pair: then its
    weights are all masked), b's value columns [C/2, C) already in vT 3, and the output columns [C/2, C)."""
    HC: gl.constexpr = C // 2
    ta = 2 * i
    tb = ta + 1
    z = i >> 30
    if not LAST:
        row_a2 = _tile_row(ta + 2, n_tiles, start, b, S_cap, block_table_ptr, stride_btb, PAGED)
        row_b4 = _tile_row(tb + 4, n_tiles, start, b, S_cap, block_table_ptr, stride_btb, PAGED)
    # a's columns [C/2, C) -> vT 2 (read by P'_a V_a of the pair before: done)
    mbarrier.wait(ready_hi.index(0), i & 1)
    _f8_transpose(kc_bufs.index(z), vt_bufs.index(2 + z), ta, start, end, HC, HC)
    mbarrier.wait(bar_a, i & 1)
    m_a = m_a_smem.load(gl.SliceLayout(1, s_layout))
    alpha = _ss_factor(m_i, m_a)
    p, l_add, m_b, beta = _f8_softmax(s, sk_smem, tb, start, lim, m_a, qk_scale, s_layout)  # b missing: p = 0
    l_i = l_i * (alpha * beta) + l_add
    if not LAST:  # stage 0's columns [C/2, C) and rope: S of a (before m_a was sent) and the transposition are done
        _f8_issue_half(ta + 2, n_tiles, row_a2, kc_desc, kr_desc, kc_bufs, kr_bufs, ready_hi, C, 1)
    pb = p.to(gl.float8e4nv)
    m_b_smem.store(m_b)
    p_b.store(pb)
    fence_async_shared()
    _cta_barrier()
    mbarrier.arrive(bar_b)
    acc = _ss_scale_rows(acc, alpha * beta, o_layout)
    pb_op = gl.convert_layout(pb, gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4))
    if LAST:
        if tb < n_tiles:
            acc = warpgroup_mma(pb_op, vt_bufs.index(3 + z).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.wait(bar_pa, i & 1)
        acc = warpgroup_mma(p_a, vt_bufs.index(2 + z).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc,))
    else:
        pv = warpgroup_mma(pb_op, vt_bufs.index(3 + z).permute((1, 0)), acc, is_async=True)
        mbarrier.wait(bar_pa, i & 1)
        pv = warpgroup_mma(p_a, vt_bufs.index(2 + z).permute((1, 0)), pv, is_async=True)
        if tb + 2 < n_tiles:
            sn = _f8_qk_issue(tb + 2, q8, kc_bufs, ready_lo, ready_hi, z, s_layout)
            acc = warpgroup_mma_wait(1, deps=(pv,))  # both P V products done
            _f8_transpose(kc_bufs.index(1 + z), vt_bufs.index(3 + z), tb + 2, start, end, HC, HC)  # vT 3 is free
            s = _f8_qk_finish(sn, sq, qr_smem, kr_bufs, sk_smem, tb + 2, n_tiles, start, end, b, S_cap, block_table_ptr,
                              stride_btb, ks_ptr, stride_ks, z, PAGED)
            # stage 1's columns [C/2, C) and rope are read: b + 4's go in
            _f8_issue_half(tb + 4, n_tiles, row_b4, kc_desc, kr_desc, kc_bufs, kr_bufs, ready_hi, C, 1)
        else:
            acc = warpgroup_mma_wait(0, deps=(pv,))
    return s, m_b, l_i, acc


@gluon.jit
def _f8_partition(q8_smem, sq_smem, qr_smem, sk_0, sk_1, kc_bufs, kr_bufs, vt_bufs, p_a, p_b, m_a_smem, m_b_smem, l_a_smem,
                  l_b_smem, ready_lo, ready_hi, sync, kc_desc, kr_desc, ks_ptr, seqlens_ptr, block_table_ptr, o_ptr,
                  lse_ptr, num_rows, num_heads, s_q, num_splits, qk_scale, S_cap, stride_ks, stride_btb, stride_ob,
                  stride_oh, stride_os, stride_lb, stride_lh, C: gl.constexpr, PAGED: gl.constexpr,
                  SPLIT: gl.constexpr, WG: gl.constexpr):
    """One warpgroup's part (WG 0: even tiles, output columns [0, C/2); WG 1: odd tiles, columns [C/2, C)), then
    the row sums of both are added and each writes its columns."""
    HC: gl.constexpr = C // 2
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 32])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HC, 32])
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    pid_h = gl.program_id(0)
    split = gl.program_id(1)
    b = gl.program_id(2).to(gl.int64)
    seqlen = gl.load(seqlens_ptr + b)
    per_split = gl.cdiv(gl.cdiv(seqlen, num_splits), _BN) * _BN
    start = split * per_split
    end = gl.minimum(start + per_split, seqlen)
    n_tiles = gl.maximum(gl.cdiv(end - start, _BN), 0)
    n_pairs = (n_tiles + 1) // 2
    rows_s = pid_h * _BH + gl.arange(0, _BH, layout=row_s)
    lim = gl.minimum(seqlen - (s_q - 1 - rows_s // num_heads), end)  # the keys each query row sees here
    if WG == 0:  # the key scales of this warpgroup's tile, from its S to its softmax
        sk_smem = sk_0
    else:
        sk_smem = sk_1
    # 1 until this warpgroup's first S writes them: a missing tile's softmax (all masked) divides by them
    sk_smem.store(gl.full([_BN], 1.0, gl.float32, layout=gl.SliceLayout(0, s_layout)))
    _cta_barrier()
    sq = sq_smem.load(row_s)
    m_i = gl.full([_BH], float("-inf"), gl.float32, layout=row_s)
    l_i = gl.zeros([_BH], gl.float32, layout=row_s)
    acc = gl.zeros([_BH, HC], gl.float32, layout=o_layout)
    s = gl.zeros([_BH, _BN], gl.float32, layout=s_layout)
    bar_a = sync.index(0)
    bar_b = sync.index(1)
    bar_pa = sync.index(2)
    if n_tiles > WG:  # S of this warpgroup's first tile (WG), its half of the values transposed, the half refilled
        sn = _f8_qk_issue(WG, q8_smem, kc_bufs, ready_lo, ready_hi, 0, s_layout)
        _f8_transpose(kc_bufs.index(WG), vt_bufs.index(3 * WG), WG, start, end, WG * HC, HC)
        s = _f8_qk_finish(sn, sq, qr_smem, kr_bufs, sk_smem, WG, n_tiles, start, end, b, S_cap, block_table_ptr,
                          stride_btb, ks_ptr, stride_ks, 0, PAGED)
        row = _tile_row(WG + 2, n_tiles, start, b, S_cap, block_table_ptr, stride_btb, PAGED)
        if WG == 0:
            _f8_issue_half(2, n_tiles, row, kc_desc, kr_desc, kc_bufs, kr_bufs, ready_lo, C, 0)
        else:
            _f8_issue_half(3, n_tiles, row, kc_desc, kr_desc, kc_bufs, kr_bufs, ready_hi, C, 1)
    if WG == 0:
        for i in range(n_pairs - 1):
            s, m_i, l_i, acc = _f8_wg0_pair(
                i, s, m_i, l_i, acc, q8_smem, sq, qr_smem, sk_smem, kc_bufs, kr_bufs, vt_bufs, p_a, p_b, m_a_smem, m_b_smem,
                ready_lo, ready_hi, bar_a, bar_b, bar_pa, n_tiles, start, end, lim, b, S_cap, block_table_ptr,
                stride_btb, ks_ptr, stride_ks, kc_desc, kr_desc, qk_scale, C, PAGED, False, s_layout, o_layout)
        if n_pairs > 0:
            s, m_i, l_i, acc = _f8_wg0_pair(
                n_pairs - 1, s, m_i, l_i, acc, q8_smem, sq, qr_smem, sk_smem, kc_bufs, kr_bufs, vt_bufs, p_a, p_b, m_a_smem,
                m_b_smem, ready_lo, ready_hi, bar_a, bar_b, bar_pa, n_tiles, start, end, lim, b, S_cap,
                block_table_ptr, stride_btb, ks_ptr, stride_ks, kc_desc, kr_desc, qk_scale, C, PAGED, True, s_layout,
                o_layout)
        l_mine = l_a_smem
        l_other = l_b_smem
    else:
        for i in range(n_pairs - 1):
            s, m_i, l_i, acc = _f8_wg1_pair(
                i, s, m_i, l_i, acc, q8_smem, sq, qr_smem, sk_smem, kc_bufs, kr_bufs, vt_bufs, p_a, p_b, m_a_smem, m_b_smem,
                ready_lo, ready_hi, bar_a, bar_b, bar_pa, n_tiles, start, end, lim, b, S_cap, block_table_ptr,
                stride_btb, ks_ptr, stride_ks, kc_desc, kr_desc, qk_scale, C, PAGED, False, s_layout, o_layout)
        if n_pairs > 0:
            s, m_i, l_i, acc = _f8_wg1_pair(
                n_pairs - 1, s, m_i, l_i, acc, q8_smem, sq, qr_smem, sk_smem, kc_bufs, kr_bufs, vt_bufs, p_a, p_b, m_a_smem,
                m_b_smem, ready_lo, ready_hi, bar_a, bar_b, bar_pa, n_tiles, start, end, lim, b, S_cap,
                block_table_ptr, stride_btb, ks_ptr, stride_ks, kc_desc, kr_desc, qk_scale, C, PAGED, True, s_layout,
                o_layout)
        l_mine = l_b_smem
        l_other = l_a_smem
    # the row sums: each warpgroup summed its own tiles' weights (in the same running-max frame)
    l_mine.store(l_i)
    _cta_barrier()
    mbarrier.arrive(sync.index(3 + WG))
    mbarrier.wait(sync.index(4 - WG), 0)
    l_i = l_i + l_other.load(row_s)
    # a split without keys (short row) leaves l_i = 0: output 0 with log-sum-exp -inf, ignored by the merge
    has = l_i > 0
    l_o = gl.convert_layout(gl.where(has, l_i, 1.0), gl.SliceLayout(1, o_layout))
    o = acc / l_o[:, None]
    rows_o = pid_h * _BH + gl.arange(0, _BH, layout=gl.SliceLayout(1, o_layout))
    cols_o = WG * HC + gl.arange(0, HC, layout=gl.SliceLayout(0, o_layout))
    o_ptrs = o_ptr + b * stride_ob + rows_o[:, None] * stride_oh + split * stride_os + cols_o[None, :]
    gl.store(o_ptrs, o.to(o_ptr.dtype.element_ty), mask=(rows_o < num_rows)[:, None])
    if SPLIT and WG == 0:
        lse = gl.where(has, m_i + gl.log2(gl.where(has, l_i, 1.0)), float("-inf"))
        gl.store(lse_ptr + b * stride_lb + rows_s * stride_lh + split, lse, mask=rows_s < num_rows)


@gluon.jit
def _mla_decode_sm90_fp8_kernel(
    q_ptr, qr_ptr, kc_desc, kr_desc, ks_ptr, seqlens_ptr, block_table_ptr, o_ptr, lse_ptr,
    num_rows, num_heads, s_q, num_splits, qk_scale, S_cap,
    stride_qb, stride_qh, stride_qrb, stride_qrh, stride_ks, stride_btb, stride_ob, stride_oh, stride_os, stride_lb,
    stride_lh,
    C: gl.constexpr, R: gl.constexpr, PAGED: gl.constexpr, SPLIT: gl.constexpr, WG_REGS: gl.constexpr,
    num_warps: gl.constexpr,
):
    """The prologue (q quantised to e4m3 per row into shared memory, q_rope, the first two tiles' loads) in
    warpgroup 0, then the two warpgroups' parts in a warp-specialised region (``_f8_partition``)."""
    gl.static_assert(num_warps == 4, "one warpgroup here, the second one a worker partition")
    gl.static_assert(C % (2 * _FCH) == 0, "each warpgroup's value columns: whole 128-column TMA copies")
    gl.static_assert(R == _BN, "rope 64")
    pid_h = gl.program_id(0)
    split = gl.program_id(1)
    b = gl.program_id(2).to(gl.int64)
    ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])  # 16-byte loads of q rows
    l16: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    l8: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
    l8_64: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=64, element_bitwidth=8, rank=2)
    vec_layout: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])

    q8_smem = gl.allocate_shared_memory(gl.float8e4nv, [1, _BH, C], l8)  # [1, ..]: see _f8_wg0_pair's z
    qr_smem = gl.allocate_shared_memory(gl.bfloat16, [1, _BH, R], l16)
    kc_bufs = gl.allocate_shared_memory(gl.float8e4nv, [2, _BN, C], kc_desc.layout)
    kr_bufs = gl.allocate_shared_memory(gl.bfloat16, [2, _BN, R], l16)
    vt_bufs = gl.allocate_shared_memory(gl.float8e4nv, [4, C // 2, _BN], l8_64)  # a lo, b lo, a hi, b hi
    p_a = gl.allocate_shared_memory(gl.float8e4nv, [_BH, _BN], l8_64)
    p_b = gl.allocate_shared_memory(gl.float8e4nv, [_BH, _BN], l8_64)
    sq_smem = gl.allocate_shared_memory(gl.float32, [_BH], vec_layout)
    sk_0 = gl.allocate_shared_memory(gl.float32, [_BN], vec_layout)
    sk_1 = gl.allocate_shared_memory(gl.float32, [_BN], vec_layout)
    m_a_smem = gl.allocate_shared_memory(gl.float32, [_BH], vec_layout)
    m_b_smem = gl.allocate_shared_memory(gl.float32, [_BH], vec_layout)
    l_a_smem = gl.allocate_shared_memory(gl.float32, [_BH], vec_layout)
    l_b_smem = gl.allocate_shared_memory(gl.float32, [_BH], vec_layout)
    ready_lo = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    ready_hi = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    sync = gl.allocate_shared_memory(gl.int64, [5, 1], mbarrier.MBarrierLayout())  # m_a, m_b + P_b, P_a, l_a, l_b
    for i in gl.static_range(2):
        mbarrier.init(ready_lo.index(i), count=1)
        mbarrier.init(ready_hi.index(i), count=1)
    for i in gl.static_range(5):
        mbarrier.init(sync.index(i), count=1)

    # q -> e4m3 with one scale a row (amax / 448; rows past num_rows and all-zero rows: 0), 128 columns at a time
    rows_ld = pid_h * _BH + gl.arange(0, _BH, layout=gl.SliceLayout(1, ld_layout))
    rmask = (rows_ld < num_rows)[:, None]
    cols = gl.arange(0, _FCH, layout=gl.SliceLayout(0, ld_layout))
    q_rows = q_ptr + b * stride_qb + rows_ld[:, None] * stride_qh
    amax = gl.zeros([_BH], gl.float32, layout=gl.SliceLayout(1, ld_layout))
    for j in range(C // _FCH):  # not unrolled: unrolled, the second pass's loads merged with these, all of q live
        q = gl.load(q_rows + (j * _FCH + cols)[None, :], mask=rmask, other=0.0)
        amax = gl.maximum(amax, gl.max(gl.abs(q.to(gl.float32)), axis=1))
    inv = gl.where(amax > 0, _E4M3_MAX / amax, 0.0)
    for j in gl.static_range(C // _FCH):
        q = gl.load(q_rows + (j * _FCH + cols)[None, :], mask=rmask, other=0.0)
        q8_smem.index(0).slice(j * _FCH, _FCH, dim=1).store((q.to(gl.float32) * inv[:, None]).to(gl.float8e4nv))
    sq_smem.store(amax / _E4M3_MAX)
    cols_r = gl.arange(0, R, layout=gl.SliceLayout(0, ld_layout))
    qr = gl.load(qr_ptr + b * stride_qrb + rows_ld[:, None] * stride_qrh + cols_r[None, :], mask=rmask, other=0.0)
    qr_smem.index(0).store(qr)
    fence_async_shared()  # q in shared memory and the barriers' init, seen by the async proxy (TMA, wgmma)
    _cta_barrier()

    seqlen = gl.load(seqlens_ptr + b)
    per_split = gl.cdiv(gl.cdiv(seqlen, num_splits), _BN) * _BN
    start = split * per_split
    end = gl.minimum(start + per_split, seqlen)
    n_tiles = gl.maximum(gl.cdiv(end - start, _BN), 0)
    for t in gl.static_range(2):
        row = _tile_row(t, n_tiles, start, b, S_cap, block_table_ptr, stride_btb, PAGED)
        _f8_issue_half(t, n_tiles, row, kc_desc, kr_desc, kc_bufs, kr_bufs, ready_lo, C, 0)
        _f8_issue_half(t, n_tiles, row, kc_desc, kr_desc, kc_bufs, kr_bufs, ready_hi, C, 1)

    gl.warp_specialize([
        (_f8_partition, (q8_smem, sq_smem, qr_smem, sk_0, sk_1, kc_bufs, kr_bufs, vt_bufs, p_a, p_b, m_a_smem, m_b_smem, l_a_smem,
                         l_b_smem, ready_lo, ready_hi, sync, kc_desc, kr_desc, ks_ptr, seqlens_ptr, block_table_ptr,
                         o_ptr, lse_ptr, num_rows, num_heads, s_q, num_splits, qk_scale, S_cap, stride_ks,
                         stride_btb, stride_ob, stride_oh, stride_os, stride_lb, stride_lh, C, PAGED, SPLIT, 0)),
        (_f8_partition, (q8_smem, sq_smem, qr_smem, sk_0, sk_1, kc_bufs, kr_bufs, vt_bufs, p_a, p_b, m_a_smem, m_b_smem, l_a_smem,
                         l_b_smem, ready_lo, ready_hi, sync, kc_desc, kr_desc, ks_ptr, seqlens_ptr, block_table_ptr,
                         o_ptr, lse_ptr, num_rows, num_heads, s_q, num_splits, qk_scale, S_cap, stride_ks,
                         stride_btb, stride_ob, stride_oh, stride_os, stride_lb, stride_lh, C, PAGED, SPLIT, 1)),
    ], [4], [WG_REGS])
