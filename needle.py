"""
Synthetic needle retrieval: the training data of this repo and its long-context evaluation, from 1K to 128K tokens.

Two task families:

* Token level, no tokenizer. A sample is a haystack with `n` needles `k v` (a key token followed by its value token)
  at non-overlapping positions, followed by queries `Q k v`: the model must produce the value that followed key k.
  Keys, values and filler come from disjoint ranges of the vocabulary, so a needle never looks like filler:

    ids  0..7          reserved: PAD = 0, QUERY = 1
    F    next half     filler (haystack)
    K    next quarter  keys
    W    last quarter  values            e.g. vocab 1024: F = 8..515, K = 516..769, W = 770..1023

  The variants follow RULER's (keys, values per key, queries): single, multikey, multivalue, multiquery; the haystack
  is random filler, a repeated period, or distractor needles. The same generator makes the training batches.
* Text level: RULER-style prompts through a tiktoken encoder (or any object with encode / decode / n_vocab /
  eot_token), over locally generated haystacks (noise sentences, a small seeded essay grammar, distractor needles).

Every sample has its own random generator seeded by (seed, domain, task, length, needles, sample index), so a sample
never depends on the batch size, the evaluation order or which other cells run; domain 0 is training, domain 1 is
evaluation, so evaluation samples are never trained on. Scoring is teacher-forced exact match: one forward over
prompt + gold answer, logits only at the answer positions. Long contexts run with token-budget batching and chunked
prefill; every cell gets a Wilson interval, and two checkpoints can be compared on identical samples (McNemar's
exact test and a paired bootstrap).

    python needle.py --ckpt out/ckpt.pt --lengths 1K,2K,4K --needles 1,4,8 --samples 400 --out needle.json
    python needle.py --ckpt out-needle-lucid/ckpt.pt --preset lucid_mniah --vs out-needle-softmax/ckpt.pt --out mniah.json
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
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch

NEEDLE_VERSION = 1          # bump when the samples drawn for existing arguments change
PAD, QUERY = 0, 1
N_RESERVED = 8
TRAIN, EVAL = 0, 1          # the `domain` of a sample's seed
IGNORE = -100               # target of positions that are not scored

VARIANTS = ("single", "multikey", "multivalue", "multiquery")
TOKEN_HAYSTACKS = ("random", "repeat", "needle")
QUERY_MODES = ("faithful", "packed")
PACKED_QUERIES = 8          # queries per sample in packed mode
REPEAT_PERIOD = (20, 25)    # the `repeat` haystack's period, about the length of RULER's noise sentences

# -----------------------------------------------------------------------------
# token-level task: vocabulary, needle placement, samples, training batches


@dataclass
class Sample:
    """One sequence of exactly `length` tokens and what is scored in it."""
    tokens: np.ndarray      # (T,) int64
    targets: np.ndarray     # (T,) the token to predict at position p (the next token), IGNORE where not scored
    answers: list           # per queried value: the positions whose predictions must all be right (int64 arrays)
    depths: np.ndarray      # per queried value: the depth in % of its needle (multivalue: the pinned one, else
                            # the first in order of appearance)


def vocab_layout(vocab_size):
    """The disjoint id ranges [lo, hi) of filler, keys and values for a vocabulary of vocab_size ids."""
    if vocab_size < 64:
        raise ValueError(f"the needle task needs vocab_size >= 64, got {vocab_size}")
    free = vocab_size - N_RESERVED
    n_keys = n_values = free // 4
    filler = (N_RESERVED, vocab_size - n_keys - n_values)
    keys = (filler[1], filler[1] + n_keys)
    values = (keys[1], vocab_size)
    return {"filler": filler, "keys": keys, "values": values}


def sample_rng(seed, domain, task, length, n_needles, index, variant=None):
    """
    The generator of one sample. Strings are hashed with crc32 because hash() is salted per process. `variant` (a
    string naming everything else that shapes the sample) is left out for the original multikey task, so its training
    and evaluation samples stay what they were.
    """
    parts = [seed, domain, zlib.crc32(task.encode())]
    if variant is not None:
        parts.append(zlib.crc32(variant.encode()))
    return np.random.default_rng(parts + [length, n_needles, index])


def max_needles(length, vocab_size, n_queries=1):
    """The most multikey needles (2 tokens each) a sample of this length can hold with distinct keys and values."""
    layout = vocab_layout(vocab_size)
    distinct = min(layout["keys"][1] - layout["keys"][0], layout["values"][1] - layout["values"][0])
    return max(0, min(distinct, (length - 3 * n_queries) // 2))


def token_capacity_error(length, n_needles, vocab_size, variant="multikey", n_queries=1, haystack="random"):
    """Why these needles cannot fit a token-level sample (a sentence), or None if they fit."""
    layout = vocab_layout(vocab_size)
    n_k, n_w = layout["keys"][1] - layout["keys"][0], layout["values"][1] - layout["values"][0]
    if variant == "single" and n_needles != 1:
        return f"the single variant has exactly 1 needle, got {n_needles}"
    if n_needles < 1:
        return f"need at least 1 needle, got {n_needles}"
    if variant == "multivalue":
        suffix, keys_needed = 2 + n_needles, 1
    else:
        if not 1 <= n_queries <= n_needles:
            return f"need 1 <= n_queries <= n_needles, got n_queries={n_queries}, n_needles={n_needles}"
        suffix, keys_needed = 3 * n_queries, n_needles
    spare = 1 if haystack == "needle" else 0        # distractor needles need at least one unused key and value
    if keys_needed + spare > n_k or n_needles + spare > n_w:
        return (f"{n_needles} needles need {keys_needed + spare} distinct keys and {n_needles + spare} distinct "
                f"values; vocab_size {vocab_size} has {n_k} and {n_w}")
    room = length - suffix
    if haystack == "needle":
        room -= room % 2                            # needles sit on the distractors' 2-token grid
    if 2 * n_needles > room:
        return f"{n_needles} needles and {n_queries} queries do not fit in length {length}"
    return None


def place_needles(rng, haystack_len, n, unit=1, depth=None):
    """
    Start positions (sorted) of n non-overlapping 2-token needles in [0, haystack_len), on a grid of `unit` tokens,
    and the index of the pinned needle (None if depth is None). Unpinned: sorted gaps over the free slots, so every
    arrangement is equally likely. Pinned: the other n − 1 needles are placed in a haystack without the pinned one,
    which is then inserted at the requested depth; if that point splits a needle, the nearer side of it is taken,
    so the pinned start is within ±1 token of depth% · (haystack_len − 2).
    """
    slots, width = haystack_len // unit, 2 // unit
    if depth is None:
        starts = np.sort(rng.integers(0, slots - width * n + 1, size=n)) + width * np.arange(n)
        return unit * starts, None
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
    One token-level sample of exactly `length` tokens: `[haystack with needles] [Q k v] ...` (multivalue: one
    `[Q k v1 .. vm]` block). `depth` (in %) pins the first queried needle; the other needles stay uniform.
    For the default arguments the random draws are those of the original generator, so the training data is unchanged.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    if haystack not in TOKEN_HAYSTACKS:
        raise ValueError(f"unknown token haystack {haystack!r}; choose from {TOKEN_HAYSTACKS}")
    reason = token_capacity_error(length, n_needles, vocab_size, variant, n_queries, haystack)
    if reason:
        raise ValueError(reason)
    layout = vocab_layout(vocab_size)
    multivalue = variant == "multivalue"
    haystack_len = length - (2 + n_needles if multivalue else 3 * n_queries)
    tokens = rng.integers(*layout["filler"], size=length) if haystack == "random" else None
    keys = rng.choice(np.arange(*layout["keys"]), size=1 if multivalue else n_needles, replace=False)
    values = rng.choice(np.arange(*layout["values"]), size=n_needles, replace=False)
    if haystack == "repeat":
        period = rng.integers(*layout["filler"], size=int(rng.integers(REPEAT_PERIOD[0], REPEAT_PERIOD[1] + 1)))
        tokens = np.resize(period, length)
    elif haystack == "needle":                      # distractor pairs: unused keys with values no real key has
        tokens = rng.integers(*layout["filler"], size=length)
        pairs = length // 2
        tokens[0:2 * pairs:2] = rng.choice(np.setdiff1d(np.arange(*layout["keys"]), keys), size=pairs)
        tokens[1:2 * pairs:2] = rng.choice(np.setdiff1d(np.arange(*layout["values"]), values), size=pairs)
    starts, pinned = place_needles(rng, haystack_len, n_needles, 2 if haystack == "needle" else 1, depth)
    tokens[starts], tokens[starts + 1] = (np.repeat(keys, n_needles) if multivalue else keys), values
    targets = np.full(length, IGNORE, dtype=np.int64)
    depth_of = 100.0 * starts / max(1, haystack_len - 2)
    p = haystack_len
    if multivalue:                                  # Q k v1 .. vm: the values in order of appearance
        tokens[p], tokens[p + 1], tokens[p + 2:p + 2 + n_needles] = QUERY, keys[0], values
        targets[p + 1:p + 1 + n_needles] = values
        shown = depth_of[[0 if pinned is None else pinned]]      # the pinned needle, else the first
        return Sample(tokens.astype(np.int64), targets, [np.arange(p + 1, p + 1 + n_needles)], shown)
    if pinned is None:
        asked = rng.choice(n_needles, size=n_queries, replace=False)
    else:
        rest = np.delete(np.arange(n_needles), pinned)
        asked = np.concatenate([[pinned], rng.choice(rest, size=n_queries - 1, replace=False)]).astype(np.int64)
    answers = []
    for q, needle in enumerate(asked):
        p = haystack_len + 3 * q
        tokens[p], tokens[p + 1], tokens[p + 2] = QUERY, keys[needle], values[needle]
        targets[p + 1] = values[needle]             # predicted from the query key's position
        answers.append(np.array([p + 1]))
    return Sample(tokens.astype(np.int64), targets, answers, depth_of[asked])


def make_sample(rng, length, n_needles, n_queries, vocab_size):
    """
    One multi-key sample of exactly `length` tokens: returns (tokens, targets, answer_pos, depths), numpy int64.
    targets[p] is the token the model must predict at position p (the next token) or IGNORE; answer_pos holds the
    positions p whose prediction is a queried value, in query order; depths are the queried needles' depth in %.
    """
    if not 1 <= n_queries <= n_needles:
        raise ValueError(f"need 1 <= n_queries <= n_needles, got n_queries={n_queries}, n_needles={n_needles}")
    s = make_token_sample(rng, length, n_needles, vocab_size, "multikey", "random", n_queries)
    return s.tokens, s.targets, np.array([a[0] for a in s.answers], dtype=np.int64), s.depths


def make_batch(seed, first_index, batch_size, length, vocab_size, domain=TRAIN, task="multikey",
               n_needles=None, needle_cap=32, query_cap=8):
    """
    Samples first_index .. first_index+batch_size-1 as (idx, targets), LongTensors (B, length).
    n_needles=None draws each sample's count uniformly from 1..min(needle_cap, length/16) (the training mix) and asks
    min(n, query_cap) of them; a fixed n_needles asks one query (the headline evaluation).
    """
    idx = np.empty((batch_size, length), dtype=np.int64)
    targets = np.empty((batch_size, length), dtype=np.int64)
    for b in range(batch_size):
        rng = sample_rng(seed, domain, task, length, n_needles or 0, first_index + b)
        if n_needles is None:
            n = int(rng.integers(1, max(1, min(needle_cap, length // 16, max_needles(length, vocab_size))) + 1))
            q = min(n, query_cap)
        else:
            n, q = n_needles, 1
        idx[b], targets[b], _, _ = make_sample(rng, length, n, q, vocab_size)
    return torch.from_numpy(idx), torch.from_numpy(targets)


def curriculum_length(it, max_iters, min_len, max_len):
    """Training length at iteration it: doubles from min_len to max_len in equal-step stages."""
    n_stages = int(math.log2(max_len // min_len)) + 1
    stage = min(it * n_stages // max(1, max_iters), n_stages - 1)
    return min(min_len * 2 ** stage, max_len)


class TokenTask:
    """The token-level task as an evaluation generator (the same interface as TextTask)."""
    kind = "token"

    def __init__(self, vocab_size, haystack="random"):
        if haystack not in TOKEN_HAYSTACKS:
            raise ValueError(f"unknown token haystack {haystack!r}; choose from {TOKEN_HAYSTACKS}")
        vocab_layout(vocab_size)                    # validates vocab_size
        self.vocab_size, self.haystack = vocab_size, haystack

    def key(self):
        return f"token/{self.haystack}"

    def describe(self):
        return {"task": "token", "haystack": self.haystack, "vocab_size": self.vocab_size, "tokenizer": None,
                "template": None}

    def capacity_error(self, length, n_needles, variant, n_queries):
        return token_capacity_error(length, n_needles, self.vocab_size, variant, n_queries, self.haystack)

    def sample(self, rng, length, n_needles, variant, n_queries, depth=None):
        return make_token_sample(rng, length, n_needles, self.vocab_size, variant, self.haystack, n_queries, depth)

    def chance(self):
        lo, hi = vocab_layout(self.vocab_size)["values"]
        return 1.0 / (hi - lo)

# -----------------------------------------------------------------------------
# text-level task (RULER-style prompts through a tokenizer)

TEXT_HAYSTACKS = ("noise", "essay", "needle")
TEXT_KINDS = ("words", "numbers", "uuids")   # what keys and values are made of
TEMPLATES = ("completion", "ruler", "passkey")

ADJECTIVES = """able active amber ancient angry annual bitter blank bold brave brief bright broad calm candid careful
cheap clever coastal cold common crisp curious daily damp dark deep dense direct distant dry eager early electric
empty equal exact faint fancy fast fierce final firm flat fluent formal fresh frozen gentle giant glad golden grand
green hasty heavy hidden hollow honest humble icy idle jolly keen kind large late lazy level light little lively
loud loyal lucky lunar magic major mellow mild minor misty modern narrow neat noble odd open orange pale plain polite
proud quick quiet rapid rare""".split()
NOUNS = """anchor apple arrow badge basket beacon bell blossom boat bottle bridge brook cabin camel candle canyon
castle cedar chair cloud comet copper coral crane crystal desert dolphin dragon drum eagle engine falcon feather
fence forest fossil fountain garden glacier glove harbor hammer harp helmet island jacket jungle kettle kite ladder
lantern lemon lighthouse lizard marble meadow mirror monkey mountain needle oasis ocean orchard otter owl paddle
parrot pebble pepper piano pillow planet pocket pond puzzle quarry rabbit raven ribbon river rocket saddle salmon
shadow shell statue temple thunder tiger tower tulip valley violin walnut whale willow window""".split()

# RULER's noise haystack repeats a few plain sentences; ours are the same kind of text.
NOISE_SENTENCES = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                   "There and back again.")

# A small grammar standing in for Paul Graham's essays: varied, plausible prose with no needle-like sentences.
ESSAY_SUBJECTS = ("Most founders", "Good programmers", "The best startups", "Investors", "Early users",
                  "Small teams", "Big companies", "Good writers", "Young hackers", "The people who win")
ESSAY_VERBS = ("underestimate", "learn a lot from", "tend to ignore", "care deeply about", "depend on",
               "keep looking for", "slowly build", "rarely change", "try to avoid", "eventually notice")
ESSAY_OBJECTS = ("how long things take", "what users actually want", "the problems nobody talks about",
                 "the details of the work", "a few early customers", "the cost of waiting", "new kinds of software",
                 "ideas that seem bad at first", "the shape of the market", "their own assumptions")
ESSAY_TAILS = ("", " in the beginning", " more than they admit", " when money is tight", " if they are lucky",
               " most of the time", " for years", " without noticing it")
ESSAY_POOL_SIZE = 2000
SPACERS = (" the", " and", " of", " a")     # candidates for a 1-token filler that pads the haystack to the exact length

RULER_TEMPLATE = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
                  "I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
                  "{type_needle_v} for {query} mentioned in the provided text? The special magic {type_needle_v} for "
                  "{query} mentioned in the provided text are")
RULER_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                 "I will quiz you about the important information there.\n")


def byte_encoding():
    """A byte-level tiktoken encoding (256 single-byte tokens + <|endoftext|> = 256): offline, round-trips any text."""
    import tiktoken
    return tiktoken.Encoding(
        name="bytes", pat_str=r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
        mergeable_ranks={bytes([i]): i for i in range(256)}, special_tokens={"<|endoftext|>": 256})


def gpt2_files_cached():
    """Whether tiktoken's gpt2 files are already in its cache, so that loading them needs no network."""
    import tempfile
    default = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    cache = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR", default))
    urls = ["https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
            "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"]
    return bool(cache) and all(os.path.exists(os.path.join(cache, hashlib.sha1(u.encode()).hexdigest())) for u in urls)


def load_encoder(name):
    """An encoder by name: "bytes" (built in) or a tiktoken encoding such as "gpt2" (cached or downloaded once)."""
    if name == "bytes":
        return byte_encoding()
    import tiktoken
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:
        raise ValueError(f"cannot load the tiktoken encoding {name!r} ({type(e).__name__}: {e}); offline machines need "
                         "a pre-filled $TIKTOKEN_CACHE_DIR, or use --tokenizer bytes") from None


def essay_pool(size=ESSAY_POOL_SIZE):
    """A fixed pool of grammar sentences (its own seed, so every run and sample draws from the same pool)."""
    rng = np.random.default_rng(zlib.crc32(b"essay pool"))
    parts = (ESSAY_SUBJECTS, ESSAY_VERBS, ESSAY_OBJECTS, ESSAY_TAILS)
    return [f"{s} {v} {o}{t}." for s, v, o, t in
            zip(*(np.asarray(p, dtype=object)[rng.integers(0, len(p), size=size)] for p in parts))]


def split_sentences(text):
    """Sentences of a plain text: whitespace normalised, cut after . ! or ?."""
    return [s for s in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text).strip()) if s]


def join_list(items):
    """RULER's list of queried keys: "a", "a and b"... written "a, b, and c"."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + ", and " + items[-1]


class TextTask:
    """
    RULER-style needle retrieval in text. A sample is `intro + context + question + answer`, exactly `length` tokens
    of `enc`, built from id lists: each haystack sentence is encoded once as " " + sentence, needle sentences are
    inserted at sentence boundaries, and the answer is the ids of " " + value. Every piece starts where GPT-2's
    pre-tokenizer would cut anyway (a space-prefixed word, a newline, punctuation), so the concatenated ids equal the
    encoding of the concatenated text; `enc.encode(enc.decode(ids)) == ids` checks it.
    """
    kind = "text"

    def __init__(self, enc, haystack="essay", keys="words", values="numbers", template="completion",
                 haystack_file=None):
        for name, value, allowed in (("haystack", haystack, TEXT_HAYSTACKS), ("keys", keys, TEXT_KINDS),
                                     ("values", values, TEXT_KINDS), ("template", template, TEMPLATES)):
            if value not in allowed:
                raise ValueError(f"unknown text {name} {value!r}; choose from {allowed}")
        for attr in ("encode", "decode", "n_vocab", "eot_token"):
            if not hasattr(enc, attr):
                raise ValueError(f"the encoder needs encode/decode/n_vocab/eot_token; it has no {attr!r}")
        self.enc, self.haystack, self.keys, self.values, self.template = enc, haystack, keys, values, template
        self.haystack_file = haystack_file
        self._ids = {}                                                  # encoding cache of repeated pieces
        if haystack_file is not None:
            with open(haystack_file, encoding="utf-8") as f:
                self.pool = split_sentences(f.read())
            if not self.pool:
                raise ValueError(f"--haystack_file {haystack_file!r} has no sentences")
            self.haystack = "file"
        else:
            self.pool = {"noise": list(NOISE_SENTENCES), "essay": essay_pool(), "needle": None}[haystack]
        one_token = [s for s in SPACERS if len(enc.encode(s)) == 1]
        self.spacer = one_token[0] if one_token else SPACERS[0]

    def key(self):
        name = getattr(self.enc, "name", type(self.enc).__name__)
        extra = ""
        if self.haystack_file:
            extra = "/" + hashlib.sha256("\n".join(self.pool).encode()).hexdigest()[:12]
        return f"text/{name}/{self.haystack}{extra}/{self.keys}/{self.values}/{self.template}"

    def describe(self):
        return {"task": "text", "haystack": self.haystack, "vocab_size": self.enc.n_vocab,
                "tokenizer": getattr(self.enc, "name", type(self.enc).__name__), "template": self.template,
                "keys": self.keys, "values": self.values, "haystack_file": self.haystack_file}

    def capacity_error(self, length, n_needles, variant, n_queries):
        if variant == "single" and n_needles != 1:
            return f"the single variant has exactly 1 needle, got {n_needles}"
        if self.template == "passkey" and variant != "single":
            return "the passkey template has one needle and no key: use --variant single"
        if variant != "multivalue" and not 1 <= n_queries <= n_needles:
            return f"need 1 <= n_queries <= n_needles, got n_queries={n_queries}, n_needles={n_needles}"
        return None                                 # lengths are checked when a sample is built

    def chance(self):
        return 0.0                                  # a 7-digit number or a uuid is not guessed

    def encode(self, text, cache=True):
        if not cache:
            return self.enc.encode(text)
        ids = self._ids.get(text)
        if ids is None:
            ids = self._ids[text] = self.enc.encode(text)
        return ids

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

    def _type_word(self):
        return {"words": "words", "numbers": "numbers", "uuids": "uuids"}[self.values]

    def needle_text(self, key, value):
        if self.template == "ruler":
            return RULER_NEEDLE.format(type_needle_v=self._type_word(), key=key, value=value)
        if self.template == "passkey":
            return f"The pass key is {value}. Remember it. {value} is the pass key."
        return f"The secret code for {key} is {value}."

    def prompt_parts(self, asked_keys, answers, multivalue):
        """
        (intro, [(text, group)]): the text before the context, and the pieces after it; a piece with group g is
        (part of) the gold answer of queried value g, None is prompt text.
        """
        if self.template == "ruler":
            template, type_word = RULER_TEMPLATE, self._type_word()
            if len(answers) * (len(answers[0].split(", ")) if multivalue else 1) == 1:
                # RULER's singular form for one key with one value
                template = template.replace("Some", "A").replace("are all", "is").replace("are", "is")
                type_word = type_word[:-1]
            template = template.replace("{type_needle_v}", type_word).replace("{query}", join_list(asked_keys))
            intro, question = template.split("{context}")
            pieces = [(question, None)]
            for g, answer in enumerate(answers):
                pieces += ([(",", None)] if g else []) + [(" " + answer, g)]
            return intro, pieces
        if self.template == "passkey":
            return PASSKEY_INTRO, [("\nWhat is the pass key? The pass key is", None), (" " + answers[0], 0)]
        if multivalue:
            n = len(answers[0].split(", "))
            return "", [(f"\nThe {n} secret codes for {asked_keys[0]}, in order, are", None), (" " + answers[0], 0)]
        pieces = []
        for g, (key, answer) in enumerate(zip(asked_keys, answers)):
            pieces += [(("." if g else "") + f"\nThe secret code for {key} is", None), (" " + answer, g)]
        return "", pieces

    def haystack_ids(self, rng, budget, exclude_keys):
        """Whole haystack sentences (id lists) whose total length is at most budget, and the number left over."""
        sentences, total = [], 0
        if self.pool is None:                       # distractor needles with keys that are never asked
            while True:
                key, = self.draw(rng, self.keys, 1, exclude_keys)
                value, = self.draw(rng, self.values, 1)
                ids = self.encode(" " + self.needle_text(key, value), cache=False)
                if total + len(ids) > budget:
                    return sentences, budget - total
                sentences.append(ids)
                total += len(ids)
        if self.haystack == "essay":
            order = iter(())
        else:                                       # noise and files: consecutive sentences, as in a document
            start = 0 if self.haystack == "noise" else int(rng.integers(len(self.pool)))
            order = (self.pool[(start + i) % len(self.pool)] for i in range(10 ** 9))
        while True:
            if self.haystack == "essay":
                text = self.pool[int(rng.integers(len(self.pool)))]
            else:
                text = next(order)
            ids = self.encode(" " + text)
            if total + len(ids) > budget:
                return sentences, budget - total
            sentences.append(ids)
            total += len(ids)

    def sample(self, rng, length, n_needles, variant, n_queries, depth=None):
        reason = self.capacity_error(length, n_needles, variant, n_queries)
        if reason:
            raise ValueError(reason)
        multivalue = variant == "multivalue"
        keys = self.draw(rng, self.keys, 1 if multivalue else n_needles)
        values = self.draw(rng, self.values, n_needles)
        needle_keys = keys * n_needles if multivalue else keys
        if multivalue:
            asked = [0]
        else:
            asked = [int(a) for a in rng.choice(n_needles, size=n_queries, replace=False)]
        needle_ids = [self.encode(" " + self.needle_text(k, v), cache=False) for k, v in zip(needle_keys, values)]
        # the answers depend on the order of appearance (multivalue), so the question is built after placement; its
        # length does not depend on the order, so the budget can be computed with any order
        def parts(order):
            answers = [", ".join(values[i] for i in order)] if multivalue else [values[i] for i in asked]
            return self.prompt_parts([keys[i] for i in asked], answers, multivalue)
        intro, pieces = parts(range(n_needles))
        intro_ids = self.encode(intro)
        suffix_len = sum(len(self.encode(t, cache=g is None)) for t, g in pieces)
        budget = length - len(intro_ids) - suffix_len - sum(map(len, needle_ids))
        if budget < 0:
            raise ValueError(f"{n_needles} needles and the question do not fit in {length} tokens of "
                             f"{getattr(self.enc, 'name', 'the encoder')}")
        sentences, left = self.haystack_ids(rng, budget, set(keys))
        one = self.encode(self.spacer)     # a 1-token word repeated; a byte-level encoder just cuts the text
        spacer = one * left if len(one) == 1 else self.encode(self.spacer * left)[:left]
        # needles at sentence boundaries: uniform, or the first queried needle pinned to the boundary nearest depth
        n_sent = len(sentences)
        bounds = rng.integers(0, n_sent + 1, size=n_needles)
        pinned = asked[0] if not multivalue else 0
        if depth is not None:
            bounds[pinned] = int(round(depth / 100 * n_sent))
        order = sorted(range(n_needles), key=lambda j: (bounds[j], j != pinned, j))
        context, starts = list(spacer), {}
        j = 0
        for i in range(n_sent + 1):
            while j < n_needles and bounds[order[j]] == i:
                starts[order[j]] = len(context)
                context += needle_ids[order[j]]
                j += 1
            if i < n_sent:
                context += sentences[i]
        intro, pieces = parts(order)
        tokens = list(intro_ids) + context
        targets = np.full(length, IGNORE, dtype=np.int64)
        answers = [[] for _ in range(1 if multivalue else n_queries)]
        for text, g in pieces:
            ids = self.encode(text, cache=g is None)
            if g is not None:
                for k, t in enumerate(ids):        # the token at s + k is predicted from position s + k − 1
                    targets[len(tokens) + k - 1] = t
                    answers[g].append(len(tokens) + k - 1)
            tokens += ids
        assert len(tokens) == length, (len(tokens), length)
        h = len(context)
        def depth_pct(j):
            return 100.0 * starts[j] / max(1, h - len(needle_ids[j]))
        shown = (order[0] if depth is None else pinned) if multivalue else None   # the pinned needle, else the first
        depths = [depth_pct(shown)] if multivalue else [depth_pct(i) for i in asked]
        return Sample(np.array(tokens, dtype=np.int64), targets, [np.array(a, dtype=np.int64) for a in answers],
                      np.array(depths))

# -----------------------------------------------------------------------------
# scoring: teacher-forced exact match, logits only at the answer positions

DEFAULT_CHUNK_THRESHOLD = 16384     # longer sequences run through model.prefill_chunked
DEFAULT_CHUNK_SIZE = 8192


class ModelScorer:
    """
    score_fn(idx (B, T), positions (B, P)) -> logits (B, P, V) for a model.py GPT. It takes the post-ln_f hidden
    states and multiplies only the asked rows by lm_head: full logits at 128K with V = 50,304 would be 12 GB in bf16.
    Sequences longer than chunk_threshold (or all of them once force_chunked is set, e.g. after an OOM at batch 1)
    go through model.prefill_chunked, which gives the same states with bounded memory.
    """

    def __init__(self, model, chunk_threshold=0, chunk_size=DEFAULT_CHUNK_SIZE, autocast_dtype=None):
        self.model, self.chunk_threshold, self.chunk_size = model, chunk_threshold, chunk_size
        self.autocast_dtype = autocast_dtype
        self.force_chunked = False
        self.max_len = None             # model.py has RoPE or no positions: no table to run past

    def chunked(self, length):
        return self.force_chunked or bool(self.chunk_threshold and length > self.chunk_threshold)

    @torch.no_grad()
    def __call__(self, idx, positions):
        ctx = nullcontext()
        if self.autocast_dtype is not None and idx.is_cuda:
            ctx = torch.autocast(device_type="cuda", dtype=self.autocast_dtype)
        with ctx:
            if self.chunked(idx.shape[1]):
                h = self.model.prefill_chunked(idx, self.chunk_size)
            else:
                h = self.model.forward_hidden(idx)                         # (B, T, C)
            h = torch.gather(h, 1, positions[:, :, None].expand(-1, -1, h.shape[-1]))
            return h @ self.model.lm_head.weight.t()


def model_score_fn(model, chunk_threshold=0, chunk_size=DEFAULT_CHUNK_SIZE, autocast_dtype=None):
    """score_fn(idx (B, T), positions (B, P)) -> logits (B, P, V), from a model.py GPT, logits only where asked."""
    return ModelScorer(model, chunk_threshold, chunk_size, autocast_dtype)


def score_samples(score_fn, samples, device="cpu"):
    """
    Per sample, per queried value: True iff the argmax equals the gold token at every answer position. One forward
    over prompt + gold answer suffices: greedy decoding's first m tokens equal the gold answer iff these m teacher-
    forced argmaxes do. Samples with fewer answer positions are padded with a repeated position.
    """
    flat = [np.concatenate(s.answers) for s in samples]
    width = max(len(f) for f in flat)
    positions = np.stack([np.concatenate([f, np.full(width - len(f), f[-1])]) for f in flat])
    idx = torch.from_numpy(np.stack([s.tokens for s in samples]))
    with torch.no_grad():
        logits = score_fn(idx.to(device), torch.from_numpy(positions).to(device))
    pred = logits.argmax(-1).cpu().numpy()
    out = []
    for b, s in enumerate(samples):
        hit = pred[b] == s.targets[positions[b]]
        ends = np.cumsum([len(a) for a in s.answers])
        out.append([bool(hit[e - len(a):e].all()) for a, e in zip(s.answers, ends)])
    return out


def score_with_backoff(score_fn, samples, state, device="cpu"):
    """
    score_samples in batches of state["batch"]; on CUDA out-of-memory, free the cache and halve the batch, and at
    batch 1 switch the scorer to chunked prefill (if it has one) before giving up.
    """
    out, i = [], 0
    while i < len(samples):
        part = samples[i:i + state["batch"]]
        try:
            out += score_samples(score_fn, part, device)
            i += len(part)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if state["batch"] > 1:
                state["batch"] //= 2
            elif getattr(score_fn, "force_chunked", True) is False:
                score_fn.force_chunked = True
                state["chunked"] = True
            else:
                raise
    return out

# -----------------------------------------------------------------------------
# statistics


def wilson(p, n, z=1.96):
    """Wilson 95% interval of a proportion p observed over n trials (check: p = 0.5, n = 100 -> [0.404, 0.596])."""
    if n <= 0:
        return (0.0, 1.0)
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_exact(b, c):
    """Two-sided exact McNemar p-value of discordant counts b (only A right), c (only B right): Binomial(b+c, ½)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2 ** n)


def paired_bootstrap(a, b, n_boot=2000, seed=0):
    """95% percentile interval of mean(a − b) resampling samples (pairs), a and b per-sample accuracies."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if len(d) == 0:
        return (0.0, 0.0)
    means = d[np.random.default_rng(seed).integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1)
    return (float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5)))


def effective_length(accs, threshold=0.9):
    """The largest L with acc >= threshold at every length <= L; accs is [(length, acc or None)]; 0 if none."""
    best = 0
    for length, acc in sorted(accs):
        if acc is None or acc < threshold:
            break
        best = length
    return best


def chance_accuracy(vocab_size):
    """Accuracy of guessing a value uniformly."""
    lo, hi = vocab_layout(vocab_size)["values"]
    return 1.0 / (hi - lo)

# -----------------------------------------------------------------------------
# evaluation: cells, grids, resume


@dataclass(frozen=True)
class EvalSpec:
    """Everything besides the task generator and the (length, needles) cell that decides which samples are drawn."""
    variant: str = "multikey"
    query_mode: str = "faithful"
    queries: int = 4            # queries per sample of the multiquery variant
    depths: tuple = ()          # pinned depths in %, cycled over a cell's samples; () = uniform
    samples: int = 400
    seed: int = 0

    def n_queries(self, n_needles):
        if self.variant == "multivalue":
            return 1
        if self.variant == "multiquery":
            return min(n_needles, self.queries)
        return 1 if self.query_mode == "faithful" else min(n_needles, PACKED_QUERIES)

    def depth(self, index):
        return self.depths[index % len(self.depths)] if self.depths else None

    def depth_bins(self):
        return list(self.depths) if self.depths else [float(d) for d in range(0, 101, 10)]


def data_key(task, spec):
    """The string that seeds a cell's samples; None for the original multikey task (its seeds predate this file)."""
    if (task.kind == "token" and task.haystack == "random" and spec.variant == "multikey"
            and spec.query_mode == "faithful" and not spec.depths):
        return None
    depths = ",".join(f"{d:g}" for d in spec.depths)
    return f"{task.key()}/{spec.variant}/{spec.query_mode}/q{spec.queries}/d{depths}"


def cell_sample(task, spec, length, n_needles, index):
    """Sample `index` of a cell: a function of its arguments only."""
    key = data_key(task, spec)
    if key is None:
        rng = sample_rng(spec.seed, EVAL, "multikey", length, n_needles, index)
    else:
        rng = sample_rng(spec.seed, EVAL, task.kind, length, n_needles, index, variant=key)
    return task.sample(rng, length, n_needles, spec.variant, spec.n_queries(n_needles), spec.depth(index))


def cell_hash(task, spec, length, n_needles, model_id=None, vs_id=None):
    """What makes a finished cell reusable on restart: the data, the cell, and the model(s)."""
    text = json.dumps({"version": NEEDLE_VERSION, "data": data_key(task, spec) or "multikey", "task": task.describe(),
                       "spec": asdict(spec), "length": length, "needles": n_needles, "model": model_id, "vs": vs_id},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class OutOfTime(Exception):
    """--max_seconds ran out in the middle of a cell."""


def run_cell(score_fn, task, spec, length, n_needles, budget=16384, device="cpu", vs_score_fn=None, deadline=None,
             model_id=None, vs_id=None):
    """
    Evaluate one (length, needles) cell: returns its record (acc, ci95, all_correct, per-depth counts, fingerprint,
    and with vs_score_fn the paired comparison on identical samples). Samples are generated and scored in batches of
    max(1, budget // length) sequences. A cell that cannot be run is recorded with acc None and a skipped_reason.
    """
    record = {"hash": cell_hash(task, spec, length, n_needles, model_id, vs_id), "length": length,
              "num_needles": n_needles, "n_samples": 0, "n_values": 0, "acc": None, "ci95": None,
              "all_correct": None, "seconds": 0.0, "batch": None, "chunked": False, "skipped_reason": None,
              "fingerprint": None, "depth_hist": []}
    reason = task.capacity_error(length, n_needles, spec.variant, spec.n_queries(n_needles))
    for fn in (score_fn, vs_score_fn):
        limit = getattr(fn, "max_len", None)
        if reason is None and limit is not None and length > limit:
            reason = f"exceeds model positions ({length} > {limit})"
    if reason:
        record["skipped_reason"] = reason
        return record
    t0 = time.time()
    fns = [score_fn] + ([vs_score_fn] if vs_score_fn is not None else [])
    states = [{"batch": max(1, min(spec.samples, budget // length)), "chunked": False} for _ in fns]
    for fn, state in zip(fns, states):
        state["chunked"] = bool(getattr(fn, "chunked", lambda T: False)(length))
    results = [[] for _ in fns]
    fingerprint, depth_points = hashlib.sha256(), []
    for first in range(0, spec.samples, states[0]["batch"]):
        if deadline is not None and time.time() > deadline:
            raise OutOfTime()
        try:
            batch = [cell_sample(task, spec, length, n_needles, i)
                     for i in range(first, min(spec.samples, first + states[0]["batch"]))]
        except ValueError as e:                     # text needles that do not fit this length
            record["skipped_reason"] = str(e)
            return record
        for s in batch:
            fingerprint.update(s.tokens.tobytes())
            fingerprint.update(s.targets.tobytes())
            depth_points.append(s.depths)
        for r, fn, state in zip(results, fns, states):
            r += score_with_backoff(fn, batch, state, device)
    record.update(cell_stats(results[0]))
    bins = np.array(spec.depth_bins())
    hist = {float(b): [0, 0] for b in bins}
    for depths, correct in zip(depth_points, results[0]):
        for d, c in zip(depths, correct):
            b = float(bins[np.argmin(np.abs(bins - d))])
            hist[b][0] += 1
            hist[b][1] += int(c)
    record.update(seconds=round(time.time() - t0, 3), batch=states[0]["batch"], chunked=states[0]["chunked"],
                  fingerprint=fingerprint.hexdigest(), depth_hist=[[b, n, c] for b, (n, c) in hist.items() if n])
    if vs_score_fn is not None:
        record["vs"] = paired_stats(results[0], results[1])
        record["vs"].update(batch=states[1]["batch"], chunked=states[1]["chunked"])
    return record


def cell_stats(correct):
    """acc (over queried values), Wilson interval (n = samples: packed queries are correlated), all_correct."""
    n_samples, n_values = len(correct), sum(len(c) for c in correct)
    acc = sum(map(sum, correct)) / max(1, n_values)
    lo, hi = wilson(acc, n_samples)
    return {"n_samples": n_samples, "n_values": n_values, "acc": acc, "ci95": [lo, hi],
            "all_correct": sum(all(c) for c in correct) / max(1, n_samples)}


def paired_stats(a, b):
    """The comparison of model A with model B on the same samples: Δacc, its bootstrap CI, McNemar's exact test."""
    only_a = sum(all(x) and not all(y) for x, y in zip(a, b))
    only_b = sum(all(y) and not all(x) for x, y in zip(a, b))
    per_a, per_b = [np.mean(x) for x in a], [np.mean(y) for y in b]
    other = cell_stats(b)
    lo, hi = paired_bootstrap(per_a, per_b)
    return {"acc": other["acc"], "ci95": other["ci95"], "all_correct": other["all_correct"],
            "delta": cell_stats(a)["acc"] - other["acc"], "delta_ci95": [lo, hi], "discordant": [only_a, only_b],
            "mcnemar_p": mcnemar_exact(only_a, only_b)}


def evaluate_cell(score_fn, length, n_needles, n_samples, vocab_size, seed=0, batch_size=16, device="cpu"):
    """Teacher-forced exact-match accuracy of one (length, needles) cell over n_samples samples, one query each."""
    spec = EvalSpec(samples=n_samples, seed=seed)
    record = run_cell(score_fn, TokenTask(vocab_size), spec, length, n_needles, batch_size * length, device)
    if record["skipped_reason"]:
        raise ValueError(record["skipped_reason"])
    return record["acc"]


def evaluate(score_fn, lengths, needle_counts, n_samples, vocab_size, seed=0, batch_size=16, device="cpu"):
    """Accuracy for each (length, needles) cell; a cell whose needles do not fit is None."""
    results = {}
    for length in lengths:
        for n in needle_counts:
            fits = n <= max_needles(length, vocab_size)
            results[(length, n)] = evaluate_cell(score_fn, length, n, n_samples, vocab_size, seed, batch_size,
                                                 device) if fits else None
    return results


def _clock(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def run_grid(score_fn, task, spec, lengths, needle_counts, out=None, vs_score_fn=None, model_id=None, vs_id=None,
             meta=None, budget=16384, device="cpu", max_seconds=None, log=print):
    """
    Evaluate every (length, needles) cell, short to long, and return the result document. With `out`
    the JSON is rewritten after every cell (temporary file + os.replace, so it is always valid), and cells whose
    hash is already in an existing `out` are reused instead of run again. max_seconds stops between batches; the
    unfinished cell is left out of the JSON, so a restart runs it.
    """
    started = time.time()
    deadline = started + max_seconds if max_seconds else None
    done = {}
    if out and os.path.exists(out):
        with open(out) as f:
            done = {c["hash"]: c for c in json.load(f).get("cells", [])}
    doc = {"meta": dict(meta or {}), "grid": {"lengths": sorted(lengths), "num_needles": sorted(needle_counts),
                                              "depths": list(spec.depths), "query_mode": spec.query_mode},
           "cells": [], "depth_cells": [], "data_fingerprint": None}
    doc["meta"].update(needle_version=NEEDLE_VERSION, variant=spec.variant, seed=spec.seed, samples=spec.samples,
                       metric="teacher-forced exact match", numpy=np.__version__, torch=torch.__version__,
                       started=datetime.datetime.now().isoformat(timespec="seconds"), **task.describe())
    grid = [(L, n) for L in sorted(lengths) for n in sorted(needle_counts)]
    work_left = sum(spec.samples * L for L in sorted(lengths) for n in needle_counts)
    work_done, eval_seconds, stopped = 0, 0.0, False
    for k, (length, n) in enumerate(grid):
        h = cell_hash(task, spec, length, n, model_id, vs_id)
        label = f"[{k + 1}/{len(grid)}] length {length_label(length)} needles {n}"
        work_left -= spec.samples * length
        if h in done:
            record = done[h]
            log(f"{label}: done before, reused")
        else:
            try:
                record = run_cell(score_fn, task, spec, length, n, budget, device, vs_score_fn, deadline, model_id,
                                  vs_id)
            except OutOfTime:
                log(f"{label}: --max_seconds {max_seconds} reached, stopping; rerun the same command to continue")
                stopped = True
                break
            if record["skipped_reason"]:
                log(f"{label}: skipped ({record['skipped_reason']})")
            else:
                work_done += spec.samples * length
                eval_seconds += record["seconds"]
                eta = eval_seconds / work_done * work_left
                lo, hi = record["ci95"]
                extra = ""
                if "vs" in record:
                    v = record["vs"]
                    extra = (f" | vs {100 * v['acc']:.1f}, Δ {100 * v['delta']:+.1f} "
                             f"[{100 * v['delta_ci95'][0]:+.1f}, {100 * v['delta_ci95'][1]:+.1f}], "
                             f"McNemar p {v['mcnemar_p']:.3g}")
                log(f"{label}: acc {100 * record['acc']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] "
                    f"all {100 * record['all_correct']:.1f}{extra} | batch {record['batch']}"
                    f"{' chunked' if record['chunked'] else ''} | {record['seconds']:.1f}s | elapsed "
                    f"{_clock(time.time() - started)}, ETA {_clock(eta)} (assumes time ∝ tokens)")
        doc["cells"].append(record)
        finish(doc, started)
        if out:
            write_json(out, doc)
    doc["meta"]["stopped_early"] = stopped
    finish(doc, started)
    if out:
        write_json(out, doc)
    return doc


def finish(doc, started):
    """Recompute the derived keys: depth_cells, data_fingerprint, wall_s."""
    merged = {}
    for c in doc["cells"]:
        for b, n, correct in c.get("depth_hist", []):
            m = merged.setdefault((c["length"], c["num_needles"], b), [0, 0])
            m[0] += n
            m[1] += correct
    doc["depth_cells"] = [{"length": L, "num_needles": n, "depth_bin": b, "n": m[0], "acc": m[1] / m[0]}
                          for (L, n, b), m in sorted(merged.items())]
    prints = [c["fingerprint"] for c in doc["cells"] if c.get("fingerprint")]
    doc["data_fingerprint"] = hashlib.sha256("".join(prints).encode()).hexdigest() if prints else None
    doc["meta"]["wall_s"] = round(time.time() - started, 3)

# -----------------------------------------------------------------------------
# outputs: table, JSON, heatmap


def length_label(length):
    """1024 -> "1K", 6144 -> "6K", 1000 -> "1000"."""
    return f"{length // 1024}K" if length % 1024 == 0 else str(length)


def parse_length(text):
    """ "2K" -> 2048, "128k" -> 131072, "1000" -> 1000; anything else is an error naming the text."""
    m = re.fullmatch(r"\s*(\d+)\s*([kK]?)\s*", text)
    if not m or int(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"invalid length {text!r}: use a positive integer with an optional K suffix "
                                         "(1K = 1024)")
    return int(m.group(1)) * (1024 if m.group(2) else 1)


def format_table(results, lengths, needle_counts, threshold=0.9):
    """
    Rows are needle counts, columns lengths, cells accuracy in % (— if skipped); each row ends with its effective
    length, the largest L with acc >= threshold at every length <= L. results maps (length, needles) to an accuracy,
    None, or a cell record.
    """
    def acc(L, n):
        r = results.get((L, n))
        return r.get("acc") if isinstance(r, dict) else r
    lines = ["needles | " + " | ".join(f"{length_label(L):>6}" for L in lengths) + f" | eff@{threshold:g}"]
    for n in needle_counts:
        cells = [acc(L, n) for L in lengths]
        eff = effective_length([(L, a) for L, a in zip(lengths, cells)], threshold)
        if all(a is None for a in cells):
            eff_text = "—"                                  # nothing measured, nothing to say
        else:
            eff_text = length_label(eff) if eff else f"<{length_label(min(lengths))}"
        lines.append(f"{n:>7} | " + " | ".join("     —" if a is None else f"{100 * a:6.1f}" for a in cells)
                     + f" | {eff_text:>6}")
    return "\n".join(lines)


def doc_results(doc, key=None):
    """{(length, needles): acc} of a result document (key="vs": the comparison model's)."""
    out = {}
    for c in doc["cells"]:
        acc = c["acc"] if key is None else (c.get(key) or {}).get("acc")
        if key == "delta":
            acc = (c.get("vs") or {}).get("delta")
        out[(c["length"], c["num_needles"])] = acc
    return out


def write_json(path, doc):
    """Write through a temporary file and rename, so the file on disk is always a complete JSON document."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def write_heatmaps(doc, prefix):
    """
    One depth × length PNG per needle count (gkamradt's layout: lengths on x, depth % on y with 0 at the top,
    red-yellow-green, vmin 0, vmax 1). Returns the paths written; none if matplotlib cannot be imported.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import LinearSegmentedColormap
    except ImportError:
        return []
    cmap = LinearSegmentedColormap.from_list("needle", ["#F0496E", "#EBB839", "#0CD79F"])
    meta, paths = doc["meta"], []
    for n in sorted({d["num_needles"] for d in doc["depth_cells"]}):
        cells = [d for d in doc["depth_cells"] if d["num_needles"] == n]
        lengths = sorted({d["length"] for d in cells})
        bins = sorted({d["depth_bin"] for d in cells})
        grid = np.full((len(bins), len(lengths)), np.nan)
        for d in cells:
            grid[bins.index(d["depth_bin"]), lengths.index(d["length"])] = d["acc"]
        fig, ax = plt.subplots(figsize=(17.5, 8))
        im = ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(lengths)), [length_label(L) for L in lengths], rotation=45)
        ax.set_yticks(range(len(bins)), [f"{b:g}" for b in bins])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("depth (%)")
        ax.set_title(f"{meta.get('task')} {meta.get('variant')}, {n} needles, {meta.get('query_mode', '')} "
                     f"(teacher-forced exact match)")
        fig.colorbar(im, ax=ax, label="Score")
        fig.tight_layout()
        path = f"{prefix}_{meta.get('task')}_{meta.get('variant')}_n{n}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths

# -----------------------------------------------------------------------------
# command line

PRESETS = {
    # the paper's MNIAH (Fig. 4): RULER niah_multikey_1 with N needles, one query, 500 samples, 2K-8K; add longer
    # lengths with --lengths (Table 6 goes to 64K). The text form uses RULER's essay / words / numbers.
    "lucid_mniah": {"variant": "multikey", "needles": [2, 4, 6, 8, 10], "query_mode": "faithful", "samples": 500,
                    "lengths": [2048, 4096, 6144, 8192], "text_haystack": "essay", "keys": "words",
                    "values": "numbers"},
}
DEFAULTS = {"variant": "multikey", "needles": [1, 2, 4, 8, 16, 32], "query_mode": "faithful", "samples": 400,
            "lengths": [1024 * 2 ** i for i in range(8)], "text_haystack": "essay", "token_haystack": "random",
            "keys": "words", "values": "numbers", "template": "completion", "tokenizer": "gpt2"}


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


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _depth(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"depth {text!r} is not a number") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"depth {text!r} is outside 0..100")
    return value


def build_parser():
    p = argparse.ArgumentParser(description="Needle retrieval accuracy of a checkpoint from 1K to 128K tokens "
                                            "(teacher-forced exact match).")
    p.add_argument("--ckpt", required=True, help="ckpt.pt written by train.py")
    p.add_argument("--task", choices=("token", "text"), default="token")
    p.add_argument("--preset", choices=sorted(PRESETS))
    p.add_argument("--variant", choices=VARIANTS)
    p.add_argument("--haystack", help=f"token: {'/'.join(TOKEN_HAYSTACKS)}; text: {'/'.join(TEXT_HAYSTACKS)}")
    p.add_argument("--haystack_file", help="text task: a plain-text haystack instead of the generated one")
    p.add_argument("--lengths", type=_list("length", parse_length), help="e.g. 1K,2K,4K (1K = 1024)")
    p.add_argument("--needles", type=_list("needle", _positive_int), help="needle counts, e.g. 1,2,4,8")
    p.add_argument("--samples", type=_positive_int, help="samples per cell (default 400; the preset 500)")
    p.add_argument("--depths", type=_list("depth", _depth), help="pin the queried needle's depth %%, e.g. 0,10,...,100")
    p.add_argument("--query_mode", choices=QUERY_MODES)
    p.add_argument("--queries", type=_positive_int, default=4, help="queries per sample of the multiquery variant")
    p.add_argument("--template", choices=TEMPLATES, help="text task prompt wording (default completion)")
    p.add_argument("--keys", choices=TEXT_KINDS, help="text task keys (default words)")
    p.add_argument("--values", choices=TEXT_KINDS, help="text task values (default numbers)")
    p.add_argument("--tokenizer", help="text task tiktoken encoding (default gpt2; 'bytes' = byte-level, offline)")
    p.add_argument("--out", help="JSON results, rewritten after every cell; an existing file resumes")
    p.add_argument("--png", help="heatmap file prefix (default: --out without .json)")
    p.add_argument("--vs", help="a second checkpoint, evaluated on identical samples (paired comparison)")
    p.add_argument("--max_seconds", type=float, help="stop cleanly after this long (the JSON stays valid)")
    p.add_argument("--budget", type=parse_length, help="tokens per batch (default 256K softmax, 128K LUCID)")
    p.add_argument("--chunk_threshold", type=parse_length, default=DEFAULT_CHUNK_THRESHOLD,
                   help="chunked prefill above this length (0 = only after OOM at batch 1)")
    p.add_argument("--chunk_size", type=parse_length, default=DEFAULT_CHUNK_SIZE)
    p.add_argument("--threshold", type=float, default=0.9, help="accuracy threshold of the effective length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="autocast dtype on CUDA (default bfloat16); CPU runs fp32")
    return p


def resolve_args(parser, args):
    """Fill defaults (preset first) and check the combination; errors go through parser.error (exit 2)."""
    preset = PRESETS.get(args.preset, {})
    def pick(name, default_key=None):
        value = getattr(args, name)
        if value is None:
            value = preset.get(default_key or name, DEFAULTS[default_key or name])
        return value
    args.variant = pick("variant")
    args.query_mode = pick("query_mode")
    args.samples = pick("samples")
    args.lengths = pick("lengths")
    user_needles = args.needles is not None
    args.needles = pick("needles")
    if args.variant == "single":
        if user_needles and args.needles != [1]:
            parser.error(f"--variant single has exactly 1 needle, got --needles {args.needles}")
        args.needles = [1]
    if args.task == "token":
        args.haystack = args.haystack or DEFAULTS["token_haystack"]
        if args.haystack not in TOKEN_HAYSTACKS:
            parser.error(f"--haystack {args.haystack!r} is not a token haystack; choose from {TOKEN_HAYSTACKS}")
        for name in ("template", "keys", "values", "tokenizer", "haystack_file"):
            if getattr(args, name) is not None:
                parser.error(f"--{name} applies to --task text only")
    else:
        args.haystack = args.haystack or preset.get("text_haystack", DEFAULTS["text_haystack"])
        if args.haystack not in TEXT_HAYSTACKS:
            parser.error(f"--haystack {args.haystack!r} is not a text haystack; choose from {TEXT_HAYSTACKS}")
        args.template = args.template or DEFAULTS["template"]
        args.keys, args.values = pick("keys"), pick("values")
        args.tokenizer = args.tokenizer or DEFAULTS["tokenizer"]
        if args.template == "passkey" and args.variant != "single":
            parser.error("--template passkey has one needle and no key: use --variant single")
        if args.haystack_file and not os.path.isfile(args.haystack_file):
            parser.error(f"--haystack_file {args.haystack_file!r} does not exist")
    if not os.path.isfile(args.ckpt):
        parser.error(f"--ckpt {args.ckpt!r} does not exist")
    if args.vs and not os.path.isfile(args.vs):
        parser.error(f"--vs {args.vs!r} does not exist")
    if args.max_seconds is not None and args.max_seconds <= 0:
        parser.error("--max_seconds must be positive")
    if not 0 < args.threshold <= 1:
        parser.error("--threshold must be in (0, 1]")
    if args.out and os.path.isdir(args.out):
        parser.error(f"--out {args.out!r} is a directory")
    return args


def model_meta(path, model):
    cfg = model.config
    return {"ckpt": os.path.abspath(path), "n_params": model.num_params(), "attention": cfg.attn, "pos_enc": cfg.pos,
            "token_shift": cfg.token_shift, "train_len": cfg.block_size, "vocab_size": cfg.vocab_size}


def main(argv=None):
    parser = build_parser()
    args = resolve_args(parser, parser.parse_args(argv))
    from model import load_model
    model, _ = load_model(args.ckpt, args.device)
    vs_model = load_model(args.vs, args.device)[0] if args.vs else None
    vocab_size = model.config.vocab_size
    if vs_model is not None and vs_model.config.vocab_size != vocab_size:
        parser.error(f"--vs has vocab_size {vs_model.config.vocab_size}, --ckpt has {vocab_size}")
    if vs_model is not None and vs_model.config.pos != model.config.pos:
        print(f"warning: the two models use different positions ({model.config.pos} vs {vs_model.config.pos}); "
              "length generalization is then not comparable", file=sys.stderr)
    try:
        if args.task == "token":
            task = TokenTask(vocab_size, args.haystack)
        else:
            enc = load_encoder(args.tokenizer)
            if enc.n_vocab > vocab_size:
                parser.error(f"tokenizer {args.tokenizer!r} has {enc.n_vocab} ids, the model only {vocab_size}")
            task = TextTask(enc, args.haystack, args.keys, args.values, args.template, args.haystack_file)
    except ValueError as e:
        parser.error(str(e))
    cuda = "cuda" in str(args.device)
    dtype = (args.dtype or "bfloat16") if cuda else "float32"
    autocast = torch.bfloat16 if dtype == "bfloat16" else None
    scorer = model_score_fn(model, args.chunk_threshold, args.chunk_size, autocast)
    vs_scorer = model_score_fn(vs_model, args.chunk_threshold, args.chunk_size, autocast) if vs_model else None
    lucid_any = model.config.attn == "lucid" or (vs_model is not None and vs_model.config.attn == "lucid")
    budget = args.budget or (128 * 1024 if lucid_any else 256 * 1024)
    spec = EvalSpec(args.variant, args.query_mode, args.queries, tuple(args.depths or ()), args.samples, args.seed)
    meta = {"model": model_meta(args.ckpt, model), "train_len": model.config.block_size, "dtype": dtype,
            "device": str(args.device), "query_mode": args.query_mode, "budget": budget,
            "chunk_threshold": args.chunk_threshold, "chunk_size": args.chunk_size,
            "tf32": bool(torch.backends.cuda.matmul.allow_tf32), "preset": args.preset, "command": sys.argv[1:]
            if argv is None else list(argv)}
    if vs_model is not None:
        meta["vs_model"] = model_meta(args.vs, vs_model)
    model_id = f"{os.path.abspath(args.ckpt)}:{model.num_params()}:{dtype}"
    vs_id = f"{os.path.abspath(args.vs)}:{vs_model.num_params()}:{dtype}" if vs_model else None
    print(f"{args.task} {args.variant} ({args.haystack} haystack, {args.query_mode} queries), {args.samples} samples "
          f"per cell, {model.config.attn} model{' vs ' + vs_model.config.attn if vs_model else ''}, "
          f"batch budget {budget:,} tokens, device {args.device} {dtype}")
    doc = run_grid(scorer, task, spec, args.lengths, args.needles, args.out, vs_scorer, model_id, vs_id, meta, budget,
                   args.device, args.max_seconds)
    lengths, needles = sorted(args.lengths), sorted(args.needles)
    metric = f"teacher-forced exact match, % ({args.samples} samples per cell; chance {100 * task.chance():.1f})"
    print(f"\n{args.ckpt} ({model.config.attn}): {metric}")
    print(format_table(doc_results(doc), lengths, needles, args.threshold))
    if vs_model is not None:
        print(f"\n{args.vs} ({vs_model.config.attn}), the same samples:")
        print(format_table(doc_results(doc, "vs"), lengths, needles, args.threshold))
        print("\nΔ = first − second, points (paired; see the JSON for bootstrap CIs and McNemar p):")
        delta = doc_results(doc, "delta")
        print("needles | " + " | ".join(f"{length_label(L):>6}" for L in lengths))
        for n in needles:
            print(f"{n:>7} | " + " | ".join("     —" if delta.get((L, n)) is None else
                                            f"{100 * delta[(L, n)]:+6.1f}" for L in lengths))
    prefix = args.png or (os.path.splitext(args.out)[0] if args.out else None)
    if prefix and doc["depth_cells"]:
        for path in write_heatmaps(doc, prefix):
            print(f"wrote {path}")
    if args.out:
        print(f"wrote {args.out} (data fingerprint {str(doc['data_fingerprint'])[:16]})")
    return doc


if __name__ == "__main__":
    main()
