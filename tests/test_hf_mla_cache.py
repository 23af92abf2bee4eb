"""A patched DeepSeek-V3 attention under HF's cache (the path ``generate`` takes): its latent rows live in HF's cache
object, a single-token step over a DynamicCache with no padding runs the absorbed latent decode (``ops.mla_decode``)
over them, padded batches take the masked path, and ``patch_model(kv_cache_dtype="fp8")`` keeps the rows as the
FP8 latent cache.

The kernels run through Triton's interpreter on the CPU (``use_kernels = True``) and natively on the GPU; every
comparison is against HF's own model on the same tokens (teacher-forced step logits, relative error). The models are
fp32, where the absorbed decode must give HF's logits to rounding (1e-3); one test runs bf16, where the absorbed
form rounds at other points than HF's expanded keys (q W_UK instead of c_kv W_UK^T): on this random model, whose
softmax is sharp at some steps, either path may land a few percent from HF at such a step (seen: 7e-2 against
1e-2 at one step of one draw, both paths ~2.7e-2 over another draw's steps), so that bound is 5e-2."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_ds  # noqa: E402

import moe_kernels as mk  # noqa: E402
from moe_kernels.integrations import hf as mk_hf  # noqa: E402
from moe_kernels.reference import mla_decode as RD  # noqa: E402
from _helpers import assert_close_rel, rel_err  # noqa: E402
from test_hf_equivalence import ds_config, randomize  # noqa: E402

N_LAYERS = 3  # ds_config's


def _model(device, dtype=torch.float32):
    torch.manual_seed(0)
    return randomize(hf_ds.DeepseekV3ForCausalLM(ds_config()), std=0.1).to(device=device, dtype=dtype)


FP32_BOUND = 1e-3  # fp32 model: the same attention to rounding (the GPU's kernels accumulate in other orders)


def _patched(model, device, **kw):
    mk.patch_model(model, precision=None, **kw)
    mlas = [m for m in model.modules() if isinstance(m, mk.MultiHeadLatentAttention)]
    assert len(mlas) == N_LAYERS
    if device == "cpu":
        for m in mlas:
            m.use_kernels = True  # the kernels, through the interpreter
    return mlas


def _steps(model, ids, n_prompt, mask=None):
    """Teacher-forced logits of the last position after the prompt, then of each single-token step, through one
    DynamicCache; with ``mask`` (HF's 2-D padding mask [B, L]) the steps see its growing prefix."""
    cache = DynamicCache()
    kw = {} if mask is None else {"attention_mask": mask[:, :n_prompt]}
    out = model(ids[:, :n_prompt], past_key_values=cache, use_cache=True, **kw)
    logits = [out.logits[:, -1].float()]
    for t in range(n_prompt, ids.shape[1]):
        kw = {} if mask is None else {"attention_mask": mask[:, : t + 1]}
        out = model(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True, **kw)
        logits.append(out.logits[:, -1].float())
    return torch.stack(logits, 1), out.past_key_values


class _Count:
    """Counts MultiHeadLatentAttention._decode_over calls (the absorbed decode over cache rows)."""

    def __init__(self, monkeypatch):
        self.n = 0
        real = mk.MultiHeadLatentAttention._decode_over

        def counted(mla, *a, **k):
            self.n += 1
            return real(mla, *a, **k)
        monkeypatch.setattr(mk.MultiHeadLatentAttention, "_decode_over", counted)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_steps_run_the_latent_kernel_over_hf_cache(device, dtype, monkeypatch):
    model = _model(device, dtype)
    ids = torch.randint(0, 97, (2, 9), device=device)
    n_prompt = 5
    with torch.no_grad():
        ref, _ = _steps(model, ids, n_prompt)
        _patched(model, device)
        count = _Count(monkeypatch)
        ours, cache = _steps(model, ids, n_prompt)
    assert_close_rel(ours, ref, FP32_BOUND if dtype == torch.float32 else 5e-2,
                     "step logits, latent decode over HF's cache")
    assert count.n == N_LAYERS * (ids.shape[1] - n_prompt), count.n  # every single-token step, every layer
    keys = cache.layers[0].keys  # the latent rows [c_kv | k_rope], one "head"; the values are empty
    assert keys.shape == (2, 1, ids.shape[1], 64 + 16) and keys.dtype == dtype
    assert cache.layers[0].values.shape[-1] == 0 and cache.get_seq_length() == ids.shape[1]


def test_latent_decode_can_be_turned_off(monkeypatch):
    """$MOE_KERNELS_HF_LATENT_DECODE=0: every step takes the masked path (the former behaviour), same logits."""
    model = _model("cpu")
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        _patched(model, "cpu")
        on, _ = _steps(model, ids, 5)
        monkeypatch.setenv("MOE_KERNELS_HF_LATENT_DECODE", "0")
        count = _Count(monkeypatch)
        off, _ = _steps(model, ids, 5)
    assert count.n == 0
    assert_close_rel(off, on, FP32_BOUND, "masked path vs latent decode")


def test_padded_batch_takes_the_masked_path(device, monkeypatch):
    """Left padding: the steps' masks hide keys, so the absorbed decode (which sees every key) must not run; the
    masked path gives HF's logits on the rows' real tokens."""
    model = _model(device)
    ids = torch.randint(0, 97, (2, 8), device=device)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1: three pad tokens in front
    n_prompt = 5
    with torch.no_grad():
        ref, _ = _steps(model, ids, n_prompt, mask)
        _patched(model, device)
        count = _Count(monkeypatch)
        ours, _ = _steps(model, ids, n_prompt, mask)
    assert count.n == 0
    assert_close_rel(ours, ref, FP32_BOUND, "step logits of a left-padded batch")


def test_mask_verdict():
    keep = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    assert mk_hf._plain_causal(None, 1) and mk_hf._plain_causal(keep, 1)
    hole = keep.clone()
    hole[1, ..., 0] = False
    assert not mk_hf._plain_causal(hole, 1)
    additive = torch.zeros(2, 1, 1, 7)
    assert mk_hf._plain_causal(additive, 1)
    additive[0, ..., 3] = torch.finfo(torch.float32).min
    assert not mk_hf._plain_causal(additive, 1)  # the same object, changed in place: judged again
    assert not mk_hf._plain_causal("not a tensor", 1)
    # three new tokens after four cached keys: token s sees keys 0 .. 4 + s
    causal = torch.ones(7, 7, dtype=torch.bool).tril()[4:].expand(2, 1, 3, 7)
    assert mk_hf._plain_causal(causal, 3) and not mk_hf._plain_causal(causal, 1)
    assert not mk_hf._plain_causal(torch.ones(2, 1, 3, 7, dtype=torch.bool), 3)  # sees the future
    padded = causal.clone()
    padded[0, ..., 0] = False
    assert not mk_hf._plain_causal(padded, 3)


def test_speculative_steps_run_the_latent_kernel(device, monkeypatch):
    """Steps of 3 tokens after the prompt (a speculative / MTP verification's shape): the absorbed decode with 3
    causal queries per row, every position's logits HF's."""
    model = _model(device)
    ids = torch.randint(0, 97, (2, 11), device=device)
    n_prompt, step = 5, 3

    def chunks():
        cache = DynamicCache()
        out = model(ids[:, :n_prompt], past_key_values=cache, use_cache=True)
        logits = []
        for t in range(n_prompt, ids.shape[1], step):
            out = model(ids[:, t : t + step], past_key_values=out.past_key_values, use_cache=True)
            logits.append(out.logits.float())
        return torch.cat(logits, 1)

    with torch.no_grad():
        ref = chunks()
        _patched(model, device)
        count = _Count(monkeypatch)
        ours = chunks()
    assert count.n == N_LAYERS * 2  # two steps of 3 tokens
    assert_close_rel(ours, ref, FP32_BOUND, "logits of 3-token steps")


def test_fp8_latent_cache_under_hf_cache(device, monkeypatch):
    """patch_model(kv_cache_dtype="fp8"): HF's cache holds the FP8 rows (uint8, fp8_row_bytes each); the steps still
    run the latent decode, and their logits stay within the FP8 cache's error of the bf16 cache's."""
    model = _model(device)
    ids = torch.randint(0, 97, (2, 9), device=device)
    n_prompt = 5
    with torch.no_grad():
        _patched(model, device)
        bf16, _ = _steps(model, ids, n_prompt)
    model8 = _model(device)
    with torch.no_grad():
        mlas = _patched(model8, device, kv_cache_dtype="fp8")
        assert all(m.kv_cache_dtype == "fp8" for m in mlas)
        count = _Count(monkeypatch)
        fp8, cache = _steps(model8, ids, n_prompt)
    keys = cache.layers[0].keys
    assert keys.dtype == torch.uint8 and keys.shape == (2, 1, ids.shape[1], RD.fp8_row_bytes(64, 16))
    assert count.n == N_LAYERS * (ids.shape[1] - n_prompt)
    err = rel_err(fp8, bf16)
    print(f"FP8 latent cache vs bf16 cache, step logits: relative error {err:.2e}")
    assert 0 < err < 0.1, err


def test_kv_cache_dtype_is_checked():
    model = _model("cpu")
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        mk.patch_model(model, kv_cache_dtype="int8")


def test_static_cache_takes_the_masked_path(device, monkeypatch):
    """generate(cache_implementation="static"): the layers return the whole preallocated buffer (rows past the
    length are zeros), so no step may take the absorbed decode; the tokens are HF's."""
    model = _model(device)
    ids = torch.randint(0, 97, (2, 6), device=device)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, cache_implementation="static",
              pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        _patched(model, device)
        count = _Count(monkeypatch)
        out = model.generate(ids, **kw)
    assert count.n == 0
    for t, (ours, theirs) in enumerate(zip(out.scores, ref.scores)):
        assert_close_rel(ours.float(), theirs.float(), FP32_BOUND, f"step {t} logits, static cache")
        if not torch.equal(out.sequences[:, 6 + t], ref.sequences[:, 6 + t]):
            break  # a near-tie under rounding: the inputs differ from here on
