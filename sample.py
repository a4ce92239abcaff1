"""
Load a checkpoint written by train.py and generate with the KV cache. For a needle-trained model it shows held-out
prompts, the model's greedy answer and the gold answer.

    python sample.py --ckpt out-tiny/ckpt.pt --num_samples 3 --length 256 --needles 4
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


def main(argv=None):
    parser = argparse.ArgumentParser(description="Generate from a trained checkpoint.")
    parser.add_argument("--ckpt", default="out-tiny/ckpt.pt")
    parser.add_argument("--num_samples", type=int, default=3)
    parser.add_argument("--length", type=int, default=0, help="sequence length of the needle prompt (0 = training length)")
    parser.add_argument("--needles", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    model, info = load_model(args.ckpt, args.device)
    cfg = model.config
    print(f"{args.ckpt}: {cfg.attn} attention, {model.num_params() / 1e6:.2f}M parameters, trained to iter "
          f"{info['iter_num']}")
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


if __name__ == "__main__":
    main()
