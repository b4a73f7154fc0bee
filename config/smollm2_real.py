# SmolLM2-135M-Instruct (real pretrained weights, from `make smollm2`) in continual pre-training on
# the embedded word problems, tokenized with its own tokenizer: the paper's study on a real LM,
# sized for a 2-core CPU. `make real` prepares the data and runs baseline, EntroDrop and the
# matched-budget random control with this preset.
#
# Sizes, chosen from two baseline runs (2-vCPU AMD EPYC: a step of 8 x 128 tokens, forward,
# backward and AdamW, takes 4.5 s) so that the baseline visibly turns within minutes:
# - 64 training problems (6k tokens, 46 windows of 128 tokens) repeated for 7 epochs, mixed 6:4
#   with the standard library's Python text: about 10 optimizer steps per epoch;
# - a constant learning rate of 1e-4: the baseline's held-out loss then bottoms near epoch 4 and
#   has risen by a fifth at epoch 7 (at 2e-4 it bottomed at epoch 2, on a noisier curve);
# - an evaluation every 5 steps (about two per epoch) on 32 held-out problems (3k tokens).
init_from = "checkpoints/SmolLM2-135M-Instruct"
target_data = "out/real/data/math"
general_data = "out/real/data/general"
out_dir = "out/real/entrodrop"
seq_len = 128
global_batch_size = 8
micro_batch_size = 8
epochs = 7.0
learning_rate = 1e-4
min_lr = 1e-4
eval_interval = 5
general_eval_windows = 8
checkpoint_interval = 25
log_interval = 1
# Exports at epochs 2, 4, 6 and 7 (the final model), each scored for accuracy.
export_every = 2
# EntroDrop: gamma_max 0.4 and a 50% gate as in the miniature; j0 where the baseline's curve turns
# (Sec. 3.3), read off its log; the ceiling then rises from 12% to 88% of gamma_max within the two
# epochs around j0 (k = 2 per epoch), about as fast as the baseline degrades after its turn.
gamma_max = 0.4
curriculum_midpoint = "auto:out/real/baseline"
curriculum_sharpness = 2.0
