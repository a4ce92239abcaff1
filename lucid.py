"""
LUCID attention (arXiv 2602.10410): causal softmax attention over preconditioned values.

Per (batch, KV head), with N tokens, head size d and s = 1/sqrt(d):

    k̂_i  = k_i / sqrt(mean(k_i²) + eps)         RMS-normalised keys, no learned weight, computed in fp32
    A_ij = exp(s·k̂_i·k̂_j − √d)                   = exp(−(s/2)·|k̂_i − k̂_j|²) when eps = 0, so 0 < A_ij ≤ 1
    L    = I + stril(A)                         unit lower-triangular: the diagonal is exactly 1
    V'   = L⁻¹ V                                forward substitution, v'_i = v_i − Σ_{j<i} A_ij·v'_j
    O    = softmax(s·QKᵀ + causal mask) · V'    ordinary causal attention, raw (post-RoPE) keys, unchanged

Only V is replaced, so any causal attention kernel runs unchanged after the solve. Keys that look alike in the
exponential kernel's feature space share value mass through L; subtracting it lets a query single one of them out.
‖L⁻¹‖₂ ≤ 2 for any keys, so the solve is always well behaved: A = e^(−√d)·exp∘(s·K̂K̂ᵀ) is the Gram matrix of
features of norm √A_ii ≤ 1 (= 1 when eps = 0), so L + Lᵀ = I + A + (I − diag A) ⪰ I and |L⁻¹x| ≤ 2|x|. This is why
the key normalisation has no learned weight: a weight lets |k̂_i|² exceed d, A_ii > 1, and the bound is gone (a fork
that added one measured ‖L⁻¹‖₂ = 13 after training). tests/test_lucid.py guards the bound.

Backward, given G = ∂loss/∂V':
    dV   = L⁻ᵀ G                                back substitution with the unit upper matrix Lᵀ
    Z_ij = −(dv_i·v'_j)·A_ij for j < i, else 0  from L·V' = V  ⇒  dL = −dV·V'ᵀ on L's free entries
    dK̂   = s·(Z + Zᵀ)·K̂                          through the exp
    dk_i = r_i·(dk̂_i − k̂_i·(k̂_i·dk̂_i)/d)        through the weightless RMSNorm, r_i = 1/sqrt(mean(k_i²) + eps)

This file holds, top to bottom: an obviously-correct dense reference; the blocked forward substitution that never
forms an N×N matrix, with its blocked analytic backward in a torch.autograd.Function; the decode / chunked-prefill
step against a cache of raw keys and V'; and the public `precondition` / `lucid_attention`. The Triton kernel lives in
kernel.py and plugs in through `precondition(..., impl="triton")`. Equation numbers refer to the paper (eq. 5,
App. A.1–A.2).
"""

import math
import warnings

import torch
import torch.nn.functional as F

EPS = 1e-6          # guards all-zero keys; with the unit diagonal it only touches off-diagonal entries
BLOCK_SIZE = 256    # rows per block in the PyTorch path: O(N·BLOCK_SIZE) extra memory per head
IMPLS = ("naive", "torch", "triton", "auto")

# -----------------------------------------------------------------------------
# input checks: bad input is a ValueError that names the problem


def _check_tensor(name, x):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have rank 4, shape (B, H, T, D); got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def _check_kv(k, v):
    _check_tensor("k", k)
    _check_tensor("v", v)
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must agree in (B, Hkv, T); got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if k.shape[2] == 0:
        raise ValueError("sequence length T must be at least 1")
    if k.device != v.device:
        raise ValueError(f"k and v must be on one device; got {k.device} and {v.device}")


def _check_qkv(q, k, v):
    _check_tensor("q", q)
    _check_kv(k, v)
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q must be (B, H, T, D) matching k's B, T and D; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads H={q.shape[1]} must be divisible by KV heads Hkv={k.shape[1]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")


def _compute_dtype(*xs):
    # fp32 accumulation whatever the input dtype; float64 stays float64 so tests can check the math to 1e-10
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32

# -----------------------------------------------------------------------------
# the pieces of the math


def rms_normalize(k, eps=EPS):
    """k (..., T, D) -> (k̂, rstd): k̂ = k·rstd in fp32 (fp64 for fp64 input), rstd (..., T, 1)."""
    k = k.to(_compute_dtype(k))
    rstd = torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + eps)
    return k * rstd, rstd


def preconditioner_entries(kh_rows, kh_cols):
    """A_ij = exp(s·k̂_i·k̂_j − √d) for rows (..., R, D) against columns (..., C, D) -> (..., R, C)."""
    d = kh_rows.shape[-1]
    return torch.exp(d ** -0.5 * (kh_rows @ kh_cols.transpose(-1, -2)) - math.sqrt(d))


def _unit_lower(a):
    """I + stril(a) for a square block a (..., n, n)."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    return a.tril(-1) + eye


def precondition_naive(k, v, eps=EPS):
    """The obviously-correct dense reference: V' = (I + stril(A))⁻¹ V with an N×N matrix. Tests only."""
    kh, _ = rms_normalize(k, eps)                                            # (B, Hkv, T, D)
    L = _unit_lower(preconditioner_entries(kh, kh))                          # (B, Hkv, T, T)
    vp = torch.linalg.solve_triangular(L, v.to(kh.dtype), upper=False, unitriangular=True)
    return vp.to(v.dtype)

# -----------------------------------------------------------------------------
# blocked forward substitution (left-looking) and its analytic backward


def _forward_substitution(kh, v, block_size, kh_past=None, vp_past=None):
    """
    Solve for V' of the rows kh, v (..., C, D), in blocks of rows. Rows already solved earlier (a KV cache, or
    chunked prefill) come in as kh_past, vp_past (..., P, D); they never change, causality makes the system
    block lower-triangular. Extra memory is O(C·block_size + P·block_size): no C×C or P×C matrix is formed.
    """
    C = kh.shape[-2]
    vp = torch.empty_like(v)
    for start in range(0, C, block_size):
        end = min(start + block_size, C)
        kh_i = kh[..., start:end, :]                                         # (..., bs, D)
        r = v[..., start:end, :]                                             # R_I = V_I − Σ_{J<I} A_IJ·V'_J
        if vp_past is not None and vp_past.shape[-2] > 0:
            r = r - preconditioner_entries(kh_i, kh_past) @ vp_past
        if start > 0:
            r = r - preconditioner_entries(kh_i, kh[..., :start, :]) @ vp[..., :start, :]
        L_ii = _unit_lower(preconditioner_entries(kh_i, kh_i))              # (..., bs, bs)
        vp[..., start:end, :] = torch.linalg.solve_triangular(L_ii, r, upper=False, unitriangular=True)
    return vp


def _backward_substitution(kh, vp, g, block_size):
    """
    Given G = ∂loss/∂V' (..., T, D), return dV = L⁻ᵀG and dK̂ = s·(Z + Zᵀ)·K̂, right-looking over column blocks
    from the last to the first. At block I every dV_J with J > I is final, so the column A_{>I,I} serves both the
    back substitution and the pairs (J > I, I) of Z: each A block is computed exactly once.
    """
    T, d = kh.shape[-2], kh.shape[-1]
    s = d ** -0.5
    dv = torch.empty_like(g)
    dkh = torch.zeros_like(kh)
    for start in reversed(range(0, T, block_size)):
        end = min(start + block_size, T)
        kh_i, vp_i = kh[..., start:end, :], vp[..., start:end, :]           # (..., bs, D)
        r = g[..., start:end, :]
        if end < T:
            kh_after, dv_after = kh[..., end:, :], dv[..., end:, :]         # rows after block I, (..., T-end, D)
            A = preconditioner_entries(kh_after, kh_i)                      # (..., T-end, bs)
            r = r - A.transpose(-1, -2) @ dv_after
            Z = -(dv_after @ vp_i.transpose(-1, -2)) * A                    # Z_ji for j > i
            dkh[..., end:, :] += s * (Z @ kh_i)
            dkh[..., start:end, :] += s * (Z.transpose(-1, -2) @ kh_after)
        A_ii = preconditioner_entries(kh_i, kh_i).tril(-1)                  # (..., bs, bs), strictly lower
        L_ii = A_ii + torch.eye(end - start, dtype=kh.dtype, device=kh.device)
        dv_i = torch.linalg.solve_triangular(L_ii.transpose(-1, -2), r, upper=True, unitriangular=True)
        dv[..., start:end, :] = dv_i
        Z = -(dv_i @ vp_i.transpose(-1, -2)) * A_ii
        dkh[..., start:end, :] += s * ((Z + Z.transpose(-1, -2)) @ kh_i)
    return dv, dkh


def rms_normalize_backward(kh, rstd, dkh):
    """dk from dk̂ through k̂ = k·rstd (no weight): dk = rstd·(dk̂ − k̂·(k̂·dk̂)/d). Exact for any eps."""
    d = kh.shape[-1]
    return rstd * (dkh - kh * (kh * dkh).sum(-1, keepdim=True) / d)


class BlockedPrecondition(torch.autograd.Function):
    """V' = L⁻¹V by blocked forward substitution; the backward is the blocked analytic one, no autograd in loops."""

    @staticmethod
    def forward(ctx, k, v, eps, block_size):
        with torch.autocast(device_type=k.device.type, enabled=False):     # the solve is fp32 under bf16 autocast
            kh, rstd = rms_normalize(k, eps)
            vp = _forward_substitution(kh, v.to(kh.dtype), block_size)
        ctx.save_for_backward(kh, rstd, vp)
        ctx.block_size = block_size
        ctx.dtypes = (k.dtype, v.dtype)
        return vp.to(v.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable   # a second derivative would silently miss terms: refuse it
    def backward(ctx, g):
        kh, rstd, vp = ctx.saved_tensors
        with torch.autocast(device_type=kh.device.type, enabled=False):
            dv, dkh = _backward_substitution(kh, vp, g.to(kh.dtype), ctx.block_size)
            dk = rms_normalize_backward(kh, rstd, dkh)
        return dk.to(ctx.dtypes[0]), dv.to(ctx.dtypes[1]), None, None

# -----------------------------------------------------------------------------
# decode and chunked prefill


def precondition_chunk(k_new, v_new, k_past, vp_past, eps=EPS, block_size=BLOCK_SIZE, rstd_past=None):
    """
    V' of C new tokens after P cached ones. k_new, v_new: (B, Hkv, C, D); k_past: cached raw keys and vp_past:
    cached V', (B, Hkv, P, D). The chunk is solved within itself too, so one call with C tokens equals C calls with
    one token each, and both equal the full prefill (earlier V' never change). rstd_past (B, Hkv, P, 1), the cached
    rstd of the past keys, saves renormalising the cache. Returns (B, Hkv, C, D) in v's dtype.
    """
    _check_kv(k_new, v_new)
    _check_tensor("k_past", k_past)
    _check_tensor("vp_past", vp_past)
    if k_past.shape[:3] != vp_past.shape[:3]:
        raise ValueError(f"k_past {tuple(k_past.shape)} and vp_past {tuple(vp_past.shape)} disagree in (B, Hkv, P)")
    if k_past.shape[:2] != k_new.shape[:2] or k_past.shape[3] != k_new.shape[3]:
        raise ValueError(f"cache keys {tuple(k_past.shape)} do not match new keys {tuple(k_new.shape)} in B, Hkv or D")
    if rstd_past is not None and rstd_past.shape != k_past.shape[:3] + (1,):
        raise ValueError(f"rstd_past must be {tuple(k_past.shape[:3]) + (1,)}, got {tuple(rstd_past.shape)}")
    with torch.autocast(device_type=k_new.device.type, enabled=False):
        kh, _ = rms_normalize(k_new, eps)                                    # (B, Hkv, C, D)
        dtype = kh.dtype
        if rstd_past is None:
            kh_past, _ = rms_normalize(k_past, eps)                          # (B, Hkv, P, D)
        else:
            kh_past = k_past.to(dtype) * rstd_past.to(dtype)
        vp = _forward_substitution(kh, v_new.to(dtype), block_size, kh_past, vp_past.to(dtype))
    return vp.to(v_new.dtype)


def _check_decode(q, k, v, k_cache, vp_cache, rstd_cache, length, start):
    _check_tensor("q", q)
    _check_kv(k, v)
    for name, x in (("k_cache", k_cache), ("vp_cache", vp_cache), ("rstd_cache", rstd_cache)):
        _check_tensor(name, x)
    B, Hkv, T, D = k.shape
    if T != 1 or q.shape[2] != 1:
        raise ValueError(f"decode_step takes one new token; got q {tuple(q.shape)}, k {tuple(k.shape)} "
                         "(a chunk of tokens goes through precondition_chunk)")
    if q.shape[0] != B or q.shape[3] != D or q.shape[1] % Hkv != 0:
        raise ValueError(f"q {tuple(q.shape)} must be (B, H, 1, D) with H divisible by Hkv for k {tuple(k.shape)}")
    if k_cache.shape[:2] != (B, Hkv) or k_cache.shape[3] != D or vp_cache.shape != k_cache.shape:
        raise ValueError(f"caches k {tuple(k_cache.shape)}, V' {tuple(vp_cache.shape)} must be (B, Hkv, max_len, D) "
                         f"for k {tuple(k.shape)}")
    if rstd_cache.shape != k_cache.shape[:3] + (1,):
        raise ValueError(f"rstd_cache must be {tuple(k_cache.shape[:3]) + (1,)}, got {tuple(rstd_cache.shape)}")
    if not 0 <= length <= k_cache.shape[2]:
        raise ValueError(f"cache length {length} outside 0 .. max_len={k_cache.shape[2]}")
    if start is not None and (start.shape != (B,) or start.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"start must be an integer tensor of shape ({B},), got {start.dtype} {tuple(start.shape)}")


def decode_step_torch(q, k, v, k_cache, vp_cache, rstd_cache, length, start=None, eps=EPS):
    """
    The PyTorch reference (and fallback) of one decode step; see decode_step. The row of A, the new V' row and the
    attention are formed explicitly from the first `length` cached rows, in fp32 (fp64 for fp64 input).
    """
    B, H, _, D = q.shape
    Hkv = k.shape[1]
    s = D ** -0.5
    with torch.autocast(device_type=q.device.type, enabled=False):
        kh_t, rstd_t = rms_normalize(k, eps)                                 # (B, Hkv, 1, D), (B, Hkv, 1, 1)
        dtype = torch.promote_types(kh_t.dtype, _compute_dtype(q, vp_cache))
        keys = k_cache[:, :, :length].to(dtype)                             # (B, Hkv, P, D)
        vp_past = vp_cache[:, :, :length].to(dtype)                         # (B, Hkv, P, D)
        kh_past = keys * rstd_cache[:, :, :length].to(dtype)
        valid = torch.ones(B, 1, 1, length, dtype=torch.bool, device=q.device)
        if start is not None:                                                # left padding: keys before start are out
            valid = torch.arange(length, device=q.device) >= start.view(B, 1, 1, 1)
        a = preconditioner_entries(kh_t.to(dtype), kh_past).where(valid, 0.0)   # (B, Hkv, 1, P), row t of A
        vp_t = v.to(dtype) - a @ vp_past                                     # v'_t = v_t − Σ_j a_j·v'_j
        qg = q.to(dtype).reshape(B, Hkv, H // Hkv, D)                        # the G query heads of each KV head
        scores = (s * qg @ keys.transpose(-1, -2)).masked_fill(~valid, float("-inf"))   # (B, Hkv, G, P)
        own = s * (qg * k.to(dtype)).sum(-1, keepdim=True)                  # (B, Hkv, G, 1), the new token itself
        p = torch.cat([scores, own], dim=-1).softmax(-1)
        o = p[..., :length] @ vp_past + p[..., length:] * vp_t              # (B, Hkv, G, D)
    return o.reshape(B, H, 1, D).to(q.dtype), vp_t.to(v.dtype), rstd_t


_decode_kernel_checked = {}   # (device, dtype, D, G) -> None if kernel.decode_selfcheck passed, else why not


def which_decode_impl(q, k_cache, impl="auto"):
    """The implementation decode_step will run: "triton" (kernel.py's fused step) or "torch"."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl in ("naive", "torch") or (impl == "auto" and not q.is_cuda):
        return "torch"                      # on CPU the kernel runs only under the Triton interpreter: tests ask for it
    try:
        import kernel
        reason = kernel.decode_supports(q, k_cache)
    except Exception as e:  # triton missing or broken
        reason = f"kernel.py could not be imported ({type(e).__name__}: {e})"
    if reason is None:
        key = (q.device, k_cache.dtype, q.shape[-1], q.shape[1] // k_cache.shape[1])
        if key not in _decode_kernel_checked:
            try:
                _decode_kernel_checked[key] = kernel.decode_selfcheck(*key)
            except Exception as e:
                _decode_kernel_checked[key] = f"its self-check on {q.device} raised {type(e).__name__}: {e}"
        reason = _decode_kernel_checked[key]
    if reason is None:
        return "triton"
    _warn_once(f"LUCID fused decode kernel not used ({reason}); falling back to the PyTorch decode step")
    return "torch"


def decode_step(q, k, v, k_cache, vp_cache, rstd_cache, length, start=None, impl="auto", eps=EPS):
    """
    One LUCID decode step against a static cache, for every (batch, KV head):

        k̂_t = RMS(k_t),  a_j = exp(s·k̂_t·k̂_j − √d) with k̂_j = k_j·rstd_j,  v'_t = v_t − Σ_{j<t} a_j·v'_j
        o_h = softmax(s·q_h·[K; k_t]ᵀ)·[V'; v'_t]          for the G query heads h of the KV head

    q: (B, H, 1, D); k, v: the new token's post-RoPE key and value (B, Hkv, 1, D); k_cache, vp_cache (B, Hkv, max_len,
    D) and rstd_cache (B, Hkv, max_len, 1) hold `length` valid rows. start (B,), optional: row b's cache begins at
    position start[b] (left padding); earlier rows are left out of both the solve and the attention.
    Returns (o (B, H, 1, D) in q's dtype, v'_t (B, Hkv, 1, D) in v's dtype, rstd_t (B, Hkv, 1, 1) fp32 or fp64); the
    caller writes k_t, v'_t, rstd_t at position `length`. impl="auto" runs kernel.py's fused step on CUDA when it
    supports the inputs (one read of K and V' serves the solve row and all G query heads), else the PyTorch step.
    """
    _check_decode(q, k, v, k_cache, vp_cache, rstd_cache, length, start)
    if which_decode_impl(q, k_cache, impl) == "triton":
        import kernel
        return kernel.decode_step(q, k, v, k_cache, vp_cache, rstd_cache, length, start, eps)
    return decode_step_torch(q, k, v, k_cache, vp_cache, rstd_cache, length, start, eps)

# -----------------------------------------------------------------------------
# public interface

_warned = set()


def _warn_once(message):
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


_kernel_checked = {}   # (device, dtype, D) -> None if kernel.selfcheck passed (a float64 comparison), else why not


def _kernel_unsupported_reason(k, v):
    """None when kernel.py can run these inputs (and passed its self-check for them), else why not."""
    try:
        import kernel
    except Exception as e:  # triton missing or broken: the torch path still works
        return f"kernel.py could not be imported ({type(e).__name__}: {e})"
    reason = kernel.supports(k, v)
    if reason is not None:
        return reason
    key = (k.device, k.dtype, k.shape[-1])
    if key not in _kernel_checked:
        try:
            _kernel_checked[key] = kernel.selfcheck(*key)
        except Exception as e:
            _kernel_checked[key] = f"its self-check on {k.device} raised {type(e).__name__}: {e}"
    return _kernel_checked[key]


def which_impl(k, v, impl="auto"):
    """The implementation `precondition` will run for these inputs: "naive", "torch" or "triton"."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl in ("naive", "torch"):
        return impl
    if impl == "auto" and not k.is_cuda:
        return "torch"                      # on CPU the kernel runs only under the Triton interpreter: tests ask for it
    reason = _kernel_unsupported_reason(k, v)
    if reason is None:
        return "triton"
    _warn_once(f"LUCID Triton kernel not used ({reason}); falling back to the PyTorch path")
    return "torch"


def precondition(k, v, impl="auto", eps=EPS, block_size=BLOCK_SIZE):
    """
    V' = L⁻¹V for keys k and values v of shape (B, Hkv, T, D); returns v's shape and dtype.
    impl: "naive" (dense N×N reference, tests only), "torch" (blocked, O(T·block_size) memory, analytic backward),
    "triton" (kernel.py; unsupported inputs fall back to "torch" with a one-time warning), or "auto" (the kernel on
    CUDA when it supports the inputs, else "torch"). Differentiable in k and v.
    """
    _check_kv(k, v)
    impl = which_impl(k, v, impl)
    if impl == "naive":
        return precondition_naive(k, v, eps)
    if impl == "triton":
        import kernel
        return kernel.precondition(k, v, eps)
    return BlockedPrecondition.apply(k, v, eps, block_size)


def lucid_attention(q, k, v, impl="auto", eps=EPS):
    """
    LUCID attention. q: (B, H, T, D); k, v: (B, Hkv, T, D) with H divisible by Hkv (grouped-query attention when
    H > Hkv: query head h reads KV head h // (H/Hkv)). Returns (B, H, T, D).
    """
    _check_qkv(q, k, v)
    vp = precondition(k, v, impl=impl, eps=eps)                              # (B, Hkv, T, D), once per KV head
    return F.scaled_dot_product_attention(q, k, vp, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
