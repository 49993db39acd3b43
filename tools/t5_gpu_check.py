"""GPU check of the T5 family: bf16 vs fp32 forward, cached decoding vs full forward, a few train steps."""
import time, jax, jax.numpy as jnp, numpy as np, optax, flax.linen as nn
from jaxft.models.t5 import T5Config, T5Model, init_cache
from jaxft.objectives import OBJECTIVES, shift_labels
from jaxft.step import TrainState, make_train_step
print(jax.devices())
cfg = T5Config(vocab_size=512, d_model=256, d_kv=32, d_ff=512, num_layers=4, num_decoder_layers=4, num_heads=8,
               feed_forward_proj="gated-gelu", tie_word_embeddings=False, scale_decoder_outputs=False, attention="auto")
rng = np.random.RandomState(0)
ids = rng.randint(2, 512, (8, 64)); mask = np.ones_like(ids); mask[1, 40:] = 0
labels = rng.randint(2, 512, (8, 32)); labels[2, 20:] = -100
dec = np.asarray(shift_labels(labels, 0, 0))
m32 = T5Model(cfg); params = nn.unbox(m32.init(jax.random.PRNGKey(0), ids[:1, :4]))["params"]
l32 = np.asarray(m32.apply({"params": params}, ids, mask, decoder_input_ids=dec))
m16 = T5Model(cfg.replace(dtype="bfloat16"))
l16 = np.asarray(m16.apply({"params": params}, ids, mask, decoder_input_ids=dec))
print("bf16 vs fp32 rel err", np.abs(l16 - l32).max() / np.abs(l32).max())
p = {"params": params}
states, em = m32.apply(p, ids, mask, method="encode")
cache = init_cache(cfg, 8, 32)
step = jax.jit(lambda c, x, dm, i, s: m32.apply(p, x, dm, encoder_states=s, encoder_mask=em, cache=c, cache_index=i, method="decode"))
outs = []
for t in range(32):
    lg, cache = step(cache, dec[:, t:t+1], (np.arange(32) <= t)[None].repeat(8, 0).astype(np.int32), jnp.int32(t), states if t == 0 else None)
    outs.append(lg)
print("cached vs full rel err", np.abs(np.concatenate(outs, 1) - l32).max() / np.abs(l32).max())
tx = optax.adam(3e-3)
state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=jax.random.PRNGKey(0))
ts = jax.jit(make_train_step(m16, tx, optax.constant_schedule(3e-3), 1, objective=OBJECTIVES["seq2seq_lm"]))
b = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec, "labels": labels, "weight": np.ones(8, np.float32)}
losses = []
for i in range(30):
    state, met = ts(state, {}, b); losses.append(float(met["loss"]))
t0 = time.time()
for i in range(20):
    state, met = ts(state, {}, b)
jax.block_until_ready(met["loss"]); print("bf16 train losses", losses[0], losses[-1], "step ms", (time.time() - t0) / 20 * 1000)
