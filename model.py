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
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.arange(start, start + length, device=device, dtype=torch.float32)[:, None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs (x_m, x_{m+D/2}) of x (B, H, T, D) by the position's angle."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    x1, x2 = x.to(dtype).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def causal_attention(q, k, v):
    """
    Softmax attention of q (B, H, C, D) over k, v (B, Hkv, S, D) where the C queries are the last C of the S
    positions: the causal mask is aligned bottom-right (query c sees keys j ≤ S − C + c). SDPA's is_causal is
    aligned top-left when C ≠ S, which would let a decoded token see only the first key.
    """
    C, S = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if C == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if C == 1:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    mask = torch.ones(C, S, dtype=torch.bool, device=q.device).tril(diagonal=S - C)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class KVCache:
    """
    What a forward needs to continue a sequence: per layer the post-RoPE keys and the values (for LUCID the solved
    V', so a new token costs one pass over the cache and earlier rows are never solved again), and the last token
    (for the token shift).
    """

    def __init__(self, n_layer):
        self.k = [None] * n_layer      # each (B, Hkv, len, D)
        self.v = [None] * n_layer
        self.len = 0
        self.last_token = None         # (B,)

    def past(self, layer):
        return self.k[layer], self.v[layer]

    def append(self, layer, k, v):
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=2)
            v = torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v


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
        past_k, past_v = cache.past(self.layer) if cache is not None else (None, None)
        if self.attn == "lucid":  # the switch: precondition the values, V' = L⁻¹V, against the cached rows if any
            if past_k is None:
                v = lucid.precondition(k, v, impl=self.lucid_impl)
            else:
                v = lucid.precondition_chunk(k, v, past_k, past_v)
        if cache is not None:
            k, v = cache.append(self.layer, k, v)                                                # (B, Hkv, S, D)
        y = causal_attention(q, k, v)                                                            # (B, H, T, D)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


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
    h: (B, T, C), weight: (V, C), targets: (B, T).
    """
    keep = targets != -100
    h, targets = h[keep], targets[keep]                                                       # (N, C), (N,)
    if targets.numel() == 0:
        return h.sum() * 0.0

    def chunk_loss(h_chunk, t_chunk):
        logits = h_chunk @ weight.t()                                                         # (rows, V)
        return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), t_chunk, reduction="sum")

    total = sum(checkpoint(chunk_loss, h[i:i + chunk_rows], targets[i:i + chunk_rows], use_reentrant=False)
                for i in range(0, len(targets), chunk_rows))
    return total / len(targets)


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
        x = self.wte(idx)                                                                     # (B, T, C)
        if self.shift is not None:
            prev = torch.cat([idx.new_zeros(B, 1), idx[:, :-1]], dim=1)                         # previous token id
            if start > 0:
                prev[:, 0] = cache.last_token
            prev_emb = self.wte(prev)
            if start == 0:
                prev_emb[:, 0] = 0.0                                                           # nothing before token 0
            x = x + self.shift(prev_emb)
        rope = None
        if self.config.pos == "rope":
            rope = rope_angles(start, T, self.config.n_embd // self.config.n_head, self.config.rope_theta, idx.device)
        for block in self.blocks:
            x = block(x, rope, cache)
        if cache is not None:
            cache.len += T
            cache.last_token = idx[:, -1]
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

    @torch.no_grad()
    def prefill_chunked(self, idx, chunk_size):
        """The hidden states of forward_hidden(idx), computed chunk_size tokens at a time against a growing cache."""
        cache = KVCache(len(self.blocks))
        return torch.cat([self.forward_hidden(idx[:, i:i + chunk_size], cache)
                          for i in range(0, idx.shape[1], chunk_size)], dim=1)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Continue idx (B, T) by max_new_tokens tokens using a KV cache. top_k=1 (or temperature=0) is greedy."""
        cache = KVCache(len(self.blocks))
        logits = self.lm_head(self.forward_hidden(idx, cache)[:, -1])                        # (B, vocab)
        for step in range(max_new_tokens):
            if temperature == 0 or top_k == 1:
                idx_next = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                idx_next = torch.multinomial(F.softmax(logits.float(), dim=-1), num_samples=1)
            idx = torch.cat([idx, idx_next], dim=1)
            if step + 1 < max_new_tokens:
                logits = self.lm_head(self.forward_hidden(idx_next, cache)[:, -1])
        return idx

    def configure_optimizer(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with weight decay on matrices (not on norms)."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")


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
