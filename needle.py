"""
Synthetic needle retrieval: the training data of this repo and its long-context evaluation.

* Token task (no tokenizer): a haystack with n needles `k v` (a key token, then its value token), then queries
  `Q k v`: the model must produce the value that followed key k. Filler, keys and values come from disjoint id ranges

    ids  0..7          reserved: PAD = 0, QUERY = 1
    F    next half     filler
    K    next quarter  keys
    W    last quarter  values            e.g. vocab 128: F = 8..67, K = 68..97, W = 98..127

  Haystacks: `needle` (the default: distractor `k v` pairs with keys never asked, RULER's multikey_2), `random`
  filler, or a `repeat`ed period. Only `needle` has no shortcut: on the other two a model that ignores the key and
  copies the first value it saw scores 100% with one needle. Every table therefore prints that key-blind copier's
  accuracy, measured on the same samples, beside uniform chance.
* Text task: RULER-style prompts through a tiktoken encoder (or any object with encode / decode / n_vocab).

Each sample has its own generator, seeded by (seed, domain, task, length, needles, index, and what else shapes that
sample), so batch size, order and the other cells never change it. Domains: 0 training, 1 this file's command line,
2 train.py's validation. Scoring is teacher-forced exact match: one forward over prompt + gold answer, logits only
at the answer positions; a queried value is right iff the argmax is the gold token at each of its positions (this
equals greedy decoding's first tokens). Per cell: Wilson 95% interval (n = samples), the copier and chance, and an
attention probe ("hit": the attention mass that the best head puts, at the query, on the matching needle). Two
checkpoints are compared on identical samples, with the sample as the unit: a sample is right iff all its queried
values are; McNemar's exact test on discordant samples, Δ = difference of those per-sample rates, bootstrap over samples.

    python needle.py --ckpt out-tiny/ckpt.pt --vs out-tiny-softmax/ckpt.pt --out tiny.json
    python needle.py --ckpt out-tiny/ckpt.pt --vs out-tiny-softmax/ckpt.pt --show tiny.png --lengths 512 --needles 4
"""

import argparse
import datetime
import hashlib
import json
import math
import os
import re
import sys
import time
import uuid
import zlib
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

NEEDLE_VERSION = 2          # bump when the samples drawn for existing arguments change
PAD, QUERY = 0, 1
N_RESERVED = 8
TRAIN, EVAL, VALID = 0, 1, 2    # seed domains: training batches, needle.py's command line, train.py's validation
IGNORE = -100               # target of positions that are not scored
VARIANTS = ("single", "multikey", "multivalue")
TOKEN_HAYSTACKS = ("needle", "random", "repeat")
REPEAT_PERIOD = (20, 25)    # the `repeat` haystack's period, about the length of RULER's noise sentences


class DoesNotFit(ValueError):
    """The needles and queries asked for do not fit the sample (the cell is skipped, not an error)."""


@dataclass
class Sample:
    """One sequence of exactly `length` tokens and what is scored in it."""
    tokens: np.ndarray      # (T,) int64
    targets: np.ndarray     # (T,) the token to predict at position p (the next token), IGNORE where not scored
    answers: list           # per queried value: the positions whose predictions must all be right
    depths: np.ndarray      # per queried value: depth in % of its needle (multivalue: the pinned or first one)
    copier: list            # per queried value: would a key-blind copier be right (see `copier` in the docstring)
    spans: np.ndarray = field(default=None)   # (N, 2) [start, end) of every needle-like pair, in order of appearance
    asked: list = field(default=None)         # per queried value: the row of `spans` of its (first) needle

# -----------------------------------------------------------------------------
# token task


def vocab_layout(vocab_size):
    """The disjoint id ranges [lo, hi) of filler, keys and values for a vocabulary of vocab_size ids."""
    if vocab_size < 64:
        raise ValueError(f"the needle task needs vocab_size >= 64, got {vocab_size}")
    n = (vocab_size - N_RESERVED) // 4
    return {"filler": (N_RESERVED, vocab_size - 2 * n), "keys": (vocab_size - 2 * n, vocab_size - n),
            "values": (vocab_size - n, vocab_size)}


def chance_accuracy(vocab_size, n_values=1):
    """Accuracy of guessing each of n_values value tokens uniformly."""
    lo, hi = vocab_layout(vocab_size)["values"]
    return (1.0 / (hi - lo)) ** n_values


def sample_rng(seed, domain, task, length, n_needles, index, *extra):
    """The generator of one sample. Strings are hashed with crc32 (hash() is salted per process); `extra` holds what
    else shapes this sample (variant, queries, pinned depth), and nothing that does not."""
    extra = [zlib.crc32(x.encode()) if isinstance(x, str) else int(x) for x in extra]
    return np.random.default_rng([seed, domain, zlib.crc32(task.encode()), length, n_needles, index] + extra)


def token_capacity_error(length, n_needles, vocab_size, variant="multikey", n_queries=1, haystack="random"):
    """Why these needles cannot fit a token sample (a sentence), or None if they fit."""
    lay = vocab_layout(vocab_size)
    n_k, n_w = lay["keys"][1] - lay["keys"][0], lay["values"][1] - lay["values"][0]
    if variant not in VARIANTS:
        return f"unknown variant {variant!r}; choose from {VARIANTS}"
    if variant == "single" and n_needles != 1:
        return f"the single variant has exactly 1 needle, got {n_needles}"
    if variant != "multivalue" and not 1 <= n_queries <= n_needles:
        return f"need 1 <= queries <= needles, got {n_queries} queries, {n_needles} needles"
    suffix, keys_needed = (2 + n_needles, 1) if variant == "multivalue" else (3 * n_queries, n_needles)
    spare = haystack == "needle"                    # distractors need at least one unused key and value
    if keys_needed + spare > n_k or n_needles + spare > n_w:
        return (f"{n_needles} needles need {keys_needed + spare} distinct keys and {n_needles + spare} distinct "
                f"values; vocab_size {vocab_size} has {n_k} and {n_w}")
    room = length - suffix
    if 2 * n_needles > room - (room % 2 if haystack == "needle" else 0):
        return f"{n_needles} needles and {n_queries} queries do not fit in length {length}"
    return None


def place_needles(rng, haystack_len, n, unit=1, depth=None):
    """
    Sorted starts of n non-overlapping 2-token needles in [0, haystack_len) on a grid of `unit` tokens, and the
    index of the pinned needle (None if depth is None). Unpinned: sorted gaps over the free slots (every arrangement
    equally likely). Pinned: the other n − 1 are placed first, then the pinned one is inserted at the requested depth
    (the nearer side of a needle it would split), so it starts within ±1 token of depth% · (haystack_len − 2).
    """
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


def make_token_sample(rng, length, n_needles, vocab_size, variant="multikey", haystack="random", n_queries=1,
                      depth=None):
    """
    One token sample of exactly `length` tokens: `[haystack with needles] [Q k v] ...` (multivalue: one
    `[Q k v1 .. vm]` block, values in order of appearance). `depth` (%) pins the first queried needle. The key-blind
    copier answers query g with the g-th needle-like pair's value (multivalue: the first m pairs' values).
    """
    if haystack not in TOKEN_HAYSTACKS:
        raise ValueError(f"unknown token haystack {haystack!r}; choose from {TOKEN_HAYSTACKS}")
    reason = token_capacity_error(length, n_needles, vocab_size, variant, n_queries, haystack)
    if reason:
        raise (ValueError if reason.startswith("unknown") else DoesNotFit)(reason)
    lay = vocab_layout(vocab_size)
    multivalue = variant == "multivalue"
    hay_len = length - (2 + n_needles if multivalue else 3 * n_queries)
    # the draws below, in this order, are the training data: do not reorder them
    tokens = rng.integers(*lay["filler"], size=length) if haystack == "random" else None
    keys = rng.choice(np.arange(*lay["keys"]), size=1 if multivalue else n_needles, replace=False)
    values = rng.choice(np.arange(*lay["values"]), size=n_needles, replace=False)
    if haystack == "repeat":
        period = rng.integers(*lay["filler"], size=int(rng.integers(REPEAT_PERIOD[0], REPEAT_PERIOD[1] + 1)))
        tokens = np.resize(period, length)
    elif haystack == "needle":                      # distractor pairs: unused keys with values no real key has
        tokens = rng.integers(*lay["filler"], size=length)
        pairs = length // 2
        tokens[0:2 * pairs:2] = rng.choice(np.setdiff1d(np.arange(*lay["keys"]), keys), size=pairs)
        tokens[1:2 * pairs:2] = rng.choice(np.setdiff1d(np.arange(*lay["values"]), values), size=pairs)
    starts, pinned = place_needles(rng, hay_len, n_needles, 2 if haystack == "needle" else 1, depth)
    tokens[starts], tokens[starts + 1] = (np.repeat(keys, n_needles) if multivalue else keys), values
    pair_starts = 2 * np.arange(hay_len // 2) if haystack == "needle" else starts
    spans = np.stack([pair_starts, pair_starts + 2], 1)
    row = np.searchsorted(pair_starts, starts)      # the spans row of each real needle
    shown = tokens[pair_starts + 1]                 # values of the needle-like pairs, in order of appearance
    targets = np.full(length, IGNORE, dtype=np.int64)
    depth_of = 100.0 * starts / max(1, hay_len - 2)
    p = hay_len
    if multivalue:
        tokens[p], tokens[p + 1], tokens[p + 2:p + 2 + n_needles] = QUERY, keys[0], values
        targets[p + 1:p + 1 + n_needles] = values
        return Sample(tokens.astype(np.int64), targets, [np.arange(p + 1, p + 1 + n_needles)],
                      depth_of[[0 if pinned is None else pinned]], [bool(np.array_equal(shown[:n_needles], values))],
                      spans, [int(row[0])])
    if pinned is None:
        asked = rng.choice(n_needles, size=n_queries, replace=False)
    else:
        rest = np.delete(np.arange(n_needles), pinned)
        asked = np.concatenate([[pinned], rng.choice(rest, size=n_queries - 1, replace=False)]).astype(np.int64)
    for q, needle in enumerate(asked):
        tokens[p + 3 * q:p + 3 * q + 3] = QUERY, keys[needle], values[needle]
        targets[p + 3 * q + 1] = values[needle]     # predicted at the query key's position
    return Sample(tokens.astype(np.int64), targets, [np.array([p + 3 * q + 1]) for q in range(n_queries)],
                  depth_of[asked], [bool(shown[q % len(shown)] == values[a]) for q, a in enumerate(asked)], spans,
                  [int(row[a]) for a in asked])


def make_sample(rng, length, n_needles, n_queries, vocab_size):
    """A training sample (random haystack, multikey) as (tokens, targets, answer_pos, depths), numpy int64."""
    s = make_token_sample(rng, length, n_needles, vocab_size, "multikey", "random", n_queries)
    return s.tokens, s.targets, np.array([a[0] for a in s.answers], dtype=np.int64), s.depths


def make_batch(seed, first_index, batch_size, length, vocab_size, domain=TRAIN, task="multikey",
               n_needles=None, needle_cap=32, query_cap=8):
    """
    Training samples first_index .. first_index+batch_size-1 as (idx, targets), LongTensors (B, length). Each
    draws its needle count uniformly from 1..min(needle_cap, length/16) and asks min(n, query_cap) of them (a fixed
    n_needles asks one). The random haystack: learning to bind keys is easier there; evaluation uses distractors.
    """
    idx = np.empty((batch_size, length), dtype=np.int64)
    targets = np.empty((batch_size, length), dtype=np.int64)
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
    """The token task as an evaluation generator (the same interface as TextTask)."""

    def __init__(self, vocab_size, haystack="needle"):
        if haystack not in TOKEN_HAYSTACKS:
            raise ValueError(f"unknown token haystack {haystack!r}; choose from {TOKEN_HAYSTACKS}")
        vocab_layout(vocab_size)
        self.vocab_size, self.haystack, self.key = vocab_size, haystack, f"token/{haystack}"

    def describe(self):
        return {"task": "token", "haystack": self.haystack, "vocab_size": self.vocab_size, "tokenizer": None}

    def sample(self, rng, length, n_needles, variant, n_queries, depth=None):
        return make_token_sample(rng, length, n_needles, self.vocab_size, variant, self.haystack, n_queries, depth)

    def chance(self, variant, n_needles):
        return chance_accuracy(self.vocab_size, n_needles if variant == "multivalue" else 1)

# -----------------------------------------------------------------------------
# text task (RULER-style prompts through a tokenizer)

TEXT_HAYSTACKS = ("needle", "essay", "noise")
TEXT_KINDS = ("words", "numbers", "uuids")   # what keys and values are made of
TEMPLATES = ("completion", "ruler")
ADJECTIVES = """able active amber ancient angry bitter blank bold brave brief bright broad calm careful cheap clever
cold common crisp curious damp dark deep dense distant dry eager early empty equal exact faint fast fierce final firm
flat formal fresh frozen gentle giant glad golden grand green heavy hidden hollow honest humble icy idle keen kind
large late lazy light little lively loud loyal lucky lunar magic major mild minor misty modern narrow neat noble odd
open orange pale plain polite proud quick quiet rapid rare""".split()
NOUNS = """anchor apple arrow badge basket beacon bell boat bottle bridge brook cabin camel candle canyon castle cedar
chair cloud comet copper coral crane crystal desert dolphin dragon drum eagle engine falcon feather fence forest fossil
garden glacier glove harbor hammer harp helmet island jacket jungle kettle kite ladder lantern lemon lizard marble
meadow mirror monkey mountain needle oasis ocean orchard otter owl paddle parrot pebble pepper piano pillow planet
pocket pond puzzle rabbit raven ribbon river rocket saddle salmon shadow shell statue temple tiger tower tulip valley
violin walnut whale willow window""".split()
NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
ESSAY = (("Most founders", "Good programmers", "The best startups", "Investors", "Early users", "Small teams",
          "Big companies", "Good writers", "Young hackers"),          # a small grammar standing in for PG's essays
         ("underestimate", "learn a lot from", "tend to ignore", "care deeply about", "depend on", "slowly build",
          "rarely change", "try to avoid", "eventually notice"),
         ("how long things take", "what users actually want", "the problems nobody talks about", "the cost of waiting",
          "a few early customers", "new kinds of software", "ideas that seem bad at first", "their own assumptions"),
         ("", " in the beginning", " more than they admit", " when money is tight", " most of the time", " for years"))
RULER_TEMPLATE = ("Some special magic {type} are hidden within the following text. Make sure to memorize it. I will "
                  "quiz you about the {type} afterwards.\n{context}\nWhat are all the special magic {type} for {query} "
                  "mentioned in the provided text? The special magic {type} for {query} mentioned in the provided "
                  "text are")


def byte_encoding():
    """A byte-level tiktoken encoding (256 single-byte tokens + <|endoftext|> = 256): offline, round-trips any text."""
    import tiktoken
    return tiktoken.Encoding(
        name="bytes", pat_str=r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
        mergeable_ranks={bytes([i]): i for i in range(256)}, special_tokens={"<|endoftext|>": 256})


def load_encoder(name):
    """"bytes" (built in) or a tiktoken encoding such as "gpt2" (from its cache, or downloaded once)."""
    if name == "bytes":
        return byte_encoding()
    import tiktoken
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:
        raise ValueError(f"cannot load the tiktoken encoding {name!r} ({type(e).__name__}); offline machines need a "
                         "pre-filled $TIKTOKEN_CACHE_DIR, or use --tokenizer bytes") from None


class TextTask:
    """
    RULER-style retrieval in text: `intro + context + question + answer`, exactly `length` tokens of `enc`, built
    from id lists (each haystack sentence encoded once as " " + sentence, needle sentences at sentence boundaries,
    the answer = ids of " " + value). Every piece starts where GPT-2's pre-tokenizer cuts anyway (a space-prefixed
    word, a newline, punctuation), so the ids equal the encoding of the text; the tests check the round trip.
    """

    def __init__(self, enc, haystack="needle", keys="words", values="numbers", template="completion",
                 haystack_file=None):
        for name, value, allowed in (("haystack", haystack, TEXT_HAYSTACKS), ("keys", keys, TEXT_KINDS),
                                     ("values", values, TEXT_KINDS), ("template", template, TEMPLATES)):
            if value not in allowed:
                raise ValueError(f"unknown text {name} {value!r}; choose from {allowed}")
        if not all(hasattr(enc, a) for a in ("encode", "decode", "n_vocab")):
            raise ValueError("the encoder needs encode, decode and n_vocab")
        self.enc, self.haystack, self.keys, self.values, self.template = enc, haystack, keys, values, template
        self.pool, self._ids = {"noise": list(NOISE), "needle": None}.get(haystack), {}
        if haystack == "essay":
            rng = np.random.default_rng(zlib.crc32(b"essay pool"))     # the same pool in every run
            self.pool = ["{} {} {}{}.".format(*(p[rng.integers(len(p))] for p in ESSAY)) for _ in range(2000)]
        if haystack_file is not None:
            with open(haystack_file, encoding="utf-8") as f:
                self.pool = [s for s in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", f.read()).strip()) if s]
            if not self.pool:
                raise ValueError(f"--haystack_file {haystack_file!r} has no sentences")
            self.haystack = "file:" + hashlib.sha256("\n".join(self.pool).encode()).hexdigest()[:12]
        self.name = getattr(enc, "name", type(enc).__name__)
        self.key = f"text/{self.name}/{self.haystack}/{keys}/{values}/{template}"
        self.spacer = next((s for s in (" the", " and", " a") if len(enc.encode(s)) == 1), " the")

    def describe(self):
        return {"task": "text", "haystack": self.haystack, "vocab_size": self.enc.n_vocab, "tokenizer": self.name,
                "template": self.template, "keys": self.keys, "values": self.values}

    def chance(self, variant, n_needles):
        return 0.0                                  # a 7-digit number or a uuid is not guessed

    def encode(self, text, cache=True):
        if not cache:
            return self.enc.encode(text)
        if text not in self._ids:
            self._ids[text] = self.enc.encode(text)
        return self._ids[text]

    def draw(self, rng, kind, n, exclude=()):
        """n distinct random keys or values of a kind, none in `exclude`."""
        out, seen = [], set(exclude)
        while len(out) < n:
            if kind == "words":
                i = int(rng.integers(len(ADJECTIVES) * len(NOUNS)))
                item = f"{ADJECTIVES[i // len(NOUNS)]}-{NOUNS[i % len(NOUNS)]}"
            elif kind == "numbers":
                item = str(int(rng.integers(1_000_000, 10_000_000)))
            else:
                item = str(uuid.UUID(bytes=rng.bytes(16), version=4))
            if item not in seen:
                seen.add(item)
                out.append(item)
        return out

    def needle_text(self, key, value):
        if self.template == "ruler":
            return f"One of the special magic {self.values} for {key} is: {value}."
        return f"The secret code for {key} is {value}."

    def prompt_parts(self, asked_keys, answers, multivalue):
        """(intro, [(text, group)]): the text before the context and the pieces after it; group g marks (part of)
        the gold answer of queried value g, None prompt text."""
        if self.template == "ruler":
            kind = self.values
            if len(answers) == 1 and ", " not in answers[0]:            # RULER's singular form: one key, one value
                kind, template = kind[:-1], RULER_TEMPLATE.replace("Some", "A").replace("are all", "is").replace(
                    "are", "is")
            else:
                template = RULER_TEMPLATE
            keys = asked_keys[0] if len(asked_keys) == 1 else ", ".join(asked_keys[:-1]) + ", and " + asked_keys[-1]
            intro, question = template.format(type=kind, query=keys, context="\0").split("\0")
            pieces = [(question, None)]
            for g, answer in enumerate(answers):
                pieces += ([(",", None)] if g else []) + [(" " + answer, g)]
            return intro, pieces
        if multivalue:
            n = len(answers[0].split(", "))
            return "", [(f"\nThe {n} secret codes for {asked_keys[0]}, in order, are", None), (" " + answers[0], 0)]
        pieces = []
        for g, (key, answer) in enumerate(zip(asked_keys, answers)):
            pieces += [(("." if g else "") + f"\nThe secret code for {key} is", None), (" " + answer, g)]
        return "", pieces

    def haystack_ids(self, rng, budget, exclude_keys):
        """[(ids, value or None)] of whole haystack sentences, total at most budget, and the tokens left over."""
        out, total = [], 0
        start = 0 if self.haystack == "noise" else int(rng.integers(len(self.pool) if self.pool else 1))
        for i in range(budget + 1):
            value = None
            if self.pool is None:                   # a distractor needle, with a key that is never asked
                key, = self.draw(rng, self.keys, 1, exclude_keys)
                value, = self.draw(rng, self.values, 1)
                ids = self.encode(" " + self.needle_text(key, value), cache=False)
            elif self.haystack == "essay":
                ids = self.encode(" " + self.pool[int(rng.integers(len(self.pool)))])
            else:                                   # noise and files: consecutive sentences, as in a document
                ids = self.encode(" " + self.pool[(start + i) % len(self.pool)])
            if total + len(ids) > budget:
                break
            out.append((ids, value))
            total += len(ids)
        return out, budget - total

    def sample(self, rng, length, n_needles, variant, n_queries, depth=None):
        reason = token_capacity_error(10 ** 9, n_needles, 10 ** 9, variant, n_queries)
        if reason:
            raise (ValueError if reason.startswith("unknown") else DoesNotFit)(reason)
        multivalue = variant == "multivalue"
        keys = self.draw(rng, self.keys, 1 if multivalue else n_needles)
        values = self.draw(rng, self.values, n_needles)
        asked = [0] if multivalue else [int(a) for a in rng.choice(n_needles, size=n_queries, replace=False)]
        needle_ids = [self.encode(" " + self.needle_text(k, v), cache=False)
                      for k, v in zip(keys * n_needles if multivalue else keys, values)]

        def parts(order):   # the multivalue answer follows the order of appearance; its length does not
            answers = [", ".join(values[i] for i in order)] if multivalue else [values[i] for i in asked]
            return self.prompt_parts([keys[i] for i in asked], answers, multivalue), answers
        (intro, pieces), _ = parts(range(n_needles))
        intro_ids = self.encode(intro)
        budget = (length - len(intro_ids) - sum(len(self.encode(t, g is None)) for t, g in pieces)
                  - sum(map(len, needle_ids)))
        if budget < 0:
            raise DoesNotFit(f"{n_needles} needles and the question do not fit in {length} tokens of {self.name}")
        sentences, left = self.haystack_ids(rng, budget, set(keys))
        one = self.encode(self.spacer)              # a 1-token word repeated; a byte-level encoder cuts the text
        context = one * left if len(one) == 1 else self.encode(self.spacer * left)[:left]
        bounds = rng.integers(0, len(sentences) + 1, size=n_needles)
        if depth is not None:                       # the first queried needle at the boundary nearest depth
            bounds[asked[0]] = int(round(depth / 100 * len(sentences)))
        order = sorted(range(n_needles), key=lambda j: (bounds[j], j != asked[0], j))
        spans, shown, row, j = [], [], {}, 0
        for i in range(len(sentences) + 1):
            while j < n_needles and bounds[order[j]] == i:
                row[order[j]] = len(spans)
                spans.append((len(context), len(context) + len(needle_ids[order[j]])))
                shown.append(values[order[j]])
                context += needle_ids[order[j]]
                j += 1
            if i < len(sentences):
                ids, value = sentences[i]
                if value is not None:
                    spans.append((len(context), len(context) + len(ids)))
                    shown.append(value)
                context += ids
        (intro, pieces), answers = parts(order)
        tokens, targets = list(intro_ids) + context, np.full(length, IGNORE, dtype=np.int64)
        positions = [[] for _ in answers]
        for text, g in pieces:
            ids = self.encode(text, g is None)
            if g is not None:                       # the token at s + k is predicted at position s + k − 1
                positions[g] += range(len(tokens) - 1, len(tokens) - 1 + len(ids))
                targets[len(tokens) - 1:len(tokens) - 1 + len(ids)] = ids
            tokens += ids
        assert len(tokens) == length, (len(tokens), length)
        first = [order[0] if depth is None else asked[0]] if multivalue else asked
        depths = [100.0 * spans[row[i]][0] / max(1, len(context) - len(needle_ids[i])) for i in first]
        first = [order[0]] if multivalue else asked     # the needle of the first answer token, for the probe
        copy = [", ".join(shown[:n_needles])] if multivalue else [shown[g % len(shown)] for g in range(len(answers))]
        return Sample(np.array(tokens, dtype=np.int64), targets, [np.array(p, dtype=np.int64) for p in positions],
                      np.array(depths), [c == a for c, a in zip(copy, answers)],
                      np.array(spans, dtype=np.int64).reshape(-1, 2) + len(intro_ids), [row[i] for i in first])

# -----------------------------------------------------------------------------
# scoring: teacher-forced exact match, logits only at the answer positions


class ModelScorer:
    """
    score_fn(idx (B, T), positions (B, P)) -> logits (B, P, V) of a model.py GPT: the post-ln_f states, times
    lm_head only at the asked rows (full logits at 128K with V = 50,304 would be 12 GB in bf16). Sequences longer
    than chunk_threshold, or all once force_chunked is set (after an OOM at batch 1), use model.prefill_chunked.
    """

    def __init__(self, model, chunk_threshold=16384, chunk_size=8192, autocast_dtype=None):
        self.model, self.chunk_threshold, self.chunk_size = model, chunk_threshold, chunk_size
        self.autocast_dtype, self.force_chunked = autocast_dtype, False

    def chunked(self, length):
        return self.force_chunked or bool(self.chunk_threshold and length > self.chunk_threshold)

    @torch.no_grad()
    def __call__(self, idx, positions):
        with torch.autocast("cuda", self.autocast_dtype or torch.float32, enabled=bool(self.autocast_dtype and
                                                                                       idx.is_cuda)):
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


def score_with_backoff(score_fn, samples, state, device="cpu"):
    """score_samples in batches of state["batch"]; on CUDA out-of-memory free the cache and halve the batch, and at
    batch 1 switch the scorer to chunked prefill before giving up."""
    out, i = [], 0
    while i < len(samples):
        try:
            out += score_samples(score_fn, samples[i:i + state["batch"]], device)
            i += state["batch"]
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if state["batch"] > 1:
                state["batch"] //= 2
            elif getattr(score_fn, "force_chunked", True) is False:
                score_fn.force_chunked = state["chunked"] = True
            else:
                raise
    return out

# -----------------------------------------------------------------------------
# attention probe: what the query attends to, recomputed from q, k captured with forward hooks (model.py unchanged)


@torch.no_grad()
def attention_probe(model, idx, rows, lucid_rows=None):
    """
    Per layer: the attention probabilities (B, H, R, T) of query positions rows (B, R), softmax(q·k/√d) with the
    causal mask, recomputed from the attention modules' inputs. For LUCID they weight V' = L⁻¹V, so with lucid_rows
    (B, R') it also returns, per layer, those rows of L⁻¹ (B, Hkv, R', T): how V' at that position mixes the values.
    """
    inputs = []
    hooks = [b.attn.register_forward_hook(lambda m, args, out: inputs.append(args)) for b in model.blocks]
    try:
        model.forward_hidden(idx)
    finally:
        for h in hooks:
            h.remove()
    import lucid
    from model import apply_rope
    probs, inverse = [], []
    for block, (x, rope, *_) in zip(model.blocks, inputs):
        a, (B, T, _) = block.attn, x.shape
        q = a.c_q(x).view(B, T, a.n_head, a.head_dim).transpose(1, 2)                      # (B, H, T, D)
        k = a.c_kv(x).view(B, T, 2, a.n_kv_head, a.head_dim)[:, :, 0].transpose(1, 2)       # (B, Hkv, T, D)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q = torch.gather(q, 2, rows[:, None, :, None].expand(-1, a.n_head, -1, a.head_dim))   # (B, H, R, D)
        s = q.float() @ k.float().repeat_interleave(a.n_head // a.n_kv_head, 1).transpose(-1, -2) / a.head_dim ** 0.5
        s = s.masked_fill(torch.arange(T, device=x.device) > rows[:, None, :, None], float("-inf"))
        probs.append(s.softmax(-1))                                                          # (B, H, R, T)
        if lucid_rows is not None and a.attn == "lucid":
            kh, _ = lucid.rms_normalize(k.double())
            L = lucid._unit_lower(lucid.preconditioner_entries(kh, kh))                    # (B, Hkv, T, T)
            inv = torch.linalg.solve_triangular(L, torch.eye(T, dtype=L.dtype, device=L.device), upper=False)
            inverse.append(torch.gather(inv, 2, lucid_rows[:, None, :, None].expand(-1, a.n_kv_head, -1, T)).float())
    return (probs, inverse) if lucid_rows is not None else probs


def probe_masses(model, samples, device="cpu"):
    """
    Per sample: (mass on the matching needle, mean mass per other needle-like pair), each (layers, heads): the
    attention that the position predicting the first queried value puts on those spans' tokens.
    """
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
    """The head with the largest mean mass on the matching needle: its mean mass ("hit") and per-distractor mass."""
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
    """
    Model A against model B on the same samples, with the sample as the unit for the test and the interval alike: a
    sample is right iff all its queried values are. Δ = (b − c)/n over discordant counts b (only A right) and c (only
    B right), its 95% percentile interval from resampling samples, McNemar's exact test on b, c.
    """
    ok_a, ok_b = np.array([all(x) for x in a], float), np.array([all(y) for y in b], float)
    d = ok_a - ok_b
    only_a, only_b = int((d > 0).sum()), int((d < 0).sum())
    means = d[np.random.default_rng(seed).integers(0, len(d), size=(n_boot, len(d)))].mean(1)
    return {"delta": float(d.mean()), "delta_ci95": [float(np.percentile(means, 2.5)),
                                                     float(np.percentile(means, 97.5))],
            "discordant": [only_a, only_b], "mcnemar_p": mcnemar_exact(only_a, only_b)}


def cell_stats(correct, copier):
    """acc over queried values with its Wilson interval (n = samples: a sample's queries are correlated), the
    fraction of samples with every value right, and the key-blind copier's accuracy on the same values."""
    n, n_values = len(correct), sum(len(c) for c in correct)
    acc = sum(map(sum, correct)) / max(1, n_values)
    return {"n_samples": n, "n_values": n_values, "acc": acc, "ci95": list(wilson(acc, n)),
            "all_correct": sum(all(c) for c in correct) / max(1, n), "copier": sum(map(sum, copier)) / max(1, n_values)}


def effective_length(accs, threshold=0.9):
    """The largest L with acc >= threshold at every length <= L; accs is [(length, acc or None)]; 0 if none."""
    best = 0
    for length, acc in sorted(accs):
        if acc is None or acc < threshold:
            break
        best = length
    return best

# -----------------------------------------------------------------------------
# evaluation: cells, grids, resume


@dataclass(frozen=True)
class EvalSpec:
    """What decides a cell's samples besides the task and the (length, needles) cell."""
    variant: str = "multikey"
    queries: int = 1            # per sample: 1 = one question (RULER niah_multikey_1), more = packed (multiquery)
    depths: tuple = ()          # pinned depths in %, cycled over a cell's samples; () = uniform
    samples: int = 100
    seed: int = 0
    domain: int = EVAL

    def n_queries(self, n_needles):
        return 1 if self.variant == "multivalue" else min(n_needles, self.queries)

    def depth(self, index):
        return self.depths[index % len(self.depths)] if self.depths else None


def cell_sample(task, spec, length, n_needles, index):
    """Sample `index` of a cell; its generator's key holds only what changes this sample."""
    q, depth = spec.n_queries(n_needles), spec.depth(index)
    rng = sample_rng(spec.seed, spec.domain, task.key, length, n_needles, index, spec.variant, q,
                     0 if depth is None else 1 + round(depth * 1000))
    return task.sample(rng, length, n_needles, spec.variant, q, depth)


def model_id(model, info=None):
    """The identity of a model for the resume hash: a sha256 of its weights' bytes, its attention and iteration."""
    h = hashlib.sha256(f"{model.config.attn}:{(info or {}).get('iter_num')}".encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def cell_hash(task, spec, length, n_needles, ids=(), probe=0):
    """What makes a finished cell reusable on restart: the data, the cell, the models (by content), the probe."""
    text = json.dumps({"version": NEEDLE_VERSION, "task": task.describe(), "spec": asdict(spec), "length": length,
                       "needles": n_needles, "models": list(ids), "probe": probe}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_cell(score_fns, task, spec, length, n_needles, budget=16384, device="cpu", ids=(), probe=0):
    """
    One (length, needles) cell for one score_fn, or a list of them (all on identical samples; the first is the
    model, a second is compared with it). Samples are drawn and scored in batches of max(1, budget // length).
    Returns its record; a cell whose needles do not fit has acc None and a skipped_reason.
    """
    fns = score_fns if isinstance(score_fns, (list, tuple)) else [score_fns]
    q = spec.n_queries(n_needles)
    rec = {"hash": cell_hash(task, spec, length, n_needles, ids, probe), "length": length, "num_needles": n_needles,
           "n_samples": 0, "acc": None, "copier": None, "chance": task.chance(spec.variant, n_needles),
           "skipped_reason": None, "seconds": 0.0}
    t0, states = time.time(), [{"batch": max(1, min(spec.samples, budget // length)), "chunked": False} for _ in fns]
    for fn, state in zip(fns, states):
        state["chunked"] = bool(getattr(fn, "chunked", lambda T: False)(length))
    results, copier, depths, probes = [[] for _ in fns], [], [], [[] for _ in fns]
    fingerprint = hashlib.sha256()
    for first in range(0, spec.samples, states[0]["batch"]):
        try:
            batch = [cell_sample(task, spec, length, n_needles, i)
                     for i in range(first, min(spec.samples, first + states[0]["batch"]))]
        except DoesNotFit as e:
            rec["skipped_reason"] = str(e)
            return rec
        for s in batch:
            fingerprint.update(s.tokens.tobytes() + s.targets.tobytes())
            copier.append(s.copier)
            depths.append(s.depths)
        for r, fn, state, pr in zip(results, fns, states, probes):
            r += score_with_backoff(fn, batch, state, device)
            if len(pr) < probe and hasattr(fn, "model"):
                pr += probe_masses(fn.model, batch[:probe - len(pr)], device)
    bins = np.array([float(d) for d in spec.depths] or [float(d) for d in range(0, 101, 10)])
    hist = {float(b): [0, 0] for b in bins}
    for ds, correct in zip(depths, results[0]):
        for d, c in zip(ds, correct):
            hist[float(bins[np.argmin(np.abs(bins - d))])][0] += 1
            hist[float(bins[np.argmin(np.abs(bins - d))])][1] += int(c)
    rec.update(cell_stats(results[0], copier), n_queries=q, seconds=round(time.time() - t0, 3),
               batch=states[0]["batch"], chunked=states[0]["chunked"], fingerprint=fingerprint.hexdigest(),
               depth_hist=[[b, n, c] for b, (n, c) in hist.items() if n])
    if probes[0]:
        rec["probe"] = probe_summary(probes[0])
    if len(fns) > 1:
        other = cell_stats(results[1], copier)
        rec["vs"] = {"acc": other["acc"], "ci95": other["ci95"], "all_correct": other["all_correct"],
                     "batch": states[1]["batch"], **paired_stats(results[0], results[1])}
        if probes[1]:
            rec["vs"]["probe"] = probe_summary(probes[1])
    return rec


def run_grid(score_fns, task, spec, lengths, needle_counts, out=None, ids=(), meta=None, budget=16384,
             device="cpu", probe=0, log=print):
    """
    Every (length, needles) cell, short to long; returns the result document. With `out` the JSON is rewritten after
    every cell (temporary file + rename, always valid), and cells whose hash an existing `out` holds are reused.
    """
    started, done = time.time(), {}
    if out and os.path.exists(out):
        with open(out) as f:
            done = {c["hash"]: c for c in json.load(f).get("cells", [])}
    doc = {"meta": {**(meta or {}), **task.describe(), "needle_version": NEEDLE_VERSION, "variant": spec.variant,
                    "queries": spec.queries, "seed": spec.seed, "domain": spec.domain, "samples": spec.samples,
                    "metric": "teacher-forced exact match", "numpy": np.__version__, "torch": torch.__version__,
                    "started": datetime.datetime.now().isoformat(timespec="seconds")},
           "grid": {"lengths": sorted(lengths), "num_needles": sorted(needle_counts), "depths": list(spec.depths)},
           "cells": []}
    grid = [(L, n) for L in sorted(lengths) for n in sorted(needle_counts)]
    for k, (length, n) in enumerate(grid):
        label = f"[{k + 1}/{len(grid)}] length {length_label(length)} needles {n}"
        h = cell_hash(task, spec, length, n, ids, probe)
        rec = done.get(h) or run_cell(score_fns, task, spec, length, n, budget, device, ids, probe)
        if h in done:
            log(f"{label}: done before, reused")
        elif rec["skipped_reason"]:
            log(f"{label}: skipped ({rec['skipped_reason']})")
        else:
            line = (f"{label}: acc {100 * rec['acc']:.1f} [{100 * rec['ci95'][0]:.1f}, {100 * rec['ci95'][1]:.1f}]"
                    f" copier {100 * rec['copier']:.1f}")
            if "probe" in rec:
                line += f" hit {rec['probe']['hit']:.2f}"
            if "vs" in rec:
                v = rec["vs"]
                line += (f" | vs {100 * v['acc']:.1f}, Δ {100 * v['delta']:+.1f} [{100 * v['delta_ci95'][0]:+.1f}, "
                         f"{100 * v['delta_ci95'][1]:+.1f}] p {v['mcnemar_p']:.3g}")
            log(f"{line} | batch {rec['batch']}{' chunked' if rec['chunked'] else ''} | {rec['seconds']:.1f}s")
        doc["cells"].append(rec)
        finish(doc, started)
        if out:
            write_json(out, doc)
    return doc


def finish(doc, started):
    """Recompute the derived keys: depth_cells, data_fingerprint, wall_s."""
    doc["depth_cells"] = [{"length": c["length"], "num_needles": c["num_needles"], "depth_bin": b, "n": n,
                           "acc": k / n} for c in doc["cells"] for b, n, k in c.get("depth_hist", [])]
    prints = "".join(c.get("fingerprint") or "" for c in doc["cells"])
    doc["data_fingerprint"] = hashlib.sha256(prints.encode()).hexdigest() if prints else None
    doc["meta"]["wall_s"] = round(time.time() - started, 3)

# -----------------------------------------------------------------------------
# outputs: tables, JSON, heatmaps, the --show figure


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
    """
    Rows needle counts, columns lengths, cells in % (— if skipped), each row ending with its effective length (the
    largest L with acc >= threshold at every length <= L). results maps (length, needles) to an accuracy, None, or
    a cell record, from which `key` is shown: "acc", "copier", "all_correct", or "vs" (the second model's acc).
    """
    def value(r):
        if isinstance(r, dict):
            r = (r.get("vs") or {}).get("acc") if key == "vs" else r.get(key)
        return r
    lines = ["needles | " + " | ".join(f"{length_label(L):>6}" for L in lengths) + f" | eff@{threshold:g}"]
    for n in needle_counts:
        cells = [value(results.get((L, n))) for L in lengths]
        eff = effective_length(list(zip(lengths, cells)), threshold)
        eff = "—" if all(a is None for a in cells) else length_label(eff) if eff else f"<{length_label(min(lengths))}"
        lines.append(f"{n:>7} | " + " | ".join("     —" if a is None else f"{100 * a:6.1f}" for a in cells)
                     + f" | {eff:>6}")
    return "\n".join(lines)


def write_json(path, doc):
    """Write through a temporary file and rename, so the file on disk is always a complete JSON document."""
    with open(f"{path}.tmp", "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(f"{path}.tmp", path)


def pyplot():
    """matplotlib.pyplot with the Agg backend, or None if matplotlib is not installed (it is optional)."""
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
    plt, paths = pyplot(), []
    if plt is None:
        return paths
    from matplotlib.colors import LinearSegmentedColormap
    cmap = LinearSegmentedColormap.from_list("needle", ["#F0496E", "#EBB839", "#0CD79F"])
    meta = doc["meta"]
    for n in sorted({d["num_needles"] for d in doc["depth_cells"]}):
        cells = [d for d in doc["depth_cells"] if d["num_needles"] == n]
        lengths, bins = sorted({d["length"] for d in cells}), sorted({d["depth_bin"] for d in cells})
        grid = np.full((len(bins), len(lengths)), np.nan)
        fig, ax = plt.subplots(figsize=(17.5, 8))
        for d in cells:
            i, j = bins.index(d["depth_bin"]), lengths.index(d["length"])
            grid[i, j] = d["acc"]
            ax.text(j, i, f"{100 * d['acc']:.0f}%\nn={d['n']}", ha="center", va="center", fontsize=8)
        im = ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(lengths)), [length_label(L) for L in lengths], rotation=45)
        ax.set_yticks(range(len(bins)), [f"{b:g}" for b in bins])
        ax.set(xlabel="context length (tokens)", ylabel="depth of the queried needle (%)",
               title=f"{meta.get('task')} {meta.get('variant')}, {meta.get('haystack')} haystack, {n} needles "
                     "(teacher-forced exact match; n = values scored per depth bin)")
        fig.colorbar(im, ax=ax, label="Score")
        fig.tight_layout()
        paths.append(f"{prefix}_{meta.get('task')}_{meta.get('variant')}_n{n}.png")
        fig.savefig(paths[-1])
        plt.close(fig)
    return paths


def show_sample(path, models, names, sample, device="cpu"):
    """
    One figure for one sample. Rows: layer and head. Columns: each model's attention from the position that predicts
    the first queried value, over all positions (the queried needle in green); for a LUCID model also the row of L⁻¹
    at the queried needle's value, zoomed in: V' there = Σ_j L⁻¹[r, j]·v_j, i.e. how much of each earlier value the
    preconditioning subtracts (shared by the query heads of one KV head).
    """
    plt = pyplot()
    if plt is None:
        raise ValueError("--show needs matplotlib (pip install matplotlib)")
    idx = torch.from_numpy(sample.tokens)[None].to(device)
    query, (lo, hi) = int(sample.answers[0][0]), sample.spans[sample.asked[0]]
    cols = []
    for model, name in zip(models, names):
        probs, inv = attention_probe(model, idx, torch.tensor([[query]], device=device),
                                     torch.tensor([[int(hi) - 1]], device=device))
        ok = score_samples(ModelScorer(model), [sample], device)[0][0]
        cols.append((f"{name} ({model.config.attn}, answer {'right' if ok else 'wrong'}): attention of position "
                     f"{query}", [p[0, :, 0] for p in probs], None))
        if inv:
            g = model.config.n_head // model.config.n_kv_head
            cols.append((f"{name}: row {int(hi) - 1} of L⁻¹ (V' at the needle's value = Σ L⁻¹·V)",
                         [i[0, :, 0].repeat_interleave(g, 0) for i in inv], (max(0, lo - 64), hi + 2)))
    layers, heads = len(cols[0][1]), cols[0][1][0].shape[0]
    fig, axes = plt.subplots(layers * heads, len(cols), figsize=(6 * len(cols), 1.7 * layers * heads + 1.2),
                             squeeze=False)
    for c, (title, per_layer, zoom) in enumerate(cols):
        for layer in range(layers):
            for h in range(heads):
                ax = axes[layer * heads + h, c]
                ax.axvspan(lo - 0.5, hi - 0.5, color="#0CD79F", alpha=0.5, lw=2)
                y = per_layer[layer][h].cpu().numpy()
                ax.plot(np.arange(zoom[0], zoom[1]) if zoom else np.arange(len(y)), y[slice(*zoom) if zoom else
                                                                                          slice(None)], "k", lw=0.8)
                ax.set_ylabel(f"layer {layer} head {h}", fontsize=8)
                ax.tick_params(labelsize=7)
        axes[0, c].set_title(title, fontsize=9)
        axes[-1, c].set_xlabel("position (zoomed in)" if zoom else "position")
    n_pairs = len(sample.spans)
    fig.suptitle(f"one sample: {len(sample.tokens)} tokens, the queried needle at {lo}..{hi - 1} (green), "
                 f"{n_pairs - 1} other needle-like pairs; y: weight", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

# -----------------------------------------------------------------------------
# command line

PRESETS = {     # the paper's MNIAH (Fig. 4): 2-10 needles, one query, 500 samples, 2K-8K; longer with --lengths
    "lucid_mniah": {"variant": "multikey", "needles": [2, 4, 6, 8, 10], "samples": 500, "queries": 1,
                    "lengths": [2048, 4096, 6144, 8192]},
}
DEFAULTS = {"variant": "multikey", "needles": [1, 4, 16], "samples": 100, "queries": 1, "lengths": [128, 512, 2048]}


def _list(kind, convert):
    def parse(text):
        try:
            items = [convert(x) for x in text.split(",") if x.strip()]
        except (ValueError, argparse.ArgumentTypeError) as e:
            raise argparse.ArgumentTypeError(f"invalid {kind} list {text!r}: {e}") from None
        if not items:
            raise argparse.ArgumentTypeError(f"empty {kind} list {text!r}")
        return items
    return parse


def _int(low):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= {low}")
        return value
    return parse


def _depth(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"depth {text!r} is not a number") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"depth {text!r} is outside 0..100")
    return value


def build_parser():
    d = DEFAULTS
    p = argparse.ArgumentParser(description="Needle retrieval accuracy of checkpoints (teacher-forced exact match), "
                                "with the key-blind copier and chance beside it, and an attention probe.")
    p.add_argument("--ckpt", required=True, help="ckpt.pt written by train.py")
    p.add_argument("--vs", help="a second checkpoint, evaluated on identical samples (paired comparison)")
    p.add_argument("--attn", choices=("softmax", "lucid"), help="run --ckpt with this attention instead of its own")
    p.add_argument("--task", choices=("token", "text"), default="token", help="token ids, or text through a tokenizer")
    p.add_argument("--preset", choices=sorted(PRESETS), help="lucid_mniah: 2-10 needles, 500 samples, 2K-8K")
    p.add_argument("--variant", choices=VARIANTS, help=f"what is asked (default {d['variant']})")
    p.add_argument("--queries", type=_int(1), help="queries per sample (default 1; more = packed multiquery)")
    p.add_argument("--haystack", help=f"token: {'/'.join(TOKEN_HAYSTACKS)}; text: {'/'.join(TEXT_HAYSTACKS)} "
                                      "(default needle: distractor needles, no copy shortcut)")
    p.add_argument("--lengths", type=_list("length", parse_length),
                   help="default 128,512,2K (CPU-sized; the GPU runs use e.g. 1K,...,128K)")
    p.add_argument("--needles", type=_list("needle", _int(1)), help="needle counts (default 1,4,16)")
    p.add_argument("--samples", type=_int(1), help=f"samples per cell (default {d['samples']}; ±5 points needs ~400)")
    p.add_argument("--depths", type=_list("depth", _depth), help="pin the queried needle's depth %%, e.g. 0,50,100")
    p.add_argument("--seed", type=_int(0), default=0, help="seed of the samples (domain 1: never trained on)")
    p.add_argument("--probe", type=_int(0), default=16, help="samples per cell for the attention probe (0 = off)")
    p.add_argument("--template", choices=TEMPLATES, help="text: prompt wording (default completion)")
    p.add_argument("--keys", choices=TEXT_KINDS, help="text: what keys are (default words)")
    p.add_argument("--values", choices=TEXT_KINDS, help="text: what values are (default numbers)")
    p.add_argument("--tokenizer", help="text: tiktoken encoding (default gpt2; 'bytes' = byte-level, offline)")
    p.add_argument("--haystack_file", help="text: plain text to cut the haystack from")
    p.add_argument("--out", help="JSON results, rewritten after every cell; an existing file resumes; heatmaps beside")
    p.add_argument("--show", help="write one figure (PNG) of the attention on one sample instead of evaluating")
    p.add_argument("--budget", type=parse_length, help="tokens per batch (default 256K softmax, 128K LUCID)")
    p.add_argument("--chunk_threshold", type=parse_length, default=16384, help="chunked prefill above this length")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda[:i]")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), help="autocast on CUDA (default bfloat16); CPU fp32")
    return p


def resolve_args(parser, args):
    """Fill defaults (a preset first) and check the combination; errors go through parser.error (exit 2)."""
    preset, user_needles = PRESETS.get(args.preset, {}), args.needles is not None
    for name in ("variant", "queries", "samples", "lengths", "needles"):
        if getattr(args, name) is None:
            setattr(args, name, preset.get(name, DEFAULTS[name]))
    if args.variant == "single":
        if user_needles and args.needles != [1]:
            parser.error(f"--variant single has exactly 1 needle, got --needles {args.needles}")
        args.needles = [1]
    allowed = TOKEN_HAYSTACKS if args.task == "token" else TEXT_HAYSTACKS
    args.haystack = args.haystack or "needle"
    if args.haystack not in allowed:
        parser.error(f"--haystack {args.haystack!r} is not a {args.task} haystack; choose from {allowed}")
    text_only = ("template", "keys", "values", "tokenizer", "haystack_file")
    if args.task == "token" and any(getattr(args, n) is not None for n in text_only):
        parser.error("--" + next(n for n in text_only if getattr(args, n) is not None) + " applies to --task text")
    if args.haystack_file and not os.path.isfile(args.haystack_file):
        parser.error(f"--haystack_file {args.haystack_file!r} does not exist")
    if "cuda" in args.device and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here; use --device cpu")
    if args.out and os.path.isdir(args.out):
        parser.error(f"--out {args.out!r} is a directory")
    return args


def model_meta(path, model, info):
    cfg = model.config
    return {"ckpt": os.path.abspath(path), "id": model_id(model, info), "iter_num": info.get("iter_num"),
            "n_params": model.num_params(), "attention": cfg.attn, "pos_enc": cfg.pos, "token_shift": cfg.token_shift,
            "train_len": cfg.block_size, "vocab_size": cfg.vocab_size}


def main(argv=None):
    parser = build_parser()
    args = resolve_args(parser, parser.parse_args(argv))
    from model import load_model
    try:                                            # a missing or truncated checkpoint: one line, no traceback
        models = [load_model(args.ckpt, args.device, args.attn)] + ([load_model(args.vs, args.device)] if args.vs
                                                                    else [])
        vocab = models[0][0].config.vocab_size
        if any(m.config.vocab_size != vocab for m, _ in models):
            raise ValueError(f"--vs has vocab_size {models[-1][0].config.vocab_size}, --ckpt has {vocab}")
        if args.task == "token":
            task = TokenTask(vocab, args.haystack)
        else:
            enc = load_encoder(args.tokenizer or "gpt2")
            if enc.n_vocab > vocab:
                raise ValueError(f"tokenizer {args.tokenizer!r} has {enc.n_vocab} ids, the model only {vocab}")
            task = TextTask(enc, args.haystack, args.keys or "words", args.values or "numbers",
                            args.template or "completion", args.haystack_file)
    except ValueError as e:
        sys.exit(f"needle.py: {e}")
    spec = EvalSpec(args.variant, args.queries, tuple(args.depths or ()), args.samples, args.seed)
    names = [args.ckpt] + ([args.vs] if args.vs else [])
    if args.show:
        s = cell_sample(task, spec, args.lengths[0], args.needles[0], 0)
        try:
            print(f"wrote {show_sample(args.show, [m for m, _ in models], names, s, args.device)}")
        except ValueError as e:
            sys.exit(f"needle.py: {e}")
        return None
    dtype = (args.dtype or "bfloat16") if "cuda" in args.device else "float32"
    scorers = [ModelScorer(m, args.chunk_threshold, autocast_dtype=torch.bfloat16 if dtype == "bfloat16" else None)
               for m, _ in models]
    budget = args.budget or (128 if any(m.config.attn == "lucid" for m, _ in models) else 256) * 1024
    metas = [model_meta(n, m, info) for n, (m, info) in zip(names, models)]
    meta = {"model": metas[0], "vs_model": metas[1] if args.vs else None, "dtype": dtype, "device": args.device,
            "budget": budget, "command": sys.argv[1:] if argv is None else list(argv)}
    what = " vs ".join(f"{m['attention']}" for m in metas)
    print(f"{args.task} {args.variant}, {args.haystack} haystack, {spec.queries} queries per sample, {args.samples} "
          f"samples per cell, {what}, {args.device} {dtype}")
    doc = run_grid(scorers, task, spec, args.lengths, args.needles, args.out, [m["id"] for m in metas], meta, budget,
                   args.device, args.probe)
    results = {(c["length"], c["num_needles"]): c for c in doc["cells"]}
    L, N = sorted(args.lengths), sorted(args.needles)
    chance = ", ".join(sorted({f"{100 * c['chance']:.2g}%" for c in doc["cells"]}))
    print(f"\nteacher-forced exact match, % ({args.samples} samples per cell, {args.haystack} haystack); uniform chance "
          f"{chance}\n\nkey-blind copier (ignores the key, copies the first needle-like values it saw):")
    print(format_table(results, L, N, key="copier"))
    for name, key, meta_ in zip(names, ("acc", "vs"), metas):
        print(f"\n{name} ({meta_['attention']}):\n{format_table(results, L, N, key=key)}")
    if args.probe:
        print(f"\nattention hit (mass of the best head at the query on the matching needle; {args.probe} samples):")
        for name, key in zip(names, ("probe", "vs")):
            hit = {k: ((c.get(key) or {}).get("probe") if key == "vs" else c.get("probe")) for k, c in results.items()}
            print(f"{name}: " + ", ".join(f"{length_label(Lk)}/{n}: {h['hit']:.2f} (per distractor "
                                          f"{h['distractor']:.3f})" for (Lk, n), h in sorted(hit.items()) if h))
    if args.vs:
        print("\nΔ = first − second, points, per sample (right iff all its values are); 95% bootstrap CI; McNemar p:")
        for (Lk, n), c in sorted(results.items()):
            if "vs" in c:
                v = c["vs"]
                print(f"  {length_label(Lk):>5} {n:>3} needles: Δ {100 * v['delta']:+6.1f} [{100 * v['delta_ci95'][0]:+.1f}"
                      f", {100 * v['delta_ci95'][1]:+.1f}]  discordant {v['discordant']}  p {v['mcnemar_p']:.3g}")
    if args.out:
        for path in write_heatmaps(doc, os.path.splitext(args.out)[0]):
            print(f"wrote {path}")
        print(f"wrote {args.out} (data fingerprint {str(doc['data_fingerprint'])[:16]})")
    return doc


if __name__ == "__main__":
    main()
