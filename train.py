"""
Train a GPT with softmax or LUCID attention. Settings are the module-level variables below; a config file and
--key=value arguments override them, in order:

    python train.py configs/tiny.py                         # a tiny LUCID needle model on a CPU, under 2 minutes
    python train.py configs/needle.py --attn=softmax        # the same task, GPU-sized, with softmax attention
    python train.py configs/tiny.py --init_from=resume      # continue from out_dir/ckpt.pt

Data: "needle" draws fresh synthetic retrieval batches every step (needle.py); sample i of the run is always the
same sample, so a resumed run sees exactly the data an uninterrupted one would.
"""

import ast
import math
import os
import sys
import time
from contextlib import nullcontext

import torch

import lucid
import needle
from model import GPT, GPTConfig, load_checkpoint

# -----------------------------------------------------------------------------
# default settings
# I/O
out_dir = "out"
init_from = "scratch"          # "scratch" | "resume" (from out_dir/ckpt.pt)
log_interval = 10
eval_interval = 500            # needle evaluation + checkpoint every this many iterations (and at the end)
save_checkpoint = True
seed = 1337
# data
dataset = "needle"
batch_size = 32                # sequences per micro-step
gradient_accumulation_steps = 1
block_size = 1024              # final training length
curriculum_start = 128         # the length doubles from here to block_size in equal stages; 0 = no curriculum
needle_cap = 32                # at most this many needles per training sequence
query_cap = 8                  # at most this many queries per training sequence
# model
vocab_size = 1024
n_layer = 2
n_head = 4
n_kv_head = 4
n_embd = 256
attn = "lucid"                 # "softmax" | "lucid": the one-line switch
pos = "none"                   # "rope" | "none"
rope_theta = 10000.0
token_shift = True
lucid_impl = "auto"            # "auto" | "torch" | "triton" | "naive"
# optimizer: AdamW, linear warmup then cosine decay to min_lr
learning_rate = 2e-3
max_iters = 4000
schedule_iters = 0             # length of the lr schedule and the curriculum; 0 = max_iters (set it to stop early)
warmup_iters = 100
min_lr = 2e-4
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0                # 0 = off
# evaluation (teacher-forced exact match on held-out samples)
eval_lengths = []              # [] = [block_size]
eval_needles = [1, 2, 4, 8]
eval_samples = 100
# system
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"   # "bfloat16" autocast on CUDA or "float32"
compile = False
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, list))}


def parse_config(argv, defaults=DEFAULTS):
    """The settings: defaults, overridden by config files (Python assigning the same names) and --key=value args."""
    config = dict(defaults)

    def assign(key, value, source):
        if key not in defaults:
            raise ValueError(f"unknown setting {key!r} (from {source}); known settings: {', '.join(sorted(defaults))}")
        want = type(defaults[key])
        if want is float and type(value) is int:
            value = float(value)
        if type(value) is not want:
            raise ValueError(f"setting {key!r} (from {source}) must be {want.__name__}, got {value!r} "
                             f"of type {type(value).__name__}")
        config[key] = value

    for arg in argv:
        if arg.startswith("--"):
            if "=" not in arg:
                raise ValueError(f"expected --key=value, got {arg!r}")
            key, text = arg[2:].split("=", 1)
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text                                              # a bare string, e.g. --attn=softmax
            assign(key, value, arg)
        else:
            if not os.path.isfile(arg):
                raise ValueError(f"config file {arg!r} does not exist")
            namespace = {}
            exec(open(arg).read(), {}, namespace)
            for key, value in namespace.items():
                if not key.startswith("_"):
                    assign(key, value, arg)
    return config


def get_lr(it, c):
    """Linear warmup, then cosine decay from learning_rate to min_lr over the schedule."""
    total = c["schedule_iters"] or c["max_iters"]
    if it < c["warmup_iters"]:
        return c["learning_rate"] * (it + 1) / (c["warmup_iters"] + 1)
    if it >= total:
        return c["min_lr"]
    ratio = (it - c["warmup_iters"]) / max(1, total - c["warmup_iters"])
    return c["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (c["learning_rate"] - c["min_lr"])


def save(path, model, optimizer, model_args, iter_num, config):
    """Write the checkpoint to a temporary file, then rename: an interrupted save never leaves a broken ckpt.pt."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "model_args": model_args,
             "iter_num": iter_num, "config": config}
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def needle_eval(model, c, ctx, encoder=None):
    """
    Accuracy {(length, needles): acc} on validation samples (seed domain 2: neither trained on nor the samples that
    needle.py reports) of the distractor-needle haystack, where copying without reading the key does not work;
    encoder: the text task through that tokenizer. Prints the key-blind copier's accuracy on the same samples.
    """
    lengths = c["eval_lengths"] or [c["block_size"]]
    task = needle.TokenTask(model.config.vocab_size) if encoder is None else needle.TextTask(encoder)
    spec = needle.EvalSpec(samples=c["eval_samples"], domain=needle.VALID)
    model.eval()
    with ctx:
        records = [needle.run_cell(needle.ModelScorer(model), task, spec, L, n, device=c["device"])
                   for L in lengths for n in c["eval_needles"]]
    model.train()
    copier = [r["copier"] for r in records if r["copier"] is not None]
    print(f"needle validation ({task.describe['haystack']} haystack): key-blind copier "
          f"{100 * sum(copier) / max(1, len(copier)):.1f}% on the same samples")
    return {(r["length"], r["num_needles"]): r["acc"] for r in records}, lengths


def train(c):
    """Train with settings c (a dict like DEFAULTS). Returns the list of per-iteration losses."""
    if c["dataset"] != "needle":
        raise ValueError(f"unknown dataset {c['dataset']!r}; available: 'needle'")
    torch.manual_seed(c["seed"])
    device_type = "cuda" if "cuda" in c["device"] else "cpu"
    if c["dtype"] not in ("float32", "bfloat16"):   # float16 would need a gradient scaler
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {c['dtype']!r}")
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[c["dtype"]]
    ctx = nullcontext() if device_type == "cpu" else torch.autocast(device_type=device_type, dtype=ptdtype)
    # TF32 stays off: the model's matmuls run in bf16 under autocast anyway, and LUCID's PyTorch solve is fp32 on
    # purpose (TF32 would cost it ~3e-3 relative error instead of ~1e-5)
    ckpt_path = os.path.join(c["out_dir"], "ckpt.pt")

    model_keys = ["n_layer", "n_head", "n_kv_head", "n_embd", "vocab_size", "block_size", "attn", "pos",
                  "rope_theta", "token_shift", "lucid_impl"]
    model_args = {k: c[k] for k in model_keys}
    iter_num, checkpoint = 0, None
    if c["init_from"] == "resume":
        checkpoint = load_checkpoint(ckpt_path, c["device"])
        model_args = checkpoint["model_args"]                              # the architecture comes from the checkpoint
        iter_num = checkpoint["iter_num"]
    elif c["init_from"] != "scratch":
        raise ValueError(f"init_from must be 'scratch' or 'resume', got {c['init_from']!r}")
    model = GPT(GPTConfig(**model_args)).to(c["device"])
    optimizer = model.configure_optimizer(c["weight_decay"], c["learning_rate"], (c["beta1"], c["beta2"]), device_type)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        checkpoint = None
    raw_model = model
    if c["compile"]:
        model = torch.compile(model)

    cfg = raw_model.config
    probe = torch.empty(1, cfg.n_kv_head, cfg.block_size, cfg.n_embd // cfg.n_head, device=c["device"],
                        dtype=ptdtype if device_type == "cuda" else torch.float32)
    impl = lucid.which_impl(probe, probe, cfg.lucid_impl) if cfg.attn == "lucid" else "-"
    tokens_per_step = c["gradient_accumulation_steps"] * c["batch_size"] * cfg.block_size
    print(f"parameters: {raw_model.num_params() / 1e6:.2f}M | attention: {cfg.attn} (LUCID implementation: {impl}) "
          f"| pos: {cfg.pos} | tokens per step at full length: {tokens_per_step:,} | device: {c['device']} {c['dtype']}")
    if c["curriculum_start"]:
        print(f"curriculum: length doubles from {c['curriculum_start']} to {cfg.block_size}")

    losses = []
    total_iters = c["schedule_iters"] or c["max_iters"]
    t0, iters_timed = time.time(), 0
    while iter_num < c["max_iters"]:
        lr = get_lr(iter_num, c)
        for group in optimizer.param_groups:
            group["lr"] = lr
        T = cfg.block_size
        if c["curriculum_start"]:
            T = needle.curriculum_length(iter_num, total_iters, c["curriculum_start"], cfg.block_size)
        for micro in range(c["gradient_accumulation_steps"]):
            first = (iter_num * c["gradient_accumulation_steps"] + micro) * c["batch_size"]   # global sample index
            x, y = needle.make_batch(c["seed"], first, c["batch_size"], T, cfg.vocab_size,
                                     needle_cap=c["needle_cap"], query_cap=c["query_cap"])
            x, y = x.to(c["device"]), y.to(c["device"])
            with ctx:
                _, loss = model(x, y)
            (loss / c["gradient_accumulation_steps"]).backward()
        if c["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), c["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        iter_num += 1
        iters_timed += 1

        if iter_num % c["log_interval"] == 0 or iter_num == c["max_iters"]:
            dt = (time.time() - t0) / iters_timed                           # seconds per iteration, evals excluded
            t0, iters_timed = time.time(), 0
            tokens = c["gradient_accumulation_steps"] * c["batch_size"] * T
            print(f"iter {iter_num}: loss {losses[-1]:.4f}, lr {lr:.2e}, T {T}, {dt * 1000:.1f} ms/iter, "
                  f"{tokens / dt:,.0f} tokens/s")
        last = iter_num == c["max_iters"]
        if iter_num % c["eval_interval"] == 0 or last:
            if c["eval_samples"] > 0:
                results, lengths = needle_eval(raw_model, c, ctx)
                accs = [a for a in results.values() if a is not None]
                print(f"eval at iter {iter_num}: mean needle accuracy {100 * sum(accs) / max(1, len(accs)):.1f}%")
                if last:
                    print(f"teacher-forced exact match, % ({c['eval_samples']} held-out samples per cell, "
                          f"chance {100 * needle.chance_accuracy(cfg.vocab_size):.1f})")
                    print(needle.format_table(results, lengths, c["eval_needles"]))
            if c["save_checkpoint"]:
                save(ckpt_path, raw_model, optimizer, model_args, iter_num, c)
                print(f"saved {ckpt_path}")
            t0, iters_timed = time.time(), 0
    return losses


def load_settings(argv):
    """parse_config, except that a resumed run starts from the settings saved in its checkpoint: a bare
    `--init_from=resume --out_dir=...` continues the run as it was configured, and arguments still override."""
    settings = parse_config(argv)
    if settings["init_from"] == "resume":
        path = os.path.join(settings["out_dir"], "ckpt.pt")
        if not os.path.isfile(path):
            raise ValueError(f"init_from='resume' but there is no checkpoint at {path}")
        saved = load_checkpoint(path)["config"]
        settings = parse_config(argv, defaults={**DEFAULTS, **saved})
    return settings


if __name__ == "__main__":
    try:
        settings = load_settings(sys.argv[1:])
    except ValueError as e:
        sys.exit(f"train.py: {e}")
    train(settings)
