"""
A small GPT with a one-line switch between softmax and LUCID attention (GPTConfig.attn = "softmax" | "lucid").

Token embedding (+ an optional token shift), n_layer pre-norm blocks of causal self-attention with grouped-query
heads and a SwiGLU MLP, RMSNorm, RoPE or no positional encoding, no biases, tied input/output embeddings.
The only difference between the two attentions is one `if` in CausalSelfAttention.forward: LUCID replaces the
values V by V' = L⁻¹V (lucid.py) before the same causal softmax attention runs.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import lucid


@dataclass
class GPTConfig:
    block_size: int = 1024      # training sequence length; RoPE / NoPE models may run longer at inference
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 12         # grouped-query attention when n_kv_head < n_head
    n_embd: int = 768
    mlp_hidden: int = 0         # SwiGLU width; 0 means 8/3·n_embd rounded up to a multiple of 64
    attn: str = "softmax"       # "softmax" | "lucid"
    pos: str = "rope"           # "rope" | "none"
    rope_theta: float = 10000.0
    token_shift: bool = False   # add a learned map of the previous token's embedding (binds a value to its key)
    lucid_impl: str = "auto"    # "auto" | "torch" | "triton" | "naive", see lucid.precondition
    activation_checkpointing: bool = False  # training keeps only each block's input; the backward recomputes the block

    def __post_init__(self):
        if self.attn not in ("softmax", "lucid"):
            raise ValueError(f"attn must be 'softmax' or 'lucid', got {self.attn!r}")
        if self.pos not in ("rope", "none"):
            raise ValueError(f"pos must be 'rope' or 'none', got {self.pos!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(f"n_head={self.n_head} must be divisible by n_kv_head={self.n_kv_head}")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2 != 0:
            raise ValueError("RoPE needs an even head size")
        if self.lucid_impl not in lucid.IMPLS:
            raise ValueError(f"lucid_impl must be one of {lucid.IMPLS}, got {self.lucid_impl!r}")
        if self.mlp_hidden == 0:
            self.mlp_hidden = 64 * math.ceil(8 * self.n_embd / 3 / 64)


def rope_angles(start, length, head_dim, theta, device):
    """cos, sin of the rotation angles for positions start .. start+length-1, each (length, head_dim/2), fp32."""
    return rope_angles_at(torch.arange(start, start + length, device=device), head_dim, theta)


def rope_angles_at(positions, head_dim, theta):
    """cos, sin of the rotation angles for integer positions of any shape (...,), each (..., head_dim/2), fp32."""
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs (x_m, x_{m+D/2}) of x (B, H, T, D) by the position's angle."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    x1, x2 = x.to(dtype).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def causal_attention(q, k, v, start=None):
    """
    Softmax attention of q (B, H, C, D) over k, v (B, Hkv, S, D) where the C queries are the last C of the S
    positions: the causal mask is aligned bottom-right (query c sees keys j ≤ S − C + c). SDPA's is_causal is
    aligned top-left when C ≠ S, which would let a decoded token see only the first key.
    start (B,), optional: row b's sequence begins at position start[b] (left padding); earlier keys are masked out.
    A padding query sees only itself, so its (unused) output stays finite.
    """
    C, S = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if start is not None:
        pos = torch.arange(S, device=q.device)
        query_pos = (S - C + torch.arange(C, device=q.device))[:, None]                      # (C, 1)
        mask = (pos <= query_pos) & ((pos >= start.view(-1, 1, 1, 1)) | (pos == query_pos))   # (B, 1, C, S)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    if C == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if C == 1:  # decode: the G query heads of a KV head become G queries of that head (no GQA support needed)
        B, H, _, D = q.shape
        y = F.scaled_dot_product_attention(q.reshape(B, k.shape[1], H // k.shape[1], D), k, v)   # (B, Hkv, G, D)
        return y.reshape(B, H, 1, D)
    mask = torch.ones(C, S, dtype=torch.bool, device=q.device).tril(diagonal=S - C)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class KVCache:
    """
    What a forward needs to continue a sequence, in buffers of max_len positions allocated once (at a layer's first
    write, in the dtype of its keys) and written in place: per layer the post-RoPE keys, the values (for LUCID the
    solved V', so a new token costs one pass over the cache and earlier rows are never solved again) and, for LUCID,
    rstd_j = (mean(k_j²) + eps)^-1/2 of every cached key, so k̂_j = k_j·rstd_j needs no renormalisation. rstd is
    kept in fp32 (one scalar per key, 4 bytes next to 2·D bytes of bf16 key): it is the same fp32 value the prefill
    computes, so the decode sees exactly the prefill's k̂; a bf16 rstd (relative rounding up to 2⁻⁸) would shift the
    exponent s·k̂_t·k̂_j (up to √d = 8 at d = 64) by up to 0.03, i.e. A_ij by up to 3%. Storing k̂ itself would cost
    a second read of D values per key in the decode step; with rstd one read of k_j serves both q·k_j and k̂_t·k_j.
    start (B,), optional: left padding, row b's sequence begins at position start[b] (a ragged batch); positions
    before it are left out of the solve and the attention. Also holds the last token (for the token shift).
    """

    def __init__(self, n_layer, batch_size, max_len, start=None):
        if max_len < 1:
            raise ValueError(f"max_len must be at least 1, got {max_len}")
        if start is not None and tuple(start.shape) != (batch_size,):
            raise ValueError(f"start must have shape ({batch_size},), got {tuple(start.shape)}")
        self.batch_size, self.max_len, self.start = batch_size, max_len, start
        self.k = [None] * n_layer      # each (B, Hkv, max_len, D)
        self.v = [None] * n_layer
        self.rstd = [None] * n_layer   # each (B, Hkv, max_len, 1), fp32 (fp64 for a float64 model); LUCID only
        self.len = 0
        self.last_token = None         # (B,)
        self.pos = None                # (1,) device copy of len, only in a step for a CUDA graph (static_decode_step)
        self.token_buffer = None       # (B,) where such a step keeps the last token

    def check(self, idx):
        """A clear error before a forward of idx (B, T) that this cache cannot hold."""
        B, T = idx.shape
        if B != self.batch_size:
            raise ValueError(f"batch of {B} rows does not match the KV cache's batch of {self.batch_size}")
        if self.len + T > self.max_len:
            raise ValueError(f"KV cache overflow: {self.len} cached + {T} new tokens > max_len={self.max_len}")

    def past(self, layer):
        """Views of the cached rows: keys, values, rstd (B, Hkv, len, ·); None before the first write."""
        if self.k[layer] is None:
            return None, None, None
        rstd = self.rstd[layer][:, :, :self.len] if self.rstd[layer] is not None else None
        return self.k[layer][:, :, :self.len], self.v[layer][:, :, :self.len], rstd

    def append(self, layer, k, v, rstd=None):
        """Write T new rows at position len (len itself moves once all layers ran); views of all len + T rows."""
        B, Hkv, T, D = k.shape
        if self.pos is not None:         # a step for a CUDA graph: one row, written where the device says
            self.k[layer].index_copy_(2, self.pos, k)
            self.v[layer].index_copy_(2, self.pos, v)
            if rstd is not None:
                self.rstd[layer].index_copy_(2, self.pos, rstd.to(self.rstd[layer].dtype))
            return None, None
        if self.k[layer] is None:
            self.k[layer] = k.new_zeros(B, Hkv, self.max_len, D)
            self.v[layer] = v.new_zeros(B, Hkv, self.max_len, D)
            if rstd is not None:
                self.rstd[layer] = rstd.new_zeros(B, Hkv, self.max_len, 1)
        end = self.len + T
        self.k[layer][:, :, self.len:end] = k
        self.v[layer][:, :, self.len:end] = v
        if rstd is not None:
            self.rstd[layer][:, :, self.len:end] = rstd
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


@torch.library.custom_op("lucid_gpt::precondition", mutates_args=())
def precondition_op(k: torch.Tensor, v: torch.Tensor, impl: str) -> torch.Tensor:
    """
    lucid.precondition as one opaque operator for torch.compile: the graph calls it without tracing into it (its
    blocked loops or the Triton kernel's launch would otherwise be unrolled, one copy per length), and without a graph
    break, so activation checkpointing of a block and the rest of the model still compile into one graph.
    """
    return lucid.precondition(k, v, impl=impl).contiguous()


@torch.library.custom_op("lucid_gpt::precondition_backward", mutates_args=())
def precondition_backward_op(k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor,
                             impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """dk, dv of precondition_op: the solve runs again under autograd (its analytic backward needs its own saved
    tensors), so a compiled LUCID block pays one extra forward solve, about 1/8 of the attention's FLOPs at 32/4 heads."""
    with torch.enable_grad():
        k, v = k.detach().requires_grad_(), v.detach().requires_grad_()
        dk, dv = torch.autograd.grad(lucid.precondition(k, v, impl=impl), (k, v), grad)
    return dk.contiguous(), dv.contiguous()


# What the compiler assumes about the outputs: shapes, dtypes and a contiguous layout, which the real ops guarantee.
# (empty_like would copy the input's strides, and inductor may lay out k and v head-interleaved: the real gradients
# would then not match the promised strides.)
@precondition_op.register_fake
def _(k, v, impl):
    return v.new_empty(v.shape)


@precondition_backward_op.register_fake
def _(k, v, grad, impl):
    return k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_precondition(ctx, inputs, output):
    k, v, ctx.impl = inputs
    ctx.save_for_backward(k, v)


def _precondition_grad(ctx, grad):
    k, v = ctx.saved_tensors
    return *precondition_backward_op(k, v, grad.contiguous(), ctx.impl), None


precondition_op.register_autograd(_precondition_grad, setup_context=_setup_precondition)


class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.attn, self.lucid_impl = config.attn, config.lucid_impl
        self.c_q = nn.Linear(config.n_embd, config.n_head * self.head_dim, bias=False)
        self.c_kv = nn.Linear(config.n_embd, 2 * config.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, rope=None, cache=None):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)                # (B, H, T, D)
        k, v = self.c_kv(x).view(B, T, 2, self.n_kv_head, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, Hkv, T, D)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is None:
            if self.attn == "lucid":  # the switch: precondition the values, V' = L⁻¹V
                if torch.compiler.is_compiling():    # one opaque operator in the graph (see precondition_op)
                    v = precondition_op(k, v, self.lucid_impl)
                else:
                    v = lucid.precondition(k, v, impl=self.lucid_impl)
            y = causal_attention(q, k, v)                                                        # (B, H, T, D)
        else:
            y = self.forward_cached(q, k, v, cache)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))

    def forward_cached(self, q, k, v, cache):
        """Attention of T new tokens q, k, v (post-RoPE) after the cache's rows; writes their rows into the cache."""
        if cache.pos is not None:        # a step for a CUDA graph: the fused kernel reads the length on the device
            import kernel
            lucid_solve = self.attn == "lucid"
            y, vp, rstd = kernel.decode_step(q, k, v, cache.k[self.layer], cache.v[self.layer], cache.rstd[self.layer],
                                             cache.pos, cache.start, lucid_solve=lucid_solve)
            cache.append(self.layer, k, vp, rstd if lucid_solve else None)
            return y
        if self.attn == "softmax":
            k, v = cache.append(self.layer, k, v)                                                # (B, Hkv, S, D)
            return causal_attention(q, k, v, cache.start)
        k_cache = cache.k[self.layer]
        if q.shape[2] == 1 and k_cache is not None:      # one token: the fused step reads each cached row once
            y, vp, rstd = lucid.decode_step(q, k, v, k_cache, cache.v[self.layer], cache.rstd[self.layer], cache.len,
                                            cache.start, impl=self.lucid_impl)
            cache.append(self.layer, k, vp, rstd)
            return y
        # a chunk (or the prompt): solve it against the cached rows and within itself, V' = L⁻¹V
        if cache.start is not None:      # padding rows get v = 0, hence v' = 0: they add nothing to later rows
            pos = cache.len + torch.arange(k.shape[2], device=k.device)
            v = v.masked_fill(pos.view(1, 1, -1, 1) < cache.start.view(-1, 1, 1, 1), 0.0)
        past_k, past_vp, past_rstd = cache.past(self.layer)
        if past_k is None:
            vp = lucid.precondition(k, v, impl=self.lucid_impl)
        else:
            vp = lucid.precondition_chunk(k, v, past_k, past_vp, rstd_past=past_rstd)
        _, rstd = lucid.rms_normalize(k)
        k, vp = cache.append(self.layer, k, vp, rstd)                                            # (B, Hkv, S, D)
        return causal_attention(q, k, vp, cache.start)


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 2 * config.mlp_hidden, bias=False)
        self.c_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=False)

    def forward(self, x):
        gate, up = self.c_fc(x).chunk(2, dim=-1)
        return self.c_proj(F.silu(gate) * up)


class Block(nn.Module):

    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = nn.RMSNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.RMSNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, cache=None):
        x = x + self.attn(self.ln_1(x), rope, cache)
        return x + self.mlp(self.ln_2(x))


def cross_entropy_chunked(h, weight, targets, chunk_rows=8192):
    """
    Mean cross-entropy of logits h @ weightᵀ over positions whose target is not -100, without ever holding more
    than chunk_rows × vocab logits: each chunk's logits are recomputed in the backward (checkpoint).
    h: (B, T, C), weight: (V, C), targets: (B, T). All shapes are fixed by (B, T): no boolean indexing, so
    torch.compile traces it without a graph break; ignored positions add 0 to the sum.
    """
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)                              # (B·T, C), (B·T,)

    def chunk_loss(h_chunk, t_chunk):
        logits = h_chunk @ weight.t()                                                         # (rows, V)
        return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), t_chunk,
                               ignore_index=-100, reduction="sum")

    total = sum(checkpoint(chunk_loss, h[i:i + chunk_rows], targets[i:i + chunk_rows], use_reentrant=False)
                for i in range(0, len(targets), chunk_rows))
    return total / (targets != -100).sum().clamp(min=1)


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.shift = nn.Linear(config.n_embd, config.n_embd, bias=False) if config.token_shift else None
        self.blocks = nn.ModuleList([Block(config, layer) for layer in range(config.n_layer)])
        self.ln_f = nn.RMSNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # residual projections scaled down with depth, as in GPT-2
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward_hidden(self, idx, cache=None):
        """idx (B, T) -> final normalised hidden states (B, T, C). With a cache, idx continues the cached sequence."""
        B, T = idx.shape
        start = cache.len if cache is not None else 0
        if cache is not None:
            cache.check(idx)
        # position of each token in its own sequence; with left padding (a ragged batch) row b starts at cache.start[b]
        pos = None
        if cache is not None and (cache.start is not None or cache.pos is not None):
            first = cache.pos if cache.pos is not None else start     # a (1,) tensor in a step for a CUDA graph
            pos = first + torch.arange(T, device=idx.device)[None]                                  # (1, T)
            if cache.start is not None:
                pos = pos - cache.start.view(B, 1)                                                # (B, T)
        x = self.wte(idx)                                                                     # (B, T, C)
        if self.shift is not None:
            prev = torch.cat([idx.new_zeros(B, 1), idx[:, :-1]], dim=1)                         # previous token id
            if start > 0:
                prev[:, 0] = cache.last_token
            prev_emb = self.wte(prev)
            if pos is not None:
                prev_emb = prev_emb.masked_fill((pos == 0)[..., None], 0.0)                     # nothing before token 0
            elif start == 0:
                prev_emb[:, 0] = 0.0                                                           # nothing before token 0
            x = x + self.shift(prev_emb)
        rope = None
        head_dim = self.config.n_embd // self.config.n_head
        if self.config.pos == "rope" and pos is not None:
            cos, sin = rope_angles_at(pos.clamp(min=0), head_dim, self.config.rope_theta)     # (B, T, D/2)
            rope = cos[:, None], sin[:, None]                                              # (B or 1, 1, T, D/2)
        elif self.config.pos == "rope":
            rope = rope_angles(start, T, head_dim, self.config.rope_theta, idx.device)
        recompute = self.config.activation_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for block in self.blocks:
            x = checkpoint(block, x, rope, use_reentrant=False) if recompute else block(x, rope, cache)
        if cache is not None:
            cache.len += T
            cache.last_token = idx[:, -1]
            if cache.pos is not None:    # a step for a CUDA graph: the state moves on inside the captured buffers
                cache.pos += T
                cache.last_token = cache.token_buffer.copy_(idx[:, -1])
        return self.ln_f(x)

    def forward(self, idx, targets=None):
        """
        As in nanoGPT: with targets (B, T) (-100 = ignore) returns (None, mean loss), computed without materialising
        (B, T, vocab) logits; without targets returns (logits of the last position (B, 1, vocab), None).
        """
        h = self.forward_hidden(idx)
        if targets is None:
            return self.lm_head(h[:, [-1], :]), None
        return None, cross_entropy_chunked(h, self.lm_head.weight, targets)

    def new_cache(self, idx, max_len, lengths=None):
        """
        An empty KVCache of max_len positions for the batch idx (B, T). lengths (B,), optional: a ragged batch, row b's
        prompt is its last lengths[b] tokens (left padding); the padding is left out of the solve and the attention,
        so each row comes out as if it ran alone.
        """
        B, T = idx.shape
        if T < 1:
            raise ValueError("the prompt must have at least one token")
        if T > max_len:
            raise ValueError(f"prompt of {T} tokens is longer than max_len={max_len}")
        start = None
        if lengths is not None:
            lengths = torch.as_tensor(lengths, device=idx.device)
            if lengths.shape != (B,) or lengths.is_floating_point():
                raise ValueError(f"lengths must be {B} integers, one per row of idx {tuple(idx.shape)}; "
                                 f"got {tuple(lengths.shape)} {lengths.dtype}")
            if not bool(((lengths >= 1) & (lengths <= T)).all()):
                raise ValueError(f"lengths must lie in 1 .. {T} (the padded prompt length); got {lengths.tolist()}")
            start = (T - lengths).long()
        return KVCache(len(self.blocks), B, max_len, start)

    @torch.no_grad()
    def prefill_chunked(self, idx, chunk_size, lengths=None):
        """
        The hidden states of forward_hidden(idx), computed chunk_size tokens at a time against a KV cache.
        lengths: a left-padded ragged batch, as in new_cache (the states at padding positions are meaningless).
        """
        cache = self.new_cache(idx, idx.shape[1], lengths)
        return torch.cat([self.forward_hidden(idx[:, i:i + chunk_size], cache)
                          for i in range(0, idx.shape[1], chunk_size)], dim=1)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, lengths=None, max_len=None,
                 cuda_graph=False):
        """
        Continue idx (B, T) by max_new_tokens tokens using a static KV cache of max_len positions (default
        T + max_new_tokens). top_k=1 (or temperature=0) is greedy. lengths (B,), optional: a ragged batch given left
        padded, row b's prompt is idx[b, T - lengths[b]:]; each row is continued as if it were alone.
        cuda_graph=True decodes with static_decode_step (one CUDA graph replay per token); off by default.
        """
        needed = idx.shape[1] + max(max_new_tokens - 1, 0)                                  # the last token is not fed
        max_len = needed if max_len is None else max_len
        if needed > max_len:
            raise ValueError(f"{idx.shape[1]} prompt + {max_new_tokens} new tokens do not fit max_len={max_len}")
        cache = self.new_cache(idx, max_len, lengths)
        logits = self.lm_head(self.forward_hidden(idx, cache)[:, -1])                        # (B, vocab)
        step = self.static_decode_step(cache) if cuda_graph and max_new_tokens > 1 else None
        if step is None:
            step = lambda tok: self.lm_head(self.forward_hidden(tok, cache)[:, -1])          # noqa: E731
        for i in range(max_new_tokens):
            if temperature == 0 or top_k == 1:
                idx_next = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                idx_next = torch.multinomial(F.softmax(logits.float(), dim=-1), num_samples=1)
            idx = torch.cat([idx, idx_next], dim=1)
            if i + 1 < max_new_tokens:
                logits = step(idx_next)
        return idx

    def static_decode_step(self, cache):
        """
        Decoding one token without any shape or launch argument that depends on the cache length: the fused kernel
        (for softmax too, without the solve row) reads the length from a device tensor, and rows are written at that
        position in place. On CUDA the step is captured once in a CUDA graph and replayed for every token, so a
        step costs one graph launch instead of several hundred kernel launches from Python. Returns step(tok (B, 1))
        -> logits (B, vocab) (a buffer the next step overwrites), or None, with a one-time warning, when the kernel
        cannot run these inputs (the caller then decodes eagerly). Without CUDA (kernel under TRITON_INTERPRET=1)
        the same step runs uncaptured, which is how the tests check it.
        """
        import kernel
        if cache.k[0] is None or cache.len == 0:
            raise ValueError("static_decode_step continues a prompt: run the prompt through forward_hidden first")
        attn = self.blocks[0].attn
        q = cache.k[0].new_empty(cache.batch_size, attn.n_head, 1, attn.head_dim)           # what a step's q looks like
        if attn.attn == "lucid":
            ok = lucid.which_decode_impl(q, cache.k[0], "triton") == "triton"              # warns if not
        else:
            reason = kernel.decode_supports(q, cache.k[0])
            if reason is not None:
                lucid._warn_once(f"no CUDA-graph decode ({reason}); decoding eagerly")
            ok = reason is None
        if not ok:
            return None
        cache.pos = torch.tensor([cache.len], device=q.device)
        cache.token_buffer = cache.last_token.clone()
        cache.last_token = cache.token_buffer

        def run(tok):
            return self.lm_head(self.forward_hidden(tok, cache)[:, -1])
        if not q.is_cuda:
            return run
        tok = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=q.device)           # the graph's input
        state = cache.len, cache.pos.clone(), cache.token_buffer.clone()

        def restore():  # undo what a warm-up run or the capture did to the position (rows it wrote get rewritten)
            cache.len = state[0]
            cache.pos.copy_(state[1])
            cache.last_token = cache.token_buffer.copy_(state[2])
        side = torch.cuda.Stream(q.device)
        side.wait_stream(torch.cuda.current_stream(q.device))
        with torch.cuda.stream(side):   # warm-up compiles the kernels; it must not run on the capturing stream
            for _ in range(2):
                run(tok)
                restore()
        torch.cuda.current_stream(q.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = run(tok)
        restore()

        def replay(token):
            if cache.len + 1 > cache.max_len:
                raise ValueError(f"KV cache overflow: {cache.len} cached + 1 new token > max_len={cache.max_len}")
            tok.copy_(token)
            graph.replay()
            cache.len += 1
            return logits
        return replay

    def configure_optimizer(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with weight decay on matrices (not on norms)."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")


def flops_per_token(config, T):
    """
    Training FLOPs (forward + backward = 3 × forward) per token at sequence length T, split three ways:
      dense      6 × the parameters of every matmul (attention projections, MLP, token shift, the tied lm_head);
      attention  q·kᵀ and a·v over the causal half of the T×T square: 2·H·D·T per token and layer forward (the full
                 square, as nanoGPT, nanochat and torchtitan count it, would overstate long-context MFU about 2×);
      lucid      the solve V' = L⁻¹V: A = exp(s·k̂k̂ᵀ − √d) and the substitution, each half a T×T square per KV head, so
                 2·Hkv·D·T forward (Hkv/H of the attention's), counted forward + backward like the rest.
    The recomputation of activation checkpointing is not counted (model FLOPs, not hardware FLOPs).
    """
    C, L, H, Hkv = config.n_embd, config.n_layer, config.n_head, config.n_kv_head
    D = C // H
    per_layer = 2 * C * C + 2 * C * Hkv * D + 3 * C * config.mlp_hidden        # c_q + c_proj, c_kv, SwiGLU
    matmul_params = L * per_layer + (C * C if config.token_shift else 0) + config.vocab_size * C
    return {"dense": 6 * matmul_params,
            "attention": L * 3 * 2 * H * D * T,
            "lucid": L * 3 * 2 * Hkv * D * T if config.attn == "lucid" else 0}


def memory_budget(config, batch_size, T, act_bytes=2, shards=1, chunk_rows=8192):
    """
    Estimated peak training memory in bytes on one device, for micro-batches of batch_size × T tokens:
      params_optimizer  fp32 weights, gradients and AdamW's two moments, 16 bytes per parameter (/ shards with FSDP);
      activations       with activation checkpointing each block's input (B·T·C); without, every block's saved
                        tensors;
      recompute         one block's saved tensors while its backward runs (activation checkpointing only): per token
                        act_bytes·(6·C + 3·Hkv·D + 3·mlp_hidden) (norm outputs, q, k, v, rotated q and k, attention
                        output, the residual, the MLP's two halves and product) + 4·H (fp32 softmax statistics), and
                        for LUCID 4·(3·Hkv·D + Hkv) (the fp32 solve's k̂, v, V' and rstd);
      logits            one chunk of the chunked loss: rows × vocab × (act_bytes + 4 + 4), the logits, their fp32 copy
                        and its gradient.
    """
    C, L, H, Hkv = config.n_embd, config.n_layer, config.n_head, config.n_kv_head
    D = C // H
    n_params = L * (2 * C * C + 2 * C * Hkv * D + 3 * C * config.mlp_hidden + 2 * C) + C \
        + (C * C if config.token_shift else 0) + config.vocab_size * C
    tokens = batch_size * T
    block = act_bytes * (6 * C + 3 * Hkv * D + 3 * config.mlp_hidden) + 4 * H
    if config.attn == "lucid":
        block += 4 * (3 * Hkv * D + Hkv)
    if config.activation_checkpointing:
        activations, recompute = L * tokens * C * act_bytes, tokens * block
    else:
        activations, recompute = L * tokens * (block + C * act_bytes), 0
    budget = {"params_optimizer": 16 * n_params // shards, "activations": activations, "recompute": recompute,
              "logits": min(chunk_rows, tokens) * config.vocab_size * (act_bytes + 4 + 4)}
    budget["total"] = sum(budget.values())
    return budget


def load_checkpoint(path, device="cpu"):
    """
    Read a ckpt.pt written by train.py: a dict of tensors and plain values, so it loads with weights_only=True (no
    pickled code runs). A missing, truncated or foreign file is a ValueError that says which.
    """
    import os
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise ValueError(f"could not read checkpoint {path} (truncated, or not written by train.py?): "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "model_args" not in checkpoint:
        raise ValueError(f"{path} is not a checkpoint written by train.py (no 'model' / 'model_args')")
    return checkpoint


def load_model(path, device="cpu", attn=None):
    """
    (model in eval mode, checkpoint info without the weights) from a ckpt.pt. attn="softmax" | "lucid" runs the
    checkpoint with the other attention: both have the same parameters, LUCID adds none.
    """
    checkpoint = load_checkpoint(path, device)
    model_args = dict(checkpoint["model_args"])
    if attn is not None:
        model_args["attn"] = attn
    model = GPT(GPTConfig(**model_args))
    model.load_state_dict(checkpoint["model"])
    info = {k: v for k, v in checkpoint.items() if k not in ("model", "optimizer")}
    return model.to(device).eval(), info
