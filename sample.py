"""
Load a checkpoint written by train.py and generate with the KV cache. For a text model it continues a prompt and
decodes with the checkpoint's tiktoken encoding; for a needle-trained model it shows held-out prompts, the model's
greedy answer and the gold answer.

    python sample.py --ckpt out-text-small/ckpt.pt --start "LUCID attention" --num_samples 2 --max_new_tokens 200
    python sample.py --ckpt out-text-small/ckpt.pt --start FILE:prompt.txt --temperature 0.7 --top_k 50
    python sample.py --ckpt out-tiny/ckpt.pt --num_samples 3 --length 256 --needles 4
    python sample.py --ckpt out-tiny/ckpt.pt --attn softmax        # the same weights with the other attention
"""

import argparse

import numpy as np
import torch

import needle
from model import load_model


def show(tokens, width=24):
    """A short rendering of a long id sequence: its head and its tail."""
    tokens = [int(t) for t in tokens]
    if len(tokens) <= 2 * width:
        return " ".join(map(str, tokens))
    return " ".join(map(str, tokens[:width])) + f" … ({len(tokens) - 2 * width} more) … " + \
        " ".join(map(str, tokens[-width:]))


def bench_decode(device="cuda"):
    """
    Per-token decode latency of one model with softmax and with LUCID attention (the same weights: LUCID adds no
    parameters), at cache lengths 1K .. 128K, batch 1 and 8, in one process: `python sample.py --bench`, GPU only.
    The 1B shape (TinyLlama's): 22 layers, 32 query / 4 KV heads of 64, bf16 weights and cache. The cache is filled with random
    keys and values (latency does not depend on them) instead of a prefill. A step is the whole model on one new
    token plus the logits, run eagerly (softmax: SDPA; LUCID: the fused decode step) and as a CUDA-graph replay
    (both attentions through the fused kernel, softmax without the solve row). The last columns time one layer's
    attention alone: SDPA against the LUCID decode step.
    """
    import datetime
    import sys

    if not torch.cuda.is_available() or not str(device).startswith("cuda"):
        sys.exit("sample.py --bench needs a CUDA GPU")
    import triton
    from triton.testing import do_bench

    import lucid
    from model import GPT, GPTConfig, causal_attention

    torch.manual_seed(0)
    config = GPTConfig(block_size=2048, vocab_size=32000, n_layer=22, n_head=32, n_kv_head=4, n_embd=2048,
                       mlp_hidden=5632, attn="lucid", pos="rope")
    model = GPT(config).to(device=device, dtype=torch.bfloat16).eval()
    Hkv, D = config.n_kv_head, config.n_embd // config.n_head
    lengths = [1024 * 2 ** i for i in range(8)]                                             # 1K .. 128K
    time = lambda fn: do_bench(fn, warmup=50, rep=200)                                      # ms, median

    def set_attn(attn):
        for block in model.blocks:
            block.attn.attn = attn

    print(f"# Decode benchmark: softmax vs LUCID\n\n{torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {triton.__version__}, {datetime.date.today()}. {model.num_params() / 1e9:.2f}B parameters "
          f"({config.n_layer} layers, {config.n_head}/{Hkv} heads of {D}), bf16. Times per token in ms.\n")
    cols = ["B", "cache", "softmax eager", "LUCID eager", "ratio", "softmax graph", "LUCID graph", "ratio",
            "SDPA 1 layer", "LUCID step 1 layer", "ratio"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for B in (1, 8):
        tok = torch.zeros(B, 1, dtype=torch.long, device=device)
        cache = model.new_cache(tok, max_len=lengths[-1] + 1)
        gen = torch.Generator(device=device).manual_seed(0)
        for layer in range(config.n_layer):                                                 # stands in for a prefill
            shape = (B, Hkv, cache.max_len, D)
            cache.k[layer] = torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16)
            cache.v[layer] = torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16)
            cache.rstd[layer] = torch.cat([lucid.rms_normalize(k)[1] for k in cache.k[layer].split(1)])
        cache.last_token = tok[:, 0]
        q = torch.randn(B, config.n_head, 1, D, generator=gen, device=device, dtype=torch.bfloat16)
        k_new, v_new = q[:, :Hkv].contiguous(), q[:, Hkv:2 * Hkv].contiguous()
        rows = {L: [] for L in lengths}
        with torch.no_grad():
            for attn in ("softmax", "lucid"):                                               # eager steps
                set_attn(attn)
                for L in lengths:
                    def step():
                        cache.len = L                                                       # every step writes row L
                        return model.lm_head(model.forward_hidden(tok, cache)[:, -1])
                    rows[L].append(time(step))
            for attn in ("softmax", "lucid"):                                               # CUDA-graph steps
                set_attn(attn)
                cache.len = lengths[0]
                replay = model.static_decode_step(cache)                                    # captured once
                for L in lengths:
                    def step():
                        cache.pos.fill_(L)
                        cache.len = L
                        return replay(tok)
                    rows[L].append(time(step) if replay is not None else float("nan"))
                cache.pos = None                                                            # back to eager steps
            for L in lengths:                                                               # one layer's attention
                k, vp = cache.k[0][:, :, :L], cache.v[0][:, :, :L]
                rows[L].append(time(lambda: causal_attention(q, k, vp)))
                rows[L].append(time(lambda: lucid.decode_step(q, k_new, v_new, cache.k[0], cache.v[0],
                                                              cache.rstd[0], L)))
        print(f"<!-- B={B}: LUCID decode step {lucid.which_decode_impl(q, cache.k[0])} -->")
        for L, (se, le, sg, lg, sa, la) in rows.items():
            print(f"| {B} | {L // 1024}K | {se:.3f} | {le:.3f} | {le / se:.3f} | {sg:.3f} | {lg:.3f} | {lg / sg:.3f} "
                  f"| {sa:.4f} | {la:.4f} | {la / sa:.2f} |", flush=True)
        del cache
        torch.cuda.empty_cache()


def sample_text(model, info, args):
    """num_samples continuations of the --start prompt, decoded with the encoding the model was trained with."""
    import data
    encoding = data.load_encoding(info["config"]["encoding"])
    start = args.start
    if start.startswith("FILE:"):
        with open(start[5:], encoding="utf-8") as f:
            start = f.read()
    ids = encoding.encode(start, allowed_special="all") if start else [encoding.eot_token]
    prompt = torch.tensor(ids, dtype=torch.long, device=args.device)[None].repeat(args.num_samples, 1)
    torch.manual_seed(args.seed)
    out = model.generate(prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None)
    for i, row in enumerate(out[:, len(ids):].tolist()):
        # ids of the padded vocabulary beyond the encoding's own have no text: skipped
        print(f"--- sample {i}\n{start}{encoding.decode([t for t in row if t < encoding.n_vocab])}")


def sample_needles(model, args):
    """Held-out needle prompts, the model's greedy answer and the gold answer."""
    cfg = model.config
    length = args.length or cfg.block_size
    layout = needle.vocab_layout(cfg.vocab_size)
    print(f"vocabulary: filler {layout['filler']}, keys {layout['keys']}, values {layout['values']}, query marker "
          f"{needle.QUERY}")
    correct = 0
    for i in range(args.num_samples):
        rng = needle.sample_rng(args.seed, needle.EVAL, "sample", length, args.needles, i)
        tokens, targets, answer_pos, depths = needle.make_sample(rng, length, args.needles, 1, cfg.vocab_size)
        prompt = torch.from_numpy(tokens[:answer_pos[0] + 1])[None].to(args.device)       # up to the query key
        out = model.generate(prompt, max_new_tokens=1, top_k=1)
        answer, gold = int(out[0, -1]), int(targets[answer_pos[0]])
        correct += answer == gold
        key = int(tokens[answer_pos[0]])
        where = int(np.flatnonzero(tokens[:answer_pos[0] - 1] == key)[0])
        print(f"\nsample {i}: {length} tokens, {args.needles} needles; the queried needle '{key} {gold}' is at "
              f"position {where} (depth {depths[0]:.0f}%)")
        print(f"  prompt: {show(prompt[0].tolist())}")
        print(f"  model: {answer}   gold: {gold}   {'correct' if answer == gold else 'wrong'}")
    print(f"\n{correct}/{args.num_samples} correct")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Generate from a trained checkpoint.")
    parser.add_argument("--ckpt", default="out-tiny/ckpt.pt")
    parser.add_argument("--attn", choices=["softmax", "lucid"], help="run the checkpoint with this attention")
    parser.add_argument("--num_samples", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    text = parser.add_argument_group("text models")
    text.add_argument("--start", default="", help='the prompt, or FILE:path to read it from (default: end-of-text)')
    text.add_argument("--max_new_tokens", type=int, default=200)
    text.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    text.add_argument("--top_k", type=int, default=200, help="sample among the k likeliest tokens; 0 = all")
    needles = parser.add_argument_group("needle models")
    needles.add_argument("--length", type=int, default=0, help="needle prompt length (0 = training length)")
    needles.add_argument("--needles", type=int, default=4)
    parser.add_argument("--bench", action="store_true", help="decode latency, softmax vs LUCID (GPU only)")
    args = parser.parse_args(argv)
    if args.bench:
        return bench_decode(args.device)

    def fail(message):                                  # one line, not argparse's usage block
        parser.exit(2, f"sample.py: error: {message}\n")
    for name in ("num_samples", "max_new_tokens", "needles"):
        if getattr(args, name) < 1:
            fail(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.temperature < 0 or args.top_k < 0:
        fail("--temperature and --top_k must not be negative")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device={args.device} but CUDA is not available; use --device=cpu")
    try:
        model, info = load_model(args.ckpt, args.device, attn=args.attn)
    except ValueError as e:
        parser.exit(1, f"sample.py: {e}\n")
    cfg = model.config
    print(f"{args.ckpt}: {cfg.attn} attention, {model.num_params() / 1e6:.2f}M parameters, trained to iter "
          f"{info['iter_num']}")
    if info.get("config", {}).get("dataset") == "text":
        return sample_text(model, info, args)
    return sample_needles(model, args)


if __name__ == "__main__":
    main()
