# GPU-sized needle retrieval: the softmax-vs-LUCID reproduction. The same small GPT for both attentions, trained on
# the token-level multikey task (needle.py) with a recipe that learns it (NoPE + token shift,
# length curriculum 128 -> 256 -> 512 -> 1024, 1000 steps each). Only the attention differs:
#
#   python train.py configs/needle.py --attn=softmax --out_dir=out-needle-softmax
#   python train.py configs/needle.py --attn=lucid   --out_dir=out-needle-lucid
#
# then evaluate both on identical samples of the distractor-needle haystack (the key-blind copier and chance are
# printed beside every cell; paired: McNemar + bootstrap CI of the difference, the sample as the unit), 1K -> 128K:
#
#   python needle.py --ckpt out-needle-lucid/ckpt.pt --vs out-needle-softmax/ckpt.pt --needles 2,4,6,8,10 \
#       --samples 500 --lengths 1K,2K,4K,6K,8K,16K,32K,64K,128K --out mniah.json
#   python needle.py --ckpt out-needle-lucid/ckpt.pt --vs out-needle-softmax/ckpt.pt --queries 8 \
#       --samples 64 --lengths 1K,2K,4K,8K,16K,32K,64K,128K --needles 1,2,4,8,16,32 \
#       --depths 0,10,20,30,40,50,60,70,80,90,100 --out grid.json    # + depth x length heatmaps grid_token_*.png
#   python needle.py --ckpt out-needle-lucid/ckpt.pt --vs out-needle-softmax/ckpt.pt --show needle.png \
#       --lengths 4K --needles 8                                      # attention on one sample, both models
#
out_dir = "out-needle"
device = "cuda"
dtype = "bfloat16"
# model: 2 layers, d = 128, 4 heads of 32 (head dim small relative to the context), no positions + token shift
vocab_size = 1024       # filler 8..515, keys 516..769, values 770..1023: chance is 1/254
n_layer = 2
n_head = 4
n_kv_head = 4
n_embd = 128
attn = "lucid"          # override with --attn=softmax for the baseline
pos = "none"
token_shift = True
# data: fresh multikey samples every step, 1..min(32, T/16) needles, up to 8 queries per sequence
block_size = 1024
curriculum_start = 128
needle_cap = 32
query_cap = 8
batch_size = 64
# optimizer
learning_rate = 2e-3
min_lr = 2e-4
weight_decay = 0.1
max_iters = 4000
warmup_iters = 100
# logging and the in-training evaluation (the full one is needle.py above)
log_interval = 50
eval_interval = 1000
eval_lengths = [1024, 2048, 4096]
eval_needles = [1, 4, 8, 16, 32]
eval_samples = 100
