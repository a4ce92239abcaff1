"""Decoding: the static KV cache, the PyTorch decode step and the fused Triton step (kernel.py, under the interpreter
without CUDA), chunked prefill, ragged batches, against full prefill and a dense float64 reference."""

import os
import warnings

import torch

if not torch.cuda.is_available():   # must precede the first import of triton anywhere in this process
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

import lucid
from model import GPT, GPTConfig

triton = pytest.importorskip("triton")
import kernel  # noqa: E402

DTYPES = {"f64": torch.float64, "f32": torch.float32}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: on a busy 2-core machine a second intra-op thread makes a small matmul ~300× slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def rel_err(x, ref):
    x, ref = x.double(), ref.double()
    assert torch.isfinite(x).all(), "non-finite values"
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def assert_close(name, ref, x, tol):
    err = rel_err(x, ref)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


def trained_model(dtype=torch.float64, seed=0, **overrides):
    """A tiny GPT whose every parameter has moved from its initial value (norm weights no longer 1)."""
    args = dict(block_size=64, vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, attn="lucid",
                pos="rope", token_shift=True, lucid_impl="torch")
    args.update(overrides)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**args)).double()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:                                          # RMSNorm weights: 1 ± 0.3
                p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            else:
                p.add_(0.5 * p.std() * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.to(dtype).eval()


def set_decode_impl(model, impl):
    for block in model.blocks:
        block.attn.lucid_impl = impl


def make_keys(kind, B, H, N, D, gen):
    """Random, clustered (4 centres) or near-duplicate keys: the latter two make the E row far from zero."""
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)
    if kind == "random":
        return randn(B, H, N, D)
    if kind == "clustered":
        centres = randn(4, D)
        return centres[torch.randint(0, 4, (B, H, N), generator=gen)] + 0.1 * randn(B, H, N, D)
    return randn(B, H, 1, D) + 1e-3 * randn(B, H, N, D)


# ---------------------------------------------------------------------------------------------------------------
# model level: decode == prefill, ragged == alone


CASES = [("torch", "f64", "rope", True), ("torch", "f32", "none", False), ("triton", "f64", "none", True),
         ("triton", "f32", "rope", True)]


@pytest.mark.parametrize("impl,dtype,pos,shift", CASES, ids=[f"{i}-{d}-{p}-{'shift' if s else 'noshift'}"
                                                             for i, d, p, s in CASES])
def test_decode_equals_prefill(impl, dtype, pos, shift):
    """
    Prompt, then a chunk of 5, then single tokens: every hidden state equals the full forward's in the same dtype
    (no cache), and is no further from the float64 model than that full forward is.
    """
    reference = trained_model(pos=pos, token_shift=shift)                  # float64, no cache
    model = trained_model(DTYPES[dtype], pos=pos, token_shift=shift)
    idx = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        exact, full = reference.forward_hidden(idx), model.forward_hidden(idx)
        cache = model.new_cache(idx, max_len=30)
        parts = [model.forward_hidden(idx[:, :11], cache)]
        set_decode_impl(model, impl)
        parts.append(model.forward_hidden(idx[:, 11:16], cache))           # a chunk: the chunk path
        parts += [model.forward_hidden(idx[:, t:t + 1], cache) for t in range(16, 24)]   # one token: the decode step
    cached = torch.cat(parts, dim=1)
    assert lucid.which_decode_impl(torch.empty(2, 4, 1, 16, dtype=DTYPES[dtype]), cache.k[0], impl) == impl
    assert_close(f"{impl} decode vs prefill", full, cached, TOL[DTYPES[dtype]])
    assert rel_err(cached, exact) <= 1.5 * rel_err(full, exact) + 1e-14


def test_static_cache_is_written_in_place():
    """The buffers are allocated once at max_len and never reallocated; the cached rows equal the prefill's."""
    model = trained_model()
    idx = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = model.new_cache(idx, max_len=32)
        model.forward_hidden(idx[:, :8], cache)
        pointers = [(cache.k[i].data_ptr(), cache.v[i].data_ptr(), cache.rstd[i].data_ptr()) for i in range(2)]
        for t in range(8, 20):
            model.forward_hidden(idx[:, t:t + 1], cache)
        assert [(cache.k[i].data_ptr(), cache.v[i].data_ptr(), cache.rstd[i].data_ptr()) for i in range(2)] == pointers
        assert cache.k[0].shape == (1, 2, 32, 16) and cache.len == 20
        full = model.new_cache(idx, max_len=20)
        model.forward_hidden(idx, full)
    for layer in range(2):
        for a, b in zip(cache.past(layer), full.past(layer)):
            assert_close(f"layer {layer} cache", b, a, 1e-10)
        assert torch.all(cache.k[layer][:, :, 20:] == 0)                     # rows past len untouched


@pytest.mark.filterwarnings("ignore:LUCID Triton kernel not used")      # the float64 prompt solve: PyTorch path
@pytest.mark.parametrize("attn,impl", [("softmax", "torch"), ("lucid", "torch"), ("lucid", "triton")])
def test_ragged_batch_equals_each_prompt_alone(attn, impl):
    model = trained_model(attn=attn, lucid_impl=impl)
    gen = torch.Generator().manual_seed(1)
    lengths = [9, 14, 4]
    prompts = [torch.randint(0, 97, (1, n), generator=gen) for n in lengths]
    T = max(lengths)
    idx = torch.cat([torch.cat([torch.full((1, T - n), 5), p], dim=1) for p, n in zip(prompts, lengths)])
    with torch.no_grad():
        ragged = model.generate(idx, max_new_tokens=4, top_k=1, lengths=lengths)
        if attn == "lucid":                                                   # no silent fallback
            assert lucid.which_decode_impl(torch.empty(3, 4, 1, 16, dtype=torch.float64),
                                           torch.empty(3, 2, 8, 16, dtype=torch.float64), impl) == impl
        states = model.prefill_chunked(idx, 5, lengths=torch.tensor(lengths))
        cache = model.new_cache(idx, max_len=T + 3, lengths=lengths)         # prompt, then decode the tokens above
        decoded = torch.cat([model.forward_hidden(idx, cache)] +
                            [model.forward_hidden(ragged[:, t:t + 1], cache) for t in range(T, T + 3)], dim=1)
        for b, p in enumerate(prompts):
            alone = model.generate(p, max_new_tokens=4, top_k=1)
            assert torch.equal(ragged[b, T - lengths[b]:], alone[0]), b
            assert_close(f"row {b} prefill", model.forward_hidden(p)[0], states[b, T - lengths[b]:], 1e-10)
            full = model.forward_hidden(ragged[b:b + 1, T - lengths[b]:T + 3])[0]   # the row alone, no cache
            assert_close(f"row {b} decode", full, decoded[b, T - lengths[b]:], 1e-10)


def test_ragged_padding_content_does_not_matter():
    model = trained_model()
    idx = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(2))
    other = idx.clone()
    other[1, :7] = torch.randint(0, 97, (7,))                                # row 1 has 7 tokens of padding
    with torch.no_grad():
        a = model.generate(idx, max_new_tokens=4, temperature=0, lengths=[12, 5])
        b = model.generate(other, max_new_tokens=4, temperature=0, lengths=[12, 5])
    assert torch.equal(a[:, 12:], b[:, 12:])


# ---------------------------------------------------------------------------------------------------------------
# step level: the decode step against a dense float64 reference; GQA heads share one E row


def reference_step(q, k_all, v_all, start):
    """Dense float64 LUCID of each row's own sequence (from start[b]); returns the last token's o and v'."""
    outs, vps = [], []
    for b in range(q.shape[0]):
        k, v = k_all[b:b + 1, :, start[b]:], v_all[b:b + 1, :, start[b]:]
        vp = lucid.precondition_naive(k, v)                                  # (1, Hkv, N, D)
        G = q.shape[1] // k.shape[1]
        scores = (q[b:b + 1] @ k.repeat_interleave(G, 1).transpose(-1, -2)) * q.shape[-1] ** -0.5
        outs.append(scores.softmax(-1) @ vp.repeat_interleave(G, 1))
        vps.append(vp[:, :, -1:])
    return torch.cat(outs), torch.cat(vps)


STEP_CASES = [("torch", "f64", "clustered", 16, 4, 70), ("triton", "f64", "clustered", 16, 4, 200),
              ("triton", "f32", "random", 32, 2, 130), ("triton", "f32", "near_dup", 16, 3, 257),
              ("torch", "f32", "near_dup", 32, 1, 65)]


@pytest.mark.parametrize("impl,dtype,kind,D,G,P", STEP_CASES,
                         ids=[f"{i}-{d}-{k}-D{D}-G{G}-P{P}" for i, d, k, D, G, P in STEP_CASES])
def test_decode_step_matches_float64_reference(impl, dtype, kind, D, G, P):
    """A cache of P rows (row 1 left-padded by up to 70, so whole splits of 64 are padding), B=2, Hkv=2."""
    gen = torch.Generator().manual_seed(P)
    B, Hkv, max_len = 2, 2, P + 9
    start = torch.tensor([0, min(70, P - 5)])
    k_all = make_keys(kind, B, Hkv, P + 1, D, gen)                            # the cached rows and the new token
    v_all = torch.randn(B, Hkv, P + 1, D, generator=gen, dtype=torch.float64)
    q = torch.randn(B, Hkv * G, 1, D, generator=gen, dtype=torch.float64)
    o_ref, vp_ref = reference_step(q, k_all, v_all, start)
    dt = DTYPES[dtype]
    k_cache = torch.zeros(B, Hkv, max_len, D, dtype=dt)
    vp_cache = torch.zeros(B, Hkv, max_len, D, dtype=dt)
    rstd_cache = torch.zeros(B, Hkv, max_len, 1, dtype=torch.float64 if dt == torch.float64 else torch.float32)
    for b in range(B):                                                      # the cache as the prefill leaves it
        k_cache[b, :, :P] = k_all[b, :, :P].to(dt)
        real = slice(int(start[b]), P)
        vp_cache[b, :, real] = lucid.precondition_naive(k_all[b:b + 1, :, real], v_all[b:b + 1, :, real])[0].to(dt)
        vp_cache[b, :, :start[b]] = torch.randn(Hkv, int(start[b]), D, generator=gen, dtype=dt)  # padding junk
        rstd_cache[b, :, :P] = lucid.rms_normalize(k_all[b, :, :P].to(dt))[1]
    args = (q.to(dt), k_all[:, :, P:].to(dt), v_all[:, :, P:].to(dt), k_cache, vp_cache, rstd_cache, P, start)
    if impl == "triton":
        o, vp, rstd = kernel.decode_step(*args, split_len=64)                # several splits and a merge
        on_device = kernel.decode_step(*args[:6], torch.tensor([P]), start, split_len=64)  # grid over max_len
        for x, y in zip((o, vp, rstd), on_device):
            assert torch.equal(x, y)
    else:
        o, vp, rstd = lucid.decode_step(*args, impl=impl)
    tol = TOL[dt] if dt == torch.float64 else 1e-5
    assert_close("o", o_ref, o, tol)
    assert_close("v'_t", vp_ref, vp, tol)
    assert_close("rstd_t", lucid.rms_normalize(k_all[:, :, P:])[1], rstd, tol)
    # one E row per KV head: other queries (and another group size) leave v'_t unchanged
    q2 = torch.randn(B, Hkv * (G + 1), 1, D, generator=gen, dtype=torch.float64).to(dt)
    vp2 = (kernel.decode_step(q2, *args[1:], split_len=64) if impl == "triton"
           else lucid.decode_step(q2, *args[1:], impl=impl))[1]
    assert torch.equal(vp, vp2)


def test_decode_kernel_low_precision():
    """bf16/fp16 caches: the fused step against the fp32 PyTorch step on the same rounded inputs."""
    gen = torch.Generator().manual_seed(0)
    B, Hkv, G, P, D = 1, 2, 4, 100, 32
    k_cache = make_keys("clustered", B, Hkv, P, D, gen).float()
    rstd_cache = lucid.rms_normalize(k_cache)[1]
    vp_cache, q = torch.randn(B, Hkv, P, D, generator=gen), torch.randn(B, Hkv * G, 1, D, generator=gen)
    k, v = k_cache[:, :, :1] + 0.05, torch.randn(B, Hkv, 1, D, generator=gen)
    for dt in (torch.bfloat16, torch.float16):
        args = [x.to(dt) for x in (q, k, v, k_cache, vp_cache)] + [rstd_cache, P - 3, None]
        ref = lucid.decode_step_torch(*args)
        got = kernel.decode_step(*args, split_len=64)
        for name, x, r in zip(("o", "v'_t", "rstd"), got, ref):
            assert x.dtype == r.dtype
            assert_close(f"{dt} {name}", r, x, 1e-2)


# ---------------------------------------------------------------------------------------------------------------
# fallback and bad input


def test_strided_new_token_runs_the_kernel():
    """q, k, v of the new token may be views (e.g. every other channel): the kernel copies one token, never raises."""
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 4, 1, 64, generator=gen)[..., ::2] for _ in range(3))    # (1, 4, 1, 32), stride 2
    k, v = k[:, :2], v[:, :2]
    kc, vc = torch.randn(1, 2, 9, 32, generator=gen), torch.randn(1, 2, 9, 32, generator=gen)
    rc = torch.rand(1, 2, 9, 1, generator=gen) + 0.5
    ref = lucid.decode_step(q, k, v, kc.clone(), vc.clone(), rc.clone(), 7, impl="torch")
    out = lucid.decode_step(q, k, v, kc.clone(), vc.clone(), rc.clone(), 7, impl="triton")
    for a, b in zip(ref, out):
        assert_close("strided decode", a, b, TOL[torch.float32])


def test_unsupported_head_size_falls_back_with_one_warning():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 1, 24, generator=gen) for _ in range(3))
    kc, vc = torch.randn(2, 1, 2, 10, 24, generator=gen)
    rc = lucid.rms_normalize(kc)[1]
    lucid._warned.clear()
    with pytest.warns(UserWarning, match="head size 24"):
        out = lucid.decode_step(q, k, v, kc, vc, rc, 7, impl="triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                        # only once
        lucid.decode_step(q, k, v, kc, vc, rc, 7, impl="triton")
    for x, r in zip(out, lucid.decode_step_torch(q, k, v, kc, vc, rc, 7)):
        assert torch.equal(x, r)


def test_decode_kernel_that_fails_its_self_check_is_not_used(monkeypatch):
    real = kernel.decode_step
    monkeypatch.setattr(kernel, "decode_step", lambda *a, **kw: tuple(x + 1 for x in real(*a, **kw)))
    monkeypatch.setattr(lucid, "_decode_kernel_checked", {})
    q = torch.zeros(1, 2, 1, 16)
    kc = torch.zeros(1, 1, 4, 16)
    lucid._warned.clear()
    with pytest.warns(UserWarning, match="self-check failed"):
        assert lucid.which_decode_impl(q, kc, "triton") == "torch"
    monkeypatch.setattr(kernel, "decode_step", real)
    monkeypatch.setattr(lucid, "_decode_kernel_checked", {})
    assert lucid.which_decode_impl(q, kc, "triton") == "triton"
    assert lucid.which_decode_impl(q, kc, "auto") == "torch"                 # CPU: auto never picks the interpreter


def test_bad_input_is_a_clear_error():
    model = trained_model()
    idx = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        with pytest.raises(ValueError, match="longer than max_len"):
            model.new_cache(idx, max_len=9)
        with pytest.raises(ValueError, match="do not fit max_len"):
            model.generate(idx, max_new_tokens=5, max_len=12)
        cache = model.new_cache(idx, max_len=11)
        model.forward_hidden(idx, cache)
        with pytest.raises(ValueError, match="batch of 3 rows"):
            model.forward_hidden(torch.zeros(3, 1, dtype=torch.long), cache)
        model.forward_hidden(idx[:, :1], cache)
        with pytest.raises(ValueError, match="KV cache overflow"):
            model.forward_hidden(idx[:, :1], cache)
        for lengths, message in (([3], "one per row"), ([0, 4], "lie in 1 .. 10"), ([4, 11], "lie in 1 .. 10")):
            with pytest.raises(ValueError, match=message):
                model.generate(idx, max_new_tokens=2, lengths=lengths)
    q, k = torch.randn(1, 2, 2, 16), torch.randn(1, 1, 2, 16)
    c = torch.zeros(1, 1, 8, 16)
    with pytest.raises(ValueError, match="one new token"):
        lucid.decode_step(q, k, k, c, c, c[..., :1], 3)
    with pytest.raises(ValueError, match="outside 0 .. max_len"):
        lucid.decode_step(q[:, :, :1], k[:, :, :1], k[:, :, :1], c, c, c[..., :1], 9)


# ---------------------------------------------------------------------------------------------------------------
# the static step for CUDA graphs: the length lives on the device; on CPU it runs uncaptured under the interpreter


@pytest.mark.parametrize("attn,dtype,ragged", [("lucid", "f64", False), ("lucid", "f32", True),
                                               ("softmax", "f32", True)],
                         ids=["lucid-f64", "lucid-f32-ragged", "softmax-f32-ragged"])
def test_static_decode_step_equals_eager_decode(attn, dtype, ragged):
    model = trained_model(DTYPES[dtype], attn=attn)
    idx = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(4))
    lengths = [9, 6] if ragged else None
    with torch.no_grad():
        eager = model.generate(idx, max_new_tokens=4, temperature=0, lengths=lengths)
        logits = []
        for static in (False, True):                                          # the same tokens, step by step
            cache = model.new_cache(idx, max_len=12, lengths=lengths)
            model.forward_hidden(idx, cache)
            step = model.static_decode_step(cache) if static else \
                (lambda tok: model.lm_head(model.forward_hidden(tok, cache)[:, -1]))
            logits.append(torch.stack([step(eager[:, t:t + 1]).clone() for t in range(9, 12)]))
        assert cache.pos is not None and cache.len == 12 and int(cache.pos) == 12
        if attn == "lucid" and ragged:                                        # generate's wiring of the step
            assert torch.equal(eager, model.generate(idx, max_new_tokens=4, temperature=0, lengths=lengths,
                                                     cuda_graph=True))
    assert_close("static step logits", logits[0], logits[1], TOL[DTYPES[dtype]])


class HostSyncDetector(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every op that makes the host wait for the device (`.item()`, `int(t)`, `bool(t)`) or that has a
    data-dependent output shape: either would break CUDA-graph capture of the step."""
    SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "item"}

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        indices = args[1] if name == "index" else ()                  # x[mask]: its size is known only on the host
        boolean_index = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
        if name in self.SYNCING or boolean_index:
            self.syncs.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("attn", ["lucid", "softmax"])
def test_static_decode_step_never_waits_for_the_device(attn):
    """What a CUDA graph can capture: the step reads the cache length from a device tensor, never from the host."""
    model = trained_model(torch.float32, attn=attn)
    idx = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cache = model.new_cache(idx, max_len=10, lengths=[7, 5])
        model.forward_hidden(idx, cache)
        step = model.static_decode_step(cache)
        tok = torch.tensor([[3], [4]])
        step(tok)                                                  # first call: kernel self-checks may sync
        with HostSyncDetector() as detector:
            step(tok)
    assert detector.syncs == [], f"the static step synchronises with the host: {detector.syncs}"
