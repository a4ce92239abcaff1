# A small LUCID language model on text: the whole text pipeline (data.py) at a size that trains in minutes on one GPU
# and runs a few steps on a CPU. By default it reads this repository's own Markdown and Python files with the
# byte-level encoding, so it works offline from a fresh clone (run it from the repository root):
#
#   python train.py configs/text_small.py --device=cpu --max_iters=20
#   torchrun --standalone --nproc_per_node=2 train.py configs/text_small.py --device=cpu --max_iters=20
#
# A real corpus, gpt2 tokens (the first run tokenizes it once into data/, later runs reuse the files):
#
#   python train.py configs/text_small.py --hf_dataset=HuggingFaceFW/fineweb-edu --hf_config=sample-10BT \
#       --hf_split='train[:2%]' --data_files= --encoding=gpt2 --vocab_size=50304 --out_dir=out-fineweb-small
#
# 4 layers, d = 256, 8 query / 2 KV heads of 32, RoPE; 16 × 512 = 8,192 tokens per step, sequence-length warmup
# 128 -> 512 (64 × 128 while short: the tokens per step stay constant).
out_dir = "out-text-small"
dataset = "text"
data_files = "*.md,*.py"
encoding = "bytes"
vocab_size = 320                 # 257 byte-level tokens, padded to a multiple of 64
val_fraction = 0.02
n_layer = 4
n_head = 8
n_kv_head = 2
n_embd = 256
attn = "lucid"
pos = "rope"
token_shift = False
block_size = 512
curriculum_start = 128
batch_size = 16
gradient_accumulation_steps = 1
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 50
max_iters = 2000
weight_decay = 0.1
log_interval = 10
eval_interval = 500
eval_iters = 8
eval_samples = 20                # text-level needle retrieval (needle.py's TextTask through the same encoding)
eval_lengths = [512]
eval_needles = [1, 4]
