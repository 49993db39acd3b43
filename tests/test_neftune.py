"""NEFTune (`train.neftune_noise_alpha`): uniform noise on the input embeddings in training steps only."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from test_train import cli, losses

from jaxft import hf
from jaxft.models import family
from jaxft.peft.neftune import NoisyEmbeddings


class Probe(nn.Module):
    @nn.compact
    def __call__(self, h):
        return NoisyEmbeddings(5.0).embeddings(self, h, None)[0]


def test_noise_is_uniform_within_alpha_over_sqrt_length_times_width():
    """transformers' NEFTune: U(-a, a) per element, a = alpha / sqrt(L * d) with L the padded length."""
    h = jax.random.normal(jax.random.PRNGKey(0), (4, 50, 64))
    noise = np.asarray(Probe().apply({}, h, rngs={"dropout": jax.random.PRNGKey(1)}) - h)
    bound = 5.0 / np.sqrt(50 * 64)
    assert np.abs(noise).max() <= bound * (1 + 1e-6) and np.abs(noise).max() > 0.99 * bound
    assert abs(noise.mean()) < 0.02 * bound and abs(noise.std() - bound / np.sqrt(3)) < 0.02 * bound
    np.testing.assert_array_equal(np.asarray(Probe().apply({}, h)), np.asarray(h))  # no rng: no noise


def test_only_training_steps_see_it():
    """With the step's dropout rng the logits move; without (evaluation, generation) they are the model's."""
    cfg = hf.config_from_dict(dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2), "test")
    plain = family.build(cfg)
    noisy = family.build(cfg, (NoisyEmbeddings(5.0),))
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 8)))
    params = plain.init(jax.random.PRNGKey(0), ids)
    np.testing.assert_array_equal(np.asarray(noisy.apply(params, ids)), np.asarray(plain.apply(params, ids)))
    moved = noisy.apply(params, ids, rngs={"dropout": jax.random.PRNGKey(2)})
    assert np.abs(np.asarray(moved) - np.asarray(plain.apply(params, ids))).max() > 1e-4


def test_cli_trains_with_noise(tmp_path):
    """The run says it adds the noise and trains (that its steps see it: the test above, with the step's rng)."""
    r = cli(tmp_path / "noisy", "--config.train.neftune_noise_alpha=5", "--config.train.steps=4",
            "--config.train.log_every_steps=1", "--config.export.enabled=False")
    assert r.returncode == 0, r.stderr
    assert "method: lora (NEFTune noise alpha 5)" in r.stdout and len(losses(tmp_path / "noisy")) == 4
    r = cli(tmp_path / "bad", "--config.train.neftune_noise_alpha=-1")
    assert r.returncode == 2 and "train.neftune_noise_alpha=-1.0: expected >= 0" in r.stderr
