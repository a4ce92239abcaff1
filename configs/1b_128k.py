# A 1B LUCID language model at 128K context: the paper's 1B shape (TinyLlama's: 22 layers, d_model 2048, 32 query /
# 4 KV heads of 64, SwiGLU 5632, the gpt2 vocabulary padded to 50304, tied embeddings: 1.07B parameters).
#
#   python train.py configs/1b_128k.py --device=meta                         # dry run: the numbers below, no GPU
#   python train.py configs/1b_128k.py                                       # one 80 GB GPU
#   torchrun --standalone --nproc_per_node=8 train.py configs/1b_128k.py     # one node of 8 GPUs (DDP)
#   torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HEAD_NODE:29500 \
#       train.py configs/1b_128k.py --gradient_accumulation_steps=32 --fsdp=True     # 4 nodes, 32 GPUs, sharded
#
# Tokens per optimizer step: 8 micro-steps × 1 × 131,072 = 1,048,576 (~1M), whatever the number of GPUs: the 8
# micro-steps are divided among them (8 GPUs: one each). More than 8 GPUs need at least one micro-step each, so raise
# gradient_accumulation_steps to a multiple of their number (32 GPUs: 32, 4M tokens per step). The sequence-length
# warmup starts at 4K with 32 sequences per micro-step and doubles the length (halving the sequences) in 6 equal
# stages up to 128K.
#
# Memory budget per GPU at 128K (printed at start, model.memory_budget; bf16 activations, micro-batch 1 × 131,072):
#   parameters + gradients + AdamW (fp32, 16 B/param)            16.0 GiB  (/ N with --fsdp=True on N GPUs)
#   checkpointed activations (each block's input, 22 × T × 2048 × 2 B) 11.0 GiB
#   one block's recompute during its backward                     7.7 GiB
#   one logits chunk of the loss (8192 × 50304 × 10 B)            3.8 GiB
#   total                                                        38.5 GiB: fits one 80 GB GPU
#
# RoPE θ = 1e7: Men et al., "Base of RoPE Bounds Context Length" (arXiv 2405.14591, Fig. 1) fit the smallest base
# that keeps long-range retrieval working as 0.0424 · L^1.628, i.e. ≈ 9.1e6 for L = 131,072; we round up.
out_dir = "out-1b-128k"
dataset = "text"
hf_dataset = "emozilla/pg19"     # PG-19 books (long documents) as parquet: deepmind/pg19 is a loading script,
                                 # which datasets no longer runs; any script-free Hub id with a text column works
hf_config = ""
hf_split = "train"
encoding = "gpt2"
vocab_size = 50304
n_layer = 22
n_head = 32
n_kv_head = 4
n_embd = 2048
mlp_hidden = 5632
attn = "lucid"
pos = "rope"
rope_theta = 1e7
token_shift = False
activation_checkpointing = True
block_size = 131072
curriculum_start = 4096
batch_size = 1
gradient_accumulation_steps = 8
learning_rate = 4e-4
min_lr = 4e-5
warmup_iters = 200
max_iters = 10000
weight_decay = 0.1
grad_clip = 1.0
log_interval = 1
eval_interval = 250
eval_iters = 8
eval_samples = 20                # text-level needle retrieval (needle.py's TextTask, gpt2 tokens) on validation samples
eval_lengths = [4096, 32768, 131072]
eval_needles = [1, 4, 8]
dtype = "bfloat16"
compile = True
