"""
Train a GPT with softmax or LUCID attention. Settings are the module-level variables below; a config file and
--key=value arguments override them, in order:

    python train.py configs/tiny.py                         # a tiny LUCID needle model on a CPU, under 2 minutes
    python train.py configs/needle.py --attn=softmax        # the same task, GPU-sized, with softmax attention
    python train.py configs/tiny.py --init_from=resume      # continue from out_dir/ckpt.pt
    python train.py configs/text_small.py                   # a small text model (data.py prepares the corpus once)
    torchrun --standalone --nproc_per_node=8 train.py configs/1b_128k.py    # data parallel on 8 GPUs
    python train.py configs/1b_128k.py --device=meta        # dry run: parameters, FLOPs, memory; nothing allocated

Data: "needle" draws fresh synthetic retrieval batches every step (needle.py); "text" reads random windows of a
tokenized corpus (data.py). Either way sample j of step i is a pure function of (seed, i, j), so a resumed run, or one
with another batch split or number of processes, sees exactly the data an uninterrupted one would.
Under torchrun every rank trains on its own part of the global batch (DDP, or FSDP2 with fsdp=True); rank 0 alone
logs, evaluates and writes. gradient_accumulation_steps counts micro-steps of the whole run: each of N ranks does 1/N.
"""

import ast
import datetime
import atexit
import math
import os
import signal
import sys
import time
from contextlib import nullcontext

import torch

import lucid
import needle
from model import GPT, GPTConfig, flops_per_token, load_checkpoint, memory_budget

# -----------------------------------------------------------------------------
# default settings
# I/O
out_dir = "out"
init_from = "scratch"          # "scratch" | "resume" (from out_dir/ckpt.pt)
overwrite = False              # a fresh run may replace an existing out_dir/ckpt.pt only when this is True
log_interval = 10
eval_interval = 500            # evaluation + checkpoint every this many iterations (and at the end)
save_checkpoint = True
seed = 1337
# data
dataset = "needle"             # "needle" (synthetic, needle.py) | "text" (a tokenized corpus, data.py)
batch_size = 32                # sequences per micro-step at block_size (text: more, shorter ones during the warmup)
gradient_accumulation_steps = 1    # micro-steps per optimizer step, summed over all ranks
block_size = 1024              # final training length
curriculum_start = 128         # the length doubles from here to block_size in equal stages; 0 = none. For text the
                               # micro-batch grows as the length shrinks: tokens per step stay constant
needle_cap = 32                # at most this many needles per training sequence
query_cap = 8                  # at most this many queries per training sequence
# text data (dataset = "text")
data_files = ""                # local corpus: comma-separated paths / globs of .txt/.md, .jsonl or .parquet files
hf_dataset = ""                # or a Hub dataset id (script-free, e.g. a parquet dataset), with
hf_config = ""                 #   its config name
hf_split = "train"             #   and split (slices such as "train[:10%]" work)
text_column = "text"           # the documents' column in jsonl / parquet / Hub data
encoding = "gpt2"              # any tiktoken encoding name, or "bytes" (byte-level, offline)
val_fraction = 0.005           # the tail of the token stream held out for validation
data_dir = "data"              # prepared corpora go to data_dir/<hash of the source and encoding>/
eval_iters = 20                # validation loss over eval_iters × batch_size windows of block_size
# model
vocab_size = 1024
n_layer = 2
n_head = 4
n_kv_head = 4
n_embd = 256
mlp_hidden = 0                 # SwiGLU width; 0 = 8/3·n_embd rounded up to a multiple of 64
attn = "lucid"                 # "softmax" | "lucid": the one-line switch
pos = "none"                   # "rope" | "none"
rope_theta = 10000.0
token_shift = True
lucid_impl = "auto"            # "auto" | "torch" | "triton" | "naive"
activation_checkpointing = False   # keep only each block's input; recompute the block in the backward
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
# needle evaluation (teacher-forced exact match on held-out samples)
eval_lengths = []              # [] = [block_size]
eval_needles = [1, 2, 4, 8]
eval_samples = 100
# system
device = "cuda" if torch.cuda.is_available() else "cpu"     # "meta": a dry run that prints the estimates and stops
dtype = "bfloat16" if torch.cuda.is_available() else "float32"   # "bfloat16" autocast on CUDA or "float32"
compile = torch.cuda.is_available()
fsdp = False                   # under torchrun: shard parameters, gradients and AdamW states (FSDP2) instead of DDP
cpu_threads = 0                # torch threads per process on CPU; 0 = $OMP_NUM_THREADS, else cores / processes
# -----------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, list))}
ARCH_KEYS = ["n_layer", "n_head", "n_kv_head", "n_embd", "mlp_hidden", "vocab_size", "attn", "pos", "rope_theta",
             "token_shift"]
SCHEDULE_KEYS = ["learning_rate", "min_lr", "warmup_iters", "schedule_iters", "curriculum_start", "block_size",
                 "batch_size", "gradient_accumulation_steps", "seed", "dataset", "data_files", "hf_dataset", "encoding"]
# (GPU name substring, dense bf16 tensor-core peak FLOP/s without sparsity), first match wins
PEAK_FLOPS = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("B200", 2250e12),
              ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("A10G", 70e12),
              ("RTX 4090", 165e12), ("RTX 3090", 71e12)]


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


def check_settings(c):
    """A ValueError naming the first setting that cannot work."""
    positive = ["batch_size", "gradient_accumulation_steps", "block_size", "max_iters", "log_interval", "eval_interval",
                "n_layer", "n_head", "n_kv_head", "n_embd", "vocab_size"]
    non_negative = ["seed", "eval_iters", "warmup_iters", "schedule_iters", "curriculum_start", "eval_samples",
                    "grad_clip", "cpu_threads", "mlp_hidden", "weight_decay", "min_lr", "needle_cap", "query_cap"]
    for key in positive:
        if not c[key] > 0:
            raise ValueError(f"{key} must be positive, got {c[key]!r}")
    for key in non_negative:
        if c[key] < 0:
            raise ValueError(f"{key} must not be negative, got {c[key]!r}")
    if not c["learning_rate"] > 0:
        raise ValueError(f"learning_rate must be positive, got {c['learning_rate']!r}")
    if c["curriculum_start"]:
        ratio = c["block_size"] // c["curriculum_start"]
        if c["block_size"] % c["curriculum_start"] or ratio & (ratio - 1):
            raise ValueError(f"block_size ({c['block_size']}) must be curriculum_start ({c['curriculum_start']}) "
                             "times a power of two")
    if c["dataset"] not in ("needle", "text"):
        raise ValueError(f"unknown dataset {c['dataset']!r}; available: 'needle', 'text'")
    if c["dtype"] not in ("float32", "bfloat16"):   # float16 would need a gradient scaler
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {c['dtype']!r}")
    if c["init_from"] not in ("scratch", "resume"):
        raise ValueError(f"init_from must be 'scratch' or 'resume', got {c['init_from']!r}")
    if not 0 < c["val_fraction"] < 1:
        raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {c['val_fraction']!r}")
    if c["device"].split(":")[0] not in ("cpu", "cuda", "meta", "mps"):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N', 'mps' or 'meta' (dry run), got {c['device']!r}")
    if c["device"].startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={c['device']!r} but CUDA is not available (a CPU build of torch, or no GPU); "
                         "use --device=cpu")


def peak_flops(device):
    """Dense bf16 peak FLOP/s of this GPU from PEAK_FLOPS, or None (CPU, unknown GPU)."""
    if not str(device).startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS if key in name), None)


def gib(n):
    """Bytes as GiB (MiB below 1 GiB)."""
    return f"{n / 2 ** 30:.1f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


def describe(cfg, c, world, micro_batch):
    """The start-of-run summary: parameters, tokens per step, FLOPs per token, memory budget (for rank 0 to print)."""
    T = cfg.block_size
    tokens_per_step = c["gradient_accumulation_steps"] * c["batch_size"] * T
    flops = flops_per_token(cfg, T)
    act_bytes = 2 if c["dtype"] == "bfloat16" else 4
    budget = memory_budget(cfg, micro_batch, T, act_bytes=act_bytes, shards=world if c["fsdp"] else 1)
    lines = [f"tokens per optimizer step: {tokens_per_step:,} ({c['gradient_accumulation_steps']} micro-step"
             f"{'s' if c['gradient_accumulation_steps'] > 1 else ''} of "
             f"{c['batch_size']} x {T:,} tokens, over {world} process{'es' if world > 1 else ''})",
             f"training FLOPs per token at T={T:,}: {sum(flops.values()) / 1e9:.4g} GFLOP = dense "
             f"{flops['dense'] / 1e9:.4g} + attention (causal half) {flops['attention'] / 1e9:.4g} + LUCID solve "
             f"{flops['lucid'] / 1e9:.4g}",
             f"memory budget per device (estimate, micro-batch {micro_batch} x {T:,}): parameters + AdamW "
             f"{gib(budget['params_optimizer'])} + activations{' (checkpointed)' if cfg.activation_checkpointing else ''}"
             f" {gib(budget['activations'])} + one block's recompute {gib(budget['recompute'])} + logits chunk "
             f"{gib(budget['logits'])} = {gib(budget['total'])}"]
    return lines


def state_dicts(model, optimizer, fsdp):
    """Plain (unsharded, un-prefixed) model and optimizer state dicts; with FSDP a collective every rank calls."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=fsdp)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def save(path, state):
    """Write the checkpoint to a temporary file, then rename: an interrupted save never leaves a broken ckpt.pt."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def needle_eval(model, c, ctx, encoder=None, log=print):
    """
    Accuracy {(length, needles): acc} on validation samples (seed domain 2: neither trained on nor the samples that
    needle.py reports) of the distractor-needle haystack, where copying without reading the key does not work;
    encoder: the text task through that tokenizer. Prints the key-blind copier's accuracy on the same samples.
    """
    lengths = c["eval_lengths"] or [c["block_size"]]
    task = needle.TokenTask(model.config.vocab_size) if encoder is None else needle.TextTask(encoder)
    spec = needle.EvalSpec(samples=c["eval_samples"], domain=needle.VALID)
    # the same precision as needle.py's bf16 evaluation (the scorer sets its own autocast, so ctx alone is not enough)
    scorer = needle.ModelScorer(model, autocast_dtype=torch.bfloat16 if c.get("dtype") == "bfloat16" else None)
    sharded = hasattr(model, "unshard")          # FSDP2: the scorer calls forward_hidden and lm_head directly, which
    if sharded:                                  # bypasses the root module's hooks: gather its parameters around it
        model.unshard()
    model.eval()
    with ctx:
        records = [needle.run_cell(scorer, task, spec, L, n, device=c["device"])
                   for L in lengths for n in c["eval_needles"]]
    model.train()
    if sharded:
        model.reshard()
    copier = [r["copier"] for r in records if r["copier"] is not None]
    log(f"needle validation ({task.describe['task']} task, {task.describe['haystack']} haystack): key-blind "
        f"copier {100 * sum(copier) / max(1, len(copier)):.1f}% on the same samples, chance {100 * task.chance:.1f}%")
    return {(r["length"], r["num_needles"]): r["acc"] for r in records}, lengths


class Distributed:
    """Who this process is under torchrun (or alone): rank, local rank, world size; sets up and tears down."""

    def __init__(self, c):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank, self.local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = "RANK" in os.environ and self.world > 1
        if c["fsdp"] and not self.enabled:
            raise ValueError("fsdp=True shards the model over several processes: launch with torchrun "
                             "--nproc_per_node=N (N > 1), or train without fsdp")
        if c["gradient_accumulation_steps"] % self.world:
            raise ValueError(f"gradient_accumulation_steps={c['gradient_accumulation_steps']} must be divisible by "
                             f"the number of processes ({self.world}): it counts the micro-steps of all of them")
        self.device = c["device"]
        if self.enabled:
            import torch.distributed as dist
            if self.device.startswith("cuda"):
                self.device = f"cuda:{self.local_rank}"
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():             # once per process: a second train() call reuses the group
                # the other ranks wait at a barrier while rank 0 alone tokenizes a corpus on first use or runs the
                # needle evaluation (minutes at 128K): NCCL's default 10-minute timeout would kill the run
                dist.init_process_group("nccl" if self.device.startswith("cuda") else "gloo",
                                        timeout=datetime.timedelta(hours=2))
                # an exit without shutdown_distributed() (an error, Ctrl-C) still destroys the group while Python lives
                atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
        self.master = self.rank == 0

    def all_reduce(self, tensor, op="sum"):
        if self.enabled:
            import torch.distributed as dist
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return tensor

    def barrier(self):
        if self.enabled:
            import torch.distributed as dist
            dist.barrier()


class StopFlag:
    """Ctrl-C (SIGINT) or SIGTERM (what torchrun sends its workers when it is interrupted) sets a flag the loop checks
    at the end of each step, so the run stops on a consistent state and saves; a second Ctrl-C stops at once."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.set = False
        self.previous = {}

    def __enter__(self):
        try:
            self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        except ValueError:                               # not the main thread: leave the signals alone
            self.previous = {}
        return self

    def handle(self, signum, frame):
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def train(c):
    """Train with settings c (a dict like DEFAULTS). Returns the list of per-iteration losses (rank 0's)."""
    check_settings(c)
    return _train(c, Distributed(c))


def _train(c, dist):
    log = print if dist.master else (lambda *args, **kwargs: None)
    dev = dist.device
    device_type = dev.split(":")[0]
    dry_run = device_type == "meta"
    if device_type == "cpu":
        threads = c["cpu_threads"] or int(os.environ.get("OMP_NUM_THREADS", "0")) or \
            max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        torch.set_num_threads(threads)
    torch.manual_seed(c["seed"])
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[c["dtype"]]
    ctx = torch.autocast(device_type=device_type, dtype=ptdtype) if device_type == "cuda" else nullcontext()
    # TF32 stays off: the model's matmuls run in bf16 under autocast anyway, and LUCID's PyTorch solve is fp32 on
    # purpose (TF32 would cost it ~3e-3 relative error instead of ~1e-5)
    ckpt_path = os.path.join(c["out_dir"], "ckpt.pt")

    model_args = {k: c[k] for k in ARCH_KEYS + ["block_size", "lucid_impl", "activation_checkpointing"]}
    iter_num, checkpoint = 0, None
    if c["init_from"] == "resume":
        checkpoint = load_checkpoint(ckpt_path, "cpu")
        saved = GPTConfig(**checkpoint["model_args"])
        wanted = GPTConfig(**model_args)
        for key in ARCH_KEYS:
            if getattr(saved, key) != getattr(wanted, key):
                raise ValueError(f"{ckpt_path} was trained with {key}={getattr(saved, key)!r}; resuming cannot change "
                                 f"it to {getattr(wanted, key)!r} (sample.py and needle.py take --attn to run a "
                                 "checkpoint with the other attention)")
        iter_num = checkpoint["iter_num"]
        old = checkpoint.get("config", {})
        changed = [k for k in SCHEDULE_KEYS if k in old and old[k] != c[k]]
        if not c["schedule_iters"] and old.get("max_iters", c["max_iters"]) != c["max_iters"]:
            changed.append("max_iters")
        for k in changed:
            log(f"warning: {k} changed from {old.get(k)!r} to {c[k]!r} on resume: the run no longer follows the "
                "schedule / data of the original one")
    elif not dry_run and c["save_checkpoint"] and os.path.exists(ckpt_path) and not c["overwrite"]:
        raise ValueError(f"{ckpt_path} already exists: continue it with --init_from=resume, replace it with "
                         "--overwrite=True, or choose another --out_dir")

    # data
    text, encoder = None, None
    if c["dataset"] == "text" and not dry_run:
        import data
        if dist.local_rank == 0:                          # one process per machine tokenizes; the others wait
            path = data.prepare(c, log=log)
        dist.barrier()
        if dist.local_rank != 0:
            path = data.prepare(c, log=log)               # finds the prepared files
        text = data.TextData(path)
        text.check(c["vocab_size"], c["block_size"])
        encoder = data.load_encoding(c["encoding"])

    with torch.device("meta") if dry_run else nullcontext():
        model = GPT(GPTConfig(**model_args))
    cfg = model.config
    accum = c["gradient_accumulation_steps"] // dist.world         # this rank's micro-steps per optimizer step
    total_iters = c["schedule_iters"] or c["max_iters"]
    start_len = c["curriculum_start"] or cfg.block_size
    impl = "-"
    if cfg.attn == "lucid" and not dry_run:
        probe = torch.empty(1, cfg.n_kv_head, cfg.block_size, cfg.n_embd // cfg.n_head, device=dev,
                            dtype=ptdtype if device_type == "cuda" else torch.float32)
        impl = lucid.which_impl(probe, probe, cfg.lucid_impl)
    log(f"parameters: {model.num_params():,} ({model.num_params() / 1e6:.2f}M) | attention: {cfg.attn} (LUCID "
        f"implementation: {impl}) | pos: {cfg.pos} | device: {dev} x {dist.world} {c['dtype']}"
        f"{' | FSDP' if c['fsdp'] else ' | DDP' if dist.enabled else ''}")
    for line in describe(cfg, c, dist.world, c["batch_size"]):
        log(line)
    if c["curriculum_start"]:
        log(f"curriculum: length doubles from {c['curriculum_start']} to {cfg.block_size}"
            + (" (micro-batch grows as the length shrinks; tokens per step constant)" if c["dataset"] == "text" else ""))
    if dry_run:
        log("dry run (device=meta): nothing was allocated, read or trained")
        return []

    model.to(dev)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
    raw_model = model
    if c["fsdp"]:
        from torch.distributed.fsdp import fully_shard
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    core = model
    if c["compile"]:
        # one static graph per (micro-batch, length) of the curriculum, train and eval: raise the recompile limit
        n_shapes = 2 * (int(math.log2(cfg.block_size // start_len)) + 1) + 4
        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"  # < 2.6
        setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), n_shapes))
        core = torch.compile(model, dynamic=False)
    if dist.enabled and not c["fsdp"]:
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(core, device_ids=[dist.local_rank] if device_type == "cuda" else None)
    else:
        model = core
    optimizer = raw_model.configure_optimizer(c["weight_decay"], c["learning_rate"], (c["beta1"], c["beta2"]),
                                              device_type)
    if checkpoint is not None:
        if any(isinstance(k, int) for k in checkpoint["optimizer"]["state"]):   # an older checkpoint's plain format
            optimizer.load_state_dict(checkpoint["optimizer"])
        else:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            set_optimizer_state_dict(raw_model, optimizer, checkpoint["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        log(f"resumed from iter {iter_num} ({ckpt_path})")
        checkpoint = None
    peak = peak_flops(dev)
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    def lengths_at(it):
        """(sequence length, micro-batch) at iteration it: text trades batch for length during the warmup."""
        T = needle.curriculum_length(it, total_iters, c["curriculum_start"], cfg.block_size) \
            if c["curriculum_start"] else cfg.block_size
        return T, (c["batch_size"] * cfg.block_size // T if text is not None else c["batch_size"])

    def get_batch(it, micro, T, B):
        m = micro * dist.world + dist.rank                 # this micro-batch's place among the step's micro-batches
        if text is not None:
            x, y = text.get_batch(c["seed"], "train", it, m * B, B, T)
        else:
            x, y = needle.make_batch(c["seed"], (it * c["gradient_accumulation_steps"] + m) * B, B, T,
                                     cfg.vocab_size, needle_cap=c["needle_cap"], query_cap=c["query_cap"])
        if device_type == "cuda":
            return x.pin_memory().to(dev, non_blocking=True), y.pin_memory().to(dev, non_blocking=True)
        return x.to(dev), y.to(dev)

    @torch.no_grad()
    def val_loss():
        """Mean loss over eval_iters x batch_size fixed validation windows of block_size, split over the ranks."""
        core.eval()
        total = torch.zeros(2, device=dev, dtype=torch.float64)
        for r in range(-(-c["eval_iters"] // dist.world)):  # the same number of forwards on every rank (FSDP needs it)
            k = r * dist.world + dist.rank
            x, y = text.get_batch(0, "val", 0, min(k, c["eval_iters"] - 1) * c["batch_size"], c["batch_size"],
                                  cfg.block_size)
            with ctx:
                _, loss = core(x.to(dev), y.to(dev))
            if k < c["eval_iters"]:
                total += torch.stack([loss.double() * y.numel(), torch.tensor(y.numel(), device=dev,
                                                                                    dtype=torch.float64)])
        dist.all_reduce(total)
        core.train()
        return (total[0] / total[1]).item()

    def checkpoint_now(it):
        if not c["save_checkpoint"]:
            return
        model_state, optim_state = state_dicts(raw_model, optimizer, c["fsdp"])   # a collective under FSDP
        if dist.master:
            save(ckpt_path, {"model": model_state, "optimizer": optim_state, "model_args": model_args,
                             "iter_num": it, "config": c})
            log(f"saved {ckpt_path}")
        dist.barrier()                                    # nobody reads it (a resume in the same process) too early

    flops_at = {}                                          # training FLOPs per token, by sequence length

    def step_flops(it):
        T, B = lengths_at(it)
        if T not in flops_at:
            flops_at[T] = sum(flops_per_token(cfg, T).values())
        return c["gradient_accumulation_steps"] * B * T * flops_at[T]

    losses, pending = [], []
    t0, iters_timed, tokens_timed, flops_timed = time.time(), 0, 0, 0
    with StopFlag() as stop:
        while iter_num < c["max_iters"]:
            lr = get_lr(iter_num, c)
            for group in optimizer.param_groups:
                group["lr"] = lr
            T, B = lengths_at(iter_num)
            step_loss = 0.0
            for micro in range(accum):
                last_micro = micro == accum - 1
                if dist.enabled and not c["fsdp"]:
                    model.require_backward_grad_sync = last_micro     # sync gradients once, after the last micro-step
                elif c["fsdp"]:
                    model.set_requires_gradient_sync(last_micro)
                x, y = get_batch(iter_num, micro, T, B)
                with ctx:
                    _, loss = model(x, y)
                (loss / accum).backward()
                step_loss = step_loss + loss.detach() / accum
            if c["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(model.parameters(), c["grad_clip"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            pending.append(step_loss)
            iter_num += 1
            iters_timed += 1
            tokens_timed += c["gradient_accumulation_steps"] * B * T
            flops_timed += step_flops(iter_num - 1)

            last = iter_num == c["max_iters"]
            if iter_num % c["log_interval"] == 0 or last:
                losses += [float(v) for v in pending]              # one host sync per log line (and the stop flag)
                pending = []
                elapsed = time.time() - t0                         # evaluations excluded
                dt, tokens_per_s, flops_per_s = elapsed / iters_timed, tokens_timed / elapsed, flops_timed / elapsed
                mfu = f"{100 * flops_per_s / (peak * dist.world):.1f}%" if peak and c["dtype"] == "bfloat16" else "n/a"
                mem = f"{gib(torch.cuda.max_memory_allocated(dev))}" if device_type == "cuda" else "n/a"
                # the steps left cost more per token as the length grows: estimate them by their FLOPs
                eta = sum(step_flops(it) for it in range(iter_num, c["max_iters"])) / flops_per_s
                log(f"iter {iter_num}: loss {losses[-1]:.4f}, lr {lr:.2e}, T {T}, {dt * 1000:.1f} ms/iter, "
                    f"{tokens_per_s:,.0f} tokens/s, MFU {mfu}, peak memory {mem}, ETA {eta / 60:.1f} min")
                t0, iters_timed, tokens_timed, flops_timed = time.time(), 0, 0, 0
            stopping = stop.set                                    # every rank must stop at the same step
            if dist.enabled:
                stopping = bool(dist.all_reduce(torch.tensor([float(stop.set)], device=dev), op="max").item())
            if iter_num % c["eval_interval"] == 0 or last or stopping:
                if text is not None and c["eval_iters"] > 0:
                    log(f"iter {iter_num}: val loss {val_loss():.4f}")
                if c["eval_samples"] > 0 and (dist.master or c["fsdp"]):
                    results, lengths = needle_eval(raw_model, c, ctx, encoder, log)
                    accs = [a for a in results.values() if a is not None]
                    log(f"eval at iter {iter_num}: mean needle accuracy {100 * sum(accs) / max(1, len(accs)):.1f}%")
                    if last:
                        log(f"teacher-forced exact match, % ({c['eval_samples']} held-out samples per cell)")
                        log(needle.format_table(results, lengths, c["eval_needles"]))
                checkpoint_now(iter_num)
                t0, iters_timed, tokens_timed, flops_timed = time.time(), 0, 0, 0
            if stopping and not last:
                losses += [float(v) for v in pending]
                log(f"interrupted at iter {iter_num}" + (f"; continue with --init_from=resume --out_dir={c['out_dir']}"
                                                         if c["save_checkpoint"] else ""))
                raise SystemExit(130)
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


def shutdown_distributed():
    """End of a torchrun process: every rank leaves together and the process group is destroyed while the interpreter
    is fully alive (gloo's worker threads may still hold tensors; tearing them down during interpreter shutdown, or
    while the other rank still talks, can abort the process)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        import gc
        gc.collect()                                      # the DDP / FSDP wrappers of finished runs, and their buffers
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        train(load_settings(sys.argv[1:]))
        shutdown_distributed()
    except ValueError as e:                               # ordinary mistakes: one line, no traceback
        sys.exit(f"train.py: {e}")
    except KeyboardInterrupt:
        sys.exit("train.py: interrupted")
