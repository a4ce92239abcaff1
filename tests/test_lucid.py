"""lucid.py against a float64 dense solve built in the test from the same inputs, plus the invariants of the math."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

import lucid


def make_keys(kind, B, H, T, D, seed=0, dtype=torch.float64):
    """Key classes: iid is a smoke test, the others make L far from the identity."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    if kind == "random":
        k = randn(B, H, T, D)
    elif kind == "clustered":                       # 8 centres + 0.1·noise
        centres = randn(8, D)
        k = centres[torch.randint(0, 8, (B, H, T), generator=g)] + 0.1 * randn(B, H, T, D)
    elif kind == "shared":                          # one shared component + 0.25·noise
        k = randn(B, H, 1, D) + 0.25 * randn(B, H, T, D)
    elif kind == "near_duplicate":                  # a random walk: neighbours nearly identical
        k = randn(B, H, 1, D) + 0.02 * randn(B, H, T, D).cumsum(2)
    elif kind == "identical":
        k = randn(B, H, 1, D).expand(B, H, T, D).clone()
    else:
        raise AssertionError(kind)
    return k.to(dtype)


def reference_precondition(k, v, eps=lucid.EPS):
    """V' = (I + stril(exp(s·k̂k̂ᵀ − √d)))⁻¹ V in float64, written out independently of lucid.py."""
    k, v = k.double(), v.double()
    D, T = k.shape[-1], k.shape[-2]
    kh = k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + eps)
    A = torch.exp(kh @ kh.transpose(-1, -2) / math.sqrt(D) - math.sqrt(D))
    L = torch.tril(A, -1) + torch.eye(T, dtype=torch.float64)
    return torch.linalg.solve_triangular(L, v, upper=False, unitriangular=True)


def reference_attention(q, k, v):
    """Causal softmax(s·qkᵀ)·V' in float64 with explicit GQA expansion and an explicit mask."""
    q, k = q.double(), k.double()
    vp = reference_precondition(k, v)
    G = q.shape[1] // k.shape[1]
    k, vp = k.repeat_interleave(G, 1), vp.repeat_interleave(G, 1)
    T = q.shape[2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return scores.softmax(-1) @ vp


def rel_err(x, ref):
    x, ref = x.double(), ref.double()
    assert torch.isfinite(x).all(), "non-finite values"
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def assert_close(name, ref, x, tol):
    err = rel_err(x, ref)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


KEY_KINDS = ["random", "clustered", "shared", "near_duplicate", "identical"]

# -----------------------------------------------------------------------------
# forward


@pytest.mark.parametrize("kind", KEY_KINDS)
@pytest.mark.parametrize("B,H,T,D,block", [(1, 1, 1, 16, 16), (2, 2, 37, 16, 16), (1, 3, 130, 64, 32),
                                           (2, 1, 257, 64, 64)],
                         ids=lambda x: str(x))
def test_precondition_float64(kind, B, H, T, D, block):
    k = make_keys(kind, B, H, T, D, seed=T)
    v = torch.randn(B, H, T, D, dtype=torch.float64)
    ref = reference_precondition(k, v)
    assert_close("naive", ref, lucid.precondition(k, v, impl="naive"), 1e-10)
    assert_close("torch", ref, lucid.precondition(k, v, impl="torch", block_size=block), 1e-10)


@pytest.mark.parametrize("kind", KEY_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_precondition_low_precision(kind, dtype):
    """fp32 accumulation whatever the input dtype: error against float64 of the same rounded inputs is tiny."""
    B, H, T, D = 2, 2, 203, 64
    k = make_keys(kind, B, H, T, D, seed=1).to(dtype)
    v = torch.randn(B, H, T, D).to(dtype)
    out = lucid.precondition(k, v, impl="torch", block_size=64)
    assert out.dtype == dtype and out.shape == v.shape
    ref = reference_precondition(k, v)
    # fp32 path: 1e-4; bf16: the output rounding (2^-8) and growth along the first differences
    assert_close(f"torch {dtype}", ref, out, 1e-4 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2), (6, 1)], ids=["MHA", "GQA2", "MQA"])
@pytest.mark.parametrize("impl", ["naive", "torch"])
def test_lucid_attention_gqa(H, Hkv, impl):
    B, T, D = 2, 45, 16
    q = torch.randn(B, H, T, D, dtype=torch.float64)
    k = make_keys("clustered", B, Hkv, T, D, seed=3)
    v = torch.randn(B, Hkv, T, D, dtype=torch.float64)
    assert_close("lucid_attention", reference_attention(q, k, v), lucid.lucid_attention(q, k, v, impl=impl), 1e-10)

# -----------------------------------------------------------------------------
# backward


@pytest.mark.parametrize("kind", KEY_KINDS)
@pytest.mark.parametrize("T,D,block", [(1, 16, 16), (50, 16, 16), (131, 64, 32)], ids=lambda x: str(x))
def test_precondition_backward_float64(kind, T, D, block):
    B, H = 2, 2
    k0 = make_keys(kind, B, H, T, D, seed=7)
    v0 = torch.randn(B, H, T, D, dtype=torch.float64)
    g = torch.randn(B, H, T, D, dtype=torch.float64)
    grads = {}
    for name, fn in [("reference", reference_precondition),
                     ("torch", lambda k, v: lucid.precondition(k, v, impl="torch", block_size=block))]:
        k, v = k0.clone().requires_grad_(), v0.clone().requires_grad_()
        (fn(k, v) * g).sum().backward()
        grads[name] = (k.grad, v.grad)
    # identical keys: dk̂ is almost all radial and the RMSNorm backward cancels it, so dk is ~1e-7 of dv's size
    assert_close("dk", grads["reference"][0], grads["torch"][0], 1e-8 if kind == "identical" else 1e-10)
    assert_close("dv", grads["reference"][1], grads["torch"][1], 1e-10)


def test_precondition_backward_fp32():
    B, H, T, D = 1, 2, 300, 64
    k0 = make_keys("clustered", B, H, T, D, seed=11)
    v0 = torch.randn(B, H, T, D, dtype=torch.float64)
    g = torch.randn(B, H, T, D, dtype=torch.float64)
    k, v = k0.clone().requires_grad_(), v0.clone().requires_grad_()
    (reference_precondition(k, v) * g).sum().backward()
    k32, v32 = k0.float().requires_grad_(), v0.float().requires_grad_()
    (lucid.precondition(k32, v32, impl="torch", block_size=128) * g.float()).sum().backward()
    assert_close("dk fp32", k.grad, k32.grad, 1e-4)
    assert_close("dv fp32", v.grad, v32.grad, 1e-4)


@pytest.mark.parametrize("kind", ["random", "clustered"])
def test_gradcheck(kind):
    k = make_keys(kind, 1, 2, 7, 4, seed=5).requires_grad_()
    v = torch.randn(1, 2, 7, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda k, v: lucid.precondition(k, v, impl="torch", block_size=3), (k, v))


def test_second_derivative_is_refused_not_wrong():
    """The analytic backward is not itself differentiable: create_graph=True must raise, not drop terms."""
    k, v = (torch.randn(1, 1, 6, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
    (dk,) = torch.autograd.grad(lucid.precondition(k, v, impl="torch").square().sum(), k, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        dk.square().sum().backward()


def test_lucid_attention_backward_gqa():
    B, H, Hkv, T, D = 1, 4, 2, 33, 16
    q0 = torch.randn(B, H, T, D, dtype=torch.float64)
    k0 = make_keys("near_duplicate", B, Hkv, T, D, seed=2)
    v0 = torch.randn(B, Hkv, T, D, dtype=torch.float64)
    grads = []
    for fn in (reference_attention, lambda q, k, v: lucid.lucid_attention(q, k, v, impl="torch")):
        q, k, v = (x.clone().requires_grad_() for x in (q0, k0, v0))
        fn(q, k, v).pow(2).sum().backward()
        grads.append((q.grad, k.grad, v.grad))
    for name, ref, x in zip("qkv", grads[0], grads[1]):
        assert_close(f"d{name}", ref, x, 1e-10)

# -----------------------------------------------------------------------------
# invariants


def test_identical_keys_give_first_differences():
    T, D = 300, 64
    k = make_keys("identical", 1, 1, T, D)
    v = torch.randn(1, 1, T, D, dtype=torch.float64)
    expected = torch.cat([v[:, :, :1], v[:, :, 1:] - v[:, :, :-1]], dim=2)
    out = lucid.precondition(k, v, impl="torch", eps=0.0, block_size=64)   # eps > 0 makes A_ij = 1 − O(√d·eps)
    assert_close("first differences", expected, out, 1e-12)


@pytest.mark.parametrize("eps", [0.0, lucid.EPS, 1e-2])
@pytest.mark.parametrize("kind", KEY_KINDS)
def test_inverse_norm_at_most_two(kind, eps):
    """‖L⁻¹‖₂ ≤ 2 for any keys and eps ≥ 0, hence ‖V'‖ ≤ 2‖V‖."""
    T, D = 200, 16
    k = make_keys(kind, 1, 1, T, D, seed=4)
    kh, _ = lucid.rms_normalize(k, eps)
    L = torch.tril(lucid.preconditioner_entries(kh, kh), -1)[0, 0] + torch.eye(T, dtype=torch.float64)
    inv_norm = torch.linalg.matrix_norm(torch.linalg.inv(L), ord=2).item()
    assert 1.0 <= inv_norm <= 2.0 + 1e-9, inv_norm
    v = torch.randn(1, 1, T, D, dtype=torch.float64)
    assert lucid.precondition(k, v, impl="torch", eps=eps).norm() <= 2.0 * v.norm() + 1e-9


def test_a_learned_norm_weight_would_break_the_bound():
    """The bound needs A_ii ≤ 1, i.e. |k̂_i|² ≤ d: a weight on the key normalisation (here 1.1 on every channel) lets
    A exceed 1 and ‖L⁻¹‖₂ grow far past 2. This is why rms_normalize has no weight."""
    T, D = 200, 16
    kh, _ = lucid.rms_normalize(make_keys("near_duplicate", 1, 1, T, D, seed=4))
    L = torch.tril(lucid.preconditioner_entries(1.1 * kh, 1.1 * kh), -1)[0, 0] + torch.eye(T, dtype=torch.float64)
    assert torch.linalg.matrix_norm(torch.linalg.inv(L), ord=2).item() > 10.0


def test_orthogonal_keys_give_constant_entries():
    """Orthogonal k̂ (eps = 0): every off-diagonal entry is e^{-√d}."""
    D = 64
    k = torch.linalg.qr(torch.randn(D, D, dtype=torch.float64))[0][:40][None, None]   # (1, 1, 40, 64) orthonormal rows
    kh, _ = lucid.rms_normalize(k, eps=0.0)
    A = lucid.preconditioner_entries(kh, kh)[0, 0]
    off = A[~torch.eye(40, dtype=torch.bool)]
    assert torch.allclose(off, torch.full_like(off, math.exp(-math.sqrt(D))), rtol=1e-12)
    assert torch.allclose(torch.diagonal(A), torch.ones(40, dtype=torch.float64), rtol=1e-14)


def test_scale_and_sign_invariance():
    k = make_keys("clustered", 1, 2, 90, 16, seed=9)
    v = torch.randn(1, 2, 90, 16, dtype=torch.float64)
    base = lucid.precondition(k, v, impl="torch", eps=0.0, block_size=32)
    assert_close("c·K", base, lucid.precondition(3.7 * k, v, impl="torch", eps=0.0, block_size=32), 1e-12)
    assert_close("−K", base, lucid.precondition(-k, v, impl="torch", eps=0.0, block_size=32), 1e-12)


def test_causality():
    T, t = 100, 61
    q = torch.randn(1, 2, T, 16, dtype=torch.float64)
    k = make_keys("clustered", 1, 2, T, 16, seed=1)
    v = torch.randn(1, 2, T, 16, dtype=torch.float64)
    out = lucid.lucid_attention(q, k, v, impl="torch")
    vp = lucid.precondition(k, v, impl="torch", block_size=16)              # t falls inside a block
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    q2[:, :, t:] += 1.0
    k2[:, :, t:] = torch.randn_like(k2[:, :, t:])
    v2[:, :, t:] *= -3.0
    out2 = lucid.lucid_attention(q2, k2, v2, impl="torch")
    assert torch.equal(out[:, :, :t], out2[:, :, :t])
    assert torch.equal(vp[:, :, :t], lucid.precondition(k2, v2, impl="torch", block_size=16)[:, :, :t])

# -----------------------------------------------------------------------------
# decode and chunked prefill


@pytest.mark.parametrize("chunk", [1, 7, 64], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_decode_equals_prefill(chunk, dtype):
    B, H, T, D = 2, 2, 150, 16
    k = make_keys("clustered", B, H, T, D, seed=6).to(dtype)
    v = torch.randn(B, H, T, D, dtype=dtype)
    full = lucid.precondition(k, v, impl="torch", block_size=32)
    P = 20                                                                    # a prefix solved as one prefill
    vp = lucid.precondition(k[:, :, :P], v[:, :, :P], impl="torch")
    for start in range(P, T, chunk):
        end = min(start + chunk, T)
        new = lucid.precondition_chunk(k[:, :, start:end], v[:, :, start:end], k[:, :, :start], vp, block_size=16)
        vp = torch.cat([vp, new], dim=2)
    assert_close("decode", reference_precondition(k, v), vp, 1e-10 if dtype == torch.float64 else 1e-4)
    assert_close("decode vs prefill", full, vp, 1e-10 if dtype == torch.float64 else 1e-4)


def test_decode_from_empty_cache():
    k = make_keys("random", 1, 1, 9, 16)
    v = torch.randn(1, 1, 9, 16, dtype=torch.float64)
    empty = k[:, :, :0]
    assert_close("empty cache", reference_precondition(k, v), lucid.precondition_chunk(k, v, empty, empty), 1e-12)

# -----------------------------------------------------------------------------
# interface


def test_autocast_bf16_runs_solve_in_fp32():
    k = make_keys("clustered", 1, 2, 70, 16, seed=2, dtype=torch.float32)
    v = torch.randn(1, 2, 70, 16)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = lucid.precondition(k, v, impl="torch", block_size=32)
    assert out.dtype == torch.float32
    assert_close("autocast", reference_precondition(k, v), out, 1e-4)


def test_fallback_warns_once_for_unsupported_kernel_input():
    pytest.importorskip("triton")
    k = make_keys("random", 1, 1, 20, 48, dtype=torch.float32)                # head size 48: not a kernel size
    v = torch.randn(1, 1, 20, 48)
    lucid._warned.clear()
    with pytest.warns(UserWarning, match="falling back to the PyTorch path"):
        out = lucid.precondition(k, v, impl="triton")
    assert_close("fallback", reference_precondition(k, v), out, 1e-4)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                        # the second call is silent
        lucid.precondition(k, v, impl="triton")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU kernel runs need the Triton interpreter")
def test_triton_impl_runs_the_kernel_after_its_self_check(monkeypatch):
    kernel = pytest.importorskip("kernel")
    monkeypatch.setattr(lucid, "_kernel_checked", {})
    k = make_keys("clustered", 1, 2, 40, 32, dtype=torch.float32)
    v = torch.randn(1, 2, 40, 32)
    with torch.no_grad():                                                    # as in generation or evaluation
        assert lucid.which_impl(k, v, "triton") == "triton"
    assert lucid._kernel_checked == {(k.device, torch.float32, 32): None}     # checked once, passed
    assert_close("kernel", reference_precondition(k, v), lucid.precondition(k, v, impl="triton"), 1e-4)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU kernel runs need the Triton interpreter")
def test_kernel_that_fails_its_self_check_is_not_used(monkeypatch):
    kernel = pytest.importorskip("kernel")
    monkeypatch.setattr(lucid, "_kernel_checked", {})
    monkeypatch.setattr(lucid, "_warned", set())
    monkeypatch.setattr(kernel, "precondition", lambda k, v, eps=lucid.EPS: 1.5 * v)   # a wrong kernel
    k = make_keys("random", 1, 1, 30, 16, dtype=torch.float32)
    v = torch.randn(1, 1, 30, 16)
    with pytest.warns(UserWarning, match="self-check failed"):
        out = lucid.precondition(k, v, impl="triton")
    assert_close("fallback", reference_precondition(k, v), out, 1e-4)


def test_auto_uses_torch_on_cpu():
    k = torch.randn(1, 1, 8, 16)
    assert lucid.which_impl(k, k, "auto") == "torch"


BAD_INPUTS = {
    "rank3": (lambda: (torch.randn(2, 8, 16), torch.randn(2, 8, 16)), "rank 4"),
    "mismatched-T": (lambda: (torch.randn(1, 2, 8, 16), torch.randn(1, 2, 9, 16)), "agree in"),
    "mismatched-heads": (lambda: (torch.randn(1, 2, 8, 16), torch.randn(1, 3, 8, 16)), "agree in"),
    "integer-k": (lambda: (torch.ones(1, 1, 8, 16, dtype=torch.int64), torch.randn(1, 1, 8, 16)), "floating-point"),
    "empty-T": (lambda: (torch.randn(1, 1, 0, 16), torch.randn(1, 1, 0, 16)), "at least 1"),
    "not-a-tensor": (lambda: ([[1.0]], torch.randn(1, 1, 8, 16)), "torch.Tensor"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_precondition_bad_inputs(case):
    make, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        lucid.precondition(*make())


def test_bad_impl():
    with pytest.raises(ValueError, match="impl must be one of"):
        lucid.precondition(torch.randn(1, 1, 4, 16), torch.randn(1, 1, 4, 16), impl="cuda")


@pytest.mark.parametrize("q_shape,message", [((1, 3, 8, 16), "divisible"), ((1, 4, 9, 16), "matching"),
                                             ((4, 8, 16), "rank 4")], ids=["H-not-divisible", "T-mismatch", "rank3"])
def test_lucid_attention_bad_inputs(q_shape, message):
    k, v = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match=message):
        lucid.lucid_attention(torch.randn(*q_shape), k, v)


def test_lucid_attention_dtype_mismatch():
    k, v = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="dtype"):
        lucid.lucid_attention(torch.randn(1, 2, 8, 16, dtype=torch.float64), k, v)
