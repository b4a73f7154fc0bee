# Llama-3.1-8B-Instruct, continual pre-training on a scarce math set with the paper's settings
# (Sec. 4.1, Appendix A.1-A.2): sequences of 4,096 tokens, global batches of 512 sequences, peak
# learning rate 1e-5 with cosine decay, target:general = 6:4, gamma_max 0.1, gate 50%. A budget of
# 1B tokens on 0.02B unique target tokens is 30 target epochs (1B x 0.6 / 0.02B).
#   torchrun --nproc_per_node=8 train.py config/llama3.1_8b_math.py --method=entrodrop
# Paths: a HF checkpoint folder and two folders written by data/prepare.py.
# Memory: plain DDP would keep on every GPU the fp32 weights, gradients and AdamW moments, 16 bytes
# per parameter: 128 GB for 8B parameters, before activations. FSDP over 8 GPUs keeps an eighth of
# them (about 19 GiB per GPU with the blocks in flight) plus about 27 GiB of activations at 4,096
# tokens, 46 GiB in all: it fits 80 GB GPUs; with --activation_checkpointing=True about 22 GiB
# (`python bench.py --memory_table`). FSDP needs torchrun, even on one node.
init_from = "checkpoints/Llama-3.1-8B-Instruct"
target_data = "data/numina"
general_data = "data/infinity_instruct"
out_dir = "out/llama3.1_8b_math/entrodrop"
seq_len = 4096
global_batch_size = 512
micro_batch_size = 1           # sequences per forward pass
target_ratio = 0.6
epochs = 30.0
learning_rate = 1e-5
min_lr = 1e-6
warmup_steps = 20
weight_decay = 0.0
grad_clip = 1.0
method = "entrodrop"
gamma_max = 0.1
gate_percentile = 0.5
# j0 should sit where the baseline's validation loss turns (Sec. 3.3): run the baseline first and
# read its best epoch off out/.../log.jsonl. Scaled from Qwen3-0.6B (best epoch 25 of 90) to 30
# epochs.
curriculum_unit = "epoch"
curriculum_midpoint = 8.0
curriculum_sharpness = 0.6     # per epoch: the ceiling rises 12% -> 88% of gamma_max in 7 epochs
eval_interval = 50
checkpoint_interval = 100
log_interval = 1
compile = True
parallel = "fsdp"
