"""Tests for models.autoencoder: the posterior's KL, shapes, diffusers' parameter layout, overfitting.

Models are tiny (widths 8-16, 8x8 or 16x16 images). Shapes and parameter trees are
checked abstractly (`nnx.eval_shape`, nothing compiled); the overfit test compiles one
forward and one whole training run (a `lax.scan` over the Adam steps).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from sklearn.datasets import load_digits

from diffusion_jax import models
from diffusion_jax.models.autoencoder import AutoencoderKL, DiagonalGaussian

# Initialisers drawn with the 'rbg' key implementation: the default threefry initialisers
# compile one kernel per parameter shape, about 20 s for a tiny model on a loaded 2-core CPU
# (rbg: about 3 s). The draws differ; the distributions are the model's own.
INIT_KEY_IMPL = "rbg"

SD_VAE = dict(in_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4)
# diffusers' AutoencoderKL with SD's config: sum(p.numel() for p in vae.parameters()) = 83,653,863,
# the count reported for runwayml/stable-diffusion-v1-5's (and SD 2's) `vae`; `diffusers_layout` below
# re-derives it from the layer shapes of diffusers' vae.py / unet_2d_blocks.py / resnet.py.
SD_VAE_PARAMS = 83_653_863


def diffusers_layout(
    in_channels: int,
    block_out_channels: tuple[int, ...],
    layers_per_block: int,
    latent_channels: int,
    mid_attention: bool = True,
) -> dict[str, tuple[int, ...]]:
    """diffusers' AutoencoderKL state-dict keys and shapes, written in NNX names and layouts.

    Derived from diffusers' module tree (not from our model): torch `weight` becomes
    `kernel` ([kh, kw, in, out] for convs, [in, out] for linears) or `scale` (norms).
    """
    out: dict[str, tuple[int, ...]] = {}

    def conv(name: str, cin: int, cout: int, k: int) -> None:
        out[f"{name}.kernel"] = (k, k, cin, cout)
        out[f"{name}.bias"] = (cout,)

    def norm(name: str, c: int) -> None:
        out[f"{name}.scale"] = (c,)
        out[f"{name}.bias"] = (c,)

    def linear(name: str, cin: int, cout: int) -> None:
        out[f"{name}.kernel"] = (cin, cout)
        out[f"{name}.bias"] = (cout,)

    def resnet(name: str, cin: int, cout: int) -> None:
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.conv_shortcut", cin, cout, 1)

    def mid(name: str, c: int) -> None:
        resnet(f"{name}.resnets.0", c, c)
        resnet(f"{name}.resnets.1", c, c)
        if mid_attention:
            norm(f"{name}.attentions.0.group_norm", c)
            for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                linear(f"{name}.attentions.0.{proj}", c, c)

    n = len(block_out_channels)
    conv("encoder.conv_in", in_channels, block_out_channels[0], 3)
    prev = block_out_channels[0]
    for i, c in enumerate(block_out_channels):
        for j in range(layers_per_block):
            resnet(f"encoder.down_blocks.{i}.resnets.{j}", prev if j == 0 else c, c)
        prev = c
        if i < n - 1:
            conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", c, c, 3)
    mid("encoder.mid_block", block_out_channels[-1])
    norm("encoder.conv_norm_out", block_out_channels[-1])
    conv("encoder.conv_out", block_out_channels[-1], 2 * latent_channels, 3)
    conv("quant_conv", 2 * latent_channels, 2 * latent_channels, 1)
    conv("post_quant_conv", latent_channels, latent_channels, 1)
    conv("decoder.conv_in", latent_channels, block_out_channels[-1], 3)
    mid("decoder.mid_block", block_out_channels[-1])
    prev = block_out_channels[-1]
    for i, c in enumerate(reversed(block_out_channels)):  # up_blocks.0 is the deepest level
        for j in range(layers_per_block + 1):
            resnet(f"decoder.up_blocks.{i}.resnets.{j}", prev if j == 0 else c, c)
        prev = c
        if i < n - 1:
            conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", c, c, 3)
    norm("decoder.conv_norm_out", block_out_channels[0])
    conv("decoder.conv_out", block_out_channels[0], in_channels, 3)
    return out


def param_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    """Each parameter's path joined with '.' -> its shape."""
    return {".".join(map(str, path)): tuple(v.shape) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def psnr(x: jax.Array, y: jax.Array) -> jax.Array:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    return 10.0 * jnp.log10(4.0 / jnp.mean(jnp.square(x - y)))


# ----------------------------------------------------------------------------- posterior


def test_kl_matches_closed_form_and_logvar_is_clipped():
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(3, 2, 2, 4)).astype(np.float32)
    logvar = rng.uniform(-3.0, 3.0, size=(3, 2, 2, 4)).astype(np.float32)
    logvar[0, 0, 0, 0], logvar[1, 1, 1, 3] = -50.0, 40.0  # outside LDM's [-30, 20]
    post = DiagonalGaussian.from_moments(jnp.asarray(np.concatenate([mean, logvar], axis=-1)))

    clipped = np.clip(logvar, -30.0, 20.0)
    np.testing.assert_allclose(post.mean, mean)
    np.testing.assert_allclose(post.logvar, clipped)
    assert float(post.logvar[0, 0, 0, 0]) == -30.0 and float(post.logvar[1, 1, 1, 3]) == 20.0
    std = np.exp(0.5 * clipped.astype(np.float64))
    np.testing.assert_allclose(post.std, std, rtol=1e-6)
    np.testing.assert_allclose(post.var, std**2, rtol=1e-6)
    np.testing.assert_array_equal(post.mode(), mean)
    assert len(jax.tree.leaves(post)) == 2  # a pytree of (mean, logvar): it crosses jit boundaries

    # KL(N(mu, s^2) || N(0, 1)) = log(1/s) + (s^2 + mu^2)/2 - 1/2 per coordinate, summed per example.
    expected = np.sum(-np.log(std) + 0.5 * (std**2 + mean.astype(np.float64) ** 2) - 0.5, axis=(1, 2, 3))
    kl = post.kl()
    assert kl.shape == (3,)
    np.testing.assert_allclose(kl, expected, rtol=1e-5)
    # The zero-mean unit-variance posterior is the prior: KL 0.
    np.testing.assert_allclose(DiagonalGaussian.create(jnp.zeros((2, 3)), jnp.zeros((2, 3))).kl(), 0.0, atol=1e-7)


def test_kl_is_monte_carlo_expectation_of_log_ratio():
    """E_q[log q(z) - log N(z; 0, I)] from `sample` and `nll` converges to `kl()`."""
    mean = jnp.array([[0.5, -1.0, 0.2], [2.0, 0.0, -0.3]])
    logvar = jnp.array([[-1.0, 0.5, 0.0], [0.3, -2.0, 1.0]])
    post = DiagonalGaussian.create(mean, logvar)
    n = 20_000

    @jax.jit
    def estimate(key):
        z = jax.vmap(post.sample)(jax.random.split(key, n))  # [n, 2, 3]
        log_q = -jax.vmap(post.nll)(z)  # [n, 2]
        log_p = -0.5 * jnp.sum(math.log(2 * math.pi) + z**2, axis=-1)  # [n, 2]
        return jnp.mean(log_q - log_p, axis=0), jnp.mean(z, axis=0), jnp.std(z, axis=0)

    kl_mc, z_mean, z_std = estimate(jax.random.key(0))
    np.testing.assert_allclose(kl_mc, post.kl(), rtol=0.03)
    np.testing.assert_allclose(z_mean, mean, atol=0.05)
    np.testing.assert_allclose(z_std, post.std, rtol=0.03)


# ----------------------------------------------------------------------------- shapes and errors


@pytest.mark.parametrize(
    "block_out_channels, f",
    [((8, 16, 16), 4), ((8, 16, 16, 16), 8)],
)
def test_shapes(block_out_channels, f):
    model = nnx.eval_shape(
        lambda: AutoencoderKL(
            in_channels=3, block_out_channels=block_out_channels, layers_per_block=1, latent_channels=4,
            rngs=nnx.Rngs(0),
        )
    )  # fmt: skip
    assert model.downsampling_factor == f

    def run(model, x):
        post = model.encode(x)
        z = post.sample(jax.random.key(0))
        recon, sampled = model(x, key=jax.random.key(1))
        mode_recon, _ = model(x, sample_posterior=False)
        return post.mean, post.logvar, z, model.decode(z), recon, sampled.kl(), mode_recon

    mean, logvar, z, decoded, recon, kl, mode_recon = nnx.eval_shape(run, model, jnp.zeros((2, 16, 16, 3)))
    latent = (2, 16 // f, 16 // f, 4)
    assert mean.shape == logvar.shape == z.shape == latent
    assert decoded.shape == recon.shape == mode_recon.shape == (2, 16, 16, 3)
    assert kl.shape == (2,)


def test_out_channels_defaults_to_in_channels_and_can_differ():
    a = nnx.eval_shape(lambda: AutoencoderKL(in_channels=2, block_out_channels=(8, 8), rngs=nnx.Rngs(0)))
    b = nnx.eval_shape(
        lambda: AutoencoderKL(in_channels=2, out_channels=5, block_out_channels=(8, 8), rngs=nnx.Rngs(0))
    )
    assert a.decoder.conv_out.kernel.shape[-1] == 2
    assert b.decoder.conv_out.kernel.shape[-1] == 5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(block_out_channels=()), r"block_out_channels: needs at least one level"),
        (dict(block_out_channels=64), r"block_out_channels: must be a sequence"),
        (dict(block_out_channels=(8, 0)), r"block_out_channels \(entry 0\): must be a positive integer"),
        (dict(layers_per_block=0), r"layers_per_block: must be a positive integer, got 0"),
        (dict(latent_channels=-1), r"latent_channels: must be a positive integer"),
        (dict(in_channels=1.5), r"in_channels: must be a positive integer"),
        (dict(out_channels=0), r"out_channels: must be a positive integer"),
        (dict(norm_num_groups=0), r"norm_num_groups: must be a positive integer"),
        (dict(mid_attention="yes"), r"mid_attention: must be True or False"),
    ],
)
def test_constructor_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AutoencoderKL(rngs=nnx.Rngs(0), **{"block_out_channels": (8, 16), **kwargs})


def test_call_errors():
    def make():
        return AutoencoderKL(in_channels=1, block_out_channels=(8, 16, 16), layers_per_block=1, rngs=nnx.Rngs(0))

    with pytest.raises(ValueError, match=r"x: height and width must be multiples of the downsampling factor 4"):
        nnx.eval_shape(lambda: make().encode(jnp.zeros((1, 6, 8, 1))))
    with pytest.raises(ValueError, match=r"x: expected images \[B, H, W, 1\]"):
        nnx.eval_shape(lambda: make().encode(jnp.zeros((1, 8, 8, 3))))
    with pytest.raises(ValueError, match=r"z: expected latents \[B, h, w, 4\]"):
        nnx.eval_shape(lambda: make().decode(jnp.zeros((1, 2, 2, 3))))
    with pytest.raises(ValueError, match=r"key: sampling the posterior needs a jax.random key"):
        nnx.eval_shape(lambda: make()(jnp.zeros((1, 8, 8, 1))))


# ----------------------------------------------------------------------------- diffusers layout


def test_parameter_paths_match_diffusers_names():
    config = dict(in_channels=3, block_out_channels=(8, 16), layers_per_block=2, latent_channels=4)
    model = nnx.eval_shape(lambda: AutoencoderKL(**config, rngs=nnx.Rngs(0)))
    shapes = param_shapes(model)
    for key in [
        "encoder.conv_in.kernel",
        "encoder.down_blocks.0.resnets.0.norm1.scale",
        "encoder.down_blocks.0.downsamplers.0.conv.kernel",
        "encoder.down_blocks.1.resnets.0.conv_shortcut.kernel",
        "encoder.mid_block.attentions.0.to_q.kernel",
        "encoder.mid_block.attentions.0.to_out.0.bias",
        "encoder.conv_out.kernel",
        "quant_conv.kernel",
        "post_quant_conv.bias",
        "decoder.mid_block.resnets.1.conv2.kernel",
        "decoder.up_blocks.0.upsamplers.0.conv.kernel",
        "decoder.up_blocks.1.resnets.2.conv2.kernel",
        "decoder.up_blocks.1.resnets.0.conv_shortcut.kernel",
        "decoder.conv_out.kernel",
    ]:
        assert key in shapes, key
    # diffusers' decoder: up_blocks.0 is the deepest level (16 wide) with an upsampler, the last has none.
    assert shapes["decoder.up_blocks.0.resnets.0.conv1.kernel"] == (3, 3, 16, 16)
    assert not any(k.startswith("decoder.up_blocks.1.upsamplers") for k in shapes)
    assert not any(k.startswith("encoder.down_blocks.1.downsamplers") for k in shapes)
    assert shapes["encoder.conv_out.kernel"] == (3, 3, 16, 8)  # mean and logvar
    # The whole tree: exactly diffusers' keys, each with the NNX layout of diffusers' shape.
    assert shapes == diffusers_layout(**config)
    # Only parameters: nothing else (RNG state, caches) would be saved or imported.
    assert len(jax.tree.leaves(nnx.state(model))) == len(shapes)

    no_attn = nnx.eval_shape(lambda: AutoencoderKL(**config, mid_attention=False, rngs=nnx.Rngs(0)))
    assert param_shapes(no_attn) == diffusers_layout(**config, mid_attention=False)


def test_stable_diffusion_vae_parameter_count():
    n = models.count_params(lambda: AutoencoderKL(**SD_VAE, rngs=nnx.Rngs(0)))
    assert n == SD_VAE_PARAMS
    assert sum(math.prod(s) for s in diffusers_layout(**SD_VAE).values()) == SD_VAE_PARAMS
    sd = nnx.eval_shape(lambda: AutoencoderKL(**SD_VAE, rngs=nnx.Rngs(0)))
    assert sd.downsampling_factor == 8
    assert param_shapes(sd) == diffusers_layout(**SD_VAE)


# ----------------------------------------------------------------------------- reference semantics


def test_downsample_pads_right_and_bottom_and_attention_is_single_head():
    """The blocks whose semantics weights depend on, against numpy written from diffusers' definitions."""
    from diffusion_jax.models.autoencoder import Attention, Downsample

    rng = np.random.default_rng(1)
    key = jax.random.key(0, impl=INIT_KEY_IMPL)
    down = Downsample(4, rngs=nnx.Rngs(key), dtype=jnp.float32)
    x = rng.normal(size=(2, 6, 6, 4)).astype(np.float32)
    # diffusers' Downsample2D(padding=0): F.pad(x, (0, 1, 0, 1)), then a 3x3 VALID conv with stride 2.
    xp = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    w, b = np.asarray(down.conv.kernel[...]), np.asarray(down.conv.bias[...])
    ref = np.stack(
        [
            np.stack([np.einsum("bhwi,hwio->bo", xp[:, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3], w) for j in range(3)], 1)
            for i in range(3)
        ],
        1,
    )
    np.testing.assert_allclose(down(jnp.asarray(x)), ref + b, rtol=1e-4, atol=1e-5)

    attn = Attention(8, norm_num_groups=32, rngs=nnx.Rngs(key), dtype=jnp.float32)
    x = rng.normal(size=(2, 3, 2, 8)).astype(np.float32)
    g = x.reshape(2, 6, 8, 1)  # gcd(32, 8) = 8 groups of one channel: normalise over positions
    g = (g - g.mean(axis=1, keepdims=True)) / np.sqrt(g.var(axis=1, keepdims=True) + 1e-6)
    g = g.reshape(2, 6, 8) * np.asarray(attn.group_norm.scale[...]) + np.asarray(attn.group_norm.bias[...])

    def lin(layer, t):
        return t @ np.asarray(layer.kernel[...]) + np.asarray(layer.bias[...])

    q, k, v = lin(attn.to_q, g), lin(attn.to_k, g), lin(attn.to_v, g)  # [B, T, C]
    logits = np.einsum("btc,bsc->bts", q, k) / np.sqrt(8)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ref = x + lin(attn.to_out[0], np.einsum("bts,bsc->btc", p, v)).reshape(2, 3, 2, 8)
    np.testing.assert_allclose(attn(jnp.asarray(x)), ref, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- overfitting

OVERFIT_STEPS = 200
KL_WEIGHT = 1e-6  # LDM's configs/autoencoder/autoencoder_kl_*.yaml (Rombach et al. 2022, Appendix G)


@pytest.fixture(scope="module")
def four_digits() -> jax.Array:
    """Four fixed 8x8 digits (the first 0, 1, 2, 3 of scikit-learn's set) scaled to [-1, 1]: [4, 8, 8, 1]."""
    digits = load_digits()
    idx = [int(np.flatnonzero(digits.target == k)[0]) for k in range(4)]
    return jnp.asarray(digits.images[idx] / 8.0 - 1.0, jnp.float32)[..., None]


def test_overfits_four_digits(four_digits):
    """L1 (summed per image) + 1e-6 KL, Adam: the reconstruction becomes near exact."""
    x = four_digits
    model = AutoencoderKL(
        in_channels=1, block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
        rngs=nnx.Rngs(jax.random.key(0, impl=INIT_KEY_IMPL)),
    )  # fmt: skip
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adam(3e-3)

    @jax.jit
    def mode_psnr(params):
        recon, _ = nnx.merge(graphdef, params)(x, sample_posterior=False)
        return psnr(recon, x)

    def loss_fn(params, key):
        recon, posterior = nnx.merge(graphdef, params)(x, key=key)
        rec = jnp.mean(jnp.sum(jnp.abs(recon - x), axis=(1, 2, 3)))
        return rec + KL_WEIGHT * jnp.mean(posterior.kl())

    @jax.jit
    def train(params, key):
        def step(carry, k):
            p, opt = carry
            loss, grads = jax.value_and_grad(loss_fn)(p, k)
            updates, opt = tx.update(grads, opt, p)
            return (optax.apply_updates(p, updates), opt), loss

        (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), jax.random.split(key, OVERFIT_STEPS))
        return params, losses

    before = float(mode_psnr(params))
    trained, losses = train(params, jax.random.key(1))
    after = float(mode_psnr(trained))
    assert np.all(np.isfinite(losses))
    assert float(losses[-10:].mean()) < 0.2 * float(losses[:10].mean())
    # Measured (seed 0, CPU): 6.4 dB untrained, 36.9 dB after 200 steps (seeds 1, 2: 36.4, 37.8 dB).
    assert after > 30.0, (before, after)
    assert after > before + 20.0, (before, after)
