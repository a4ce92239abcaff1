"""
Triton kernels for the LUCID preconditioner solve (arXiv 2602.10410), per (batch, KV head), in lucid.py's notation:

    k̂ = RMSNorm(k) (fp32, no weight),  A = exp(s·K̂K̂ᵀ − √d),  L = I + stril(A),  V' = L⁻¹V,  s = 1/√d

Rows come in blocks of BM (128 for 16-bit inputs); A_IJ is the (block I, block J) tile of A.
Forward, two launches:
  1. a fully parallel prologue: k̂ in the tensor-core operand type and every diagonal block's exact inverse
     (I + stril(A_II))⁻¹, off the chain;
  2. the chain, one program per (block I, head): R = V_I − Σ_{J<I} A_IJ·V'_J, then V'_I = (I + stril(A_II))⁻¹·R.
     Block I needs V'_J of every earlier block, and blocks of a head become final in order, so a per-head counter
     says how many are final: one acquire read of it, a pipelined loop over those (no flag checks), and a bounded
     poll only for the blocks still in flight. Programs take a ticket from an atomic counter instead of using
     program_id, so a program only ever waits on programs that have already started: no deadlock whatever order the
     GPU dispatches programs in.
Backward, four launches: the prologue again; the reverse chain for dV = L⁻ᵀG only (2 GEMMs per block pair, no
atomics); then dK̂ = s·(Z + Zᵀ)·K̂ by two fully parallel passes (rows and columns, as FlashAttention-2 splits dQ from
dK/dV); the RMSNorm backward last, in PyTorch.
No host sync: a chain that gives up (a wait past its bound) or overflows the fp16 chain copy sets a bit in a device
error word and leaves NaN in the outputs, never plausible numbers; every other waiter sees the bit and gives up at
once. The launch path can be captured in a CUDA graph. LUCID_KERNEL_CHECK=1 (or sync=True) reads the word per call.

The math and the PyTorch fallback are in lucid.py; this file stands alone (torch and triton only), with its own tiny
dense float64 references for the self-checks.
Public API (used by lucid.py and model.py): supports(k, v), precondition(k, v, eps=EPS, block_size=None),
selfcheck(device, dtype, D); decode_supports(q, k_cache), decode_step(q, k, v, k_cache, vp_cache, rstd_cache, length,
start=None, eps=EPS, split_len=None, lucid_solve=True), decode_selfcheck(device, dtype, D, G).
On a CPU-only machine set TRITON_INTERPRET=1 before triton is imported to run the kernels in the interpreter.
`python kernel.py` benchmarks against SDPA on a GPU; `python kernel.py --report` (no GPU needed) compiles the kernels
for sm_90 and sm_80 and prints what the compiler made of them.
"""

import contextlib
import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # supports() then says why and lucid.py uses its PyTorch path
    triton = None

HEAD_DIMS = (16, 32, 64, 128)    # tl.dot wants power-of-2 tiles of at least 16
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCK_SIZES = (16, 32, 64, 128)
LOG2E = 1.4426950408889634
EPS = 1e-6                       # key-normalisation guard, the same default as lucid.EPS
ERR_TIMEOUT, ERR_FP16_OVERFLOW = 1, 2   # bits of the error word the kernels set


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


# ---------------------------------------------------------------------------------------------------------------
# kernels
#
# Four kernels, all with BM-row blocks (128 for 16-bit inputs) read in BN-row tiles:
#   _prologue_kernel   fully parallel: k̂ in the operand type and every diagonal block's inverse (I + stril(A_II))⁻¹
#   _fwd_kernel        the chain: R = V_I − Σ_{J<I} A_IJ·V'_J over the blocks that are final, V'_I = inverse·R
#   _bwd_chain_kernel  the reverse chain, only dV = L⁻ᵀG: R = G_J − Σ_{I>J} A_IJᵀ·dV_I, dV_J = inverseᵀ·R
#   _dk_kernel         fully parallel, twice: the row and the column half of dK̂ = s·(Z + Zᵀ)·K̂
# The forward launches the first two; the backward the prologue again, its chain and _dk_kernel twice.
# State (int32, zeroed per call): [0] ticket, [1] error word, [2] polls made (for the tests), [3 + head] how many
# blocks of the head are final. Blocks of a head become final in chain order, so one counter per head replaces a flag
# per block.

if triton is not None:

    @triton.jit
    def _unit_lower_inverse(M, BS: tl.constexpr, HI: tl.constexpr):
        # (I + M)⁻¹ for strictly lower M (BS, BS), in fp32. Exact 16x16 substitution, then merges 16 -> 32 -> ... -> BS.
        # Never a Neumann series or repeated squaring: powers of M grow like binomials for similar keys.
        NB: tl.constexpr = BS // 16
        r = tl.arange(0, BS)
        # 1) all BS/16 diagonal 16x16 blocks at once, viewed as (block, row in block, column):
        #    column-oriented substitution, X_i -= M_ij X_j for i > j once row j is final
        X = tl.reshape(tl.where(r[:, None] == r[None, :], 1.0, 0.0), (NB, 16, BS))
        Mb = tl.reshape(tl.where(r[:, None] // 16 == r[None, :] // 16, M, 0.0), (NB, 16, BS))
        row = tl.arange(0, 16)[None, :, None]
        col = tl.arange(0, BS)[None, None, :] - 16 * tl.arange(0, NB)[:, None, None]   # column within own block
        for j in range(15):                                  # a runtime loop: unrolled, it spills
            xj = tl.sum(tl.where(row == j, X, 0.0), axis=1)      # (NB, BS): row j of each block
            mj = tl.sum(tl.where(col == j, Mb, 0.0), axis=2)     # (NB, 16): column j of each block
            X = X - mj[:, :, None] * xj[:, None, :]
        X = tl.reshape(X, (BS, BS))
        # 2) merges: [[P, 0], [C, Q]]⁻¹ has lower-left block −Q⁻¹CP⁻¹, i.e. X <- X − X·C·X with C the part of M
        #    inside 2w-blocks but outside w-blocks (exact: C·X·C = 0)
        w = 16
        while w < BS:
            outside = (r[:, None] // (2 * w) == r[None, :] // (2 * w)) & (r[:, None] // w != r[None, :] // w)
            C = tl.where(outside, M, 0.0)
            X = X - tl.dot(tl.dot(X, C, input_precision=HI), X, input_precision=HI)
            w *= 2
        return X

    @triton.jit
    def _split(x):
        # x = hi + lo with both parts fp16: products of split factors reach ~fp32 accuracy on fp16 tensor cores
        hi = x.to(tl.float16)
        return hi, (x - hi.to(tl.float32)).to(tl.float16)

    @triton.jit
    def _apply_inverse(LINV, blk, R, BM: tl.constexpr, HI: tl.constexpr, SPLIT: tl.constexpr,
                       TRANS: tl.constexpr):
        # Linv·R (or Linvᵀ·R) with the inverse of block blk = head·T + I. SPLIT (16-bit inputs): Linv is stored as fp16
        # hi + lo, and R, scaled by its largest entry so neither part under- or overflows (gradients are ~1e-6),
        # is split the same way: three fp16 products, fp32 accumulation, the lo·lo term is below fp32 rounding.
        # Otherwise Linv is fp32 and the product takes HI (tf32x3 on a GPU: ~fp32).
        rm = tl.arange(0, BM)
        tile = rm[:, None] * BM + rm[None, :]
        if SPLIT:
            Lh = tl.load(LINV + blk * (2 * BM * BM) + tile)
            Ll = tl.load(LINV + blk * (2 * BM * BM) + BM * BM + tile)
            if TRANS:
                Lh = tl.trans(Lh)
                Ll = tl.trans(Ll)
            m = tl.max(tl.max(tl.abs(R), axis=1), axis=0)
            m = tl.where(m > 0, m, 1.0)
            Rh, Rl = _split(R / m)
            X = tl.dot(Lh, Rh)
            X = tl.dot(Lh, Rl, X)
            X = tl.dot(Ll, Rh, X)
            return X * m
        else:
            L = tl.load(LINV + blk * (BM * BM) + tile)
            if TRANS:
                L = tl.trans(L)
            return tl.dot(L, R, input_precision=HI)

    @triton.jit
    def _khat(K, KH, KL, rows, N, eps, pbase, D: tl.constexpr, WRITE_LO: tl.constexpr):
        # k̂ for some rows of one head, stored in the operand type (and the fp16 remainder); returns the stored k̂
        cols = tl.arange(0, D)
        live = rows < N
        k = tl.load(K + rows[:, None] * D + cols[None, :], mask=live[:, None], other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.where(live, tl.sum(k * k, axis=1) / D + eps, 1.0))    # no 0·inf = NaN on padded rows
        kf = k * rstd[:, None]
        kh = kf.to(KH.dtype.element_ty)
        tl.store(KH + pbase + rows[:, None] * D + cols[None, :], kh)
        if WRITE_LO:
            tl.store(KL + pbase + rows[:, None] * D + cols[None, :], (kf - kh.to(tl.float32)).to(tl.float16))
        return kh

    @triton.jit
    def _lower(ka, kb, live, c1, c2, HI: tl.constexpr, DIAG: tl.constexpr):
        # A = exp(s·k̂_a·k̂_bᵀ − √d) on real rows; a diagonal block keeps only its strictly lower part
        A = tl.where(live[:, None], tl.exp2(tl.dot(ka, tl.trans(kb), input_precision=HI) * c1 - c2), 0.0)
        if DIAG:
            r = tl.arange(0, A.shape[0])
            A = tl.where(r[:, None] > r[None, :], A, 0.0)
        return A

    @triton.jit
    def _store_inverse(LINV, blk, X, r0, c0, BM: tl.constexpr, SPLIT: tl.constexpr):
        # one square piece X of a block's inverse at rows r0.., columns c0..
        r = tl.arange(0, X.shape[0])
        tile = (r0 + r)[:, None] * BM + (c0 + r)[None, :]
        if SPLIT:
            Xh, Xl = _split(X)
            tl.store(LINV + blk * (2 * BM * BM) + tile, Xh)
            tl.store(LINV + blk * (2 * BM * BM) + BM * BM + tile, Xl)
        else:
            tl.store(LINV + blk * (BM * BM) + tile, X)

    @triton.jit
    def _prologue_kernel(K, KH, KL, LINV, N, eps, c1, c2,
                         D: tl.constexpr, BM: tl.constexpr, HI: tl.constexpr, SPLIT: tl.constexpr,
                         WRITE_LO: tl.constexpr):
        # Program (I, head), all at once, off the chain. K: (BH, N, D). Writes, for rows of block I: KH, k̂ in the
        # operand type (fp16 for 16-bit inputs, fp32 otherwise), padded to T·BM rows per head with zeros past N;
        # for the backward (WRITE_LO) KL = fp16(k̂ − KH), the part of k̂ the fp16 copy lost; LINV, the exact inverse
        # of the unit lower I + stril(A_II) with A_II from the rounded k̂ the chain uses (identity on padded rows):
        # (BH, T, BM, BM) fp32, or with SPLIT (BH, T, 2, BM, BM) fp16 hi and lo parts.
        I, bh = tl.program_id(0), tl.program_id(1)
        T = tl.num_programs(0)
        blk = bh.to(tl.int64) * T + I
        K += bh.to(tl.int64) * N * D
        pbase = bh.to(tl.int64) * T * (BM * D)
        if BM >= 128:
            # two halves: [[P, 0], [C, Q]]⁻¹ = [[P⁻¹, 0], [−Q⁻¹CP⁻¹, Q⁻¹]], so no 128×128 fp32 product is formed
            # (at 128 rows those need more shared memory than an H100 has)
            HB: tl.constexpr = BM // 2
            rows0 = I * BM + tl.arange(0, HB)
            rows1 = rows0 + HB
            k0 = _khat(K, KH, KL, rows0, N, eps, pbase, D, WRITE_LO)
            k1 = _khat(K, KH, KL, rows1, N, eps, pbase, D, WRITE_LO)
            P = _unit_lower_inverse(_lower(k0, k0, rows0 < N, c1, c2, HI, True), HB, HI)
            _store_inverse(LINV, blk, P, 0, 0, BM, SPLIT)
            CP = tl.dot(_lower(k1, k0, rows1 < N, c1, c2, HI, False), P, input_precision=HI)
            Q = _unit_lower_inverse(_lower(k1, k1, rows1 < N, c1, c2, HI, True), HB, HI)
            _store_inverse(LINV, blk, Q, HB, HB, BM, SPLIT)
            _store_inverse(LINV, blk, -tl.dot(Q, CP, input_precision=HI), HB, 0, BM, SPLIT)
            _store_inverse(LINV, blk, tl.zeros((HB, HB), dtype=tl.float32), 0, HB, BM, SPLIT)
        else:
            rows = I * BM + tl.arange(0, BM)
            kh = _khat(K, KH, KL, rows, N, eps, pbase, D, WRITE_LO)
            X = _unit_lower_inverse(_lower(kh, kh, rows < N, c1, c2, HI, True), BM, HI)
            _store_inverse(LINV, blk, X, 0, 0, BM, SPLIT)

    @triton.jit
    def _wait(COUNT, ERR, need, limit):
        # Bounded acquire poll until the head's counter reaches `need`. Gives up after `limit` polls, or at once when
        # any program has set the error word (a stalled chain fails after one program's wait, not after every one).
        c = tl.atomic_add(COUNT, 0, sem="acquire", scope="gpu")
        n = 0
        e = 0
        while (c < need) & (n < limit) & (e == 0):
            c = tl.atomic_add(COUNT, 0, sem="acquire", scope="gpu")
            e = tl.load(ERR, volatile=True)
            n += 1
        if c < need:
            tl.atomic_or(ERR, 1, sem="relaxed")                                    # ERR_TIMEOUT
        if n > 0:
            tl.atomic_add(ERR + 1, n, sem="relaxed")   # polls, for the tests (STATE[2]); once per wait that polled
        return c

    @triton.jit
    def _publish(STATE, COUNT, value, I, DELAY: tl.constexpr):
        # test hook DELAY: every other block stalls before publishing, to expose ordering / visibility bugs
        if DELAY > 0:
            if I % 2 == 0:
                for _ in range(DELAY):
                    tl.atomic_add(STATE + 2, 0, sem="relaxed")   # a slow no-op
        tl.debug_barrier()                                    # every thread's stores are issued before the release
        tl.atomic_max(COUNT, value, sem="release", scope="gpu")   # max: a late block never lowers the count

    @triton.jit
    def _fwd_step(R, kI, KH, VC, off, c1, c2, D: tl.constexpr, BN: tl.constexpr, HI: tl.constexpr):
        # R − A_IJ·V'_J for one BN-row tile of earlier rows at element offset `off` of the padded KH / VC
        tile = off + tl.arange(0, BN)[:, None] * D + tl.arange(0, D)[None, :]
        kJ = tl.load(KH + tile)                                                     # (BN, D)
        A = tl.exp2(tl.dot(kI, tl.trans(kJ), input_precision=HI) * c1 - c2)       # A_IJ tile (BM, BN), fp32
        vJ = tl.load(VC + tile, cache_modifier=".cg")   # L2, never a stale L1 line: another program wrote it
        return R - tl.dot(A.to(VC.dtype.element_ty), vJ, input_precision=HI)

    @triton.jit
    def _bwd_step(R, kJ, KH, DVC, SCALE, off, c1, c2, D: tl.constexpr, BN: tl.constexpr, HI: tl.constexpr,
                  FP16_OPS: tl.constexpr):
        # R − A_IJᵀ·dV_I for one BN-row tile of later rows; with FP16_OPS dV_I is stored divided by *SCALE
        tile = off + tl.arange(0, BN)[:, None] * D + tl.arange(0, D)[None, :]
        kI = tl.load(KH + tile)
        At = tl.exp2(tl.dot(kJ, tl.trans(kI), input_precision=HI) * c1 - c2)      # A_IJᵀ tile (BM, BN)
        dvI = tl.load(DVC + tile, cache_modifier=".cg")
        if FP16_OPS:
            return R - tl.dot(At.to(tl.float16), dvI) * tl.load(SCALE, cache_modifier=".cg")
        else:
            return R - tl.dot(At, dvI, input_precision=HI)

    @triton.jit
    def _fwd_kernel(KH, V, LINV, VP, VC, STATE, N, BH, T, c1, c2, max_spin, cap,
                    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, HI: tl.constexpr,
                    FP16_OPS: tl.constexpr, STAGES: tl.constexpr, DELAY: tl.constexpr, STALL_BLOCK: tl.constexpr):
        # V: (BH, N, D); VP: V' output, (BH, N, D) in v's dtype; KH, VC: k̂ and the V' chain copy in the operand
        # type, (BH, T·BM, D) padded. The ticket (start order, not program_id) means a program only ever waits on
        # programs that have already started: no deadlock whatever order the GPU dispatches programs in.
        t = tl.atomic_add(STATE, 1, sem="relaxed")
        I = t // BH                              # head fastest: one wave advances every head's chain
        bh = t % BH
        COUNT = STATE + 3 + bh
        ERR = STATE + 1
        pbase = bh.to(tl.int64) * T * (BM * D)
        rm = tl.arange(0, BM)
        cols = tl.arange(0, D)
        rows = I * BM + rm
        kI = tl.load(KH + pbase + rows[:, None] * D + cols[None, :])               # (BM, D)
        R = tl.load(V + bh.to(tl.int64) * N * D + rows[:, None] * D + cols[None, :], mask=rows[:, None] < N,
                    other=0.0).to(tl.float32)
        # one acquire read: blocks 0 .. done-1 are final, so their tiles stream through a pipelined loop with no
        # flag checks (loads of later tiles may be issued early: they are already final)
        done = tl.minimum(tl.minimum(tl.atomic_add(COUNT, 0, sem="acquire", scope="gpu"), I), cap)   # cap: test hook
        for j0 in tl.range(0, done * BM, BN, num_stages=STAGES):
            R = _fwd_step(R, kI, KH, VC, pbase + j0 * D, c1, c2, D, BN, HI)
        # the blocks still in flight: wait for each (in order), one stage, so no V'_J load is issued before its poll
        limit = max_spin
        for J in tl.range(done, I, num_stages=1):
            c = _wait(COUNT, ERR, J + 1, limit)
            limit = tl.where(c > J, limit, 0)    # after a give-up: no more waiting, the result is poisoned below
            for sub in tl.static_range(BM // BN):
                R = _fwd_step(R, kI, KH, VC, pbase + (J * BM + sub * BN) * D, c1, c2, D, BN, HI)
        X = _apply_inverse(LINV, bh.to(tl.int64) * T + I, R, BM, HI, FP16_OPS, False)   # V'_I (BM, D), fp32
        X = tl.where(rows[:, None] < N, X, 0.0)                                     # padded rows stay 0
        bad = tl.load(ERR, volatile=True) != 0   # a chain that gave up anywhere returns NaN, never plausible numbers
        if FP16_OPS:
            over = tl.max(tl.max(tl.where(tl.abs(X) <= 65504.0, 0, 1), axis=1), axis=0) > 0   # fp16 copy overflows
            #                                                                                  (or X is NaN)
            if over:
                tl.atomic_or(ERR, 2, sem="relaxed")                                # ERR_FP16_OVERFLOW
            bad = bad | over
        X = tl.where(bad, float("nan"), X)
        tl.store(VC + pbase + rows[:, None] * D + cols[None, :], X.to(VC.dtype.element_ty))
        tl.store(VP + bh.to(tl.int64) * N * D + rows[:, None] * D + cols[None, :], X.to(VP.dtype.element_ty),
                 mask=rows[:, None] < N)
        if I != STALL_BLOCK:                     # test hook: a block that never publishes
            _publish(STATE, COUNT, I + 1, I, DELAY)

    @triton.jit
    def _bwd_chain_kernel(KH, G, LINV, DVC, DVS, STATE, N, BH, T, c1, c2, max_spin, cap,
                          D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, HI: tl.constexpr,
                          FP16_OPS: tl.constexpr, STAGES: tl.constexpr, DELAY: tl.constexpr,
                          STALL_BLOCK: tl.constexpr):
        # The reverse chain computes only dV = L⁻ᵀG: R = G_J − Σ_{I>J} A_IJᵀ·dV_I, dV_J = (I + stril(A_JJ))⁻ᵀ·R.
        # 2 GEMMs per block pair, no atomics. G: (BH, N, D). The count of a head is how many blocks from the end are
        # final. DVC: dV, (BH, T·BM, D) padded, the chain copy and the output. For 16-bit inputs it is fp16 scaled
        # per block by DVS (BH, T) fp32 (its largest entry), as gradients (~1e-6) would underflow fp16 unscaled:
        # the same 11-bit precision as tf32 at half the bytes and the fp16 MMA rate. fp32 inputs: fp32, DVS unused.
        t = tl.atomic_add(STATE, 1, sem="relaxed")
        J = T - 1 - t // BH
        bh = t % BH
        COUNT = STATE + 3 + bh
        ERR = STATE + 1
        pbase = bh.to(tl.int64) * T * (BM * D)
        rm = tl.arange(0, BM)
        cols = tl.arange(0, D)
        rows = J * BM + rm
        kJ = tl.load(KH + pbase + rows[:, None] * D + cols[None, :])
        R = tl.load(G + bh.to(tl.int64) * N * D + rows[:, None] * D + cols[None, :], mask=rows[:, None] < N,
                    other=0.0).to(tl.float32)
        done = tl.minimum(tl.minimum(tl.atomic_add(COUNT, 0, sem="acquire", scope="gpu"), T - 1 - J), cap)
        for step in tl.range(0, done * (BM // BN), num_stages=STAGES):             # final tiles, last row first
            i0 = T * BM - (step + 1) * BN
            R = _bwd_step(R, kJ, KH, DVC, DVS + bh * T + i0 // BM, pbase + i0 * D, c1, c2, D, BN, HI, FP16_OPS)
        limit = max_spin
        for q in tl.range(0, T - 1 - J - done, num_stages=1):
            I = T - 1 - done - q
            c = _wait(COUNT, ERR, T - I, limit)
            limit = tl.where(c >= T - I, limit, 0)
            for sub in tl.static_range(BM // BN):
                i0 = (I + 1) * BM - (sub + 1) * BN
                R = _bwd_step(R, kJ, KH, DVC, DVS + bh * T + I, pbase + i0 * D, c1, c2, D, BN, HI, FP16_OPS)
        X = _apply_inverse(LINV, bh.to(tl.int64) * T + J, R, BM, HI, FP16_OPS, True)   # back substitution, Lᵀ
        X = tl.where(rows[:, None] < N, X, 0.0)                # padded rows stay 0: later tiles read them
        X = tl.where(tl.load(ERR, volatile=True) != 0, float("nan"), X)
        if FP16_OPS:
            m = tl.max(tl.max(tl.abs(X), axis=1), axis=0)
            m = tl.where(m > 0, m, 1.0)                        # NaN stays NaN
            tl.store(DVS + bh * T + J, m)
            X = X / m
        tl.store(DVC + pbase + rows[:, None] * D + cols[None, :], X.to(DVC.dtype.element_ty))
        if J != STALL_BLOCK:
            _publish(STATE, COUNT, T - J, J, DELAY)

    @triton.jit
    def _dk_kernel(KH, KL, VC, DVC, DVS, DKH, N, c1, c2,
                   D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, HI: tl.constexpr,
                   FP16_OPS: tl.constexpr, COLUMNS: tl.constexpr, STAGES: tl.constexpr):
        # One half of dK̂/s = (Z + Zᵀ)·K̂, Z_ij = −(dv_i·v'_j)·A_ij for j < i, fully parallel (no flags, no atomics),
        # split as FlashAttention-2 splits dQ from dK/dV. Program (block B, head):
        #   rows    (COLUMNS=False): out_B = Σ_{J ≤ B} Z_BJ·K̂_J     (needs dV_B, streams k̂_J, V'_J)
        #   columns (COLUMNS=True):  out_B = Σ_{I ≥ B} Z_IBᵀ·K̂_I    (needs V'_B, streams k̂_I, dV_I)
        # KH, VC, DVC, DVS as the chains left them, DKH: (2, BH, T·BM, D) fp32. 3 GEMMs per tile (4 MMAs with fp16
        # operands). Z·K̂ takes k̂ as KH + KL, fp16 hi + lo: rounding k̂ there, unlike rounding Z, moves dk̂
        # off the radial direction the RMSNorm backward removes, and dominates the dk error for near-duplicate keys.
        Bk, bh = tl.program_id(0), tl.program_id(1)
        T = tl.num_programs(0)
        pbase = bh.to(tl.int64) * T * (BM * D)
        rn = tl.arange(0, BN)
        cols = tl.arange(0, D)
        rows = Bk * BM + tl.arange(0, BM)
        own = pbase + rows[:, None] * D + cols[None, :]
        kB = tl.load(KH + own)
        if COLUMNS:
            xB = tl.load(VC + own)                               # V'_B
            lo, hi = (Bk + 1) * BM, T * BM
        else:
            xB = tl.load(DVC + own)                              # dV_B (scaled by DVS[B] for 16-bit inputs)
            lo, hi = 0, Bk * BM
        acc = tl.zeros((BM, D), dtype=tl.float32)
        # off-diagonal tiles, all of Z, then the diagonal block's tiles with strictly lower Z
        for j0 in tl.range(lo, hi + BM, BN, num_stages=STAGES):
            if j0 >= hi:                                         # the diagonal block comes last
                j0 = j0 - hi + Bk * BM
            tile = pbase + (j0 + rn)[:, None] * D + cols[None, :]
            kT = tl.load(KH + tile)                                                 # k̂ tile (BN, D)
            A = tl.exp2(tl.dot(kB, tl.trans(kT), input_precision=HI) * c1 - c2)    # (BM, BN)
            if COLUMNS:
                yT = tl.load(DVC + tile)                                            # dV_I tile
                keep = (j0 + rn)[None, :] > rows[:, None]
            else:
                yT = tl.load(VC + tile)                                             # V'_J tile
                keep = (j0 + rn)[None, :] < rows[:, None]
            Z = -tl.dot(xB, tl.trans(yT), input_precision=HI) * A
            Z = tl.where(keep | (j0 < Bk * BM) | (j0 >= (Bk + 1) * BM), Z, 0.0)
            if FP16_OPS:
                Zh = Z.to(tl.float16)
                part = tl.dot(Zh, kT)
                part = tl.dot(Zh, tl.load(KL + tile), part)
                if COLUMNS:
                    part = part * tl.load(DVS + bh * T + j0 // BM)
                acc += part
            else:
                acc += tl.dot(Z, kT, input_precision=HI)
        if FP16_OPS:
            if not COLUMNS:
                acc = acc * tl.load(DVS + bh * T + Bk)
        if COLUMNS:
            own += tl.num_programs(1).to(tl.int64) * T * (BM * D)                  # the second half of DKH
        tl.store(DKH + own, acc)


# ---------------------------------------------------------------------------------------------------------------
# host side


def _rms_normalize(k, eps):
    # k̂ = k·rstd in fp32 (fp64 for fp64 input), rstd = 1/sqrt(mean(k²) + eps) (..., T, 1)
    k = k.to(torch.float64 if k.dtype == torch.float64 else torch.float32)
    rstd = torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + eps)
    return k * rstd, rstd


def supports(k, v):
    """None if precondition(k, v) can run on these inputs, else a short reason why not."""
    if triton is None:
        return "triton is not installed"
    if not (isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)):
        return "k and v must be tensors"
    if k.dim() != 4 or k.shape != v.shape:
        return f"k and v must have the same shape (B, H, T, D); got {tuple(k.shape)} and {tuple(v.shape)}"
    if k.dtype not in DTYPES or v.dtype not in DTYPES:
        return f"dtype {k.dtype}/{v.dtype} not supported (fp16, bf16, fp32)"
    if k.shape[-1] not in HEAD_DIMS:
        return f"head dim {k.shape[-1]} not supported (one of {HEAD_DIMS})"
    if k.device != v.device:
        return "k and v are on different devices"
    if _interpreting():
        if k.device.type != "cpu":
            return "TRITON_INTERPRET=1 runs the kernel on CPU tensors only"
    elif k.device.type != "cuda":
        return f"device {k.device.type} not supported (CUDA, or CPU with TRITON_INTERPRET=1)"
    elif torch.cuda.get_device_capability(k.device) < (8, 0):
        return "needs a CUDA GPU with compute capability >= 8.0"
    return None


def config(D, fp16_ops, N=None, block_size=None, arch=90):
    """Launch shape (BM rows per block, BN rows per inner tile, warps, pipeline stages) for compute capability
    arch (90 = sm_90). The defaults are the largest tiles that compile without register spills in
    `python kernel.py --report` (ahead-of-time compiles for sm_90 and sm_80): 128×64 with 8 warps for 16-bit inputs
    (64×64 on sm_80 at D = 128); 32×32 for fp32 inputs, whose ~fp32 products (tf32x3) take three times the
    registers."""
    if block_size is None:
        BM = 32 if not fp16_ops else 64 if arch < 90 and D > 64 else 128
        if N is not None:
            BM = min(BM, max(16, triton.next_power_of_2(N)))
    elif block_size in BLOCK_SIZES:
        BM = block_size
    else:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size}")
    BN = min(BM, 64 if fp16_ops else 32)
    return BM, BN, 8 if BM >= 128 or (fp16_ops and D > 64) else 4, 2


def _arch(device):
    if device.type != "cuda":
        return 90                                   # the interpreter: any
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _consts(D):
    hi = "ieee" if _interpreting() else "tf32x3"       # ~fp32 accuracy on tensor cores
    s = D ** -0.5
    return dict(hi=hi, s=s, c1=s * LOG2E, c2=math.sqrt(D) * LOG2E)


def _max_spin(max_spin):
    # polls before a wait gives up; on a GPU a poll is ~1 µs and a legitimate wait is at most the chain's length
    # (milliseconds). In the interpreter a wait on an earlier program returns at once and a wait on a later one can
    # never succeed, so keep the cap small there.
    return max_spin if max_spin is not None else (1000 if _interpreting() else 1 << 21)


POISON = False   # test hook: every buffer the kernels write starts as NaN, so stale memory never passes as a result


def _buffer(*shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device) if POISON else torch.empty(
        shape, dtype=dtype, device=device)


CHECK = os.environ.get("LUCID_KERNEL_CHECK") == "1"   # debug: read the error word after every call (a host sync)


def check(state, what="forward"):
    """Raise if the error word of a call's state tensor says a chain gave up (reads it: a host sync)."""
    e = int(state[1].item())
    if e & ERR_TIMEOUT:
        raise RuntimeError(f"LUCID kernel chain wait timed out in the {what} kernel: a program waited more than "
                           f"max_spin polls for an earlier block (ordering bug, or a GPU too oversubscribed)")
    if e & ERR_FP16_OVERFLOW:
        raise OverflowError(f"LUCID kernel: |V'| > 65504 does not fit the fp16 chain copy ({what})")
    return e


def _prologue(k, BM, D, fp16_ops, eps, c, write_lo):
    """Fully parallel: k̂ (operand type, padded), its fp16 remainder (backward only), every diagonal inverse."""
    BH, N = k.shape[0], k.shape[1]
    T = triton.cdiv(N, BM)
    kh = _buffer(BH, T * BM, D, dtype=torch.float16 if fp16_ops else torch.float32, device=k.device)
    kl = _buffer(BH, T * BM, D, dtype=torch.float16, device=k.device) if write_lo else kh
    linv = (_buffer(BH, T, 2, BM, BM, dtype=torch.float16, device=k.device) if fp16_ops else
            _buffer(BH, T, BM, BM, dtype=torch.float32, device=k.device))
    _prologue_kernel[(T, BH)](k, kh, kl, linv, N, eps, c["c1"], c["c2"], D=D, BM=BM, HI=c["hi"], SPLIT=fp16_ops,
                              WRITE_LO=write_lo, num_warps=4)
    return kh, kl, linv


def _forward(k, v, eps, block_size=None, max_spin=None, fp32_ops=False, sync=None, _delay=0, _stall_block=-1,
             _cap=1 << 30):
    """(V' in v's dtype, the padded chain copy the backward reads, BM, the state). sync (default CHECK) reads
    the error word: a timeout raises, an fp16 overflow is redone with fp32 operands. Without sync nothing waits on
    the host (CUDA-graph capturable) and a failed chain leaves NaN in V'."""
    B, H, N, D = v.shape
    BH = B * H
    k, v = k.reshape(BH, N, D).contiguous(), v.reshape(BH, N, D).contiguous()
    fp16_ops = not fp32_ops and k.dtype != torch.float32 and v.dtype != torch.float32
    c = _consts(D)
    BM, BN, warps, stages = config(D, fp16_ops, N, block_size, _arch(v.device))
    # the interpreter truncates fp32 -> bf16 casts (a GPU rounds to nearest), so there torch does that cast
    out_dtype = torch.float32 if _interpreting() and v.dtype == torch.bfloat16 else v.dtype
    while True:
        T = triton.cdiv(N, BM)
        try:
            kh, _, linv = _prologue(k, BM, D, fp16_ops, eps, c, False)
            vp = _buffer(BH, N, D, dtype=out_dtype, device=v.device)
            vc = _buffer(BH, T * BM, D, dtype=kh.dtype, device=v.device)
            state = torch.zeros(3 + BH, dtype=torch.int32, device=v.device)
            _fwd_kernel[(BH * T,)](kh, v, linv, vp, vc, state, N, BH, T, c["c1"], c["c2"],
                                   _max_spin(max_spin), _cap, D=D, BM=BM, BN=min(BN, BM), HI=c["hi"], FP16_OPS=fp16_ops,
                                   STAGES=stages, DELAY=_delay, STALL_BLOCK=_stall_block, num_warps=warps)
        except triton.runtime.errors.OutOfResources:      # too big for this GPU's shared memory: halve the blocks
            if BM <= 16:
                raise
            BM, warps = BM // 2, 4
            continue
        break
    if sync if sync is not None else CHECK:
        try:
            check(state)
        except OverflowError:
            return _forward(k.view(B, H, N, D), v.view(B, H, N, D), eps, block_size, max_spin, True, sync, _delay,
                            _stall_block, _cap)
    return vp.view(B, H, N, D).to(v.dtype), vc, BM, state


def _backward(k, vc, g, eps, BM, max_spin=None, sync=None, _delay=0, _stall_block=-1, _cap=1 << 30):
    """(dk, dv) in fp32 and the state, for the upstream gradient g = dL/dV' and the forward's chain copy vc
    (padded, BM-row blocks)."""
    B, H, N, D = g.shape
    BH = B * H
    k, g = k.reshape(BH, N, D).contiguous(), g.reshape(BH, N, D).contiguous()
    fp16_ops = vc.dtype == torch.float16
    c = _consts(D)
    _, BN, warps, stages = config(D, fp16_ops, N, BM, _arch(g.device))
    BN = min(BN, BM)
    T = triton.cdiv(N, BM)
    kh, kl, linv = _prologue(k, BM, D, fp16_ops, eps, c, fp16_ops)
    dvc = _buffer(BH, T * BM, D, dtype=vc.dtype, device=g.device)
    dvs = _buffer(BH, T, dtype=torch.float32, device=g.device)
    dkh = _buffer(2, BH, T * BM, D, dtype=torch.float32, device=g.device)
    while True:       # BM is the forward's (vc is padded to it); tiles that do not fit the GPU get fewer rows
        try:
            state = torch.zeros(3 + BH, dtype=torch.int32, device=g.device)
            _bwd_chain_kernel[(BH * T,)](kh, g, linv, dvc, dvs, state, N, BH, T, c["c1"], c["c2"],
                                         _max_spin(max_spin), _cap, D=D, BM=BM, BN=BN, HI=c["hi"], FP16_OPS=fp16_ops,
                                         STAGES=stages, DELAY=_delay, STALL_BLOCK=_stall_block, num_warps=warps)
            for columns in (False, True):
                _dk_kernel[(T, BH)](kh, kl, vc, dvc, dvs, dkh, N, c["c1"], c["c2"], D=D, BM=BM, BN=BN, HI=c["hi"],
                                    FP16_OPS=fp16_ops, COLUMNS=columns, STAGES=stages, num_warps=warps)
        except triton.runtime.errors.OutOfResources:
            if BN <= 16:
                raise
            BN //= 2
            continue
        break
    if sync if sync is not None else CHECK:
        check(state, "backward")
    dv = dvc.view(BH, T, BM, D).float() * dvs.view(BH, T, 1, 1) if fp16_ops else dvc
    dv = dv.reshape(BH, T * BM, D)[:, :N]
    # RMSNorm backward (elementwise, fp32): dk = r ⊙ (dk̂ − k̂ (k̂·dk̂)/d), dk̂ = s·(row half + column half)
    kf, rstd = _rms_normalize(k, eps)
    dkh = c["s"] * (dkh[0, :, :N] + dkh[1, :, :N])
    dk = rstd * (dkh - kf * (kf * dkh).sum(-1, keepdim=True) / D)
    return dk.view(B, H, N, D), dv.reshape(B, H, N, D), state


class _Precondition(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k, v, eps, block_size):
        vp, vc, BM, _ = _forward(k, v, eps, block_size)
        ctx.save_for_backward(k, vc)
        ctx.eps, ctx.BM, ctx.v_dtype = eps, BM, v.dtype
        return vp

    @staticmethod
    @torch.autograd.function.once_differentiable   # the backward is not itself differentiable: refuse, not ignore
    def backward(ctx, g):
        k, vc = ctx.saved_tensors
        dk, dv, _ = _backward(k, vc, g, ctx.eps, ctx.BM)
        return dk.to(k.dtype), dv.to(ctx.v_dtype), None, None


def precondition(k, v, eps=EPS, block_size=None):
    """V' = (I + stril(A))⁻¹ V, A = exp(s·K̂K̂ᵀ − √d), for k, v of shape (B, H_kv, T, D); differentiable in k and v.
    Assumes supports(k, v) is None. block_size: rows per block (16, 32, 64, 128); by default 128 for 16-bit inputs
    and 32 for fp32 (see config). No host sync: a chain that gives up returns NaN (LUCID_KERNEL_CHECK=1 raises)."""
    if v.numel() == 0:
        return v.clone()
    on_gpu = torch.cuda.device(k.device) if k.device.type == "cuda" else contextlib.nullcontext()
    with torch.autocast(device_type=k.device.type, enabled=False), on_gpu:   # launch on k's GPU
        return _Precondition.apply(k, v, eps, block_size)


# ---------------------------------------------------------------------------------------------------------------
# decode: one pass over the cache for the new V' row and the attention of all G query heads of a KV head
#
# Flash-decoding: the cache is split along its length; program (b·Hkv + h, split) reads each cached k_j and v'_j of
# its split once. The G queries (pre-scaled by s·log2 e) and k̂_t are stacked into one row block X (ROWS × D): row
# r < G is query head h·G + r, row G is k̂_t. One product X·K_tileᵀ gives the G attention score rows and k̂_t·k_j;
# a_j = exp(s·rstd_j·(k̂_t·k_j) − √d) is put into row G of the weight block W, so one product W·V'_tile gives both
# the G partial attention sums (online softmax) and the partial Σ a_j·v'_j. A second kernel merges the splits,
# forms v'_t = v_t − Σ a_j·v'_j, and adds the new token's own attention term, which needs v'_t and so only comes
# after the pass. Accumulation is fp32 (fp64 for fp64 input). For a 16-bit cache both products take fp16 operands
# on the tensor cores (bf16 keys and V' convert to fp16 exactly in their usual range; fp16 rounds k̂_t, the scaled
# queries, p and a_j to 2⁻¹¹ where bf16 would give 2⁻⁸); an fp32 cache uses IEEE fp32 products, never TF32.
# With LUCID=False the same kernels are plain softmax flash-decoding (no row G, v'_t = v_t): the softmax baseline.
# The cache length may live in a device tensor (the grid then covers max_len and programs past it do nothing), so
# a step can be captured once in a CUDA graph and replayed at every length.

DECODE_BLOCK_N = 64              # cached rows per tile
DECODE_MAX_ROWS = 64             # G + 1 query rows per program at most


def decode_supports(q, k_cache):
    """None if decode_step can run these inputs, else why not (the caller then uses lucid.decode_step_torch)."""
    if triton is None:
        return "triton is not installed"
    if not (q.is_cuda or _interpreting()):
        return f"tensors are on {q.device}, not CUDA (set TRITON_INTERPRET=1 to run the kernel on CPU)"
    D, G = q.shape[-1], q.shape[1] // k_cache.shape[1]
    if D not in (16, 32, 64, 128):
        return f"head size {D} is not one of 16, 32, 64, 128"
    if G + 1 > DECODE_MAX_ROWS:
        return f"{G} query heads per KV head is more than {DECODE_MAX_ROWS - 1}"
    allowed = (torch.float16, torch.bfloat16, torch.float32) + ((torch.float64,) if _interpreting() else ())
    if q.dtype not in allowed or k_cache.dtype not in allowed:
        return f"dtypes {q.dtype}, {k_cache.dtype} (supported: fp16, bf16, fp32)"
    if k_cache.stride(-1) != 1:
        return "the key cache is not contiguous in its last dimension"
    return None


if triton is not None:

    @triton.jit
    def _decode_rows(bh, Hkv, G, ROWS: tl.constexpr, LUCID: tl.constexpr):
        """Batch b and KV head h of program bh, and its row block: row r < G is query head h·G + r, row G is k̂_t."""
        b, h = (bh // Hkv).to(tl.int64), bh % Hkv                          # int64: a large cache spans > 2³¹ elements
        rows = tl.arange(0, ROWS)
        is_q = rows < G
        if LUCID:
            is_g = rows == G
        else:
            is_g = rows < 0                                                 # softmax: no solve row
        return b, h, rows, is_q, is_g

    @triton.jit
    def _decode_partial_kernel(Q, KT, KC, VC, RC, START, LENGTH, ACC, M, L, length, split_len, Hkv, G, scale, eps,
                               sq_b, sq_h, skt_b, skt_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sr_b, sr_h, sr_n,
                               D: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, F64: tl.constexpr,
                               FP16_DOT: tl.constexpr, LUCID: tl.constexpr, LENGTH_ON_DEVICE: tl.constexpr):
        ACC_T = tl.float64 if F64 else tl.float32
        bh, split = tl.program_id(0), tl.program_id(1)
        n_splits = tl.num_programs(1)
        b, h, rows, is_q, is_g = _decode_rows(bh, Hkv, G, ROWS, LUCID)
        cols = tl.arange(0, D)
        if LENGTH_ON_DEVICE:
            length = tl.load(LENGTH)
        q = tl.load(Q + b * sq_b + (h * G + rows)[:, None] * sq_h + cols[None, :], mask=is_q[:, None], other=0.0)
        x = tl.where(is_q[:, None], q.to(ACC_T) * (scale * 1.4426950408889634), 0.0)
        if LUCID:
            kt = tl.load(KT + b * skt_b + h * skt_h + cols).to(ACC_T)
            kh_t = kt / tl.sqrt(tl.sum(kt * kt, 0) / D + eps)              # k̂_t, as _rms_normalize
            x = tl.where(is_g[:, None], kh_t[None, :], x)                   # (ROWS, D)
        start = tl.load(START + b)
        lo = split * split_len
        hi = tl.minimum(lo + split_len, length)
        m = tl.full([ROWS], -1.0e30, ACC_T)      # finite: a split with every key masked leaves m, l, acc neutral
        l = tl.zeros([ROWS], ACC_T)
        acc = tl.zeros([ROWS, D], ACC_T)
        for n0 in range(lo, hi, BLOCK_N):
            offs = n0 + tl.arange(0, BLOCK_N)
            valid = (offs < hi) & (offs >= start)
            k = tl.load(KC + b * sk_b + h * sk_h + offs[:, None] * sk_n + cols[None, :], mask=valid[:, None],
                        other=0.0)
            vp = tl.load(VC + b * sv_b + h * sv_h + offs[:, None] * sv_n + cols[None, :], mask=valid[:, None],
                         other=0.0)
            if FP16_DOT:                                                    # (ROWS, BLOCK_N), one read of k_j
                sc = tl.dot(x.to(tl.float16), tl.trans(k.to(tl.float16))).to(ACC_T)
            else:
                sc = tl.dot(x, tl.trans(k.to(ACC_T)), input_precision="ieee")
            p_sc = tl.where(is_q[:, None] & valid[None, :], sc, float("-inf"))
            m_new = tl.maximum(m, tl.max(p_sc, 1))
            alpha = tl.exp2(m - m_new)                                      # 1 on row G: its sum is not rescaled
            p = tl.exp2(p_sc - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            if LUCID:
                r = tl.load(RC + b * sr_b + h * sr_h + offs * sr_n, mask=valid, other=0.0).to(ACC_T)
                kk = tl.sum(tl.where(is_g[:, None], sc, 0.0), 0)            # k̂_t·k_j, (BLOCK_N,)
                a = tl.where(valid, tl.exp2((scale * r * kk - 1.0 / scale) * 1.4426950408889634), 0.0)
                p = tl.where(is_g[:, None], a[None, :], p)                  # row G of W: the row of A
            if FP16_DOT:                                                    # one read of v'_j
                pv = tl.dot(p.to(tl.float16), vp.to(tl.float16)).to(ACC_T)
            else:
                pv = tl.dot(p.to(ACC_T), vp.to(ACC_T), input_precision="ieee")
            acc = acc * alpha[:, None] + pv
            m = m_new
        part = bh * n_splits + split
        tl.store(ACC + part * ROWS * D + rows[:, None] * D + cols[None, :], acc)
        tl.store(M + part * ROWS + rows, m)
        tl.store(L + part * ROWS + rows, l)

    @triton.jit
    def _decode_merge_kernel(Q, KT, VT, ACC, M, L, O, VPT, RT, n_splits, Hkv, G, scale, eps,
                             sq_b, sq_h, skt_b, skt_h, svt_b, svt_h, so_b, so_h, svp_b, svp_h,
                             D: tl.constexpr, ROWS: tl.constexpr, F64: tl.constexpr, LUCID: tl.constexpr):
        ACC_T = tl.float64 if F64 else tl.float32
        bh = tl.program_id(0)
        b, h, rows, is_q, is_g = _decode_rows(bh, Hkv, G, ROWS, LUCID)
        cols = tl.arange(0, D)
        q = tl.load(Q + b * sq_b + (h * G + rows)[:, None] * sq_h + cols[None, :], mask=is_q[:, None],
                    other=0.0).to(ACC_T)
        kt = tl.load(KT + b * skt_b + h * skt_h + cols).to(ACC_T)
        vt = tl.load(VT + b * svt_b + h * svt_h + cols).to(ACC_T)
        own = tl.where(is_q, tl.sum(q * (scale * 1.4426950408889634) * kt[None, :], 1), -1.0e30)   # (ROWS,)
        m_all = own
        for sp in range(0, n_splits):
            m_all = tl.maximum(m_all, tl.load(M + (bh * n_splits + sp) * ROWS + rows))
        l_all = tl.zeros([ROWS], ACC_T)
        acc = tl.zeros([ROWS, D], ACC_T)
        for sp in range(0, n_splits):
            part = bh * n_splits + sp
            w = tl.exp2(tl.load(M + part * ROWS + rows) - m_all)             # 1 on row G (both stay -1e30)
            l_all += w * tl.load(L + part * ROWS + rows)
            acc += w[:, None] * tl.load(ACC + part * ROWS * D + rows[:, None] * D + cols[None, :])
        vp_t = vt
        if LUCID:
            vp_t = vt - tl.sum(tl.where(is_g[:, None], acc, 0.0), 0)       # v'_t = v_t − Σ_j a_j·v'_j
            tl.store(RT + bh, 1.0 / tl.sqrt(tl.sum(kt * kt, 0) / D + eps))
        w_own = tl.where(is_q, tl.exp2(own - m_all), 0.0)
        o = (acc + w_own[:, None] * vp_t[None, :]) / tl.where(is_q, l_all + w_own, 1.0)[:, None]
        tl.store(O + b * so_b + (h * G + rows)[:, None] * so_h + cols[None, :], o.to(O.dtype.element_ty),
                 mask=is_q[:, None])
        tl.store(VPT + b * svp_b + h * svp_h + cols, vp_t.to(VPT.dtype.element_ty))


def decode_step(q, k, v, k_cache, vp_cache, rstd_cache, length, start=None, eps=EPS, split_len=None,
                lucid_solve=True):
    """
    The fused form of lucid.decode_step (same arguments and results, checked there). length: an int, or a one-element
    integer tensor on q's device (the grid then spans the whole cache and no launch argument depends on the length,
    as a CUDA graph needs). split_len: cached rows per program (a multiple of DECODE_BLOCK_N); by default enough
    splits to give every SM about two programs. lucid_solve=False: softmax decoding over the raw values in vp_cache
    (rstd_cache unused, may be None); v'_t is then v_t and rstd_t is not computed.
    """
    B, H, _, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    ROWS = max(16, triton.next_power_of_2(G + 1))                          # tl.dot wants at least 16 rows
    f64 = torch.float64 in (q.dtype, k.dtype, v.dtype, k_cache.dtype)
    acc_dtype = torch.float64 if f64 else torch.float32
    on_device = isinstance(length, torch.Tensor)
    span = k_cache.shape[2] if on_device else length                        # the rows the grid must cover
    if split_len is None:
        programs = 2 * (torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1)
        per_split = triton.cdiv(max(span, 1), max(1, programs // (B * Hkv)))
        split_len = DECODE_BLOCK_N * triton.cdiv(per_split, DECODE_BLOCK_N)
    n_splits = max(1, triton.cdiv(span, split_len))
    if start is None:
        start = torch.zeros(B, dtype=torch.int32, device=q.device)
    start = start.to(device=q.device, dtype=torch.int32)
    length_ptr = length if on_device else start                             # a placeholder when length is an int
    # (B, H, D), (B, Hkv, D): one token, so a copy into the layout the kernel reads costs nothing
    q3, kt, vt = (x[:, :, 0] if x.stride(-1) == 1 else x[:, :, 0].contiguous() for x in (q, k, v))
    for name, x in (("k_cache", k_cache), ("vp_cache", vp_cache)):             # written in place: never copied
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
    rc = rstd_cache if lucid_solve else k_cache                             # unused without the solve
    part_acc = _buffer(B * Hkv * n_splits, ROWS, D, dtype=acc_dtype, device=q.device)
    part_m = _buffer(B * Hkv * n_splits, ROWS, dtype=acc_dtype, device=q.device)
    part_l = _buffer(B * Hkv * n_splits, ROWS, dtype=acc_dtype, device=q.device)
    scale = D ** -0.5
    _decode_partial_kernel[(B * Hkv, n_splits)](
        q3, kt, k_cache, vp_cache, rc, start, length_ptr, part_acc, part_m, part_l, 0 if on_device else length,
        split_len, Hkv, G, scale, eps, q3.stride(0), q3.stride(1), kt.stride(0), kt.stride(1),
        *k_cache.stride()[:3], *vp_cache.stride()[:3], *rc.stride()[:3],
        D=D, ROWS=ROWS, BLOCK_N=DECODE_BLOCK_N, F64=f64, FP16_DOT=k_cache.element_size() == 2, LUCID=lucid_solve,
        LENGTH_ON_DEVICE=on_device)
    o = _buffer(B, H, D, dtype=q.dtype, device=q.device)
    vp_t = _buffer(B, Hkv, D, dtype=v.dtype, device=q.device)
    rstd_t = _buffer(B, Hkv, dtype=acc_dtype, device=q.device)
    _decode_merge_kernel[(B * Hkv,)](
        q3, kt, vt, part_acc, part_m, part_l, o, vp_t, rstd_t, n_splits, Hkv, G, scale, eps, q3.stride(0),
        q3.stride(1), kt.stride(0), kt.stride(1), vt.stride(0), vt.stride(1), o.stride(0), o.stride(1),
        vp_t.stride(0), vp_t.stride(1), D=D, ROWS=ROWS, F64=f64, LUCID=lucid_solve)
    return o[:, :, None], vp_t[:, :, None], rstd_t[:, :, None, None]


# ---------------------------------------------------------------------------------------------------------------
# self-checks: before a caller trusts the kernels on a (device, dtype, head size), run them once on a small input with
# clustered keys and a ragged last block and compare with tiny dense float64 references. They catch what the CPU
# tests cannot see (a compiler or hardware difference); lucid.py falls back to its PyTorch path when one fails.


def _dense_solve(k, v, eps):
    """float64 V' = (I + stril(A))⁻¹ V with the N×N matrix A = exp(s·K̂K̂ᵀ − √d): the reference, tests only."""
    kh, _ = _rms_normalize(k.double(), eps)
    D, N = k.shape[-1], k.shape[-2]
    A = torch.exp(kh @ kh.transpose(-1, -2) * D ** -0.5 - math.sqrt(D))
    L = A.tril(-1) + torch.eye(N, dtype=torch.float64, device=k.device)
    return torch.linalg.solve_triangular(L, v.double(), upper=False, unitriangular=True)


def _clustered(gen, *shape):
    D = shape[-1]
    centres = torch.randn(4, D, generator=gen)
    return centres[torch.randint(0, 4, shape[:-1], generator=gen)] + 0.1 * torch.randn(*shape, generator=gen)


def _rel(x, ref):
    return ((x.detach().double().cpu() - ref.detach().double().cpu()).norm() / ref.double().cpu().norm()).item()


def selfcheck(device, dtype, D, eps=EPS):
    """None if precondition (forward and backward) agrees with a dense float64 solve on a small input, else why not."""
    gen = torch.Generator().manual_seed(0)
    k, v, g = _clustered(gen, 1, 2, 203, D), torch.randn(1, 2, 203, D, generator=gen), torch.randn(1, 2, 203, D,
                                                                                                   generator=gen)
    k, v, g = (x.to(device=device, dtype=dtype) for x in (k, v, g))
    with torch.enable_grad():                          # the first call may come from inside torch.no_grad()
        kk, vv = k.clone().requires_grad_(), v.clone().requires_grad_()
        vp = precondition(kk, vv, eps)
        dk, dv = torch.autograd.grad(vp, (kk, vv), g, allow_unused=True)
        k64, v64 = (x.detach().double().cpu().requires_grad_() for x in (k, v))
        ref = _dense_solve(k64, v64, eps)
        rdk, rdv = torch.autograd.grad(ref, (k64, v64), g.double().cpu())
    tol = 1e-3 if dtype == torch.float32 else 5e-2    # 16-bit: output rounding and fp16 operands (a bug gives ~1)
    for name, x, r in (("V'", vp, ref), ("dk", dk, rdk), ("dv", dv, rdv)):
        err = _rel(x if x is not None else torch.zeros_like(r), r)
        if not err <= tol:                                                   # catches NaN too
            return f"its self-check failed on {device} {dtype}: {name} differs from float64 by {err:.1e}"
    return None


def _dense_decode(q, k, v, k_cache, vp_cache, rstd_cache, length, start, eps):
    """float64 decode step, written out row by row: the reference of decode_step."""
    B, H, _, D = q.shape
    Hkv, G, s = k.shape[1], H // k.shape[1], D ** -0.5
    q, k, v, kc, vc, rc = (x.double().cpu() for x in (q, k, v, k_cache, vp_cache, rstd_cache))
    o, vp_t = torch.empty(B, H, 1, D, dtype=torch.float64), torch.empty(B, Hkv, 1, D, dtype=torch.float64)
    rstd_t = _rms_normalize(k, eps)[1]                                       # (B, Hkv, 1, 1)
    for b in range(B):
        j0 = int(start[b])
        for h in range(Hkv):
            kh_t, _ = _rms_normalize(k[b, h], eps)                           # (1, D)
            a = torch.exp(s * (kc[b, h, j0:length] * rc[b, h, j0:length]) @ kh_t[0] - math.sqrt(D))
            vp_t[b, h, 0] = v[b, h, 0] - a @ vc[b, h, j0:length]
            keys = torch.cat([kc[b, h, j0:length], k[b, h]])                 # (P + 1, D)
            vals = torch.cat([vc[b, h, j0:length], vp_t[b, h]])
            for r in range(G):
                o[b, h * G + r, 0] = torch.softmax(s * keys @ q[b, h * G + r, 0], 0) @ vals
    return o, vp_t, rstd_t


def decode_selfcheck(device, dtype, D, G, eps=EPS):
    """None if decode_step agrees with a dense float64 step on a small cache of clustered keys, else why not."""
    gen = torch.Generator().manual_seed(0)
    B, Hkv, L, P = 2, 2, 300, 257
    k_cache = _clustered(gen, B, Hkv, L, D)
    rstd_cache = torch.rsqrt(k_cache.pow(2).mean(-1, keepdim=True) + eps)
    vp_cache, k = torch.randn(B, Hkv, L, D, generator=gen), k_cache[:, :, :1].contiguous()
    q, v = torch.randn(B, Hkv * G, 1, D, generator=gen), torch.randn(B, Hkv, 1, D, generator=gen)
    start = torch.tensor([0, 5])
    args = [x.to(device=device, dtype=dtype) for x in (q, k, v, k_cache, vp_cache)] + [rstd_cache.to(device)]
    got = decode_step(*args, P, start.to(device), eps)
    ref = _dense_decode(*args, P, start, eps)
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    for name, x, r in zip(("output", "V' row", "rstd"), got, ref):
        err = _rel(x, r)
        if not err <= tol:                                                   # catches NaN too
            return f"its self-check failed on {device} {dtype}: the {name} differs from float64 by {err:.1e}"
    return None


# ---------------------------------------------------------------------------------------------------------------
# report: python kernel.py --report  (no GPU needed)
#
# Compiles every kernel of the forward and backward ahead of time for sm_90 and sm_80 at the default configurations,
# as the JIT would specialise them (16-byte aligned pointers), and reads what the compiler made of them: registers,
# spills and shared memory from cuobjdump -res-usage, and from the SASS of the main loop (the loop with the most
# tensor-core instructions) the MMA kind, 128-bit loads, fences and atomics. ptxas and cuobjdump ship in the triton
# wheel. Bytes and FLOPs per inner step are counted from the code: per BN-row tile, with 16-bit (or fp32) operands.

_FLOAT_ARGS = ("eps", "c1", "c2")
_GPU_FENCE = r"\bMEMBAR\.\w+\.(GPU|SYS)\b"    # MEMBAR.*.CTA belongs to the cp.async / wgmma pipeline
_ATOMIC = r"\b(ATOMG|ATOM|RED|REDG)\."


def _ptr_types(fn, fp16_ops, D):
    op = "fp16" if fp16_ops else "fp32"
    io = "bf16" if fp16_ops else "fp32"
    types = dict(K=io, V=io, VP=io, G=io, KH=op, VC=op, DVC=op, KL="fp16", LINV=op, DVS="fp32", DKH="fp32",
                 STATE="i32")
    return {n: types[n] for n in fn.arg_names if n in types}


def _compile(fn, arch, constexprs, ptr_types, num_warps, num_stages):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ptr_types:
            signature[name] = "*" + ptr_types[name]
            attrs[(i,)] = [["tt.divisibility", 16]]      # torch allocations are 16-byte aligned; the JIT sees it too
        else:
            signature[name] = "fp32" if name in _FLOAT_ARGS else "i32"
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def _cuobjdump(cubin, flag):
    import subprocess
    import tempfile
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, flag, f.name], check=True, capture_output=True, text=True).stdout


def _main_loop(sass):
    """SASS lines of the main loop: the first loop (a branch back to a lower address) with MMA instructions."""
    import re
    code = [(int(m.group(1), 16), l) for l in sass.splitlines() if (m := re.match(r"\s*/\*([0-9a-f]{4,})\*/", l))]
    for addr, line in code:
        m = re.search(r"\bBRA\s+(?:!?U?P\d+,\s*)?0x([0-9a-f]+)", line)
        if m and int(m.group(1), 16) < addr:
            body = [l for a, l in code if int(m.group(1), 16) <= a <= addr]
            if any("MMA" in l for l in body):
                return body
    return []


def analyse(fn, arch, constexprs, fp16_ops, num_warps, num_stages):
    """What the compiler made of one kernel configuration: a dict of registers, spills, shared memory and SASS
    counts (whole kernel and main loop)."""
    import re
    ck = _compile(fn, arch, constexprs, _ptr_types(fn, fp16_ops, constexprs["D"]), num_warps, num_stages)
    res = _cuobjdump(ck.asm["cubin"], "-res-usage")
    sass = _cuobjdump(ck.asm["cubin"], "-sass")
    loop = _main_loop(sass)
    count = lambda lines, pat: sum(bool(re.search(pat, l)) for l in lines)
    allv = sass.splitlines()
    return dict(
        regs=int(re.search(r"REG:(\d+)", res).group(1)), stack=int(re.search(r"STACK:(\d+)", res).group(1)),
        spill_ops=count(allv, r"\b(STL|LDL)\b"), shared=ck.metadata.shared,
        hgmma=count(loop, r"\bHGMMA\b"), hmma=count(loop, r"\bHMMA\b"),
        ld128=count(loop, r"\bLDG(STS)?\.E[A-Z.]*\.128\b") + count(loop, r"\bUTMALDG\b"),
        ld_narrow=count(loop, r"\bLDG\.E(\.U16|\.16)?\s"),
        membar_loop=count(loop, _GPU_FENCE), atom_loop=count(loop, _ATOMIC),
        membar=count(allv, _GPU_FENCE), atom=count(allv, _ATOMIC))


def _report_configs(D, fp16_ops, arch=90):
    """(name, kernel, constexprs, warps, stages, bytes per inner step, FLOPs per inner step) at the defaults."""
    BM, BN, warps, stages = config(D, fp16_ops, arch=arch)
    op = 2 if fp16_ops else 4
    common = dict(D=D, BM=BM, HI="tf32x3")
    chain = dict(common, BN=BN, FP16_OPS=fp16_ops, STAGES=stages, DELAY=0, STALL_BLOCK=-1)
    dk = dict(common, BN=BN, FP16_OPS=fp16_ops, STAGES=stages)
    gemm = 2 * BM * BN * D
    return [
        ("prologue", _prologue_kernel, dict(common, SPLIT=fp16_ops, WRITE_LO=fp16_ops), 4, 1, 0, 0),
        ("forward", _fwd_kernel, chain, warps, stages, 2 * BN * D * op, 2 * gemm),     # k̂_J, V'_J; S, A·V'
        ("backward chain", _bwd_chain_kernel, chain, warps, stages, 2 * BN * D * op, 2 * gemm),   # k̂_I, dV_I
        ("dk rows", _dk_kernel, dict(dk, COLUMNS=False), warps, stages,                # k̂_J (+ lo part), V'_J
         (3 if fp16_ops else 2) * BN * D * op, 3 * gemm),
        ("dk columns", _dk_kernel, dict(dk, COLUMNS=True), warps, stages,              # k̂_I (+ lo part), dV_I
         (3 if fp16_ops else 2) * BN * D * op, 3 * gemm),
    ]


def report(archs=(90, 80), head_dims=(64, 128), dtypes=("bf16", "fp32"), out=print):
    """Compile every default configuration and print one markdown table row per kernel and target."""
    cols = ["kernel", "arch", "dtype", "D", "BM×BN", "warps", "stages", "regs", "spill bytes (STL+LDL)", "shared KB",
            "MMA in main loop", "128-bit loads in loop", "GPU fences / atomics in loop (kernel)",
            "bytes / FLOPs per step", "FLOP/byte"]
    out("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for arch in archs:
        for dtype in dtypes:
            for D in head_dims:
                fp16_ops = dtype != "fp32"
                BM, BN = config(D, fp16_ops, arch=arch)[:2]
                for name, fn, cx, warps, stages, nbytes, flops in _report_configs(D, fp16_ops, arch):
                    r = analyse(fn, arch, cx, fp16_ops, warps, stages)
                    mma = f"{r['hgmma']} HGMMA" if r["hgmma"] else f"{r['hmma']} HMMA" if r["hmma"] else "-"
                    tiles = f"{BM}×{BN}" if nbytes else f"{BM}"
                    step = f"{nbytes // 1024} KB / {flops / 1e6:.1f} M" if nbytes else "-"
                    intensity = f"{flops / nbytes:.0f}" if nbytes else "-"
                    out(f"| {name} | sm_{arch} | {dtype} | {D} | {tiles} | {warps} | {stages} | {r['regs']} | "
                        f"{r['stack']} ({r['spill_ops']}) | {r['shared'] / 1024:.0f} | {mma} | {r['ld128']} | "
                        f"{r['membar_loop']} / {r['atom_loop']} ({r['membar']} / {r['atom']}) | {step} | {intensity} |")


# ---------------------------------------------------------------------------------------------------------------
# benchmark: python kernel.py  (GPU only)


def _bench():
    import datetime
    import sys

    if not torch.cuda.is_available() or triton is None or _interpreting():
        sys.exit("kernel.py benchmark: needs a CUDA GPU, triton, and TRITON_INTERPRET unset")
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    print(f"# LUCID kernel benchmark\n\n{torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {triton.__version__}, {datetime.date.today()}. B=1, H=8, bf16, causal. Times in ms.\n")
    print("self-check (fp32 and bf16, D=64 and 128):",
          [selfcheck("cuda", dt, D) or "ok" for dt in (torch.float32, torch.bfloat16) for D in (64, 128)], "\n")
    cols = ["D", "T", "sdpa fwd", "solve fwd", "lucid fwd", "sdpa f+b", "lucid f+b", "torch solve fwd",
            "sdpa f+b MiB", "lucid f+b MiB", "lucid/sdpa fwd", "lucid/sdpa f+b"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))

    def peak(fn):
        torch.cuda.synchronize(), torch.cuda.reset_peak_memory_stats()
        fn(), torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20

    for D in (64, 128):
        for T in [1024 * 2**i for i in range(8)]:
            q, k, v = (torch.randn(1, 8, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            do = torch.randn_like(q)
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
                lucid_fwd = lambda: F.scaled_dot_product_attention(q, k, precondition(k, v), is_causal=True)
                sdpa_fb = lambda: torch.autograd.backward(sdpa(), do)
                lucid_fb = lambda: torch.autograd.backward(lucid_fwd(), do)
                with torch.no_grad():
                    row = [do_bench(sdpa), do_bench(lambda: precondition(k, v)), do_bench(lucid_fwd)]
                row += [do_bench(sdpa_fb, grad_to_none=(q, k, v)), do_bench(lucid_fb, grad_to_none=(q, k, v))]
                if T <= 32768:
                    with torch.no_grad():
                        import lucid   # the PyTorch fallback, for comparison only
                        row.append(do_bench(lambda: lucid.precondition(k, v, impl="torch")))
                else:
                    row.append(float("nan"))
                q.grad = k.grad = v.grad = None
                row += [peak(sdpa_fb), peak(lucid_fb)]
            row += [row[2] / row[0], row[4] / row[3]]
            print(f"| {D} | {T} | " + " | ".join(f"{x:.3f}" if i < 6 else f"{x:.0f}" if i < 8 else f"{x:.2f}"
                                                for i, x in enumerate(row)) + " |", flush=True)
            del q, k, v, do
            torch.cuda.empty_cache()


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="The LUCID solve kernel: benchmark against SDPA (GPU), or report "
                                                 "what the compiler makes of it (any machine).")
    parser.add_argument("--report", action="store_true", help="compile every kernel for sm_90 and sm_80 ahead of time "
                        "and print registers, spills, shared memory, MMA kind, fences and atomics (no GPU needed)")
    args = parser.parse_args()
    if args.report:
        if triton is None or _interpreting():
            parser.exit(1, "kernel.py --report: needs triton, and TRITON_INTERPRET unset (the compiler, not the "
                           "interpreter)\n")
        report()
    else:
        _bench()
