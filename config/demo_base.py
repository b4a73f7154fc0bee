# The CPU demo's base model: a tiny Qwen3-architecture model (0.33M parameters, byte-level
# tokens) pre-trained from scratch on half of the standard library and on a pool of math
# problems disjoint from the scarce set (python data/embedded.py writes both).
# Math is a fifth of its rows and it sees under half of the pool, so it knows the format of the
# problems but not yet the domain: continual pre-training then has something to learn before
# it starts to memorize, as with a real base model and a specialist corpus.
init_from = "scratch"
scratch_model = dict(model_type="qwen3", hidden_size=96, intermediate_size=256, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                     max_position_embeddings=1024, tie_word_embeddings=True)
out_dir = "out/demo/base"
target_data = "out/demo/data/math_pool"
general_data = "out/demo/data/general_base"
target_ratio = 0.2
method = "baseline"
max_steps = 800
learning_rate = 3e-3
min_lr = 3e-4
warmup_steps = 50
eval_interval = 250
checkpoint_interval = 500
log_interval = 50
