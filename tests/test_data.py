"""data.py: the text pipeline on a small local corpus with a byte-level encoding (no network)."""

import json
import os

import numpy as np
import pytest
import tiktoken
import torch

import data
import train

DOCS = ["The quick brown fox jumps over the lazy dog.\n" * 3, "Ünïcödé: naïve café, 日本語, emoji 🦊.",
        "short", "A" * 500, "Line one\nLine two\n\nLine four"]


def byte_level():
    """The 256 single-byte ranks + end-of-text: what data.py's encoding='bytes' must agree with."""
    return tiktoken.Encoding(name="test-bytes", pat_str=r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
                             mergeable_ranks={bytes([i]): i for i in range(256)}, special_tokens={"<|endoftext|>": 256})


def settings(tmp_path, files, **overrides):
    c = dict(train.DEFAULTS, dataset="text", data_files=",".join(str(f) for f in files), encoding="bytes",
             data_dir=str(tmp_path / "data"), val_fraction=0.1)
    c.update(overrides)
    return c


def write_corpus(tmp_path, kind="jsonl"):
    if kind == "jsonl":
        path = tmp_path / "docs.jsonl"
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS), encoding="utf-8")
        return [path]
    if kind == "parquet":
        import datasets
        path = tmp_path / "docs.parquet"
        datasets.Dataset.from_dict({"text": DOCS}).to_parquet(str(path))
        return [path]
    paths = []
    for i, d in enumerate(DOCS):                                   # .txt: one file is one document
        paths.append(tmp_path / f"doc{i}.txt")
        paths[-1].write_text(d, encoding="utf-8")
    return paths


@pytest.mark.parametrize("kind", ["jsonl", "txt", "parquet"])
def test_shards_round_trip_to_the_documents(tmp_path, kind):
    files = write_corpus(tmp_path, kind)
    path = data.prepare(settings(tmp_path, files), num_proc=2, docs_per_task=2)
    meta = json.load(open(os.path.join(path, "meta.json")))
    enc = byte_level()
    stream = np.concatenate([np.fromfile(os.path.join(path, f"{s}.bin"), dtype=meta["dtype"]) for s in ("train", "val")])
    assert meta["dtype"] == "uint16" and meta["n_vocab"] == 257 and meta["documents"] == len(DOCS)
    expected = "<|endoftext|>".join(DOCS) + "<|endoftext|>"              # each document followed by end-of-text
    assert enc.decode(stream.tolist()) == expected
    assert meta["val_tokens"] == round(len(stream) * 0.1) and meta["train_tokens"] + meta["val_tokens"] == len(stream)
    assert data.prepare(settings(tmp_path, files), num_proc=2, log=None) == path   # found: not redone (log unused)


def test_windows_do_not_depend_on_batch_split(tmp_path):
    text = data.TextData(data.prepare(settings(tmp_path, write_corpus(tmp_path)), num_proc=1))
    x, y = text.get_batch(7, "train", 3, 0, 8, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])                              # y is x shifted by one token
    halves = [text.get_batch(7, "train", 3, first, 4, 16) for first in (0, 4)]          # 2 ranks or 2 micro-steps
    quarters = [text.get_batch(7, "train", 3, first, 2, 16) for first in (0, 2, 4, 6)]  # 4 ranks
    for parts in (halves, quarters):
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    other_step, other_seed = text.get_batch(7, "train", 4, 0, 8, 16)[0], text.get_batch(8, "train", 3, 0, 8, 16)[0]
    assert not torch.equal(other_step, x) and not torch.equal(other_seed, x)
    starts = data.window_starts(7, "train", 3, np.arange(10000), 1000, 16)
    assert starts.min() >= 0 and starts.max() <= 1000 - 17 and len(np.unique(starts)) > 900


def tokenize_then_fail(texts):
    """A worker that dies on the third document (after earlier batches were written)."""
    return 1 / 0 if "short" in texts else [1, 2, 3]


@pytest.mark.parametrize("where", ["tokenizing", "splitting"])
def test_interrupted_preparation_leaves_no_half_shard(tmp_path, monkeypatch, where):
    c = settings(tmp_path, write_corpus(tmp_path))
    if where == "tokenizing":
        monkeypatch.setattr(data, "_tokenize", tokenize_then_fail)
        error = ZeroDivisionError
    else:
        def interrupt(*args):
            raise KeyboardInterrupt
        monkeypatch.setattr(data.os, "truncate", interrupt)
        error = KeyboardInterrupt
    with pytest.raises(error):
        data.prepare(c, num_proc=1, docs_per_task=1)
    left = [f for _, _, files in os.walk(tmp_path / "data") for f in files]
    assert left == []                                                    # no .bin, no meta.json, no temporary file
    monkeypatch.undo()
    path = data.prepare(c, num_proc=1)                                   # and the next run prepares it from scratch
    assert sorted(os.listdir(path)) == ["meta.json", "train.bin", "val.bin"]


def test_bad_input_gets_a_clear_error(tmp_path, monkeypatch):
    files = write_corpus(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        data.prepare(settings(tmp_path, [tmp_path / "missing.txt"]))
    with pytest.raises(ValueError, match="both data_files .* and hf_dataset"):
        data.prepare(settings(tmp_path, files, hf_dataset="some/dataset"))
    with pytest.raises(ValueError, match="unknown tiktoken encoding 'gpt9'"):
        data.prepare(settings(tmp_path, files, encoding="gpt9"))
    import datasets
    import huggingface_hub.constants
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)          # as HF_HUB_OFFLINE=1 does at import time
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="could not load the Hub dataset 'no-such-user/no-such-dataset'.*offline"):
        data.prepare(settings(tmp_path, [], data_files="", hf_dataset="no-such-user/no-such-dataset"))

    def offline(name):
        raise ConnectionError("no network")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)               # gpt2 not cached and no network
    with pytest.raises(ValueError, match="TIKTOKEN_CACHE_DIR"):
        data.load_encoding("gpt2")


def test_vocabulary_and_corpus_size_are_checked(tmp_path):
    text = data.TextData(data.prepare(settings(tmp_path, write_corpus(tmp_path)), num_proc=1))
    with pytest.raises(ValueError, match="257 tokens, more than vocab_size=128"):
        text.check(128, 16)
    n_val = len(text.split["val"])
    with pytest.raises(ValueError, match=f"the val split .* has {n_val} tokens, fewer than one window"):
        text.check(320, n_val)
    text.check(320, n_val - 1)                                           # exactly one window fits
