"""
The text data source (train.py's dataset = "text"): documents -> tiktoken ids -> two memmap files, then random windows.

    prepare(...)   documents from the Hub (a script-free dataset id + config, through `datasets`) or from local
                   txt / jsonl / parquet files, tokenized by several processes, each document followed by the
                   end-of-text token, written once into <data_dir>/<key>/train.bin and val.bin (uint16 when the
                   vocabulary fits, else uint32) and meta.json. The files are written under temporary names and
                   renamed at the end, so an interrupted preparation leaves nothing that looks finished; a finished
                   one is found again by its key (source, encoding, split) and skipped.
    window_starts  where the windows of a batch begin: a pure function of (seed, split, step, index in the global
                   batch, length), so batch size, world size and resume never change which windows are seen.
    TextData       the memmaps of a prepared corpus and get_batch(...) for train.py.

The validation split is the last val_fraction of the token stream (a tail, so it also works for one long document).
"""

import glob
import hashlib
import json
import multiprocessing
import os
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch

VERSION = 1                       # bump when the files written for the same settings change
SPLITS = {"train": 0, "val": 1}   # the split is part of every window's hash
_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def byte_encoding():
    """A byte-level tiktoken encoding: the 256 single-byte ranks + <|endoftext|> = 256. Offline, round-trips any text."""
    import tiktoken
    return tiktoken.Encoding(
        name="bytes", pat_str=r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
        mergeable_ranks={bytes([i]): i for i in range(256)}, special_tokens={"<|endoftext|>": 256})


def load_encoding(name):
    """A tiktoken encoding by name ("bytes" is the byte-level one above), or a ValueError that says what to do."""
    import tiktoken
    if name == "bytes":
        return byte_encoding()
    if name not in tiktoken.list_encoding_names():
        raise ValueError(f"unknown tiktoken encoding {name!r}; known: {', '.join(tiktoken.list_encoding_names())}, "
                         "bytes")
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:
        raise ValueError(f"could not load the tiktoken encoding {name!r} ({type(e).__name__}: offline, or its file is "
                         "not cached): tiktoken downloads it once into $TIKTOKEN_CACHE_DIR (default "
                         "<tmp>/data-gym-cache, files named by the sha1 of their URL); offline, copy that folder from a "
                         "machine that loaded the encoding and set TIKTOKEN_CACHE_DIR to it, or use encoding='bytes'"
                         ) from None


# -----------------------------------------------------------------------------
# preparation

def local_files(data_files):
    """The files named by a comma-separated list of paths / globs, all of one kind (txt, jsonl/json or parquet)."""
    files = []
    for pattern in [p.strip() for p in data_files.split(",") if p.strip()]:
        found = sorted(glob.glob(os.path.expanduser(pattern)))
        if not found:
            raise ValueError(f"data file {pattern!r} does not exist")
        files += found
    kinds = {os.path.splitext(f)[1].lower() for f in files}
    builder = {".txt": "text", ".md": "text", ".py": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
    unknown = [k for k in kinds if k not in builder]
    if unknown:
        raise ValueError(f"data_files: unsupported file type {unknown[0]!r}; use .txt/.md, .jsonl/.json or .parquet")
    if len({builder[k] for k in kinds}) > 1:
        raise ValueError(f"data_files mixes file types {sorted(kinds)}; give files of one kind")
    return files, builder[kinds.pop()]


def source_key(c, files):
    """What the prepared files depend on (their directory name is its hash): a changed source is prepared anew."""
    if files:
        source = [(os.path.abspath(f), os.path.getsize(f), int(os.path.getmtime(f))) for f in files]
    else:
        source = [c["hf_dataset"], c["hf_config"], c["hf_split"]]
    return {"version": VERSION, "source": source, "text_column": c["text_column"], "encoding": c["encoding"],
            "val_fraction": c["val_fraction"]}


def load_documents(c, files, builder):
    """The documents as a `datasets.Dataset` with a text column (local files or a Hub dataset)."""
    import datasets
    datasets.logging.set_verbosity_error()
    try:
        if files:
            kwargs = {"sample_by": "document"} if builder == "text" else {}   # a .txt file is one document
            ds = datasets.load_dataset(builder, data_files=files, split="train", **kwargs)
        else:
            ds = datasets.load_dataset(c["hf_dataset"], c["hf_config"] or None, split=c["hf_split"])
    except Exception as e:
        where = f"local files ({builder})" if files else \
            f"Hub dataset {c['hf_dataset']!r} (config {c['hf_config']!r}, split {c['hf_split']!r})"
        hint = "" if files else "; offline, only datasets already in the Hugging Face cache load"
        first_line = str(e).splitlines()[0][:300] if str(e) else ""
        raise ValueError(f"could not load the {where}: {type(e).__name__}: {first_line}{hint}") from None
    column = "text" if builder == "text" else c["text_column"]
    if column not in ds.column_names:
        raise ValueError(f"the documents have no column {column!r} (columns: {ds.column_names}); set text_column")
    ds = ds.select_columns([column])
    return ds.rename_column(column, "text") if column != "text" else ds


_worker_encoding = None


def _init_worker(encoding):
    global _worker_encoding
    _worker_encoding = encoding


def _tokenize(texts):
    """One batch of documents -> one array of ids, each document followed by end-of-text."""
    enc = _worker_encoding
    ids = []
    for doc in enc.encode_ordinary_batch(texts, num_threads=1):
        ids.extend(doc)
        ids.append(enc.eot_token)
    return ids


def prepare(c, num_proc=None, docs_per_task=64, log=print):
    """
    Tokenize the corpus named by settings c (train.py's) once; returns the directory holding train.bin, val.bin and
    meta.json. Skipped when they exist. Several processes tokenize; the files appear only when complete.
    """
    if c["data_files"] and c["hf_dataset"]:
        raise ValueError(f"both data_files ({c['data_files']!r}) and hf_dataset ({c['hf_dataset']!r}) are set; "
                         "clear one (e.g. --data_files= to read the Hub dataset)")
    encoding = load_encoding(c["encoding"])
    files, builder = local_files(c["data_files"]) if c["data_files"] else ([], None)
    if not files and not c["hf_dataset"]:
        raise ValueError("dataset='text' needs data_files (local txt/jsonl/parquet files) or hf_dataset (a Hub id)")
    key = source_key(c, files)
    out = os.path.join(c["data_dir"], hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16])
    if os.path.exists(os.path.join(out, "meta.json")):
        return out
    docs = load_documents(c, files, builder)
    os.makedirs(out, exist_ok=True)
    dtype = np.uint16 if encoding.n_vocab <= 2 ** 16 else np.uint32
    tmp = os.path.join(out, f"tokens.bin.tmp{os.getpid()}")
    num_proc = num_proc or max(1, min(8, (os.cpu_count() or 1) - 1))
    n_tasks, n_tokens, done, t0 = -(-len(docs) // docs_per_task), 0, 0, time.time()
    try:
        with open(tmp, "wb") as f:
            ctx = multiprocessing.get_context("spawn" if sys.platform == "darwin" else "fork")
            # one batch of documents is tokenized here: no worker processes to start (and no fork of a process that
            # may already run threads, e.g. a process group's)
            with ctx.Pool(num_proc, _init_worker, (encoding,)) if n_tasks > 1 else nullcontext() as pool:
                if pool is None:
                    _init_worker(encoding)
                # a few tasks per process at a time: Pool.imap would read the whole corpus into its queue at once
                for first in range(0, n_tasks, 16 * num_proc):
                    batches = [docs[i * docs_per_task:(i + 1) * docs_per_task]["text"]
                               for i in range(first, min(first + 16 * num_proc, n_tasks))]
                    for ids in (pool.imap if pool else map)(_tokenize, batches):   # in order: a deterministic stream
                        f.write(np.asarray(ids, dtype=dtype).tobytes())
                        n_tokens += len(ids)
                        done += 1
                        if done % 100 == 0 or done == n_tasks:
                            rate = n_tokens / max(time.time() - t0, 1e-9)
                            print(f"\rtokenizing {c['encoding']}: {done}/{n_tasks} batches of documents, "
                                  f"{n_tokens:,} tokens ({rate:,.0f}/s)", end="" if done < n_tasks else "\n",
                                  file=sys.stderr, flush=True)
        if len(docs) == 0:
            raise ValueError("the corpus has no documents")
        n_val = int(round(n_tokens * c["val_fraction"]))
        tokens = np.memmap(tmp, dtype=dtype, mode="r")
        val_tmp = os.path.join(out, f"val.bin.tmp{os.getpid()}")
        tokens[n_tokens - n_val:].tofile(val_tmp)                   # the tail is the validation split
        del tokens
        os.truncate(tmp, (n_tokens - n_val) * np.dtype(dtype).itemsize)
        os.replace(tmp, os.path.join(out, "train.bin"))
        os.replace(val_tmp, os.path.join(out, "val.bin"))
        meta = {**key, "dtype": np.dtype(dtype).name, "n_vocab": encoding.n_vocab, "eot_token": encoding.eot_token,
                "documents": len(docs), "train_tokens": n_tokens - n_val, "val_tokens": n_val}
        with open(os.path.join(out, f"meta.json.tmp{os.getpid()}"), "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(os.path.join(out, f"meta.json.tmp{os.getpid()}"), os.path.join(out, "meta.json"))  # last: done
    finally:
        for name in os.listdir(out):                     # this process's leftovers only (another may be preparing)
            if name.endswith(f".tmp{os.getpid()}"):
                os.remove(os.path.join(out, name))
    log(f"prepared {out}: {len(docs):,} documents, {n_tokens - n_val:,} train + {n_val:,} val tokens")
    return out


# -----------------------------------------------------------------------------
# sampling

def _splitmix64(x):
    """A stateless 64-bit mixer (splitmix64's finaliser) on uint64 arrays."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK
        return x ^ (x >> np.uint64(31))


def window_starts(seed, split, step, index, n_tokens, length):
    """
    First token of each window of `length` + 1 tokens: window `index` (array, position in the global batch) of
    optimizer step `step` of split `split` ("train" | "val"), out of a split of n_tokens. Pure: the same arguments
    give the same windows whatever the batch is split into.
    """
    span = n_tokens - length                                        # number of possible starts (length + 1 tokens each)
    if span < 1:
        raise ValueError(f"the {split} split has {n_tokens:,} tokens, fewer than one window of {length + 1}")
    h = np.uint64(seed) & _MASK
    for part in (SPLITS[split], step, length):
        h = _splitmix64(h ^ np.uint64(part))
    h = _splitmix64(h ^ np.asarray(index, dtype=np.uint64))
    return (h % np.uint64(span)).astype(np.int64)


class TextData:
    """A prepared corpus: memmaps of the two splits and batches of windows."""

    def __init__(self, path):
        with open(os.path.join(path, "meta.json")) as f:
            self.meta = json.load(f)
        self.path = path
        self.split = {s: np.memmap(os.path.join(path, f"{s}.bin"), dtype=self.meta["dtype"], mode="r") for s in SPLITS}

    def check(self, vocab_size, block_size):
        """A ValueError when the model cannot read these ids or a split is shorter than one window."""
        if self.meta["n_vocab"] > vocab_size:
            raise ValueError(f"the encoding {self.meta['encoding']!r} has {self.meta['n_vocab']:,} tokens, more than "
                             f"vocab_size={vocab_size:,}; raise vocab_size (e.g. to a multiple of 64)")
        for s, tokens in self.split.items():
            if len(tokens) < block_size + 1:
                raise ValueError(f"the {s} split of {self.path} has {len(tokens):,} tokens, fewer than one window of "
                                 f"block_size + 1 = {block_size + 1:,}; use more text, a shorter block_size or a "
                                 f"larger val_fraction")

    def get_batch(self, seed, split, step, first, batch_size, length):
        """Windows first .. first+batch_size-1 of the global batch of `step`: x, y (batch_size, length) int64."""
        tokens = self.split[split]
        starts = window_starts(seed, split, step, np.arange(first, first + batch_size), len(tokens), length)
        rows = np.stack([tokens[s:s + length + 1] for s in starts]).astype(np.int64)
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]
