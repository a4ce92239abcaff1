"""
needle.py on a CPU, offline: the generators and their baselines, determinism, scoring, the attention probe,
statistics, chunked prefill, outputs, the text path with a byte-level encoder, and the command line.
"""

import hashlib
import json
import os
import re
import sys

import numpy as np
import pytest
import torch

import data
import needle
from model import GPT, GPTConfig

V = 128                                          # filler 8..67, keys 68..97, values 98..127
LAYOUT = needle.vocab_layout(V)
N_VALUES = LAYOUT["values"][1] - LAYOUT["values"][0]


def in_range(x, name):
    lo, hi = LAYOUT[name]
    return (lo <= np.asarray(x)) & (np.asarray(x) < hi)


# -----------------------------------------------------------------------------
# toy score_fns: idx (B, T), positions (B, P) -> logits (B, P, V)

def one_hot(tokens, vocab=V):
    out = torch.full((*tokens.shape, vocab), -1e4, dtype=torch.float32)
    out.scatter_(-1, tokens[..., None].long(), 0.0)
    return out


def oracle(idx, positions):
    """Reads the gold value from idx: the j-th token after the last query marker's key is the value that followed
    the key's j-th occurrence in the haystack."""
    out = torch.zeros(positions.shape, dtype=torch.long)
    for b in range(idx.shape[0]):
        row = idx[b].tolist()
        for i, p in enumerate(positions[b].tolist()):
            q = max(j for j in range(p + 1) if row[j] == needle.QUERY)
            key, j = row[q + 1], p - (q + 1)
            hits = [t for t in range(q) if row[t] == key]
            out[b, i] = row[hits[j] + 1]
    return one_hot(out)


def peek(idx, positions):
    """Teacher forcing puts the gold token right after each answer-predicting position: read it."""
    return one_hot(torch.gather(idx, 1, positions + 1), vocab=int(idx.max()) + 1)


def constant(idx, positions):
    return one_hot(torch.full(positions.shape, LAYOUT["values"][0]))


def seeded_random(idx, positions):
    """Random guesses among the values, a function of the sequence only (so batching cannot change them)."""
    out = []
    for b in range(idx.shape[0]):
        g = torch.Generator().manual_seed(int(hashlib.sha256(idx[b].numpy().tobytes()).hexdigest()[:8], 16))
        out.append(torch.randint(*LAYOUT["values"], positions.shape[1:], generator=g))
    return one_hot(torch.stack(out))


class Counting:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, idx, positions):
        self.calls += 1
        return self.fn(idx, positions)


def tiny_gpt(attn="softmax", pos="rope", token_shift=False, vocab=128, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=vocab, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, attn=attn, pos=pos,
                    token_shift=token_shift, block_size=64)
    return GPT(cfg).to(dtype).eval()


def copier_fn(idx, positions):
    """A key-blind model: answers the i-th query with the value of the i-th key-value pair it saw."""
    out = torch.zeros(positions.shape, dtype=torch.long)
    for b in range(idx.shape[0]):
        row = idx[b].tolist()
        first_q = row.index(needle.QUERY)
        pairs = [row[t + 1] for t in range(first_q - 1) if in_range(row[t], "keys") and in_range(row[t + 1], "values")]
        if all(in_range(row[t], "keys") for t in range(0, first_q - 1, 2)):   # the needle haystack: a 2-token grid
            pairs = row[1:first_q:2]
        for i in range(positions.shape[1]):
            out[b, i] = pairs[i % len(pairs)]
    return one_hot(out)


# -----------------------------------------------------------------------------
# generator


def test_training_data_unchanged():
    """make_batch draws exactly the samples of the first needle.py (hashes taken from that version)."""
    def fp(*ts):
        h = hashlib.sha256()
        for t in ts:
            h.update(t.numpy().tobytes())
        return h.hexdigest()[:16]
    assert fp(*needle.make_batch(1337, 0, 8, 256, 1024)) == "1e6b5bd807747901"
    assert fp(*needle.make_batch(1337, 40, 8, 128, 128, needle_cap=8, query_cap=4)) == "961d58974856035e"
    assert fp(*needle.make_batch(0, 0, 8, 256, 1024, domain=needle.EVAL, n_needles=4)) == "915f85dcf63da3a6"


def test_training_batches_do_not_depend_on_batch_size():
    x, y = needle.make_batch(7, 0, 8, 128, V, needle_cap=8, query_cap=4)
    x1, y1 = needle.make_batch(7, 0, 3, 128, V, needle_cap=8, query_cap=4)
    x2, y2 = needle.make_batch(7, 3, 5, 128, V, needle_cap=8, query_cap=4)
    assert torch.equal(x, torch.cat([x1, x2])) and torch.equal(y, torch.cat([y1, y2]))


@pytest.mark.parametrize("haystack", needle.TOKEN_HAYSTACKS)
@pytest.mark.parametrize("q", [1, 3])
def test_token_sample_properties(haystack, q):
    n = 5
    for i in range(20):
        T = 96 + i
        s = needle.make_token_sample(np.random.default_rng(i), T, n, V, haystack, q)
        assert s.tokens.shape == (T,) and s.targets.shape == (T,) and s.tokens.dtype == np.int64
        labelled = np.flatnonzero(s.targets != needle.IGNORE)
        assert sorted(labelled.tolist()) == sorted(np.concatenate(s.answers).tolist())     # labels only at answers
        assert np.array_equal(s.targets[labelled], s.tokens[labelled + 1])                 # teacher-forced gold
        assert in_range(s.targets[labelled], "values").all()
        assert len(s.answers) == len(s.copier) == len(s.asked) == len(labelled) == q
        first_query = int(np.flatnonzero(s.tokens == needle.QUERY)[0])
        hay = s.tokens[:first_query]
        assert not (hay == needle.QUERY).any()
        if haystack != "needle":                                                            # only filler + needles
            key_pos = np.flatnonzero(in_range(hay, "keys"))
            assert len(key_pos) == n and np.all(np.diff(key_pos) >= 2)                     # non-overlapping
            assert in_range(hay[key_pos + 1], "values").all()
            assert in_range(np.delete(hay, np.concatenate([key_pos, key_pos + 1])), "filler").all()
            assert len(set(hay[key_pos + 1].tolist())) == n                                 # unique values
            assert len(set(hay[key_pos].tolist())) == n                                     # unique keys
            assert np.array_equal(s.spans[:, 0], key_pos)
        for a, row in zip(s.answers, s.asked):         # every queried key is a real needle, once per value
            key = s.tokens[a[0]]
            assert s.tokens[a[0] - 1] == needle.QUERY
            occurrences = np.flatnonzero(hay == key)
            assert len(occurrences) == len(a) and np.array_equal(hay[occurrences + 1], s.targets[a])
            lo, hi = s.spans[row]                        # the probe's span of the queried needle
            assert hi - lo == 2 and s.tokens[lo] == key and s.tokens[lo + 1] == s.targets[a[0]]


def test_vocab_ranges_disjoint():
    for vocab in (64, 128, 1024, 50304):
        lay = needle.vocab_layout(vocab)
        assert needle.N_RESERVED <= lay["filler"][0] < lay["filler"][1] == lay["keys"][0] < lay["keys"][1] \
            == lay["values"][0] < lay["values"][1] == vocab


@pytest.mark.parametrize("haystack", ["random", "needle"])
def test_depth_pinned_within_one_token(haystack):
    T, n = 200, 6
    H = T - 3
    for depth in range(0, 101, 10):
        for i in range(5):
            s = needle.make_token_sample(np.random.default_rng([depth, i]), T, n, V, haystack, 1, depth)
            key = s.tokens[s.answers[0][0]]
            where = np.flatnonzero(s.tokens[:H] == key)
            assert np.abs(where - depth / 100 * (H - 2)).min() <= 1, (depth, where)
            assert abs(s.depths[0] - depth) <= 100 / (H - 2) + 1e-9


def test_requested_needle_and_query_counts_and_capacity_errors():
    assert needle.EvalSpec(queries=8).n_queries(20) == 8 and needle.EvalSpec(queries=8).n_queries(3) == 3
    with pytest.raises(needle.DoesNotFit, match="do not fit"):
        needle.make_token_sample(np.random.default_rng(0), 40, 20, V)
    with pytest.raises(ValueError, match="distinct keys"):
        needle.make_token_sample(np.random.default_rng(0), 4096, 40, V)
    with pytest.raises(needle.DoesNotFit, match="queries <= needles"):
        needle.make_token_sample(np.random.default_rng(0), 128, 2, V, n_queries=3)
    with pytest.raises(ValueError, match="unknown token haystack"):
        needle.TokenTask(V, "repeat").sample(np.random.default_rng(0), 128, 2, 1)


def test_make_sample_keeps_its_interface():
    tokens, targets, answer_pos, depths = needle.make_sample(np.random.default_rng(0), 128, 4, 2, V)
    assert tokens.shape == targets.shape == (128,) and answer_pos.shape == depths.shape == (2,)
    assert (targets[answer_pos] == tokens[answer_pos + 1]).all()


COPY = [("random", 1, 1), ("random", 2, 1), ("random", 4, 1), ("needle", 1, 1), ("random", 4, 3), ("needle", 4, 3)]


@pytest.mark.parametrize("haystack,n,q", COPY, ids=[f"{h}-n{n}-q{q}" for h, n, q in COPY])
def test_copier_baseline_is_what_a_key_blind_model_scores(haystack, n, q):
    """The copier column equals the score of a model that ignores the key; it is perfect on the random haystack
    with one needle, about 1/n with n needles, and small only with distractor needles."""
    task, spec = needle.TokenTask(V, haystack), needle.EvalSpec(queries=q, samples=200)
    r = needle.run_cell(copier_fn, task, spec, 96, n, budget=200 * 96)
    assert r["copier"] == r["acc"]
    expect = (0, 0.15) if haystack == "needle" else (1, 1) if n == 1 else (0.5 / n, 2 / n)
    assert expect[0] <= r["copier"] <= expect[1], r["copier"]
    assert r["chance"] == pytest.approx(1 / N_VALUES)


# -----------------------------------------------------------------------------
# determinism


def test_same_arguments_same_arrays_and_fingerprint():
    task, spec = needle.TokenTask(V, "needle"), needle.EvalSpec(samples=12, queries=8, depths=(0, 50))
    a = [needle.cell_sample(task, spec, 128, 4, i) for i in range(12)]
    b = [needle.cell_sample(needle.TokenTask(V, "needle"), spec, 128, 4, i) for i in range(12)]
    assert all(np.array_equal(x.tokens, y.tokens) and np.array_equal(x.targets, y.targets) for x, y in zip(a, b))
    r1 = needle.run_cell(seeded_random, task, spec, 128, 4)
    r2 = needle.run_cell(seeded_random, task, spec, 128, 4)
    assert r1["fingerprint"] == r2["fingerprint"] and r1["acc"] == r2["acc"]
    other = needle.run_cell(seeded_random, task, needle.EvalSpec(samples=12, seed=1), 128, 4)
    assert other["fingerprint"] != r1["fingerprint"]


def test_queries_change_only_the_samples_they_shape():
    """The generator's key holds what shapes a sample: --queries does not touch samples whose needle count caps the
    queries anyway; it does change samples it shapes."""
    for task in (needle.TokenTask(V), needle.TokenTask(V, "random")):
        capped = [needle.cell_sample(task, needle.EvalSpec(queries=q), 96, 2, 0).tokens for q in (2, 8)]
        assert np.array_equal(*capped)
        shaped = [needle.cell_sample(task, needle.EvalSpec(queries=q), 96, 4, 0).tokens for q in (1, 2)]
        assert not np.array_equal(*shaped)


def test_cell_alone_equals_cell_in_grid():
    task, spec = needle.TokenTask(V), needle.EvalSpec(samples=10)
    doc = needle.run_grid(seeded_random, task, spec, [128, 64], [4, 1, 2], log=lambda s: None)
    alone = needle.run_cell(seeded_random, task, spec, 128, 2)
    cell = next(c for c in doc["cells"] if (c["length"], c["num_needles"]) == (128, 2))
    for key in ("acc", "fingerprint", "all_correct", "depth_hist", "hash", "copier"):
        assert cell[key] == alone[key]
    assert [(c["length"], c["num_needles"]) for c in doc["cells"]] == [(64, 1), (64, 2), (64, 4), (128, 1),
                                                                       (128, 2), (128, 4)]     # short to long


@pytest.mark.parametrize("q", [1, 3])
def test_batch_size_and_order_change_nothing(q):
    task, spec = needle.TokenTask(V), needle.EvalSpec(samples=13, queries=q)
    records = [needle.run_cell(seeded_random, task, spec, 96, 4, budget=b * 96) for b in (1, 4, 13, 100)]
    assert len({(r["acc"], r["fingerprint"], r["all_correct"], r["copier"]) for r in records}) == 1
    assert [r["batch"] for r in records] == [1, 4, 13, 13]
    forward = [needle.run_cell(seeded_random, task, spec, L, 3)["fingerprint"] for L in (64, 96)]
    backward = [needle.run_cell(seeded_random, task, spec, L, 3)["fingerprint"] for L in (96, 64)]
    assert forward == backward[::-1]


def test_gpt_logits_do_not_depend_on_batch_size():
    model = tiny_gpt(pos="none", token_shift=True)
    torch.manual_seed(1)
    with torch.no_grad():                            # weights moved from init, so the logits are not near-uniform
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    samples = [needle.cell_sample(needle.TokenTask(V), needle.EvalSpec(queries=4), 64, 4, i) for i in range(6)]
    fn = needle.ModelScorer(model)
    idx = torch.from_numpy(np.stack([s.tokens for s in samples]))
    pos = torch.from_numpy(np.stack([np.concatenate(s.answers) for s in samples]))
    together = fn(idx, pos)
    alone = torch.cat([fn(idx[i:i + 1], pos[i:i + 1]) for i in range(6)])
    assert together.std() > 0.1 and (together - alone).abs().max() < 1e-10


def test_validation_samples_are_not_the_reported_samples(monkeypatch):
    """train.py's in-training evaluation draws from its own seed domain, not the samples needle.py reports."""
    import train
    seen = []
    real = needle.score_samples
    monkeypatch.setattr(needle, "score_samples", lambda fn, samples, device="cpu": seen.extend(
        s.tokens.tobytes() for s in samples) or real(fn, samples, device))
    c = {"eval_lengths": [64], "block_size": 64, "eval_needles": [2], "eval_samples": 8, "vocab_size": V,
         "device": "cpu"}
    results, lengths = train.needle_eval(tiny_gpt().float(), c, torch.no_grad())
    assert lengths == [64] and set(results) == {(64, 2)} and len(seen) == 8
    reported = {needle.cell_sample(needle.TokenTask(V, h), needle.EvalSpec(seed=0), 64, 2, i).tokens.tobytes()
                for h in needle.TOKEN_HAYSTACKS for i in range(8)}
    assert not reported & set(seen)


# -----------------------------------------------------------------------------
# scoring


@pytest.mark.parametrize("haystack", needle.TOKEN_HAYSTACKS)
@pytest.mark.parametrize("q", [1, 3])
def test_oracle_scores_one(haystack, q):
    n = 6
    spec = needle.EvalSpec(queries=q, samples=8, depths=(0, 100) if q > 1 else ())
    r = needle.run_cell(oracle, needle.TokenTask(V, haystack), spec, 80, n, budget=3 * 80)
    assert r["acc"] == 1.0 and r["all_correct"] == 1.0 and r["n_samples"] == 8
    assert r["n_values"] == 8 * spec.n_queries(n)


def test_constant_and_random_models_score_about_chance():
    task = needle.TokenTask(V)
    assert task.chance == needle.chance_accuracy(V) == 1 / N_VALUES
    for fn in (constant, seeded_random):
        r = needle.run_cell(fn, task, needle.EvalSpec(samples=600, queries=8), 48, 8, budget=600 * 48)
        lo, hi = needle.wilson(r["acc"], r["n_values"])
        assert lo <= r["chance"] <= hi, (fn.__name__, r["acc"])


def test_answer_logits_only_at_answer_positions():
    shapes = []

    def spy(idx, positions):
        shapes.append((tuple(idx.shape), tuple(positions.shape)))
        return oracle(idx, positions)
    needle.run_cell(spy, needle.TokenTask(V), needle.EvalSpec(queries=5, samples=4), 64, 5, budget=4 * 64)
    assert shapes == [((4, 64), (4, 5))]


def test_teacher_forcing_equals_greedy_decoding():
    model = tiny_gpt(attn="lucid", pos="none", token_shift=True)
    fn = needle.ModelScorer(model)
    rng = np.random.default_rng(0)
    for trial in range(4):
        prompt = torch.from_numpy(rng.integers(0, V, size=(1, 30)))
        m = 4
        greedy = model.generate(prompt, max_new_tokens=m, top_k=1)[0, 30:].numpy()
        for wrong_at in (None, 0, 2):               # gold = greedy's answer, or that answer with one token changed
            gold = greedy.copy()
            if wrong_at is not None:
                gold[wrong_at] = (gold[wrong_at] + 1) % V
            tokens = np.concatenate([prompt[0].numpy(), gold])
            targets = np.full(len(tokens), needle.IGNORE)
            targets[29:29 + m] = gold
            s = needle.Sample(tokens, targets, [np.arange(29, 29 + m)], np.zeros(1), [False])
            assert needle.score_samples(fn, [s]) == [[wrong_at is None]]
            logits = fn(torch.from_numpy(tokens)[None], torch.arange(29, 29 + m)[None])
            tf = logits.argmax(-1)[0].numpy()
            upto = m if wrong_at is None else wrong_at + 1
            assert np.array_equal(tf[:upto], greedy[:upto])


# -----------------------------------------------------------------------------
# attention probe


@pytest.mark.parametrize("attn,pos", [("softmax", "rope"), ("lucid", "none"), ("lucid", "rope")])
def test_probe_reproduces_each_attention_layer(attn, pos):
    """Recomputed probabilities times V (LUCID: L⁻¹V from the probe's rows of L⁻¹) give each layer's output."""
    model = tiny_gpt(attn, pos)
    idx = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(0))
    rows = torch.tensor([[39, 10, 3], [25, 0, 39]])
    outputs, inputs = [], []
    hooks = [b.attn.register_forward_hook(lambda m, a, out: (inputs.append(a[0]), outputs.append(out)) and None)
             for b in model.blocks]
    probs, inverse = needle.attention_probe(model, idx, rows, torch.arange(40).expand(2, 40))
    for h in hooks:
        h.remove()
    assert len(inverse) == (2 if attn == "lucid" else 0)
    for layer, block in enumerate(model.blocks):
        a, x = block.attn, inputs[layer]
        v = a.c_kv(x).view(2, 40, 2, a.n_kv_head, a.head_dim)[:, :, 1].transpose(1, 2)        # (B, Hkv, T, D)
        if attn == "lucid":
            v = inverse[layer].double() @ v
        v = v.repeat_interleave(a.n_head // a.n_kv_head, 1)
        y = (probs[layer].double() @ v).transpose(1, 2).reshape(2, 3, -1)                    # (B, R, C)
        want = torch.gather(outputs[layer], 1, rows[:, :, None].expand(-1, -1, y.shape[-1]))
        assert (a.c_proj(y) - want).abs().max() < 1e-5
        assert torch.allclose(probs[layer].sum(-1), torch.ones(2, 2, 3, dtype=probs[layer].dtype))


def test_probe_masses_split_the_query_attention():
    model = tiny_gpt(pos="none", token_shift=True)
    samples = [needle.cell_sample(needle.TokenTask(V), needle.EvalSpec(), 64, 4, i) for i in range(3)]
    masses = needle.probe_masses(model, samples)
    for (hit, other), s in zip(masses, samples):
        assert hit.shape == other.shape == (2, 2)
        assert (hit >= 0).all() and (hit + other * (len(s.spans) - 1) <= 1 + 1e-6).all()
    summary = needle.probe_summary(masses)
    assert summary["n"] == 3 and summary["hit"] == pytest.approx(max(max(r) for r in summary["hit_per_head"]), abs=1e-4)


# -----------------------------------------------------------------------------
# statistics


def test_wilson_check_value():
    lo, hi = needle.wilson(0.5, 100)
    assert (round(lo, 3), round(hi, 3)) == (0.404, 0.596)
    for n, p, half in [(500, 0.5, 4.4), (100, 0.2, 7.8), (50, 0.1, 8.5)]:     # a published table of Wilson half-widths
        lo, hi = needle.wilson(p, n)
        assert round(100 * (hi - lo) / 2, 1) == half


def test_mcnemar_exact_known_cases():
    assert needle.mcnemar_exact(10, 0) == pytest.approx(2 / 1024)
    assert needle.mcnemar_exact(5, 1) == pytest.approx(2 * 7 / 64)
    assert needle.mcnemar_exact(1, 5) == needle.mcnemar_exact(5, 1)
    assert needle.mcnemar_exact(3, 3) == 1.0 and needle.mcnemar_exact(0, 0) == 1.0
    assert needle.mcnemar_exact(300, 250) == pytest.approx(0.0363, abs=5e-4)      # large n, exact integers


def test_paired_comparison_on_identical_samples():
    task, spec = needle.TokenTask(V), needle.EvalSpec(samples=50)
    same = needle.run_cell([oracle, oracle], task, spec, 64, 2)["vs"]
    assert same["delta"] == 0 and same["discordant"] == [0, 0] and same["mcnemar_p"] == 1.0
    assert same["delta_ci95"] == [0.0, 0.0]
    vs = needle.run_cell([oracle, constant], task, spec, 64, 2)["vs"]
    b, c = vs["discordant"]
    assert c == 0 and b >= 40                      # the constant is right only when the gold is its token
    assert vs["delta"] == pytest.approx(b / 50) and vs["mcnemar_p"] < 1e-6
    assert vs["delta_ci95"][0] <= vs["delta"] <= vs["delta_ci95"][1]


def test_paired_test_and_interval_share_the_sample_unit():
    """Packed queries: A gets all but the last query of every sample right, B none. No sample is discordant, so
    McNemar's p is 1; Δ and its interval are about the same unit and must be 0 (they were +0.75 [0.75, 0.75])."""
    def all_but_last(idx, positions):
        logits = oracle(idx, positions)
        logits[:, -1] = logits[:, -1].roll(1, dims=-1)
        return logits

    def wrong(idx, positions):
        return oracle(idx, positions).roll(1, dims=-1)
    spec = needle.EvalSpec(samples=30, queries=4)
    r = needle.run_cell([all_but_last, wrong], needle.TokenTask(V), spec, 96, 6)
    assert r["acc"] == 0.75 and r["vs"]["acc"] == 0 and r["all_correct"] == 0
    v = r["vs"]
    assert v["discordant"] == [0, 0] and v["mcnemar_p"] == 1.0 and v["delta"] == 0 and v["delta_ci95"] == [0, 0]
    half = needle.run_cell([oracle, all_but_last], needle.TokenTask(V), spec, 96, 6)["vs"]
    assert half["discordant"] == [30, 0] and half["delta"] == 1.0


def test_paired_stats_count_samples_not_values():
    a, b = [[True, True, True, False]] * 30, [[False] * 4] * 30
    assert needle.paired_stats(a, b) == {"delta": 0.0, "delta_ci95": [0.0, 0.0], "discordant": [0, 0],
                                         "mcnemar_p": 1.0}
    stats = needle.paired_stats([[True, True]] * 10 + [[True, False]] * 10, [[False, True]] * 20)
    assert stats["discordant"] == [10, 0] and stats["delta"] == 0.5
    assert stats["delta_ci95"][0] < 0.5 < stats["delta_ci95"][1]


def test_effective_length_and_table():
    accs = {(1024, 1): 0.95, (2048, 1): 0.91, (4096, 1): 0.5, (1024, 2): 0.2, (2048, 2): None, (4096, 2): 1.0}
    table = needle.format_table(accs, [1024, 2048, 4096], [1, 2]).splitlines()
    assert table[0].split("|")[1].strip() == "1K" and "eff@0.9" in table[0]
    assert table[1].split("|")[1:] == ["   95.0 ", "   91.0 ", "   50.0 ", "     2K"]
    assert "—" in table[2] and table[2].endswith("<1K")
    records = {k: {"acc": a, "copier": 0.5} for k, a in accs.items()}
    copier = needle.format_table(records, [1024, 2048, 4096], [1, 2], None, "copier").splitlines()
    assert copier[1] == "      1 |   50.0 |   50.0 |   50.0" and "eff" not in copier[0]


@pytest.mark.parametrize("text,value", [("1K", 1024), ("128k", 131072), ("6K", 6144), ("1000", 1000)])
def test_parse_length(text, value):
    assert needle.parse_length(text) == value and needle.length_label(value) in (text.upper(), text)


# -----------------------------------------------------------------------------
# chunked prefill


PREFILL = [(a, p, s) for a in ("softmax", "lucid") for p in ("rope", "none") for s in (False, True)]


@pytest.mark.parametrize("attn,pos,shift", PREFILL, ids=[f"{a}-{p}-{'shift' if s else 'noshift'}"
                                                         for a, p, s in PREFILL])
def test_chunked_prefill_equals_full_forward(attn, pos, shift):
    model = tiny_gpt(attn, pos, shift)
    idx = torch.randint(0, 128, (2, 50), generator=torch.Generator().manual_seed(1))
    full = model.forward_hidden(idx)
    for chunk in (7, 13, 50):
        assert (model.prefill_chunked(idx, chunk) - full).abs().max().item() < 1e-10
    positions = torch.tensor([[3, 20, 49], [0, 31, 48]])
    chunked = needle.ModelScorer(model, chunk_threshold=16, chunk_size=7)
    assert chunked.chunked(50) and not needle.ModelScorer(model).chunked(50)
    assert (chunked(idx, positions) - needle.ModelScorer(model)(idx, positions)).abs().max().item() < 1e-10


# -----------------------------------------------------------------------------
# outputs: JSON, resume, heatmap


def test_json_keys_and_resume_skips_finished_cells(tmp_path):
    out = str(tmp_path / "r.json")
    task, spec = needle.TokenTask(V), needle.EvalSpec(samples=6, depths=(0, 50, 100))
    fn = Counting(seeded_random)
    doc = needle.run_grid(fn, task, spec, [64, 96], [1, 2, 40], out=out, budget=96 * 6, meta={"model": {}},
                          log=lambda s: None)
    on_disk = json.load(open(out))
    assert on_disk == json.loads(json.dumps(doc))
    assert {"meta", "grid", "cells", "depth_cells", "data_fingerprint"} <= set(on_disk)
    for key in ("needle_version", "task", "haystack", "seed", "vocab_size", "tokenizer", "queries",
                "numpy", "torch", "started", "wall_s", "model"):
        assert key in on_disk["meta"], key
    assert on_disk["grid"] == {"lengths": [64, 96], "num_needles": [1, 2, 40], "depths": [0, 50, 100]}
    for c in on_disk["cells"]:
        for key in ("length", "num_needles", "n_samples", "n_values", "acc", "ci95", "all_correct", "copier",
                    "chance", "seconds", "batch", "chunked", "skipped_reason"):
            assert key in c or c["skipped_reason"], key
    skipped = [c for c in on_disk["cells"] if c["num_needles"] == 40]
    assert skipped and all(c["acc"] is None and "40 needles" in c["skipped_reason"] for c in skipped)
    assert {d["depth_bin"] for d in on_disk["depth_cells"]} == {0, 50, 100}
    assert sum(d["n"] for d in on_disk["depth_cells"]) == 4 * 6
    calls = fn.calls
    assert calls == 4                                # 4 runnable cells, one batch each
    again = needle.run_grid(fn, task, spec, [64, 96], [1, 2, 40], out=out, budget=96 * 6, log=lambda s: None)
    assert fn.calls == calls                         # everything reused
    assert again["data_fingerprint"] == doc["data_fingerprint"]
    assert [c["acc"] for c in again["cells"]] == [c["acc"] for c in doc["cells"]]
    needle.run_grid(fn, task, spec, [64, 96, 128], [1, 2, 40], out=out, budget=96 * 6, log=lambda s: None)
    assert fn.calls == calls + 4                     # only the new length: 2 runnable cells, 2 batches each


def _depth_doc():
    spec = needle.EvalSpec(samples=4, depths=(0, 100))
    return needle.run_grid(seeded_random, needle.TokenTask(V), spec, [64, 96], [1, 2], log=lambda s: None)


def test_heatmap_written_when_matplotlib_imports(tmp_path):
    pytest.importorskip("matplotlib")
    paths = needle.write_heatmaps(_depth_doc(), str(tmp_path / "h"))
    assert len(paths) == 2 and all(os.path.getsize(p) > 0 and p.endswith(".png") for p in paths)


def test_no_heatmap_without_matplotlib(tmp_path, monkeypatch):
    doc = _depth_doc()
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)      # `import matplotlib` now raises ImportError
    assert needle.write_heatmaps(doc, str(tmp_path / "h")) == []
    assert os.listdir(tmp_path) == []


# -----------------------------------------------------------------------------
# text task with a byte-level encoder


@pytest.fixture(scope="module")
def enc():
    pytest.importorskip("tiktoken")
    return data.load_encoding("bytes")


NEEDLE_RE = r"The secret code for (\S+) is (\S+)\."


@pytest.mark.parametrize("q", [1, 2])
def test_text_samples_render_and_answers_decode(enc, q):
    n = 4
    for haystack in needle.TEXT_HAYSTACKS:
        task = needle.TextTask(enc, haystack)
        s = task.sample(np.random.default_rng([7, len(haystack)]), 1024, n, q, depth=30)
        ids = s.tokens.tolist()
        assert len(ids) == 1024 and enc.encode(enc.decode(ids)) == ids      # the concatenation round-trips
        labelled = np.flatnonzero(s.targets != needle.IGNORE)
        assert sorted(labelled.tolist()) == sorted(np.concatenate(s.answers).tolist())
        assert np.array_equal(s.targets[labelled], s.tokens[labelled + 1])
        text = enc.decode(ids)
        context = text.rsplit("\n", q)[0]                                  # without the question(s)
        pairs = re.findall(NEEDLE_RE, context)
        answers = [enc.decode(s.targets[a].tolist()) for a in s.answers]
        assert all(a.startswith(" ") for a in answers)
        spans = [enc.decode(s.tokens[lo:hi].tolist()) for lo, hi in s.spans]   # every needle-like sentence, in order
        assert [re.findall(NEEDLE_RE, t)[0] for t in spans] == pairs
        for row, a in zip(s.asked, answers):
            assert spans[row].endswith(a + ".")
        if haystack != "needle":                     # the only needle sentences are the real ones
            assert len(pairs) == n
            assert s.copier == [" " + pairs[g % n][1] == a for g, a in enumerate(answers)]


def test_text_prompt_wording(enc):
    task = needle.TextTask(enc, "essay")
    s = task.sample(np.random.default_rng(0), 300, 2, 1)
    text = enc.decode(s.tokens.tolist())
    assert re.search(r"(Most founders|Investors|Early users|Small teams|Big companies|Young hackers|Good programmers"
                     r"|The best startups) \w+", text)
    question = text.rsplit("\n", 1)[1]
    key = re.fullmatch(r"The secret code for (\w+)-(\w+) is \d{7}", question)
    assert key and key[1] in needle.ADJECTIVES and key[2] in needle.NOUNS


def test_text_cells_with_peeking_oracle_and_copier(enc):
    task = needle.TextTask(enc, "essay")
    spec = needle.EvalSpec(queries=2, samples=5, depths=(10, 90))
    r = needle.run_cell(peek, task, spec, 1024, 4, budget=2 * 1024)
    assert r["acc"] == 1.0 and r["n_values"] == 5 * 2
    assert needle.run_cell(peek, task, needle.EvalSpec(samples=6), 1024, 1)["copier"] == 1.0
    distractors = needle.TextTask(enc, "needle")
    assert needle.run_cell(peek, distractors, needle.EvalSpec(samples=10), 512, 1)["copier"] <= 0.2

    def almost(idx, positions):                      # right everywhere but the second token of each answer
        logits = peek(idx, positions)
        logits[:, 1] = logits[:, 1].roll(1, dims=-1)
        return logits
    assert needle.run_cell(almost, task, needle.EvalSpec(samples=4), 512, 2)["acc"] == 0.0
    assert needle.run_cell(peek, task, needle.EvalSpec(samples=2), 120, 8)["skipped_reason"]   # does not fit


def test_text_task_rejects_bad_arguments(enc):
    with pytest.raises(ValueError, match="haystack"):
        needle.TextTask(enc, haystack="poetry")
    with pytest.raises(needle.DoesNotFit, match="queries <= needles"):
        needle.TextTask(enc).sample(np.random.default_rng(0), 512, 2, 3)


# -----------------------------------------------------------------------------
# command line


def write_ckpt(path, seed=0, vocab=320, attn="softmax", iter_num=0):
    """A tiny checkpoint in train.py's format (vocab 320, so the byte-level text task fits too)."""
    torch.manual_seed(seed)
    args = dict(vocab_size=vocab, n_layer=1, n_head=2, n_kv_head=1, n_embd=32, attn=attn, pos="none",
                token_shift=True, block_size=64)
    model = GPT(GPTConfig(**args))
    with torch.no_grad():                            # (tied) value embeddings scaled up: the argmax is some value
        model.wte.weight[slice(*needle.vocab_layout(vocab)["values"])] *= 5
    torch.save({"model": model.state_dict(), "model_args": args, "config": {}, "iter_num": iter_num}, path)
    return str(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_ckpt(tmp_path_factory.mktemp("ckpt") / "ckpt.pt")


def test_cli_paired_grid_json_and_heatmap(tmp_path, capsys):
    """Two different checkpoints (vocab 64: 14 values, so untrained models are right often enough to disagree): the
    second model's column equals that model evaluated alone, and Δ is the difference of the per-sample rates."""
    a, b = write_ckpt(tmp_path / "a.pt", 1, 64), write_ckpt(tmp_path / "b.pt", 2, 64)
    common = ["--lengths", "32,48", "--needles", "1,2", "--samples", "40", "--depths", "0,50,100", "--device", "cpu",
              "--probe", "4"]
    out = str(tmp_path / "res.json")
    doc = needle.main(["--ckpt", a, "--vs", b, "--out", out] + common)
    printed = capsys.readouterr().out
    assert "needles |" in printed and "Δ" in printed and "copier" in printed and "chance" in printed
    assert "JSON" not in printed.split("wrote")[0]
    alone = needle.main(["--ckpt", b] + common)
    saved = json.load(open(out))
    assert saved["meta"]["model"]["attention"] == "softmax" and saved["meta"]["vs_model"]["ckpt"].endswith("b.pt")
    assert sum(c["vs"]["discordant"] != [0, 0] for c in saved["cells"]) >= 2
    for c, other in zip(saved["cells"], alone["cells"]):
        assert c["vs"]["acc"] == other["acc"] and c["copier"] == other["copier"]
        assert c["vs"]["delta"] == pytest.approx(c["all_correct"] - other["all_correct"])
        assert 0 <= c["probe"]["hit"] <= 1 and c["vs"]["probe"]["hit"] == other["probe"]["hit"]
    assert saved["data_fingerprint"] == doc["data_fingerprint"] == alone["data_fingerprint"]
    pngs = [p for p in os.listdir(tmp_path) if p.endswith(".png")]
    assert len(pngs) == (2 if needle.pyplot() else 0)


def test_cli_resume_identifies_the_checkpoint_by_content(tmp_path, capsys):
    """Other weights of the same shape written to the same path are a different model: nothing is reused."""
    path, out = str(tmp_path / "ckpt.pt"), str(tmp_path / "r.json")
    args = ["--ckpt", path, "--lengths", "32", "--needles", "1", "--samples", "40", "--out", out]
    write_ckpt(path, seed=1, vocab=64)
    first = needle.main(args)
    assert "reused" in (needle.main(args), capsys.readouterr().out)[1]
    write_ckpt(path, seed=2, vocab=64)
    second = needle.main(args)
    assert "reused" not in capsys.readouterr().out
    assert first["cells"][0]["hash"] != second["cells"][0]["hash"]
    assert first["meta"]["model"]["id"] != second["meta"]["model"]["id"]


def test_cli_attn_runs_the_checkpoint_with_the_other_attention(ckpt, capsys):
    doc = needle.main(["--ckpt", ckpt, "--attn", "lucid", "--vs", ckpt, "--lengths", "64", "--needles", "2",
                       "--samples", "4", "--probe", "0"])
    assert doc["meta"]["model"]["attention"] == "lucid" and doc["meta"]["vs_model"]["attention"] == "softmax"
    assert doc["meta"]["model"]["id"] != doc["meta"]["vs_model"]["id"]


def test_cli_show_writes_one_figure(ckpt, tmp_path, capsys, monkeypatch):
    png = str(tmp_path / "show.png")
    args = ["--ckpt", ckpt, "--attn", "lucid", "--vs", ckpt, "--lengths", "64", "--needles", "3", "--show", png]
    if needle.pyplot() is not None:
        needle.main(args)
        assert os.path.getsize(png) > 10000 and f"wrote {png}" in capsys.readouterr().out
    monkeypatch.setattr(needle, "pyplot", lambda: None)
    with pytest.raises(SystemExit, match="needs matplotlib"):
        needle.main(args)


def test_cli_text_task_and_help(ckpt, tmp_path, capsys):
    doc = needle.main(["--ckpt", ckpt, "--task", "text", "--tokenizer", "bytes",
                       "--lengths", "512", "--needles", "2", "--samples", "3", "--device", "cpu", "--probe", "1"])
    assert doc["meta"]["tokenizer"] == "bytes" and doc["meta"]["haystack"] == "needle"
    assert doc["cells"][0]["n_samples"] == 3 and "probe" in doc["cells"][0]
    args = needle.build_parser().parse_args(["--ckpt", ckpt])
    assert (args.lengths, args.needles, args.samples, args.queries) == ([128, 512, 2048], [1, 4, 16], 100, 1)
    assert "128,512,2K" in needle.build_parser().format_help()      # the CPU-sized default grid is in --help


BAD = [
    (["--lengths", "3Q"], "invalid length"),
    (["--lengths", "0"], "invalid length"),
    (["--depths", "50,120"], "invalid depth '120'"),
    (["--task", "spiral"], "invalid choice"),
    (["--samples", "0"], "invalid count"),
    (["--seed", "-1"], "invalid seed"),
    (["--queries", "0"], "invalid count"),
    (["--needles", "1,0"], "invalid needle count '0'"),
    (["--tokenizer", "bytes"], "applies to --task text"),
    (["--haystack", "essay"], "not a token haystack"),
] + ([(["--device", "cuda"], "CUDA is not available")] if not torch.cuda.is_available() else [])


@pytest.mark.parametrize("extra,message", BAD, ids=[" ".join(e) for e, _ in BAD])
def test_bad_arguments_are_errors_at_parse_time(ckpt, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        needle.main(["--ckpt", ckpt, "--device", "cpu"] + extra)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_missing_or_truncated_checkpoint_is_one_line(ckpt, tmp_path):
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(open(ckpt, "rb").read()[:300])
    for path, message in (("no/such/ckpt.pt", "no checkpoint at"), (str(truncated), "could not read")):
        for argv in (["--ckpt", path], ["--ckpt", ckpt, "--vs", path]):
            with pytest.raises(SystemExit) as e:
                needle.main(argv)
            assert message in str(e.value.code) and "\n" not in str(e.value.code)


def test_sample_py_rejects_zero_needles(ckpt, capsys):
    import sample
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", ckpt, "--needles", "0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--needles must be at least 1" in err and len(err.strip().splitlines()) == 1


def test_text_copier_has_no_shortcut_when_needles_share_a_boundary(enc):
    """At short lengths several needles often fall between the same two sentences; the asked one must not always be
    the first of them (a key-blind copier then scored 100% with 4 needles)."""
    task = needle.TextTask(enc, "essay")
    hits = [task.sample(needle.sample_rng(0, needle.EVAL, "copier", 256, 4, i), 256, 4, 1).copier[0]
            for i in range(200)]
    assert 0.1 < np.mean(hits) < 0.45, np.mean(hits)         # about 1/4: the asked needle is any of the four
