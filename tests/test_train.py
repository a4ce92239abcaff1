"""train.py: settings, learning, checkpoint and exact resume."""

import os
import subprocess
import sys

import pytest
import torch

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_settings(out_dir, **overrides):
    c = train.parse_config([os.path.join(ROOT, "configs", "tiny.py")])
    c.update(out_dir=str(out_dir), max_iters=20, log_interval=5, eval_interval=1000, eval_samples=0,
             block_size=64, curriculum_start=32, warmup_iters=2, batch_size=8)
    c.update(overrides)
    return c


def test_parse_config_file_then_overrides(tmp_path):
    cfg = tmp_path / "x.py"
    cfg.write_text("n_layer = 3\nattn = 'softmax'\nlearning_rate = 1e-2\n")
    c = train.parse_config([str(cfg), "--n_layer=5", "--attn=lucid", "--learning_rate=1", "--eval_needles=[1,2]"])
    assert c["n_layer"] == 5 and c["attn"] == "lucid" and c["learning_rate"] == 1.0 and c["eval_needles"] == [1, 2]
    assert c["n_embd"] == train.DEFAULTS["n_embd"]


@pytest.mark.parametrize("argv,message", [
    (["--n_layr=3"], "unknown setting 'n_layr'"),
    (["--n_layer=2.5"], "must be int"),
    (["--token_shift=yes"], "must be bool"),
    (["--n_layer"], "expected --key=value"),
    (["configs/missing.py"], "does not exist"),
], ids=["unknown-key", "float-for-int", "string-for-bool", "no-value", "missing-file"])
def test_parse_config_errors(argv, message):
    with pytest.raises(ValueError, match=message):
        train.parse_config(argv)


def test_unknown_key_in_config_file(tmp_path):
    cfg = tmp_path / "bad.py"
    cfg.write_text("n_layers = 3\n")
    with pytest.raises(ValueError, match="unknown setting 'n_layers'"):
        train.parse_config([str(cfg)])


def test_command_line_error_is_a_clear_message():
    result = subprocess.run([sys.executable, "train.py", "--max_iter=5"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    assert "unknown setting 'max_iter'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("attn", ["softmax", "lucid"])
def test_loss_decreases(tmp_path, attn):
    losses = train.train(tiny_settings(tmp_path, attn=attn, max_iters=40, save_checkpoint=False,
                                       curriculum_start=0, block_size=32))
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


def test_resume_continues_exactly(tmp_path):
    straight = train.train(tiny_settings(tmp_path / "a", max_iters=20))
    first = train.train(tiny_settings(tmp_path / "b", max_iters=10, schedule_iters=20))
    assert os.path.exists(tmp_path / "b" / "ckpt.pt") and not os.path.exists(tmp_path / "b" / "ckpt.pt.tmp")
    second = train.train(tiny_settings(tmp_path / "b", max_iters=20, schedule_iters=20, init_from="resume"))
    assert first + second == straight                       # bit-identical on CPU: data and schedule are stateless


def test_resume_starts_from_the_saved_settings(tmp_path):
    train.train(tiny_settings(tmp_path, max_iters=4, learning_rate=5e-3, eval_samples=0))
    c = train.load_settings([f"--out_dir={tmp_path}", "--init_from=resume", "--max_iters=6"])
    assert c["learning_rate"] == 5e-3 and c["vocab_size"] == 128 and c["block_size"] == 64   # saved, not defaults
    assert c["max_iters"] == 6 and c["init_from"] == "resume"                                # the command line wins
    with pytest.raises(ValueError, match="no checkpoint"):
        train.load_settings([f"--out_dir={tmp_path / 'nothing'}", "--init_from=resume"])


def test_float16_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="dtype must be"):
        train.train(tiny_settings(tmp_path, dtype="float16"))


def test_sample_shows_prompts_answers_and_gold(tmp_path, capsys):
    import sample
    train.train(tiny_settings(tmp_path, max_iters=2))
    sample.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--num_samples", "2", "--length", "64", "--needles", "3"])
    out = capsys.readouterr().out
    assert out.count("  model: ") == 2 and out.count("gold: ") == 2
    assert "/2 correct" in out


# -----------------------------------------------------------------------------
# the text source, torchrun, dry run, protections

def text_settings(tmp_path, **overrides):
    """configs/text_small.py shrunk to a model that trains 10 steps in a second, on a corpus written here."""
    os.makedirs(tmp_path, exist_ok=True)
    corpus = tmp_path / "corpus.jsonl"
    if not corpus.exists():
        import json
        import random
        rng = random.Random(0)
        words = "the a lucid softmax key value query needle haystack token model layer head solve".split()
        corpus.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(5, 300)))})
                                  + "\n" for _ in range(60)))
    c = train.parse_config([os.path.join(ROOT, "configs", "text_small.py")])
    c.update(data_files=str(corpus), data_dir=str(tmp_path / "data"), out_dir=str(tmp_path / "out"), n_layer=2,
             n_embd=32, n_head=4, n_kv_head=2, block_size=32, curriculum_start=8, batch_size=2,
             gradient_accumulation_steps=2, max_iters=20, schedule_iters=20, warmup_iters=3, log_interval=5,
             eval_interval=10, eval_iters=2, eval_samples=0, device="cpu", dtype="float32", compile=False,
             lucid_impl="torch")
    c.update(overrides)
    return c


def test_text_resume_continues_exactly(tmp_path, capsys):
    straight = train.train(text_settings(tmp_path / "a"))
    first = train.train(text_settings(tmp_path / "b", max_iters=10))
    second = train.train(text_settings(tmp_path / "b", init_from="resume"))
    assert first + second == straight                       # bit-identical: the windows are a function of (seed, step)
    out = capsys.readouterr().out
    assert "resumed from iter 10" in out
    val = [line for line in out.splitlines() if line.startswith("iter 20: val loss")]
    assert len(val) == 2 and val[0] == val[1]               # the resumed run's validation loss is the straight run's
    assert "warning" not in out
    train.train(text_settings(tmp_path / "b", init_from="resume", max_iters=22, learning_rate=3e-3))
    assert "warning: learning_rate changed from 0.001 to 0.003 on resume" in capsys.readouterr().out


DRIVER = """
import os, sys
sys.path.insert(0, {root!r})
written = []
def audit(event, args):                                     # record what a rank > 0 writes under the test's folder
    if event == "open" and isinstance(args[0], str) and args[0].startswith({tmp!r}) and \\
            (any(m in str(args[1]) for m in "wax+") or (isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR))):
        written.append(args[0])
    elif event in ("os.rename", "os.remove", "os.mkdir", "os.truncate") and str(args[0]).startswith({tmp!r}):
        written.append(str(args[0]))
if os.environ["RANK"] != "0":
    sys.addaudithook(audit)
import train
c = {settings!r}
train.train(dict(c, max_iters=10))
train.train(dict(c, init_from="resume"))
# FSDP with the needle evaluation (text task) and no validation loss before it: the root's parameters are gathered
sharded = dict(c, fsdp=True, out_dir=c["out_dir"] + "-fsdp", eval_iters=0, eval_samples=2, eval_lengths=[256],
               eval_needles=[1])
train.train(dict(sharded, max_iters=10))
train.train(dict(sharded, init_from="resume"))
train.shutdown_distributed()                               # as train.py's main ends
print(f"rank {{os.environ['RANK']}} wrote {{written}}", flush=True)
"""


def test_torchrun_ddp_and_fsdp_equal_one_process_and_rank_1_writes_nothing(tmp_path):
    """2 processes (gloo), 1 micro-step of 2 windows each, stopped at 10 and resumed to 20, with DDP and with FSDP2
    == 1 process with 2 micro-steps of 2 windows, 20 steps straight."""
    c = text_settings(tmp_path / "ddp", max_iters=20, log_interval=10)
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(root=ROOT, tmp=str(tmp_path), settings=c))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script)], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + "\n--- stderr\n" + result.stderr[-3000:]
    assert "rank 1 wrote []" in result.stdout, result.stdout[-2000:]
    assert "device: cpu x 2 float32 | DDP" in result.stdout and "resumed from iter 10" in result.stdout
    assert result.stdout.count("needle validation (text task") == 2    # FSDP: rank 0 alone logs, at iters 10 and 20
    one = text_settings(tmp_path / "one", max_iters=20, log_interval=10, data_dir=c["data_dir"])
    train.train(one)
    ddp = torch.load(tmp_path / "ddp" / "out" / "ckpt.pt", weights_only=True)["model"]
    single = torch.load(tmp_path / "one" / "out" / "ckpt.pt", weights_only=True)["model"]
    assert ddp.keys() == single.keys() and not any(k.startswith(("_orig_mod.", "module.")) for k in ddp)
    moved = max((single[k] - train.GPT(train.GPTConfig(**{a: one[a] for a in train.ARCH_KEYS})).state_dict()[k])
                .abs().max().item() for k in single)
    assert moved > 1e-3                                      # the weights trained away from init
    fsdp = torch.load(tmp_path / "ddp" / "out-fsdp" / "ckpt.pt", weights_only=True)["model"]
    assert fsdp.keys() == single.keys()
    for name, state in (("DDP", ddp), ("FSDP", fsdp)):
        diff = max((state[k] - single[k]).abs().max().item() for k in single)
        assert diff < 2e-6, (name, diff)


@pytest.mark.parametrize("attn,recompute", [("softmax", False), ("lucid", False), ("lucid", True)],
                         ids=["softmax", "lucid", "lucid-checkpointed"])
def test_compile_equals_eager_without_graph_breaks(tmp_path, attn, recompute):
    from torch._dynamo.utils import counters
    # 2 layers (the shape that crashed torch 2.13's AOT autograd at a graph break around the solve) and 2 KV heads with
    # RoPE (inductor may lay k and v out head-interleaved: the solve's gradients must match the strides it was promised)
    c = dict(max_iters=3, save_checkpoint=False, curriculum_start=0, n_layer=2, n_kv_head=2, pos="rope",
             eval_iters=0, attn=attn, activation_checkpointing=recompute)
    eager = train.train(text_settings(tmp_path / "e", **c))
    counters.clear()
    compiled = train.train(text_settings(tmp_path / "c", compile=True, **c))
    assert max(abs(a - b) for a, b in zip(eager, compiled)) < 1e-4, (eager, compiled)
    assert not counters["graph_break"], list(counters["graph_break"])    # the LUCID solve is one opaque operator
    assert counters["stats"]["unique_graphs"] == 1


def test_1b_dry_run_prints_the_model_without_allocating(capsys):
    c = train.parse_config([os.path.join(ROOT, "configs", "1b_128k.py"), "--device=meta"])
    assert train.train(c) == []
    out = capsys.readouterr().out
    printed = int(out.split("parameters: ")[1].split(" ")[0].replace(",", ""))
    with torch.device("meta"):
        model = train.GPT(train.GPTConfig(**{k: c[k] for k in train.ARCH_KEYS + ["block_size"]}))
    counted = sum(p.numel() for p in model.parameters())
    assert abs(printed - counted) / counted < 0.02 and abs(counted - 1.07e9) / 1.07e9 < 0.02
    assert "tokens per optimizer step: 1,048,576" in out and "LUCID solve" in out and "memory budget" in out


@pytest.mark.parametrize("override,message", [
    ({"batch_size": 0}, "batch_size must be positive"),
    ({"eval_interval": -1}, "eval_interval must be positive"),
    ({"block_size": 48}, "power of two"),
    ({"fsdp": True}, "fsdp=True .* torchrun"),
    ({"attn": "sofmax"}, "attn must be 'softmax' or 'lucid'"),
    ({"dataset": "txt"}, "unknown dataset 'txt'"),
    ({"vocab_size": 128}, "more than vocab_size=128"),
    ({"block_size": 4096, "curriculum_start": 0}, "fewer than one window"),
    ({"device": "cuda"}, "CUDA is not available"),
], ids=["batch-0", "interval", "curriculum", "fsdp-alone", "attn-typo", "dataset", "vocab", "short-corpus", "no-cuda"])
def test_bad_settings_are_clear_errors(tmp_path, override, message):
    if override.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available")
    with pytest.raises(ValueError, match=message):
        train.train(text_settings(tmp_path, **override))


def test_a_run_never_replaces_a_checkpoint_it_did_not_write(tmp_path):
    train.train(text_settings(tmp_path, max_iters=2))
    with pytest.raises(ValueError, match="already exists: continue it with --init_from=resume"):
        train.train(text_settings(tmp_path, max_iters=2))
    with pytest.raises(ValueError, match="trained with attn='lucid'; resuming cannot change it"):
        train.train(text_settings(tmp_path, init_from="resume", attn="softmax"))
    train.train(text_settings(tmp_path, max_iters=3, overwrite=True))
    path = tmp_path / "out" / "ckpt.pt"
    path.write_bytes(path.read_bytes()[:1000])                             # truncated
    with pytest.raises(ValueError, match="truncated"):
        train.train(text_settings(tmp_path, init_from="resume"))


def test_ctrl_c_saves_then_stops(tmp_path, monkeypatch):
    class PressedAtOnce(train.StopFlag):
        def __enter__(self):
            super().__enter__()
            self.set = True                                             # as if Ctrl-C came during the first step
            return self
    monkeypatch.setattr(train, "StopFlag", PressedAtOnce)
    with pytest.raises(SystemExit):
        train.train(text_settings(tmp_path, max_iters=20))
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["iter_num"] == 1


def test_sample_continues_a_text_prompt(tmp_path, capsys):
    import sample
    train.train(text_settings(tmp_path, max_iters=2))
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("the needle")
    for start in ("the key", f"FILE:{prompt}"):
        sample.main(["--ckpt", str(tmp_path / "out" / "ckpt.pt"), "--start", start, "--num_samples", "2",
                     "--max_new_tokens", "7", "--top_k", "5"])
    out = capsys.readouterr().out
    assert out.count("--- sample ") == 4 and "\nthe key" in out and "\nthe needle" in out
    sample.main(["--ckpt", str(tmp_path / "out" / "ckpt.pt"), "--attn", "softmax", "--num_samples", "1",
                 "--max_new_tokens", "3", "--temperature", "0"])
    assert "softmax attention" in capsys.readouterr().out
