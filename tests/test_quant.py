"""int8 and NF4 quantization (jaxft.quant) against references written from their definitions,
bitsandbytes where it is installed, and the model and training loop over quantized bases."""

from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft import quant
from jaxft.errors import JaxftError

# bitsandbytes' published NF4 table (bitsandbytes/functional.py, also QLoRA's appendix), for comparison.
BNB_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
           -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
           0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
           0.7229568362236023, 1.0]


def paper_nf4():
    """QLoRA, section 3: q_i = Q_X(p_i) for N(0, 1), 2^(k-1) quantiles for the positive half and
    2^(k-1) - 1 for the negative one from the outermost probability delta to 1/2, the two zeros merged,
    normalised to [-1, 1]; delta is the mean of 1 - 1/(2*15) and 1 - 1/(2*16)."""
    delta = ((1 - 1 / (2 * 15)) + (1 - 1 / (2 * 16))) / 2
    q = NormalDist().inv_cdf
    pos = [q(delta + (0.5 - delta) * i / 8) for i in range(8)]
    neg = [-q(delta + (0.5 - delta) * i / 7) for i in range(7)]
    v = np.sort(np.array(pos + neg + [0.0]))
    return (v / v.max()).astype(np.float32)


def test_nf4_levels_match_paper_and_bitsandbytes_table():
    ref = paper_nf4()
    np.testing.assert_array_equal(quant.NF4, ref)
    assert quant.NF4[7] == 0.0 and len(set(quant.NF4.tolist())) == 16
    np.testing.assert_allclose(quant.NF4, np.float32(BNB_NF4), rtol=0, atol=2e-7)  # within 2 float32 ulps


@pytest.mark.parametrize("absmax", [1.0, 0.0371])
def test_single_level_dequantization_is_exact(absmax):
    """A block holding each level once (times absmax), plus +-absmax: every value comes back bit for bit."""
    ref = paper_nf4()
    codes = np.concatenate([np.arange(16), np.arange(16)[::-1], np.arange(32) % 16])
    w = ref[codes] * np.float32(absmax)
    q = quant.quantize(w.reshape(8, 8), "nf4", double_quant=False)
    assert q.values.dtype == jnp.uint8 and q.values.shape == (32,)
    np.testing.assert_array_equal(np.asarray(q.values), (codes[0::2] << 4) | codes[1::2])
    np.testing.assert_array_equal(np.asarray(quant.dequantize(q)).reshape(-1), ref[codes] * np.float32(absmax))


def test_packing_two_codes_per_byte_high_nibble_first():
    ref = paper_nf4()
    codes = np.arange(64) % 16
    q = quant.quantize(ref[codes].reshape(4, 16), "nf4", double_quant=False)
    np.testing.assert_array_equal(np.asarray(q.values), (codes[0::2] << 4) | codes[1::2])


def error_bound(w, block=64):
    """Half the widest gap between NF4 levels, times each block's absmax."""
    flat = np.pad(w.reshape(-1), (0, -w.size % block)).reshape(-1, block)
    bound = np.broadcast_to(np.abs(flat).max(1, keepdims=True) * np.diff(paper_nf4()).max() / 2, flat.shape)
    return bound.reshape(-1)[: w.size].reshape(w.shape)


@pytest.mark.parametrize("shape", [(256, 384), (33, 47), (5, 7)])  # 47*33 is not a multiple of 64 or 256*64
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_round_trip_error_bounds_and_odd_sizes(shape, double_quant):
    w = np.random.RandomState(0).standard_normal(shape).astype(np.float32) * 0.02
    q = quant.quantize(w, "nf4", double_quant=double_quant)
    out = np.asarray(quant.dequantize(q))
    assert out.shape == shape and out.dtype == np.float32
    err = np.abs(out - w)
    slack = 1.02 if double_quant else 1.0 + 1e-6  # the 8-bit absmax moves each block's scale by < 1/127
    assert (err <= error_bound(w) * slack + 1e-9).all()
    assert err.mean() < 0.1 * np.abs(w).mean()  # NF4 on normal weights: about 7% mean relative error


def test_int8_round_trip_per_output_channel():
    w = np.random.RandomState(1).standard_normal((48, 24)).astype(np.float32)
    w[:, 3] *= 100  # one loud output channel must not blur the others
    q = quant.quantize(w, "int8")
    assert q.values.dtype == jnp.int8 and q.scale.shape == (24,)
    out = np.asarray(quant.dequantize(q))
    step = np.abs(w).max(0) / 127
    assert (np.abs(out - w) <= step / 2 * (1 + 1e-6)).all()
    np.testing.assert_array_equal(np.asarray(q.values), np.round(w / step).astype(np.int8))


def test_byte_counts():
    w = np.random.RandomState(2).standard_normal((1024, 768)).astype(np.float32)
    nf4, nf4_fp32_absmax, int8 = (quant.quantize(w, "nf4"), quant.quantize(w, "nf4", double_quant=False),
                                  quant.quantize(w, "int8"))
    assert nf4.nbytes <= 0.16 * w.nbytes
    assert nf4.nbytes < nf4_fp32_absmax.nbytes <= 0.15 * w.nbytes
    assert int8.nbytes <= 0.27 * w.nbytes


def test_leading_dims_quantize_each_matrix_alone():
    """Stacked (scanned) layers: quantizing [L, in, out] equals quantizing each [in, out]."""
    w = np.random.RandomState(3).standard_normal((3, 40, 24)).astype(np.float32)
    for kind in quant.KINDS:
        stacked = quant.dequantize(quant.quantize(w, kind, batch_dims=1))
        for i in range(3):
            np.testing.assert_array_equal(np.asarray(stacked[i]), np.asarray(quant.dequantize(quant.quantize(w[i], kind))))


def test_bad_arguments_are_errors():
    with pytest.raises(JaxftError, match="kind 'fp4'"):
        quant.quantize(np.ones((4, 4)), "fp4")
    with pytest.raises(JaxftError, match="block_size=63"):
        quant.quantize(np.ones((4, 4)), "nf4", block_size=63)


def test_codes_and_absmax_match_bitsandbytes():
    """Where bitsandbytes runs (its CPU backend does 4-bit), its packed codes and fp32 absmax are ours."""
    F = pytest.importorskip("bitsandbytes.functional")
    import torch

    w = np.random.RandomState(4).standard_normal((96, 200)).astype(np.float32)
    packed, state = F.quantize_4bit(torch.tensor(w), blocksize=64, quant_type="nf4", compress_statistics=False)
    q = quant.quantize(w, "nf4", double_quant=False)
    np.testing.assert_array_equal(packed.numpy().reshape(-1), np.asarray(q.values))
    np.testing.assert_array_equal(state.absmax.numpy(), np.asarray(q.scale))
