"""
Synthetic needle retrieval: the training data of this repo and its long-context evaluation.

Token task: a haystack with n needles `k v` (a key token, then its value token), then queries `Q k v`; the model must
produce the value that followed k. Ids: 0..7 reserved (PAD = 0, QUERY = 1), then filler (half the rest), keys and
values (a quarter each). Haystacks: `needle` (default: distractor `k v` pairs whose keys are never asked) or `random`
filler. Only `needle` has no shortcut: on `random` a model that ignores the key and copies the first value it saw is
right with one needle, so every cell reports that key-blind copier's accuracy on its own samples beside uniform
chance. Text task: the same through a tiktoken encoder, needle sentences in prose.

A sample's generator is keyed by (seed, domain, task, length, needles, index) and what else shapes that sample, so
batch size, order and other cells never change it; domains: 0 training, 1 this command line, 2 train.py's validation.
Scoring is teacher-forced exact match (one forward over prompt + gold answer, logits only at the answer positions;
it equals greedy decoding's first tokens), with a Wilson interval per cell (n = samples). `--vs` compares two models
on identical samples with the sample as the unit (right iff all its queried values are): McNemar's exact test on the
discordant samples, Δ of the per-sample rates with a bootstrap interval over samples.

    python needle.py --ckpt out-tiny/ckpt.pt --vs out-tiny-softmax/ckpt.pt --out tiny.json
    python needle.py --ckpt out-tiny/ckpt.pt --vs out-tiny-softmax/ckpt.pt --show tiny.png --lengths 512 --needles 4
"""

import argparse
import hashlib
import json
import math
import os
import re
import sys
import time
import zlib
from dataclasses import asdict, dataclass

import numpy as np
import torch

NEEDLE_VERSION = 3          # bump when the samples drawn for existing arguments change
PAD, QUERY, N_RESERVED = 0, 1, 8
TRAIN, EVAL, VALID = 0, 1, 2    # seed domains: training batches, needle.py's command line, train.py's validation
IGNORE = -100               # target of positions that are not scored
TOKEN_HAYSTACKS = ("needle", "random")


class DoesNotFit(ValueError):
    """The needles and queries asked for do not fit the sample: the cell is skipped, not an error."""


@dataclass
class Sample:
    """One sequence of exactly `length` tokens and what is scored in it."""
    tokens: np.ndarray      # (T,) int64
    targets: np.ndarray     # (T,) the token to predict at position p (the next token), IGNORE where not scored
    answers: list           # per query: the positions whose predictions must all be right (its value's tokens)
    depths: np.ndarray      # per query: depth in % of its needle in the haystack
    copier: list            # per query: is the key-blind copier right (query g -> the g-th needle-like pair's value)
    spans: np.ndarray = None    # (N, 2) [start, end) of every needle-like pair or sentence, in order of appearance
    asked: list = None          # per query: the row of `spans` of its needle

# -----------------------------------------------------------------------------
# token task


def vocab_layout(vocab_size):
    """The disjoint id ranges [lo, hi) of filler, keys and values for a vocabulary of vocab_size ids."""
    if vocab_size < 64:
        raise ValueError(f"the needle task needs vocab_size >= 64, got {vocab_size}")
    n = (vocab_size - N_RESERVED) // 4
    return {"filler": (N_RESERVED, vocab_size - 2 * n), "keys": (vocab_size - 2 * n, vocab_size - n),
            "values": (vocab_size - n, vocab_size)}


def chance_accuracy(vocab_size):
    """Accuracy of guessing a value token uniformly."""
    lo, hi = vocab_layout(vocab_size)["values"]
    return 1.0 / (hi - lo)


def sample_rng(seed, domain, task, length, n_needles, index, *extra):
    """The generator of one sample; strings are hashed with crc32 (hash() is salted per process)."""
    extra = [zlib.crc32(x.encode()) if isinstance(x, str) else int(x) for x in extra]
    return np.random.default_rng([seed, domain, zlib.crc32(task.encode()), length, n_needles, index] + extra)


def check_fits(length, n_needles, n_queries, n_ids=10 ** 9, pairs=False):
    """DoesNotFit unless n_queries of n_needles needles fit: n_ids distinct keys and values, 2-token needles in the
    haystack before 3-token queries (on a 2-token grid if pairs, with a spare key and value for the distractors)."""
    room = length - 3 * n_queries
    if not 1 <= n_queries <= n_needles:
        raise DoesNotFit(f"need 1 <= queries <= needles, got {n_queries} queries, {n_needles} needles")
    if n_needles + pairs > n_ids:
        raise DoesNotFit(f"{n_needles} needles need {n_needles + pairs} distinct keys and values; there are {n_ids}")
    if 2 * n_needles > room - (room % 2 if pairs else 0):
        raise DoesNotFit(f"{n_needles} needles and {n_queries} queries do not fit in length {length}")


def place_needles(rng, haystack_len, n, unit=1, depth=None):
    """Sorted starts of n non-overlapping 2-token needles in [0, haystack_len) on a grid of `unit` tokens (sorted
    gaps: every arrangement equally likely), and the index of the pinned needle: with `depth` the other n − 1 are
    placed first and the pinned one is inserted within ±1 token of depth% · (haystack_len − 2)."""
    slots, width = haystack_len // unit, 2 // unit
    if depth is None:
        return unit * (np.sort(rng.integers(0, slots - width * n + 1, size=n)) + width * np.arange(n)), None
    others = np.sort(rng.integers(0, slots - width * n + 1, size=n - 1)) + width * np.arange(n - 1)
    target = depth / 100 * (haystack_len - 2) / unit
    p = int(np.clip(round(target), 0, slots - width))
    split = others[(others < p) & (p < others + width)]
    if len(split):
        s = int(split[0])
        p = s if abs(s - target) <= abs(s + width - target) else s + width
    others = np.where(others >= p, others + width, others)
    pinned = int(np.sum(others < p))
    return unit * np.insert(others, pinned, p), pinned


def make_token_sample(rng, length, n_needles, vocab_size, haystack="random", n_queries=1, depth=None):
    """One token sample `[haystack with needles] [Q k v] * n_queries`; `depth` (%) pins the first queried needle."""
    if haystack not in TOKEN_HAYSTACKS:
        raise ValueError(f"unknown token haystack {haystack!r}; choose from {TOKEN_HAYSTACKS}")
    lay = vocab_layout(vocab_size)
    check_fits(length, n_needles, n_queries, lay["keys"][1] - lay["keys"][0], haystack == "needle")
    hay_len = length - 3 * n_queries
    # the draws below, in this order, are the training data: do not reorder them
    tokens = rng.integers(*lay["filler"], size=length) if haystack == "random" else None
    keys = rng.choice(np.arange(*lay["keys"]), size=n_needles, replace=False)
    values = rng.choice(np.arange(*lay["values"]), size=n_needles, replace=False)
    if haystack == "needle":                        # distractor pairs: unused keys with values no real key has
        tokens = rng.integers(*lay["filler"], size=length)
        pairs = length // 2
        tokens[0:2 * pairs:2] = rng.choice(np.setdiff1d(np.arange(*lay["keys"]), keys), size=pairs)
        tokens[1:2 * pairs:2] = rng.choice(np.setdiff1d(np.arange(*lay["values"]), values), size=pairs)
    starts, pinned = place_needles(rng, hay_len, n_needles, 2 if haystack == "needle" else 1, depth)
    tokens[starts], tokens[starts + 1] = keys, values
    pair_starts = 2 * np.arange(hay_len // 2) if haystack == "needle" else starts
    row = np.searchsorted(pair_starts, starts)      # the spans row of each real needle
    shown = tokens[pair_starts + 1]                 # values of the needle-like pairs, in order of appearance
    if pinned is None:
        asked = rng.choice(n_needles, size=n_queries, replace=False)
    else:
        rest = np.delete(np.arange(n_needles), pinned)
        asked = np.concatenate([[pinned], rng.choice(rest, size=n_queries - 1, replace=False)]).astype(np.int64)
    targets = np.full(length, IGNORE, dtype=np.int64)
    for q, needle in enumerate(asked):
        p = hay_len + 3 * q
        tokens[p:p + 3] = QUERY, keys[needle], values[needle]
        targets[p + 1] = values[needle]             # predicted at the query key's position
    return Sample(tokens.astype(np.int64), targets, [np.array([hay_len + 3 * q + 1]) for q in range(n_queries)],
                  100.0 * starts[asked] / max(1, hay_len - 2),
                  [bool(shown[q % len(shown)] == values[a]) for q, a in enumerate(asked)],
                  np.stack([pair_starts, pair_starts + 2], 1), [int(row[a]) for a in asked])


def make_sample(rng, length, n_needles, n_queries, vocab_size):
    """A training sample (random haystack) as (tokens, targets, answer_pos, depths), numpy int64."""
    s = make_token_sample(rng, length, n_needles, vocab_size, "random", n_queries)
    return s.tokens, s.targets, np.array([a[0] for a in s.answers], dtype=np.int64), s.depths


def make_batch(seed, first_index, batch_size, length, vocab_size, domain=TRAIN, task="multikey",
               n_needles=None, needle_cap=32, query_cap=8):
    """Training samples first_index .. +batch_size as (idx, targets), LongTensors (B, length), on the random haystack
    (binding keys is learned there; evaluation has distractors). Each draws its needle count n from
    1..min(needle_cap, length/16) and asks min(n, query_cap) of them (a fixed n_needles asks one)."""
    idx, targets = np.empty((2, batch_size, length), dtype=np.int64)
    lay = vocab_layout(vocab_size)
    most = min(lay["keys"][1] - lay["keys"][0], (length - 3) // 2)
    for b in range(batch_size):
        rng = sample_rng(seed, domain, task, length, n_needles or 0, first_index + b)
        n = n_needles or int(rng.integers(1, max(1, min(needle_cap, length // 16, most)) + 1))
        idx[b], targets[b], _, _ = make_sample(rng, length, n, min(n, query_cap) if n_needles is None else 1,
                                               vocab_size)
    return torch.from_numpy(idx), torch.from_numpy(targets)


def curriculum_length(it, max_iters, min_len, max_len):
    """Training length at iteration it: doubles from min_len to max_len in equal-step stages."""
    n_stages = int(math.log2(max_len // min_len)) + 1
    return min(min_len * 2 ** min(it * n_stages // max(1, max_iters), n_stages - 1), max_len)


class TokenTask:
    """The token task as an evaluation generator (the interface of TextTask)."""

    def __init__(self, vocab_size, haystack="needle"):
        self.vocab_size, self.haystack, self.key = vocab_size, haystack, f"token/{haystack}"
        self.chance = chance_accuracy(vocab_size)
        self.describe = {"task": "token", "haystack": haystack, "vocab_size": vocab_size, "tokenizer": None}

    def sample(self, rng, length, n_needles, n_queries, depth=None):
        return make_token_sample(rng, length, n_needles, self.vocab_size, self.haystack, n_queries, depth)

# -----------------------------------------------------------------------------
# text task: needle sentences in prose, through a tokenizer

TEXT_HAYSTACKS = ("needle", "essay")
WORDS = """able amber ancient bitter bold brave bright calm cheap clever cold crisp curious dark deep distant dry eager
early empty exact fast fierce flat fresh frozen gentle giant golden green heavy hidden hollow honest icy keen kind large
lazy light little loud lucky lunar magic mild misty modern narrow noble odd orange pale plain proud quick quiet rapid
rare|anchor apple arrow badge basket beacon bell boat bridge cabin camel candle canyon castle cedar cloud comet copper
coral crane desert dolphin dragon drum eagle engine falcon feather forest fossil garden glacier harbor hammer harp
island jacket kettle kite ladder lantern lemon lizard marble meadow mirror monkey ocean orchard otter owl parrot pebble
piano planet pond rabbit raven river rocket saddle salmon shadow shell statue temple tiger tower tulip valley violin
whale willow""".split("|")
ADJECTIVES, NOUNS = WORDS[0].split(), WORDS[1].split()
ESSAY = [p.split("|") for p in (          # a small grammar standing in for Paul Graham's essays (RULER's haystack)
    "Most founders|Good programmers|The best startups|Investors|Early users|Small teams|Big companies|Young hackers",
    "underestimate|learn a lot from|tend to ignore|care deeply about|depend on|slowly build|rarely change|notice",
    "how long things take|what users want|the problems nobody mentions|the cost of waiting|a few early customers|"
    "new kinds of software|ideas that seem bad at first|their own assumptions",
    "| in the beginning| more than they admit| when money is tight| most of the time| for years")]


class TextTask:
    """`context + question + answer`, exactly `length` tokens of `enc`, from id lists: haystack sentences encoded once
    as " " + sentence, needle sentences "The secret code for <key> is <value>." at sentence boundaries (keys are
    adjective-noun pairs, values 7-digit numbers), queries "\nThe secret code for <key> is" and the answer " <value>".
    Every piece starts where GPT-2's pre-tokenizer cuts anyway (a space-prefixed word, a newline, punctuation), so the
    ids equal the encoding of the text (tested)."""

    def __init__(self, enc, haystack="needle", haystack_file=None):
        if haystack not in TEXT_HAYSTACKS:
            raise ValueError(f"unknown text haystack {haystack!r}; choose from {TEXT_HAYSTACKS}")
        self.enc, self.haystack, self.chance = enc, haystack, 0.0      # a 7-digit number is not guessed
        rng = np.random.default_rng(zlib.crc32(b"essay pool"))         # the same essay in every run
        pool = ["{} {} {}{}.".format(*(p[rng.integers(len(p))] for p in ESSAY)) for _ in range(2000)]
        if haystack_file is not None:
            with open(haystack_file, encoding="utf-8") as f:
                pool = [s for s in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", f.read()).strip()) if s]
            if not pool:
                raise ValueError(f"--haystack_file {haystack_file!r} has no sentences")
            self.haystack = "file:" + hashlib.sha256("\n".join(pool).encode()).hexdigest()[:12]
        self.pool = [enc.encode(" " + s) for s in pool] if self.haystack != "needle" else []   # []: distractors
        name = getattr(enc, "name", type(enc).__name__)
        self.key = f"text/{name}/{self.haystack}/words/numbers"
        self.describe = {"task": "text", "haystack": self.haystack, "vocab_size": enc.n_vocab, "tokenizer": name,
                         "keys": "words", "values": "numbers"}
        self.spacer = next((s for s in (" the", " and", " a") if len(enc.encode(s)) == 1), " the")

    def draw(self, rng, n, keys, exclude=()):
        """n distinct random keys (adjective-noun) or values (7-digit numbers), none in `exclude`."""
        out = []
        while len(out) < n:
            if keys:
                item = f"{ADJECTIVES[rng.integers(len(ADJECTIVES))]}-{NOUNS[rng.integers(len(NOUNS))]}"
            else:
                item = str(int(rng.integers(10 ** 6, 10 ** 7)))
            if item not in out and item not in exclude:
                out.append(item)
        return out

    def haystack_ids(self, rng, budget, exclude_keys):
        """[(ids, value or None)] of whole haystack sentences, total at most budget, and the tokens left over."""
        out, total, start = [], 0, int(rng.integers(len(self.pool))) if self.pool else 0
        for i in range(budget + 1):
            value = None
            if not self.pool:                       # a distractor needle, with a key that is never asked
                key, value = self.draw(rng, 1, True, exclude_keys)[0], self.draw(rng, 1, False)[0]
                ids = self.enc.encode(f" The secret code for {key} is {value}.")
            else:                                   # essay: random sentences; a file: consecutive ones
                j = rng.integers(len(self.pool)) if self.haystack == "essay" else (start + i) % len(self.pool)
                ids = self.pool[j]
            if total + len(ids) > budget:
                return out, budget - total
            out.append((ids, value))
            total += len(ids)

    def sample(self, rng, length, n_needles, n_queries, depth=None):
        check_fits(10 ** 9, n_needles, n_queries)
        encode = self.enc.encode
        keys, values = self.draw(rng, n_needles, True), self.draw(rng, n_needles, False)
        asked = [int(a) for a in rng.choice(n_needles, size=n_queries, replace=False)]
        needles = [encode(f" The secret code for {k} is {v}.") for k, v in zip(keys, values)]
        question = [(encode(("." if g else "") + f"\nThe secret code for {keys[i]} is"), encode(" " + values[i]))
                    for g, i in enumerate(asked)]  # per query: its prompt and its gold answer
        budget = length - sum(len(q) + len(a) for q, a in question) - sum(map(len, needles))
        if budget < 0:
            raise DoesNotFit(f"{n_needles} needles and the question do not fit in {length} tokens")
        sentences, left = self.haystack_ids(rng, budget, set(keys))
        one = encode(self.spacer)                   # a 1-token word repeated; a byte-level encoder cuts the text
        tokens = one * left if len(one) == 1 else encode(self.spacer * left)[:left]
        bounds = rng.integers(0, len(sentences) + 1, size=n_needles)
        if depth is not None:                       # the first queried needle at the boundary nearest depth
            bounds[asked[0]] = int(round(depth / 100 * len(sentences)))
        pieces = [(ids, value, None) for ids, value in sentences]
        # needles sharing a boundary keep their random order, except that a pinned needle comes first (a fixed place
        # for the asked one would let a copier find it)
        pinned_first = (lambda j: (bounds[j], j != asked[0], j)) if depth is not None else (lambda j: (bounds[j], j))
        for j in sorted(range(n_needles), key=pinned_first, reverse=True):
            pieces.insert(bounds[j], (needles[j], values[j], j))           # needle j before sentence bounds[j]
        spans, shown, row = [], [], {}
        for ids, value, j in pieces:
            if value is not None:                   # a needle-like sentence: real (j) or distractor (None)
                row[j] = len(spans)
                spans.append((len(tokens), len(tokens) + len(ids)))
                shown.append(value)
            tokens += ids
        hay_len, targets, answers = len(tokens), np.full(length, IGNORE, dtype=np.int64), []
        for q, a in question:                       # the token at s + k is predicted at position s + k − 1
            answers.append(np.arange(len(tokens) + len(q) - 1, len(tokens) + len(q) - 1 + len(a)))
            targets[answers[-1]] = a
            tokens += q + a
        assert len(tokens) == length, (len(tokens), length)
        return Sample(np.array(tokens, dtype=np.int64), targets, answers,
                      np.array([100.0 * spans[row[i]][0] / max(1, hay_len - len(needles[i])) for i in asked]),
                      [shown[g % len(shown)] == values[i] for g, i in enumerate(asked)],
                      np.array(spans).reshape(-1, 2), [row[i] for i in asked])

# -----------------------------------------------------------------------------
# scoring: teacher-forced exact match, logits only at the answer positions


class ModelScorer:
    """score_fn(idx (B, T), positions (B, P)) -> logits (B, P, V) of a model.py GPT: lm_head only at the asked rows
    (full logits at 128K with V = 50,304 would be 12 GB in bf16); above chunk_threshold tokens prefill is chunked."""

    def __init__(self, model, chunk_threshold=16384, chunk_size=8192, autocast_dtype=None):
        self.model, self.chunk_threshold, self.chunk_size = model, chunk_threshold, chunk_size
        self.autocast_dtype = autocast_dtype

    def chunked(self, length):
        return bool(self.chunk_threshold and length > self.chunk_threshold)

    @torch.no_grad()
    def __call__(self, idx, positions):
        with torch.autocast("cuda", self.autocast_dtype or torch.float32,
                            enabled=bool(self.autocast_dtype and idx.is_cuda)):
            if self.chunked(idx.shape[1]):
                h = self.model.prefill_chunked(idx, self.chunk_size)
            else:
                h = self.model.forward_hidden(idx)                              # (B, T, C)
            h = torch.gather(h, 1, positions[:, :, None].expand(-1, -1, h.shape[-1]))
            return h @ self.model.lm_head.weight.t()


def score_samples(score_fn, samples, device="cpu"):
    """Per sample, per queried value: True iff the argmax is the gold token at every answer position (shorter
    answer lists are padded with a repeated position)."""
    flat = [np.concatenate(s.answers) for s in samples]
    width = max(len(f) for f in flat)
    positions = np.stack([np.concatenate([f, np.full(width - len(f), f[-1])]) for f in flat])
    idx = torch.from_numpy(np.stack([s.tokens for s in samples]))
    with torch.no_grad():
        pred = score_fn(idx.to(device), torch.from_numpy(positions).to(device)).argmax(-1).cpu().numpy()
    out = []
    for b, s in enumerate(samples):
        hit, ends = pred[b] == s.targets[positions[b]], np.cumsum([len(a) for a in s.answers])
        out.append([bool(hit[e - len(a):e].all()) for a, e in zip(s.answers, ends)])
    return out

# -----------------------------------------------------------------------------
# attention probe: the query's attention, recomputed from the attention modules' inputs (forward hooks)


@torch.no_grad()
def attention_probe(model, idx, rows, lucid_rows=None):
    """Per layer, the attention probabilities (B, H, R, T) of the query positions rows (B, R): softmax(q·k/√d),
    causal, with q, k recomputed from what each attention module received. For LUCID they weight V' = L⁻¹V; with
    lucid_rows (B, R') it also returns, per LUCID layer, those rows of L⁻¹ (B, Hkv, R', T)."""
    import lucid
    from model import apply_rope
    inputs = []
    hooks = [b.attn.register_forward_hook(lambda m, args, out: inputs.append(args)) for b in model.blocks]
    try:
        model.forward_hidden(idx)
    finally:
        for h in hooks:
            h.remove()
    probs, inverse = [], []
    for block, (x, rope, *_) in zip(model.blocks, inputs):
        a, (B, T, _) = block.attn, x.shape
        q = a.c_q(x).view(B, T, a.n_head, a.head_dim).transpose(1, 2)                      # (B, H, T, D)
        k = a.c_kv(x).view(B, T, 2, a.n_kv_head, a.head_dim)[:, :, 0].transpose(1, 2)       # (B, Hkv, T, D)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q = torch.gather(q, 2, rows[:, None, :, None].expand(-1, a.n_head, -1, a.head_dim))   # (B, H, R, D)
        s = q.float() @ k.float().repeat_interleave(a.n_head // a.n_kv_head, 1).transpose(-1, -2) / a.head_dim ** 0.5
        probs.append(s.masked_fill(torch.arange(T, device=x.device) > rows[:, None, :, None], -math.inf).softmax(-1))
        if lucid_rows is not None and a.attn == "lucid":
            kh, _ = lucid.rms_normalize(k.double())
            L = lucid._unit_lower(lucid.preconditioner_entries(kh, kh))                    # (B, Hkv, T, T)
            inv = torch.linalg.solve_triangular(L, torch.eye(T, dtype=L.dtype, device=L.device), upper=False)
            inverse.append(torch.gather(inv, 2, lucid_rows[:, None, :, None].expand(-1, a.n_kv_head, -1, T)).float())
    return (probs, inverse) if lucid_rows is not None else probs


def probe_masses(model, samples, device="cpu"):
    """Per sample, each (layers, heads): the attention mass that the position predicting the first queried value
    puts on the tokens of the matching needle, and the mean mass per other needle-like pair."""
    idx = torch.from_numpy(np.stack([s.tokens for s in samples])).to(device)
    rows = torch.tensor([[int(s.answers[0][0])] for s in samples], device=device)
    probs = torch.stack([p[:, :, 0] for p in attention_probe(model, idx, rows)], 1).cpu().numpy()  # (B, L, H, T)
    out = []
    for b, s in enumerate(samples):
        mass = np.stack([probs[b, ..., lo:hi].sum(-1) for lo, hi in s.spans], -1)                  # (L, H, N)
        others = np.delete(mass, s.asked[0], axis=-1)
        out.append((mass[..., s.asked[0]], others.mean(-1) if others.shape[-1] else np.zeros(mass.shape[:2])))
    return out


def probe_summary(masses):
    """The head with the largest mean mass on the matching needle: that mass ("hit") and its mass per distractor."""
    hit, other = np.mean([m for m, _ in masses], 0), np.mean([o for _, o in masses], 0)
    layer, head = np.unravel_index(np.argmax(hit), hit.shape)
    return {"n": len(masses), "hit": float(hit[layer, head]), "distractor": float(other[layer, head]),
            "head": [int(layer), int(head)], "hit_per_head": hit.round(4).tolist()}

# -----------------------------------------------------------------------------
# statistics


def wilson(p, n, z=1.96):
    """Wilson 95% interval of a proportion p observed over n trials (check: p = 0.5, n = 100 -> [0.404, 0.596])."""
    if n <= 0:
        return (0.0, 1.0)
    denom = 1 + z * z / n
    centre, half = (p + z * z / (2 * n)) / denom, z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_exact(b, c):
    """Two-sided exact McNemar p-value of discordant counts b (only A right), c (only B right): Binomial(b+c, ½)."""
    n = b + c
    return 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n)


def paired_stats(a, b, n_boot=2000, seed=0):
    """A against B on the same samples, the sample as the unit (right iff all its values are): Δ = (b − c)/n with b
    (c) the samples only A (only B) gets right, its 95% bootstrap interval over samples, McNemar's test on b, c."""
    d = np.array([all(x) for x in a], float) - np.array([all(y) for y in b], float)
    b, c = int((d > 0).sum()), int((d < 0).sum())
    means = d[np.random.default_rng(seed).integers(0, len(d), size=(n_boot, len(d)))].mean(1)
    return {"delta": float(d.mean()), "delta_ci95": [float(np.percentile(means, q)) for q in (2.5, 97.5)],
            "discordant": [b, c], "mcnemar_p": mcnemar_exact(b, c)}


def cell_stats(correct, copier):
    """acc over queried values, its Wilson interval (n = samples: a sample's queries are correlated), the fraction
    of samples with every value right, and the key-blind copier's accuracy on the same values."""
    n, n_values = len(correct), sum(len(c) for c in correct)
    acc = sum(map(sum, correct)) / max(1, n_values)
    return {"n_samples": n, "n_values": n_values, "acc": acc, "ci95": list(wilson(acc, n)),
            "all_correct": sum(all(c) for c in correct) / max(1, n), "copier": sum(map(sum, copier)) / max(1, n_values)}

# -----------------------------------------------------------------------------
# evaluation: cells, grids, resume


@dataclass(frozen=True)
class EvalSpec:
    """What decides a cell's samples besides the task and the (length, needles) cell."""
    queries: int = 1            # per sample: 1 = one question (RULER niah_multikey_1), more = packed (multiquery)
    depths: tuple = ()          # pinned depths in %, cycled over a cell's samples; () = uniform
    samples: int = 100
    seed: int = 0
    domain: int = EVAL

    def n_queries(self, n_needles):
        return min(n_needles, self.queries)


def cell_sample(task, spec, length, n_needles, index):
    """Sample `index` of a cell; its generator's key holds only what changes this sample."""
    q, depth = spec.n_queries(n_needles), spec.depths[index % len(spec.depths)] if spec.depths else None
    rng = sample_rng(spec.seed, spec.domain, task.key, length, n_needles, index, "multikey", q,
                     0 if depth is None else 1 + round(depth * 1000))     # "multikey": the task's name since v1
    return task.sample(rng, length, n_needles, q, depth)


def model_id(model, info=None):
    """A model's identity for the resume hash: sha256 of its weights' bytes, its attention and iteration."""
    h = hashlib.sha256(f"{model.config.attn}:{(info or {}).get('iter_num')}".encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode() + t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def cell_hash(task, spec, length, n_needles, ids=(), probe=0):
    """What makes a finished cell reusable on restart: the data, the cell, the models (by content), the probe."""
    key = {"version": NEEDLE_VERSION, "task": task.describe, "spec": asdict(spec), "length": length,
           "needles": n_needles, "models": list(ids), "probe": probe}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def run_cell(score_fns, task, spec, length, n_needles, budget=16384, device="cpu", ids=(), probe=0):
    """One (length, needles) cell for one score_fn or a list (all on identical samples; a second is compared with the
    first), in batches of max(1, budget // length) samples; the first `probe` samples are probed for every score_fn
    with a .model. A cell whose needles do not fit has acc None and a skipped_reason."""
    fns = score_fns if isinstance(score_fns, (list, tuple)) else [score_fns]
    rec = {"hash": cell_hash(task, spec, length, n_needles, ids, probe), "length": length, "num_needles": n_needles,
           "acc": None, "chance": task.chance, "skipped_reason": None}
    t0, batch_size = time.time(), max(1, min(spec.samples, budget // length))
    results, probes, copier, depths, fingerprint = [[] for _ in fns], [[] for _ in fns], [], [], hashlib.sha256()
    for first in range(0, spec.samples, batch_size):
        try:
            batch = [cell_sample(task, spec, length, n_needles, i)
                     for i in range(first, min(spec.samples, first + batch_size))]
        except DoesNotFit as e:
            return {**rec, "skipped_reason": str(e)}
        for s in batch:
            fingerprint.update(s.tokens.tobytes() + s.targets.tobytes())
            copier.append(s.copier)
            depths += list(s.depths)
        for r, fn, pr in zip(results, fns, probes):
            r += score_samples(fn, batch, device)
            for sample in batch[:max(0, probe - len(pr))] if hasattr(fn, "model") else []:
                pr += probe_masses(fn.model, [sample], device)     # one at a time: a full forward, not chunked
    bins = np.array(spec.depths or range(0, 101, 10), dtype=float)       # each queried value in its nearest bin
    where = bins[np.abs(np.array(depths)[:, None] - bins).argmin(1)]
    right = np.concatenate([np.array(c, bool) for c in results[0]])
    hist = [[b, int((where == b).sum()), int(right[where == b].sum())] for b in bins if (where == b).any()]
    rec.update(cell_stats(results[0], copier), n_queries=spec.n_queries(n_needles), batch=batch_size,
               chunked=bool(getattr(fns[0], "chunked", lambda T: False)(length)), seconds=round(time.time() - t0, 3),
               fingerprint=fingerprint.hexdigest(), depth_hist=hist)
    if probes[0]:
        rec["probe"] = probe_summary(probes[0])
    if len(fns) > 1:
        other = cell_stats(results[1], copier)
        rec["vs"] = {**{k: other[k] for k in ("acc", "ci95", "all_correct")}, **paired_stats(results[0], results[1]),
                     **({"probe": probe_summary(probes[1])} if probes[1] else {})}
    return rec


def run_grid(score_fns, task, spec, lengths, needle_counts, out=None, ids=(), meta=None, budget=16384,
             device="cpu", probe=0, log=print):
    """Every (length, needles) cell, short to long; returns the result document. With `out` the JSON is rewritten after
    every cell (temporary file + rename: always valid), and cells whose hash an existing `out` holds are reused."""
    started, done = time.time(), {}
    if out and os.path.exists(out):
        with open(out) as f:
            done = {c["hash"]: c for c in json.load(f).get("cells", [])}
    doc = {"meta": {**(meta or {}), **task.describe, "needle_version": NEEDLE_VERSION, **asdict(spec),
                    "metric": "teacher-forced exact match", "numpy": np.__version__, "torch": torch.__version__,
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S")},
           "grid": {"lengths": sorted(lengths), "num_needles": sorted(needle_counts), "depths": list(spec.depths)},
           "cells": []}
    grid = [(L, n) for L in sorted(lengths) for n in sorted(needle_counts)]
    for k, (length, n) in enumerate(grid):
        rec = done.get(cell_hash(task, spec, length, n, ids, probe)) or run_cell(score_fns, task, spec, length, n,
                                                                                 budget, device, ids, probe)
        line = f"[{k + 1}/{len(grid)}] length {length_label(length)} needles {n}: "
        if rec["hash"] in done or rec["skipped_reason"]:
            log(line + ("done before, reused" if rec["hash"] in done else f"skipped ({rec['skipped_reason']})"))
        else:
            v, (lo, hi) = rec.get("vs"), rec["ci95"]
            log(line + f"acc {100 * rec['acc']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] copier {100 * rec['copier']:.1f}"
                + (f" hit {rec['probe']['hit']:.2f}" if "probe" in rec else "")
                + (f" | vs {100 * v['acc']:.1f}: Δ {100 * v['delta']:+.1f} [{100 * v['delta_ci95'][0]:+.1f}, "
                   f"{100 * v['delta_ci95'][1]:+.1f}] discordant {v['discordant']} p {v['mcnemar_p']:.3g}" if v else "")
                + f" | batch {rec['batch']}{' chunked' if rec['chunked'] else ''} | {rec['seconds']:.1f}s")
        doc["cells"].append(rec)
        doc["depth_cells"] = [{"length": c["length"], "num_needles": c["num_needles"], "depth_bin": b, "n": m,
                               "acc": r / m} for c in doc["cells"] for b, m, r in c.get("depth_hist", [])]
        prints = "".join(c.get("fingerprint") or "" for c in doc["cells"])
        doc["data_fingerprint"] = hashlib.sha256(prints.encode()).hexdigest() if prints else None
        doc["meta"]["wall_s"] = round(time.time() - started, 3)
        if out:
            with open(f"{out}.tmp", "w") as f:
                json.dump(doc, f, indent=1)
            os.replace(f"{out}.tmp", out)
    return doc

# -----------------------------------------------------------------------------
# outputs: tables, heatmaps, the --show figure


def length_label(length):
    """1024 -> "1K", 6144 -> "6K", 1000 -> "1000"."""
    return f"{length // 1024}K" if length % 1024 == 0 else str(length)


def parse_length(text):
    """ "2K" -> 2048, "128k" -> 131072, "1000" -> 1000; anything else is an error naming the text."""
    m = re.fullmatch(r"\s*(\d+)\s*([kK]?)\s*", text)
    if not m or int(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"invalid length {text!r}: a positive integer, optional K (1K = 1024)")
    return int(m.group(1)) * (1024 if m.group(2) else 1)


def format_table(results, lengths, needle_counts, threshold=0.9, key="acc"):
    """Rows needle counts, columns lengths (ascending), cells in % (— if skipped); with a threshold each row ends with
    the effective length, the largest L with value >= threshold at every length <= L. results maps (length, needles)
    to a number, None, or a cell record, from which `key` ("acc", "copier") or key(record) is shown."""
    def value(r):
        if isinstance(r, dict):
            return None if r["acc"] is None else key(r) if callable(key) else r[key]
        return r
    lines = ["needles | " + " | ".join(f"{length_label(L):>6}" for L in lengths)
             + (f" | eff@{threshold:g}" if threshold else "")]
    for n in needle_counts:
        cells = [value(results.get((L, n))) for L in lengths]
        lines.append(f"{n:>7} | " + " | ".join("     —" if a is None else f"{100 * a:6.1f}" for a in cells))
        if threshold:
            ok = 0                                  # lengths passed in a row, from the shortest
            while ok < len(cells) and cells[ok] is not None and cells[ok] >= threshold:
                ok += 1
            eff = length_label(lengths[ok - 1]) if ok else f"<{length_label(lengths[0])}"
            lines[-1] += f" | {'—' if all(a is None for a in cells) else eff:>6}"
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot with the Agg backend, or None without matplotlib (it is optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def write_heatmaps(doc, prefix):
    """One depth × length PNG per needle count (gkamradt's layout: red-yellow-green, 0..1, depth 0 at the top), each
    cell annotated with its accuracy and number of scored values. The paths written; none without matplotlib."""
    plt, paths, meta = pyplot(), [], doc["meta"]
    for n in sorted({d["num_needles"] for d in doc["depth_cells"]}) if plt else []:
        cells = [d for d in doc["depth_cells"] if d["num_needles"] == n]
        lengths, bins = sorted({d["length"] for d in cells}), sorted({d["depth_bin"] for d in cells})
        grid = np.full((len(bins), len(lengths)), np.nan)
        fig, ax = plt.subplots(figsize=(17.5, 8))
        for d in cells:
            i, j = bins.index(d["depth_bin"]), lengths.index(d["length"])
            grid[i, j] = d["acc"]
            ax.text(j, i, f"{100 * d['acc']:.0f}%\nn={d['n']}", ha="center", va="center", fontsize=8)
        cmap = plt.matplotlib.colors.LinearSegmentedColormap.from_list("needle", ["#F0496E", "#EBB839", "#0CD79F"])
        fig.colorbar(ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, aspect="auto"), ax=ax, label="Score")
        ax.set_xticks(range(len(lengths)), [length_label(L) for L in lengths], rotation=45)
        ax.set_yticks(range(len(bins)), [f"{b:g}" for b in bins])
        ax.set(xlabel="context length (tokens)", ylabel="depth of the queried needle (%)",
               title=f"{meta.get('task')} task, {meta.get('haystack')} haystack, {n} needles "
                     "(teacher-forced exact match; n = values scored per depth bin)")
        paths.append(f"{prefix}_{meta.get('task')}_n{n}.png")
        fig.tight_layout()
        fig.savefig(paths[-1])
        plt.close(fig)
    return paths


def show_sample(path, models, names, sample, device="cpu"):
    """One figure for one sample. Rows: layer and head. Columns: each model's attention from the position that predicts
    the first queried value, over all positions (the queried needle in green); for a LUCID model also the row of L⁻¹
    at the queried needle's value, zoomed in: V' there = Σ_j L⁻¹[r, j]·v_j, i.e. how much of each earlier value the
    preconditioning subtracts (shared by the query heads of one KV head)."""
    plt = pyplot()
    if plt is None:
        raise ValueError("--show needs matplotlib (pip install matplotlib)")
    idx, rows = torch.from_numpy(sample.tokens)[None].to(device), []
    query, (lo, hi) = int(sample.answers[0][0]), sample.spans[sample.asked[0]]
    value = int(hi) - 1 if hi - lo == 2 else int(hi) - 2     # the value's (last) token: a text needle ends with "."
    for model, name in zip(models, names):
        probs, inv = attention_probe(model, idx, torch.tensor([[query]], device=device),
                                     torch.tensor([[value]], device=device))
        ok = score_samples(ModelScorer(model), [sample], device)[0][0]
        rows.append((f"{name} ({model.config.attn}, answer {'right' if ok else 'wrong'}): attention of position "
                     f"{query}", [p[0, :, 0] for p in probs], None))
        if inv:
            g = model.config.n_head // model.config.n_kv_head
            rows.append((f"{name}: row {value} of L⁻¹ (V' at the needle's value = Σ L⁻¹·V)",
                         [i[0, :, 0].repeat_interleave(g, 0) for i in inv], (max(0, lo - 64), hi + 2)))
    layers, heads = len(rows[0][1]), rows[0][1][0].shape[0]
    fig, axes = plt.subplots(layers * heads, len(rows), figsize=(6 * len(rows), 1.7 * layers * heads + 1.2),
                             squeeze=False)
    for c, (title, per_layer, zoom) in enumerate(rows):                 # one column per model (and L⁻¹)
        for r in range(layers * heads):
            ax, y = axes[r, c], per_layer[r // heads][r % heads].cpu().numpy()
            ax.axvspan(lo - 0.5, hi - 0.5, color="#0CD79F", alpha=0.5, lw=2)
            x = np.arange(*zoom) if zoom else np.arange(len(y))
            ax.plot(x, y[x], "k", lw=0.8)
            ax.set_ylabel(f"layer {r // heads} head {r % heads}", fontsize=8)
            ax.tick_params(labelsize=7)
        axes[0, c].set_title(title, fontsize=9)
        axes[-1, c].set_xlabel("position (zoomed in)" if zoom else "position")
    fig.suptitle(f"one sample: {len(sample.tokens)} tokens, the queried needle at {lo}..{hi - 1} (green), "
                 f"{len(sample.spans) - 1} other needle-like pairs; y: weight", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

# -----------------------------------------------------------------------------
# command line


def typed(kind, convert, ok, many=False):
    """An argparse type: convert(text), which must satisfy ok(value); many = a comma-separated list of them."""
    def one(text):
        try:
            value = convert(text)
        except (ValueError, argparse.ArgumentTypeError) as e:
            raise argparse.ArgumentTypeError(f"invalid {kind} {text!r}: {e}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"invalid {kind} {text!r}")
        return value
    return (lambda text: [one(x) for x in text.split(",")]) if many else one


def build_parser():
    """The options; the paper's MNIAH setting is --needles 2,4,6,8,10 --samples 500 --lengths 2K,4K,6K,8K."""
    p = argparse.ArgumentParser(description="Needle retrieval accuracy of checkpoints (teacher-forced exact match) "
                                "beside the key-blind copier and chance, with an attention probe.")
    count, add = typed("count (an integer >= 1)", int, lambda v: v >= 1), p.add_argument
    add("--ckpt", required=True, help="ckpt.pt written by train.py")
    add("--vs", help="a second checkpoint, evaluated on identical samples (paired comparison)")
    add("--attn", choices=("softmax", "lucid"), help="run --ckpt with this attention instead of its own")
    add("--task", choices=("token", "text"), default="token", help="token ids (default), or text through a tokenizer")
    add("--queries", type=count, default=1, help="queries per sample (default 1; more = packed, RULER's multiquery)")
    add("--haystack", default="needle", help=f"token: {'/'.join(TOKEN_HAYSTACKS)}; text: {'/'.join(TEXT_HAYSTACKS)}"
        " (default needle: distractor needles, no copy shortcut)")
    add("--lengths", type=typed("length", parse_length, bool, True), default=[128, 512, 2048],
        help="default 128,512,2K (CPU-sized; on a GPU e.g. 1K,...,128K)")
    add("--needles", type=typed("needle count", int, lambda v: v >= 1, True), default=[1, 4, 16],
        help="needle counts (default 1,4,16; the paper's MNIAH: 2,4,6,8,10 with --samples 500)")
    add("--samples", type=count, default=100, help="samples per cell (default 100; ±5 points needs about 400)")
    add("--depths", type=typed("depth", float, lambda v: 0 <= v <= 100, True), default=(), help="pin the queried "
        "needle's depth %%, cycled over a cell's samples, e.g. 0,50,100 (default uniform)")
    add("--seed", type=typed("seed (an integer >= 0)", int, lambda v: v >= 0), default=0, help="seed of the samples")
    add("--probe", type=typed("probe count", int, lambda v: v >= 0), default=16,
        help="samples per cell whose attention is probed (default 16; 0 = off)")
    add("--tokenizer", help="text: tiktoken encoding (default gpt2; 'bytes' = byte-level, offline)")
    add("--haystack_file", help="text: plain text to take the haystack sentences from")
    add("--out", help="JSON results, rewritten after every cell (a rerun resumes), heatmaps beside it")
    add("--show", help="instead of evaluating, write a PNG of the attention on one sample (first length and needles)")
    add("--budget", type=parse_length, help="tokens per batch (default 256K softmax, 128K LUCID)")
    add("--chunk_threshold", type=parse_length, default=16384, help="chunked prefill above this length (default 16K)")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:i]")
    add("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="autocast on CUDA; CPU runs float32")
    return p


def check_args(parser, args):
    """The combinations argparse cannot check; errors go through parser.error (one line, exit 2)."""
    allowed = TOKEN_HAYSTACKS if args.task == "token" else TEXT_HAYSTACKS
    if args.haystack not in allowed:
        parser.error(f"--haystack {args.haystack!r} is not a {args.task} haystack; choose from {allowed}")
    for name in ("tokenizer", "haystack_file"):
        if args.task == "token" and getattr(args, name) is not None:
            parser.error(f"--{name} applies to --task text")
    if args.haystack_file and not os.path.isfile(args.haystack_file):
        parser.error(f"--haystack_file {args.haystack_file!r} does not exist")
    if "cuda" in args.device and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here; use --device cpu")
    return args


def main(argv=None):
    parser = build_parser()
    args = check_args(parser, parser.parse_args(argv))
    from model import load_model
    names = [args.ckpt] + ([args.vs] if args.vs else [])
    try:                                            # a missing or truncated checkpoint: one line, no traceback
        models = [load_model(n, args.device, args.attn if i == 0 else None) for i, n in enumerate(names)]
        vocab = models[0][0].config.vocab_size
        if models[-1][0].config.vocab_size != vocab:
            raise ValueError(f"--vs has vocab_size {models[-1][0].config.vocab_size}, --ckpt has {vocab}")
        if args.task == "token":
            task = TokenTask(vocab, args.haystack)
        else:
            from data import load_encoding           # the same tokenizers (and offline advice) as training
            enc = load_encoding(args.tokenizer or "gpt2")
            if enc.n_vocab > vocab:
                raise ValueError(f"the tokenizer has {enc.n_vocab} ids, the model only {vocab}")
            task = TextTask(enc, args.haystack, args.haystack_file)
        spec = EvalSpec(args.queries, tuple(args.depths), args.samples, args.seed)
        if args.show:
            sample = cell_sample(task, spec, args.lengths[0], args.needles[0], 0)
            return print(f"wrote {show_sample(args.show, [m for m, _ in models], names, sample, args.device)}")
    except ValueError as e:
        sys.exit(f"needle.py: {e}")
    dtype = args.dtype if "cuda" in args.device else "float32"
    scorers = [ModelScorer(m, args.chunk_threshold, autocast_dtype=torch.bfloat16 if dtype == "bfloat16" else None)
               for m, _ in models]
    budget = args.budget or (128 if any(m.config.attn == "lucid" for m, _ in models) else 256) * 1024
    metas = [{"ckpt": os.path.abspath(n), "id": model_id(m, info), "iter_num": info.get("iter_num"),
              "n_params": m.num_params(), "attention": m.config.attn, "pos_enc": m.config.pos,
              "train_len": m.config.block_size} for n, (m, info) in zip(names, models)]
    meta = {"model": metas[0], "vs_model": metas[1] if args.vs else None, "dtype": dtype, "device": args.device,
            "budget": budget, "command": sys.argv[1:] if argv is None else list(argv)}
    print(f"{args.task} task, {args.haystack} haystack, {spec.queries} queries per sample, {args.samples} samples "
          f"per cell, {' vs '.join(m['attention'] for m in metas)}, {args.device} {dtype}"
          + ("; Δ = first − second per sample (right iff all its values are), 95% bootstrap CI, McNemar p"
             if args.vs else ""))
    ids = [f"{m['id']}:{dtype}" for m in metas]          # a cell scored in bf16 is not reused for float32
    doc = run_grid(scorers, task, spec, args.lengths, args.needles, args.out, ids, meta, budget, args.device,
                   args.probe)
    results = {(c["length"], c["num_needles"]): c for c in doc["cells"]}
    tables = [("key-blind copier (ignores the key, copies the first needle-like values it saw)", "copier", None)]
    second = (lambda c: c["vs"]["acc"], lambda c: c["vs"]["probe"]["hit"])
    tables += [(f"{n} ({m['attention']})", key, 0.9) for n, m, key in zip(names, metas, ("acc", second[0]))]
    if args.probe:
        tables += [(f"attention hit of {n}, % (the best head's mass on the matching needle, {args.probe} samples)",
                    key, None) for n, key in zip(names, (lambda c: c["probe"]["hit"], second[1]))]
    print(f"\nteacher-forced exact match, % ({args.samples} samples per cell, {args.haystack} haystack); "
          f"uniform chance {100 * task.chance:.2g}%")
    for title, key, threshold in tables:
        print(f"\n{title}:\n{format_table(results, sorted(args.lengths), sorted(args.needles), threshold, key)}")
    for path in write_heatmaps(doc, os.path.splitext(args.out)[0]) if args.out else []:
        print(f"wrote {path}")
    if args.out:
        print(f"wrote {args.out} (data fingerprint {str(doc['data_fingerprint'])[:16]})")
    return doc


if __name__ == "__main__":
    main()
