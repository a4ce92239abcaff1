"""model.py: the softmax/LUCID switch, cached generation, chunked prefill, the chunked loss."""

import pytest
import torch
import torch.nn.functional as F

import lucid
from model import GPT, GPTConfig, causal_attention, cross_entropy_chunked


def tiny_config(**overrides):
    args = dict(block_size=64, vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, attn="lucid",
                pos="rope", token_shift=True, lucid_impl="torch")
    args.update(overrides)
    return GPTConfig(**args)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(tiny_config(**overrides)).double().eval()


CASES = [(attn, pos, B) for attn in ("softmax", "lucid") for pos in ("rope", "none") for B in (1, 3)]


@pytest.mark.parametrize("attn,pos,B", CASES, ids=[f"{a}-{p}-B{b}" for a, p, b in CASES])
def test_cached_greedy_generation_equals_full_forward_argmax(attn, pos, B):
    model = tiny_model(attn=attn, pos=pos)
    idx = torch.randint(0, 97, (B, 13), generator=torch.Generator().manual_seed(B))
    out = model.generate(idx, max_new_tokens=15, top_k=1)
    expected = idx
    for _ in range(15):                                     # no cache: the whole sequence through the model each step
        logits, _ = model(expected)
        expected = torch.cat([expected, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("attn", ["softmax", "lucid"])
@pytest.mark.parametrize("chunk", [1, 5, 16], ids=lambda c: f"C{c}")
def test_prefill_chunked_equals_full_forward(attn, chunk):
    model = tiny_model(attn=attn, pos="rope")
    idx = torch.randint(0, 97, (2, 37), generator=torch.Generator().manual_seed(0))
    full = model.forward_hidden(idx)
    chunked = model.prefill_chunked(idx, chunk)
    assert (full - chunked).abs().max().item() < 1e-10


def test_softmax_branch_is_sdpa_and_lucid_branch_is_lucid_attention():
    model = tiny_model(attn="softmax", pos="none", token_shift=False)
    attn = model.blocks[0].attn
    x = torch.randn(2, 21, 64, dtype=torch.float64)
    B, T, C = x.shape
    q = attn.c_q(x).view(B, T, 4, 16).transpose(1, 2)
    k, v = attn.c_kv(x).view(B, T, 2, 2, 16).permute(2, 0, 3, 1, 4)
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    expected = attn.c_proj(sdpa.transpose(1, 2).reshape(B, T, C))
    assert torch.allclose(attn(x), expected, atol=1e-12)
    attn.attn = "lucid"                                     # the same weights through the other branch
    expected = attn.c_proj(lucid.lucid_attention(q, k, v, impl="torch").transpose(1, 2).reshape(B, T, C))
    assert torch.allclose(attn(x), expected, atol=1e-12)


def test_same_weights_load_into_both_attentions():
    softmax = tiny_model(attn="softmax")
    lucid_model = tiny_model(seed=1, attn="lucid")
    lucid_model.load_state_dict(softmax.state_dict(), strict=True)
    idx = torch.randint(0, 97, (1, 30))
    h_soft, h_lucid = softmax.forward_hidden(idx), lucid_model.forward_hidden(idx)
    assert torch.allclose(h_soft[:, 0], h_lucid[:, 0])      # token 0: V' = V, so the two agree exactly
    assert not torch.allclose(h_soft, h_lucid)              # later tokens: the preconditioner changes the output


@pytest.mark.parametrize("C,S", [(1, 9), (4, 9), (9, 9)], ids=["decode", "chunk", "prefill"])
def test_causal_attention_is_bottom_right_aligned(C, S):
    q = torch.randn(2, 4, C, 8, dtype=torch.float64)
    k, v = torch.randn(2, 2, S, 8, dtype=torch.float64), torch.randn(2, 2, S, 8, dtype=torch.float64)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = q @ kk.transpose(-1, -2) / 8 ** 0.5
    visible = torch.arange(S)[None, :] <= (S - C + torch.arange(C))[:, None]   # query c sits at position S − C + c
    expected = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ vv
    assert torch.allclose(causal_attention(q, k, v), expected, atol=1e-12)


def test_cross_entropy_chunked_matches_full_logits():
    torch.manual_seed(0)
    h = torch.randn(3, 17, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (3, 17))
    targets[:, ::3] = -100
    loss = cross_entropy_chunked(h, w, targets, chunk_rows=5)
    ref = F.cross_entropy((h @ w.t()).view(-1, 11), targets.view(-1), ignore_index=-100)
    assert torch.allclose(loss, ref)
    g = torch.autograd.grad(loss, (h, w))
    g_ref = torch.autograd.grad(ref, (h, w))
    assert all(torch.allclose(a, b) for a, b in zip(g, g_ref))


def test_forward_returns_loss_without_logits_and_last_logits_without_targets():
    model = tiny_model()
    idx = torch.randint(0, 97, (2, 10))
    logits, loss = model(idx)
    assert logits.shape == (2, 1, 97) and loss is None
    logits, loss = model(idx, idx)
    assert logits is None and loss.ndim == 0 and torch.isfinite(loss)


@pytest.mark.parametrize("overrides,message", [
    (dict(attn="linear"), "attn must be"), (dict(pos="alibi"), "pos must be"),
    (dict(n_embd=60, n_head=8), "divisible by n_head"), (dict(n_kv_head=3), "divisible by n_kv_head"),
    (dict(lucid_impl="cuda"), "lucid_impl"),
], ids=["attn", "pos", "n_embd", "n_kv_head", "lucid_impl"])
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


@pytest.mark.parametrize("attn", ["softmax", "lucid"])
def test_bf16_autocast_cache_paths_agree_with_full_forward(attn):
    """Under bf16 autocast the cache holds bf16 keys and V'; chunked prefill still tracks the full forward."""
    torch.manual_seed(0)
    model = GPT(tiny_config(attn=attn)).eval()                               # fp32 weights, bf16 matmuls
    idx = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = model.forward_hidden(idx)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            full = model.forward_hidden(idx)
            chunked = model.prefill_chunked(idx, 9)
            out = model.generate(idx[:, :20], max_new_tokens=3, top_k=1)
    assert out.shape == (2, 23)
    rel = lambda x: ((x.float() - exact).norm() / exact.norm()).item()
    assert rel(full) < 3e-2 and rel(chunked) < 3e-2, (rel(full), rel(chunked))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_model_with_kernel_matches_torch_path_on_gpu():
    """The same LUCID model under bf16 autocast, solve by the Triton kernel vs the PyTorch path: loss and gradients."""
    torch.manual_seed(0)
    results = []
    for impl in ("triton", "torch"):
        torch.manual_seed(0)
        model = GPT(tiny_config(n_embd=256, n_head=4, n_kv_head=2, lucid_impl=impl, block_size=1024)).cuda()
        assert lucid.which_impl(torch.empty(1, 2, 8, 64, device="cuda", dtype=torch.bfloat16),
                                torch.empty(1, 2, 8, 64, device="cuda", dtype=torch.bfloat16), impl) == impl
        idx = torch.randint(0, 97, (2, 1000), generator=torch.Generator().manual_seed(1)).cuda()
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            _, loss = model(idx, idx)
        loss.backward()
        results.append((loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    (loss_k, grad_k), (loss_t, grad_t) = results
    assert abs(loss_k - loss_t) < 1e-2 * abs(loss_t)
    assert ((grad_k - grad_t).norm() / grad_t.norm()).item() < 5e-2


# -----------------------------------------------------------------------------
# FLOPs and memory accounting (what train.py prints at start)

def test_flops_per_token_hand_computed_and_dense_part_counted_by_torch():
    from torch.utils.flop_counter import FlopCounterMode
    from model import flops_per_token
    # 2 layers, d = 64, 4 query / 2 KV heads of 16, SwiGLU 192, vocab 97, token shift, T = 128
    cfg = tiny_config(block_size=128, mlp_hidden=192, attn="lucid")
    f = flops_per_token(cfg, 128)
    # dense: 6 x (per layer: c_q 64·64 + c_kv 64·64 + c_proj 64·64 + SwiGLU 3·64·192 = 49152; x 2 layers; shift 64·64;
    # lm_head 97·64)
    assert f["dense"] == 6 * (2 * 49152 + 4096 + 6208)
    # attention: per token, layer and head: q·k and a·v over the causal half (64 of 128 keys), 16 dims, 2 FLOPs each
    assert f["attention"] == 3 * 2 * 4 * (2 * 64 * 16 * 2)                # x3 forward + backward, x2 layers, x4 heads
    # LUCID solve: per KV head E = exp(k̂·k̂) and the substitution, each over the same causal half
    assert f["lucid"] == 3 * 2 * 2 * (2 * 64 * 16 * 2)
    assert flops_per_token(tiny_config(block_size=128, mlp_hidden=192, attn="softmax"), 128)["lucid"] == 0
    # torch's own count of the matmuls of one forward + backward = dense + the loss chunk's recomputed logits
    model = GPT(tiny_config(block_size=128, mlp_hidden=192, attn="softmax", pos="none"))
    x = torch.randint(0, 97, (2, 128), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(x, x)[1].backward()
    counted = counter.get_flop_counts()["Global"][torch.ops.aten.mm]
    assert counted == 2 * 128 * (f["dense"] + 2 * 97 * 64)


@pytest.mark.parametrize("recompute", [True, False], ids=["checkpointed", "plain"])
def test_memory_budget_hand_computed(recompute):
    from model import memory_budget
    cfg = tiny_config(block_size=128, mlp_hidden=192, attn="lucid", activation_checkpointing=recompute)
    b = memory_budget(cfg, batch_size=2, T=128, act_bytes=4)
    n_params = sum(p.numel() for p in GPT(cfg).parameters())
    assert b["params_optimizer"] == 16 * n_params
    assert memory_budget(cfg, 2, 128, act_bytes=4, shards=4)["params_optimizer"] == 4 * n_params
    # one block, per token: 4 bytes x (6·64 + 3·2·16 + 3·192) + fp32 softmax statistics 4·4 + the fp32 solve 4·(3·32 + 2)
    block = 4 * (384 + 96 + 576) + 16 + 392
    tokens = 2 * 128
    if recompute:
        assert b["activations"] == 2 * tokens * 64 * 4 and b["recompute"] == tokens * block
    else:
        assert b["activations"] == 2 * tokens * (block + 64 * 4) and b["recompute"] == 0
    assert b["logits"] == tokens * 97 * (4 + 4 + 4)                     # fewer rows than one 8192-row chunk
    assert b["total"] == b["params_optimizer"] + b["activations"] + b["recompute"] + b["logits"]


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = GPT(tiny_config()).double()
    recomputed = GPT(tiny_config(activation_checkpointing=True)).double()
    recomputed.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 97, (2, 33), generator=torch.Generator().manual_seed(1))
    targets = idx.clone()
    targets[0, :5] = -100                                                 # ignored positions
    for model in (plain, recomputed):
        model(idx, targets)[1].backward()
    for (name, p), q in zip(plain.named_parameters(), recomputed.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-12), name


def test_precondition_op_matches_lucid_precondition_forward_and_backward():
    from model import precondition_op
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, 2, 37, 16, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 37, 16, generator=g, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(2, 2, 37, 16, generator=g, dtype=torch.float64)
    expected = lucid.precondition(k, v, impl="naive")
    dk, dv = torch.autograd.grad(expected, (k, v), dout)
    out = precondition_op(k, v, "torch")
    dk_op, dv_op = torch.autograd.grad(out, (k, v), dout)
    for a, b in ((out, expected), (dk_op, dk), (dv_op, dv)):
        assert (a - b).abs().max().item() < 1e-10
