"""Tests for kernel.py (the Triton LUCID solve) against a dense float64 reference built here from the same inputs.

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set below and in conftest.py before
triton is imported) on small shapes that span several blocks; the CUDA-only tests at the bottom go to 16K tokens.
Tolerances: relative Frobenius error against float64 of the same rounded inputs, 16-bit limits from the
measured error of k̂ and exp(·) rounding.
"""

import math
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():   # must precede the first import of triton anywhere in this process
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

pytest.importorskip("triton")

import kernel  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"    # without CUDA: CPU tensors under the interpreter
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
KEYS = ("iid", "clustered", "shared", "drift", "identical")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


# ---------------------------------------------------------------------------------------------------------------
# inputs, reference, comparison


def make_keys(kind, B, H, N, D, gen):
    """Key classes: iid keys leave L ≈ I and are a smoke test only; the others make L far from the identity."""
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)
    if kind == "iid":
        return randn(B, H, N, D)
    if kind == "clustered":                                   # 8 centres + 0.1·noise
        centres = randn(B, H, 8, D)
        idx = torch.randint(0, 8, (B, H, N), generator=gen)
        return torch.gather(centres, 2, idx[..., None].expand(B, H, N, D)) + 0.1 * randn(B, H, N, D)
    if kind == "shared":                                      # one shared component + 0.25·noise
        return randn(B, H, 1, D) + 0.25 * randn(B, H, N, D)
    if kind == "drift":                                       # random walk with tiny steps: near-duplicate neighbours
        return randn(B, H, 1, D) + torch.cumsum(0.02 * randn(B, H, N, D), dim=2)
    if kind == "identical":                                   # L is all ones below the diagonal
        return randn(B, H, 1, D).expand(B, H, N, D).clone()
    raise ValueError(kind)


def make_inputs(kind, B, H, N, D, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    k = make_keys(kind, B, H, N, D, gen)
    v, g = torch.randn(B, H, N, D, generator=gen), torch.randn(B, H, N, D, generator=gen)
    return [x.to(device=device, dtype=dtype) for x in (k, v, g)]


def reference(k, v, g, eps=1e-6):
    """Dense float64 V' = L⁻¹V, with dk, dv by autograd, from the same (rounded) inputs the kernel saw."""
    k64, v64 = (x.detach().double().requires_grad_(True) for x in (k, v))
    N, D = k.shape[-2:]
    r = torch.rsqrt(k64.pow(2).mean(-1, keepdim=True) + eps)
    kh = k64 * r
    A = torch.exp(kh @ kh.transpose(-1, -2) / math.sqrt(D) - math.sqrt(D))
    L = torch.tril(A, -1) + torch.eye(N, dtype=torch.float64, device=k.device)
    vp = torch.linalg.solve_triangular(L, v64, upper=False, unitriangular=True)
    dk, dv, dkh = torch.autograd.grad(vp, (k64, v64, kh), g.double())
    # ‖r·dk̂‖: the size of dk before the RMSNorm backward removes its radial part. For identical keys dk̂ is
    # radial, dk is a ~eps/mean(k²) remnant of a cancellation, and this is the scale its error is judged against.
    return vp.detach(), dk, dv, (r * dkh).norm().item()


def rel_err(ref, x):
    x = x.detach().double().to(ref.device)
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def assert_close(name, ref, x, tol, scale=None):
    """Relative Frobenius (= relative RMS) error ‖x − ref‖/‖ref‖ (or /scale), plus a finite check."""
    assert x.shape == ref.shape, f"{name}: shape {tuple(x.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(x).all(), f"{name}: non-finite values"
    err = rel_err(ref, x) if scale is None else (x.detach().double().to(ref.device) - ref).norm().item() / scale
    assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.1e}"
    return err


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    """Every buffer the kernels write starts as NaN: stale memory must never pass as a result."""
    monkeypatch.setattr(kernel, "POISON", True)


def run_kernel(k, v, g, block_size=None, cap=1 << 30):
    """V', dk, dv through the chains with sync: a chain that gave up raises here. cap=1: every block after the first
    goes through the polled tail loop instead of the pipelined one."""
    vp, vc, BM, state = kernel._forward(k, v, 1e-6, block_size, sync=True, _cap=cap)
    dk, dv, _ = kernel._backward(k, vc, g, 1e-6, BM, sync=True, _cap=cap)
    return vp, dk.to(k.dtype), dv.to(v.dtype)


def tolerances(dtype, keys, N=1024, cuda=False):
    """(V' and dV, dK) limits, scaled by √(N/1024) above 1K: the error grows with the length of P·V' sums."""
    scale = max(1.0, math.sqrt(N / 1024))
    if dtype == torch.float32:    # interpreter: exact fp32 operands; GPU: tf32x3
        t = (1e-3, 1e-3) if cuda else (1e-4, 1e-4)
    else:                         # fp16 k̂, P and chain copy; 16-bit output rounding is ~1.6e-3 of it
        t = {"iid": (3e-3, 3e-3), "clustered": (1.2e-2, 1.5e-2)}.get(keys, (2.5e-2, 1.5e-1))
    return t[0] * scale, t[1] * scale


def check_case(B, T, H, D, keys, dtype, bs, device="cpu", seed=0, errors=None, cap=1 << 30):
    k, v, g = make_inputs(keys, B, H, T, D, dtype, device, seed)
    rvp, rdk, rdv, dk_scale = reference(k, v, g)
    vp, dk, dv = run_kernel(k, v, g, bs, cap)
    assert vp.dtype == v.dtype and dk.dtype == k.dtype and dv.dtype == v.dtype
    tv, tk = tolerances(dtype, keys, T, cuda=device != "cpu")
    e = (assert_close("V'", rvp, vp, tv),
         assert_close("dk", rdk, dk, tk, scale=dk_scale if keys == "identical" else None),
         assert_close("dv", rdv, dv, tv))
    if errors is not None:
        errors.append(e)
    return e


# ---------------------------------------------------------------------------------------------------------------
# CPU / interpreter (also run on a GPU)

CASES = [  # B, T, H, D, keys, dtype, block_size, path ("pipelined": one count read; "polled": cap=1, every block
           # after the first through the bounded-poll tail loop)
    (1, 1, 1, 16, "iid", "fp32", 16, "pipelined"),
    (1, 17, 1, 16, "clustered", "fp32", 16, "polled"),
    (1, 64, 2, 32, "drift", "fp32", 16, "pipelined"),
    (1, 130, 2, 32, "iid", "fp32", 32, "polled"),
    (1, 130, 2, 32, "clustered", "fp32", 32, "pipelined"),
    (1, 150, 2, 32, "shared", "fp32", 32, "polled"),
    (2, 130, 2, 16, "identical", "fp32", 16, "pipelined"),
    (2, 300, 2, 32, "drift", "fp32", 32, "polled"),
    (1, 300, 2, 16, "clustered", "fp32", 64, "pipelined"),
    (1, 300, 1, 16, "identical", "fp32", 128, "polled"),
    (1, 100, 1, 64, "drift", "fp32", 32, "pipelined"),
    (1, 130, 2, 32, "clustered", "fp16", 32, "polled"),
    (1, 130, 2, 32, "drift", "fp16", 16, "pipelined"),
    (1, 130, 2, 32, "shared", "bf16", 32, "pipelined"),
    (1, 130, 2, 32, "iid", "bf16", 32, "polled"),
    (1, 300, 1, 64, "clustered", "bf16", None, "pipelined"),   # the default 128-row blocks, 64-row tiles
    (1, 300, 1, 128, "drift", "bf16", None, "polled"),
    (2, 130, 1, 16, "identical", "bf16", 16, "pipelined"),
]


@pytest.mark.parametrize("B,T,H,D,keys,dtype,bs,path", CASES,
                         ids=[f"B{c[0]}-T{c[1]}-H{c[2]}-D{c[3]}-{c[4]}-{c[5]}-bs{c[6] or 'default'}-{c[7]}"
                              for c in CASES])
def test_forward_backward_vs_float64(B, T, H, D, keys, dtype, bs, path):
    check_case(B, T, H, D, keys, DTYPES[dtype], bs, device=DEV, cap=1 if path == "polled" else 1 << 30)


def test_autograd_path_equals_the_chains():
    # precondition (autograd, no host sync) returns exactly what the synced chains return
    k, v, g = make_inputs("clustered", 1, 2, 70, 32, torch.bfloat16, DEV)
    vp, dk, dv = run_kernel(k, v, g, 32)
    k2, v2 = k.clone().requires_grad_(True), v.clone().requires_grad_(True)
    vp2 = kernel.precondition(k2, v2, block_size=32)
    dk2, dv2 = torch.autograd.grad(vp2, (k2, v2), g)
    assert torch.equal(vp, vp2) and torch.equal(dk, dk2) and torch.equal(dv, dv2)


def test_second_derivative_is_refused_not_wrong():
    k, v = (torch.randn(1, 1, 20, 16, device=DEV, requires_grad=True) for _ in range(2))
    (dk,) = torch.autograd.grad(kernel.precondition(k, v, block_size=16).square().sum(), k, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        dk.square().sum().backward()


def test_identical_keys_give_first_difference():
    # with identical keys L is all ones below the diagonal, so v'_i = v_i − v_{i−1}
    k, v, _ = make_inputs("identical", 1, 1, 70, 16, torch.float32, DEV)
    vp = kernel.precondition(k, v, eps=0.0, block_size=16)
    expected = torch.cat([v[:, :, :1], v[:, :, 1:] - v[:, :, :-1]], dim=2)
    assert_close("V'", expected.double(), vp, 1e-5)


def test_block_sizes_and_layout_agree():
    # same answer for every block size, for non-contiguous (B, T, H, D)-strided inputs, and under autocast
    gen = torch.Generator().manual_seed(1)
    k, v = (torch.randn(2, 100, 2, 32, generator=gen).to(DEV).transpose(1, 2) for _ in range(2))
    assert not k.is_contiguous()
    out = {bs: kernel.precondition(k, v, block_size=bs) for bs in (16, 32, 64)}
    with torch.autocast(device_type=DEV, dtype=torch.bfloat16):
        out["autocast"] = kernel.precondition(k, v, block_size=32)
    assert out["autocast"].dtype == torch.float32
    for key, x in out.items():
        assert_close(f"block {key}", out[16].double(), x, 1e-4 if CUDA else 1e-5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")    # the interpreter's numpy sees the overflowed first try
def test_fp16_chain_overflow():
    # |V'| > 65504 does not fit the fp16 chain copy. Without sync: the error bit and NaN, never plausible numbers;
    # with sync the host sees the bit and recomputes with fp32 operands.
    k, v, g = make_inputs("clustered", 1, 1, 40, 16, torch.bfloat16, DEV)
    v = (v.float() * 1e5).bfloat16()
    vp, vc, _, state = kernel._forward(k, v, 1e-6, block_size=16, sync=False)
    assert state[1].item() & kernel.ERR_FP16_OVERFLOW and vp.isnan().any()
    vp, vc, _, _ = kernel._forward(k, v, 1e-6, block_size=16, sync=True)
    assert vc.dtype == torch.float32 and torch.isfinite(vp).all()
    assert_close("V'", reference(k, v, g)[0], vp, 3e-3)


@pytest.mark.parametrize("chain", ["forward", "backward"])
def test_stalled_chain_fails_fast_with_nan_and_the_next_call_works(chain):
    # block 1 of every head never publishes. The first program that waits for it gives up after max_spin polls and
    # sets the error bit; every other waiter sees the bit and gives up at once (not after its own full spin). Every
    # block after the stalled one comes back NaN, the error word says why, sync raises, and the next call is fine.
    k, v, g = make_inputs("iid", 1, 2, 96, 16, torch.float32, DEV)
    max_spin, stall = 40, dict(_stall_block=1, max_spin=40, _cap=0)
    if chain == "forward":
        out, _, _, state = kernel._forward(k, v, 1e-6, 16, sync=False, **stall)
        after = out[:, :, 32:]                                        # blocks 2.. (block size 16)
    else:
        _, vc, BM, _ = kernel._forward(k, v, 1e-6, 16, sync=True)
        _, out, state = kernel._backward(k, vc, g, 1e-6, BM, sync=False, _stall_block=4, max_spin=40, _cap=0)
        after = out[:, :, :64]                                        # blocks 0..3 wait for block 4
    assert state[1].item() & kernel.ERR_TIMEOUT
    assert after.isnan().all()
    waiters = 2 * 5                                                   # later blocks of both heads
    assert max_spin <= state[2].item() <= max_spin + waiters, f"{state[2].item()} polls: a waiter kept spinning"
    with pytest.raises(RuntimeError, match="chain wait timed out"):
        kernel.check(state, chain)
    vp, dk, dv = run_kernel(k, v, g, 16)                              # the next call works
    rvp, rdk, rdv, _ = reference(k, v, g)
    assert_close("V'", rvp, vp, 1e-4), assert_close("dk", rdk, dk, 1e-4), assert_close("dv", rdv, dv, 1e-4)


def test_block_too_big_for_the_gpu_falls_back_to_smaller_blocks(monkeypatch):
    # a launch that does not fit (shared memory) is retried with half the block size; results do not change
    real, tried = kernel._fwd_kernel, []

    class TooBig:
        def __getitem__(self, grid):
            def launch(*args, BM, **kw):
                tried.append(BM)
                if BM > 16:
                    raise kernel.triton.runtime.errors.OutOfResources(300000, 232448, "shared memory")
                return real[grid](*args, BM=BM, **kw)
            return launch

    k, v, g = make_inputs("clustered", 1, 1, 40, 16, torch.float32, DEV)
    monkeypatch.setattr(kernel, "_fwd_kernel", TooBig())
    vp, vc, BM, _ = kernel._forward(k, v, 1e-6, block_size=64, sync=True)
    assert tried == [64, 32, 16] and BM == 16
    assert_close("V'", reference(k, v, g)[0], vp, 1e-3 if CUDA else 1e-4)
    dk, dv, _ = kernel._backward(k, vc, g, 1e-6, BM, sync=True)      # the backward follows the forward's blocks
    assert_close("dv", reference(k, v, g)[2], dv, 1e-3 if CUDA else 1e-4)


def test_backward_tiles_too_big_for_the_gpu_fall_back_to_fewer_rows(monkeypatch):
    # the backward keeps the forward's blocks (its chain copy is padded to them) and halves the tile rows instead
    real, tried = kernel._dk_kernel, []

    class TooBig:
        def __getitem__(self, grid):
            def launch(*args, BN, **kw):
                tried.append(BN)
                if BN > 16:
                    raise kernel.triton.runtime.errors.OutOfResources(300000, 232448, "shared memory")
                return real[grid](*args, BN=BN, **kw)
            return launch

    k, v, g = make_inputs("clustered", 1, 1, 80, 16, torch.float32, DEV)
    vp, vc, BM, _ = kernel._forward(k, v, 1e-6, block_size=32, sync=True)
    monkeypatch.setattr(kernel, "_dk_kernel", TooBig())
    dk, dv, _ = kernel._backward(k, vc, g, 1e-6, BM, sync=True)
    assert tried == [32, 16, 16]
    _, rdk, rdv, _ = reference(k, v, g)
    assert_close("dk", rdk, dk, 1e-3 if CUDA else 1e-4), assert_close("dv", rdv, dv, 1e-3 if CUDA else 1e-4)


def test_import_without_triton():
    code = ("import sys; sys.modules['triton'] = None; import torch, kernel; "
            "assert kernel.supports(torch.zeros(1, 1, 4, 16), torch.zeros(1, 1, 4, 16)) == 'triton is not installed'")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)


def test_supports_reasons(monkeypatch):
    dev = DEV
    x = torch.zeros(1, 2, 8, 32, device=dev)
    assert kernel.supports(x, x) is None
    assert "head dim" in kernel.supports(torch.zeros(1, 1, 8, 48, device=dev), torch.zeros(1, 1, 8, 48, device=dev))
    assert "dtype" in kernel.supports(x.int(), x.int())
    assert "dtype" in kernel.supports(x.double(), x.double())
    assert "shape" in kernel.supports(x, x[:, :1])
    assert "shape" in kernel.supports(x[0], x[0])
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert "device" in kernel.supports(x, x)
    monkeypatch.setattr(kernel, "triton", None)
    assert kernel.supports(x, x) == "triton is not installed"


# ---------------------------------------------------------------------------------------------------------------
# ahead-of-time compiles for sm_90 (CPU is enough): the guard that keeps the kernel fast when nobody has a GPU


def _nvidia_backend():
    try:
        import triton.backends
        tool = os.path.join(os.path.dirname(kernel.triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        return "nvidia" in triton.backends.backends and os.path.exists(tool)
    except Exception:
        return False


@pytest.mark.skipif(not _nvidia_backend(), reason="this triton build has no NVIDIA backend (ptxas, cuobjdump)")
@pytest.mark.parametrize("D", [64, 128])
def test_sm90_compile_default_bf16_configs(D):
    # The chains' and key-gradient passes' default bf16 configurations on sm_90: no register spills, wgmma (HGMMA)
    # and 128-bit loads of k̂_J / V'_J in the main loop, and no GPU-scope fence or atomic in any main loop. Compiled
    # in a child process: under TRITON_INTERPRET=1 the kernels are interpreter objects, not compilable.
    code = (f"import json, kernel; print(json.dumps([(name, kernel.analyse(fn, 90, cx, True, w, st)) for name, fn, "
            f"cx, w, st, _, _ in kernel._report_configs({D}, True) if name != 'prologue']))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, check=True, capture_output=True, text=True)
    import json
    for name, r in json.loads(out.stdout.strip().splitlines()[-1]):
        assert r["stack"] == 0 and r["spill_ops"] == 0, f"{name}: register spills {r}"
        assert r["hgmma"] > 0 and r["hmma"] == 0, f"{name}: main loop not on wgmma {r}"
        assert r["ld128"] > 0 and r["ld_narrow"] == 0, f"{name}: main-loop loads not 128-bit {r}"
        assert r["membar_loop"] == 0 and r["atom_loop"] == 0, f"{name}: fence or atomic in the main loop {r}"


# ---------------------------------------------------------------------------------------------------------------
# CUDA only: long sequences, all dtypes, delayed producers, random shapes


@needs_cuda
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("keys", KEYS)
@pytest.mark.parametrize("T", [1000, 4096, 16384])
def test_cuda_long_vs_float64(T, keys, dtype):
    # dense float64 reference on the GPU: ~2 GiB per N×N matrix at 16K, so one head there
    B, H = (1, 1) if T > 4096 else (1, 2)
    check_case(B, T, H, 128 if T != 4096 else 64, keys, DTYPES[dtype], None, device="cuda", seed=T)


@needs_cuda
@pytest.mark.parametrize("T", [32768, 131072])
def test_cuda_very_long_vs_torch_path(T):
    # against lucid.py's blocked fp32 path on the same bf16 inputs (a dense float64 solve does not fit at 128K)
    import lucid
    k, v, g = make_inputs("clustered", 1, 2, T, 128, torch.bfloat16, "cuda", seed=T)
    kk, vv = k.clone().requires_grad_(True), v.clone().requires_grad_(True)
    vp = kernel.precondition(kk, vv)
    ref = lucid.precondition(k.float(), v.float(), impl="torch", block_size=1024)
    tv, _ = tolerances(torch.bfloat16, "clustered", T, cuda=True)
    assert_close("V'", ref.double(), vp, tv)
    if T <= 32768:
        dk, dv = torch.autograd.grad(vp, (kk, vv), g)
        kf, vf = k.float().requires_grad_(True), v.float().requires_grad_(True)
        rdk, rdv = torch.autograd.grad(lucid.precondition(kf, vf, impl="torch", block_size=1024), (kf, vf), g.float())
        assert_close("dv", rdv.double(), dv, tv)
        assert torch.isfinite(dk).all()


@needs_cuda
def test_cuda_more_than_2_pow_31_elements():
    # B·H·T·D > 2^31: every offset must be 64-bit. The last head (past element 2^31) against the torch path.
    import lucid
    H, T, D = 65, 262144, 128
    assert H * T * D > 2 ** 31
    gen = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    with torch.no_grad():
        vp = kernel.precondition(k, v)
        ref = lucid.precondition(k[:, -1:].float(), v[:, -1:].float(), impl="torch", block_size=4096)
    assert_close("V' of the last head", ref.double(), vp[:, -1:], 5e-3)


@needs_cuda
def test_cuda_two_streams_at_once():
    # calls on two streams overlap: each has its own ticket, counters and error word
    ins = [make_inputs(kind, 2, 4, 4096, 64, torch.bfloat16, "cuda", seed=i) for i, kind in enumerate(("drift", "iid"))]
    with torch.no_grad():
        expected = [kernel.precondition(k, v) for k, v, _ in ins]
        streams = [torch.cuda.Stream(), torch.cuda.Stream()]
        torch.cuda.synchronize()
        outs = [[], []]
        for _ in range(5):
            for i, (s, (k, v, _)) in enumerate(zip(streams, ins)):
                with torch.cuda.stream(s):
                    outs[i].append(kernel.precondition(k, v))
        torch.cuda.synchronize()
    for i in range(2):
        for x in outs[i]:
            assert torch.equal(x, expected[i])


@needs_cuda
def test_cuda_graph_capture_and_replay_equals_eager():
    # no host sync in the launch path: forward and backward capture in a CUDA graph; replays on new inputs equal eager
    k, v, g = make_inputs("clustered", 1, 4, 2048, 128, torch.bfloat16, "cuda")
    sk, sv, sg = k.clone().requires_grad_(True), v.clone().requires_grad_(True), g.clone()

    def step():
        vp = kernel.precondition(sk, sv)
        dk, dv = torch.autograd.grad(vp, (sk, sv), sg)
        return vp, dk, dv

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                         # warm-up compiles the kernels off the capturing stream
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for seed in (1, 2):
        k2, v2, g2 = make_inputs("drift", 1, 4, 2048, 128, torch.bfloat16, "cuda", seed=seed)
        with torch.no_grad():
            sk.copy_(k2), sv.copy_(v2), sg.copy_(g2)
        graph.replay()
        eager = run_kernel(k2, v2, g2)
        for name, x, e in zip(("V'", "dk", "dv"), outs, eager):
            assert torch.equal(x, e), name


@needs_cuda
@pytest.mark.parametrize("bs", [64, 128])
def test_cuda_delayed_producers(bs):
    # every other block spins before publishing: a consumer that reads V'_J / dV_I before the flag (missing acquire
    # or release, a hoisted load) sees stale data. Results must equal the undelayed run.
    # The sums run in the same order whichever blocks were final at the count read, so results are bitwise equal.
    k, v, g = make_inputs("drift", 2, 4, 4096, 64, torch.bfloat16, "cuda", seed=3)
    for cap in (1 << 30, 1):                              # the pipelined loop, and every block through the polls
        vp0, vc0, BM, _ = kernel._forward(k, v, 1e-6, bs, sync=True)
        vp1, vc1, _, _ = kernel._forward(k, v, 1e-6, bs, sync=True, _delay=20000, _cap=cap)
        assert torch.equal(vp0, vp1) and torch.equal(vc0, vc1)
        dk0, dv0, _ = kernel._backward(k, vc0, g, 1e-6, BM, sync=True)
        dk1, dv1, _ = kernel._backward(k, vc0, g, 1e-6, BM, sync=True, _delay=20000, _cap=cap)
        assert torch.equal(dv0, dv1) and torch.equal(dk0, dk1)


@needs_cuda
def test_cuda_stalled_chain_fails_fast():
    k, v, g = make_inputs("iid", 1, 8, 1024, 64, torch.bfloat16, "cuda")
    vp, _, _, state = kernel._forward(k, v, 1e-6, 64, max_spin=10000, _stall_block=0, sync=False)
    assert state[1].item() & kernel.ERR_TIMEOUT and vp[:, :, 64:].isnan().all()
    assert state[2].item() <= 10000 + 8 * 16              # one program spun to the limit, the others gave up at once
    with pytest.raises(RuntimeError, match="chain wait timed out"):
        kernel.check(state)
    check_case(1, 1024, 8, 64, "iid", torch.bfloat16, None, device="cuda")   # and the next call is fine


@needs_cuda
def test_cuda_fuzz_random_shapes():
    rng = torch.Generator().manual_seed(1234)
    pick = lambda xs: xs[torch.randint(len(xs), (1,), generator=rng).item()]
    for i in range(24):
        B, H = pick([1, 2]), pick([1, 3, 4])
        T, D = torch.randint(1, 3000, (1,), generator=rng).item(), pick(list(kernel.HEAD_DIMS))
        bs, keys, dtype = pick([None, 16, 32, 64, 128]), pick(KEYS), pick(list(DTYPES))
        try:
            check_case(B, T, H, D, keys, DTYPES[dtype], bs, device="cuda", seed=i)
        except AssertionError as e:
            raise AssertionError(f"B{B}-T{T}-H{H}-D{D}-{keys}-{dtype}-bs{bs}: {e}") from None
