"""Tests for autoencoder_loss, models.discriminator and metrics.image_quality.

Models are tiny (an AutoencoderKL of widths 8-16 with 2 latent channels, a PatchGAN of width 8
with 2 layers, 16x16 one-channel images) and initialised with 'rbg' keys, which compile much
faster on CPU than threefry (tests/test_autoencoder.py). The generator loss and its gradient are
compiled once, in one program with the reference they are checked against (fixture `setup`,
`run`), and reused for every step value; the references are independent computations:
hand-computed numbers, plain `jax.grad` of the loss terms written out again here, numpy
forward passes, and SSIM from Wang et al.'s definitions.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.ndimage
from flax import nnx
from numpy.lib.stride_tricks import sliding_window_view
from sklearn.datasets import load_digits

from diffusion_jax import autoencoder_loss as ael
from diffusion_jax.metrics import image_quality
from diffusion_jax.models.autoencoder import AutoencoderKL, DiagonalGaussian
from diffusion_jax.models.discriminator import PatchDiscriminator, min_image_size, patch_output_size

INIT_KEY_IMPL = "rbg"
KL_WEIGHT = 1e-3  # larger than LDM's 1e-6 so that the KL visibly enters the totals checked below
DISC_START = 5
DISC_WEIGHT = 0.5
# Test programs are compiled without XLA:CPU's backend optimisations: the generator's value_and_grad then
# compiles in about 2.5 s instead of 6.5 s and still runs in milliseconds. The numerics are the same ops.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def jit(fn):
    return jax.jit(fn, compiler_options=FAST_COMPILE)


def init_key(seed: int) -> jax.Array:
    return jax.random.key(seed, impl=INIT_KEY_IMPL)


def flat(state) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}


# ----------------------------------------------------------------------------- pure losses


def test_hinge_vanilla_and_generator_losses_on_hand_logits():
    real = jnp.array([[2.0, 0.5], [-1.0, 1.0]])  # relu(1 - real) = 0, 0.5, 2, 0 -> mean 0.625
    fake = jnp.array([[-2.0, 0.0], [0.5, -0.5]])  # relu(1 + fake) = 0, 1, 1.5, 0.5 -> mean 0.75
    np.testing.assert_allclose(ael.hinge_d_loss(real, fake), 0.5 * (0.625 + 0.75), rtol=1e-6)
    # Perfectly separated logits beyond the margins: zero loss.
    assert float(ael.hinge_d_loss(jnp.full((3,), 1.5), jnp.full((3,), -1.0))) == 0.0
    # vanilla: 0.5 * (mean softplus(-real) + mean softplus(fake)), softplus(t) = log(1 + e^t).
    sp = lambda t: np.log1p(np.exp(t))  # noqa: E731
    expected = 0.5 * (np.mean(sp(-np.asarray(real))) + np.mean(sp(np.asarray(fake))))
    np.testing.assert_allclose(ael.vanilla_d_loss(real, fake), expected, rtol=1e-6)
    np.testing.assert_allclose(ael.generator_adversarial_loss(fake), 0.5, rtol=1e-6)  # -(-2 + 0 + 0.5 - 0.5) / 4


def test_reconstruction_and_kl_losses():
    x = jnp.array([[[[0.0], [1.0]]], [[[-1.0], [0.5]]]])  # [2, 1, 2, 1]
    y = jnp.array([[[[0.5], [0.0]]], [[[-1.0], [-0.5]]]])
    np.testing.assert_allclose(ael.reconstruction_loss(x, y), [0.75, 0.5], rtol=1e-6)
    np.testing.assert_allclose(ael.reconstruction_loss(x, y, "l2"), [0.625, 0.5], rtol=1e-6)
    np.testing.assert_allclose(ael.reconstruction_loss(x, y, reduction="sum"), [1.5, 1.0], rtol=1e-6)
    with pytest.raises(ValueError, match=r"kind: must be 'l1' or 'l2', got 'l3'"):
        ael.reconstruction_loss(x, y, "l3")
    with pytest.raises(ValueError, match=r"x_rec: expected the shape of x"):
        ael.reconstruction_loss(x, y[:1])
    # KL of N(mu, s^2) to N(0, 1) per coordinate: -log s + (s^2 + mu^2) / 2 - 1/2, summed per example, / B.
    mean = np.array([[0.0, 1.0], [2.0, -1.0]])
    logvar = np.array([[0.0, 0.0], [np.log(4.0), 0.0]])
    per = -0.5 * logvar + 0.5 * (np.exp(logvar) + mean**2) - 0.5  # [[0, .5], [1.5 - log 2 + ... ]]
    expected = per.sum() / 2
    np.testing.assert_allclose(ael.kl_loss(DiagonalGaussian.create(jnp.asarray(mean), jnp.asarray(logvar))), expected)


def test_adaptive_weight_by_hand():
    g_rec = jnp.array([[3.0, 0.0], [0.0, 4.0]])  # norm 5
    g_gan = jnp.array([1.0, 2.0, 2.0])  # norm 3
    np.testing.assert_allclose(ael.adaptive_weight(g_rec, g_gan), 5.0 / (3.0 + 1e-4), rtol=1e-6)
    np.testing.assert_allclose(ael.adaptive_weight(g_rec, g_gan, eps=1.0), 5.0 / 4.0, rtol=1e-6)
    # A vanishing GAN gradient: 5 / 1e-4 = 5e4, clipped to max_weight.
    assert float(ael.adaptive_weight(g_rec, jnp.zeros(3))) == 1e4
    assert float(ael.adaptive_weight(g_rec, jnp.zeros(3), max_weight=7.0)) == 7.0
    # Pytrees are normed as one vector: ||(3, 4)|| = 5.
    np.testing.assert_allclose(ael.adaptive_weight({"a": jnp.array([3.0]), "b": jnp.array([4.0])}, g_gan), 5 / 3.0001)
    # Not differentiated (Esser et al.'s lambda is a constant in the backward pass).
    grads = jax.grad(lambda a, b: ael.adaptive_weight(a, b), argnums=(0, 1))(g_rec, g_gan)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in grads)


def test_adopt_weight():
    assert float(ael.adopt_weight(0.5, 4, 5)) == 0.0
    assert float(ael.adopt_weight(0.5, 5, 5)) == 0.5
    assert float(jax.jit(ael.adopt_weight, static_argnums=2)(0.5, jnp.int32(7), 5)) == 0.5


# ----------------------------------------------------------------------------- discriminator


def np_conv(x: np.ndarray, kernel: np.ndarray, stride: int) -> np.ndarray:
    """PyTorch Conv2d(kernel_size=4, padding=1, stride) in NHWC, from the definition."""
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    win = sliding_window_view(xp, (4, 4), axis=(1, 2))[:, ::stride, ::stride]  # [B, h, w, C, 4, 4]
    return np.einsum("bhwcij,ijco->bhwo", win, kernel)


def np_group_norm(x: np.ndarray, groups: int, scale: np.ndarray, bias: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    b, h, w, c = x.shape
    g = x.reshape(b, h, w, groups, c // groups)
    g = (g - g.mean(axis=(1, 2, 4), keepdims=True)) / np.sqrt(g.var(axis=(1, 2, 4), keepdims=True) + eps)
    return g.reshape(b, h, w, c) * scale + bias


def test_discriminator_layers_and_forward_against_numpy():
    disc = PatchDiscriminator(3, ndf=8, n_layers=2, rngs=nnx.Rngs(init_key(0)))
    shapes = {k: v.shape for k, v in flat(nnx.state(disc, nnx.Param)).items()}
    # taming's NLayerDiscriminator(ndf=8, n_layers=2): widths 8, 16, 32 = ndf * min(2**i, 8); bias only where no norm.
    assert shapes == {
        "convs.0.kernel": (4, 4, 3, 8),
        "convs.0.bias": (8,),
        "convs.1.kernel": (4, 4, 8, 16),
        "norms.0.scale": (16,),
        "norms.0.bias": (16,),
        "convs.2.kernel": (4, 4, 16, 32),
        "norms.1.scale": (32,),
        "norms.1.bias": (32,),
        "convs.3.kernel": (4, 4, 32, 1),
        "convs.3.bias": (1,),
    }
    assert len(jax.tree.leaves(nnx.state(disc))) == len(shapes)  # only parameters
    p = flat(nnx.state(disc, nnx.Param))
    assert abs(p["convs.1.kernel"].std() - 0.02) < 0.003  # taming's N(0, 0.02) init
    x = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
    # Make the biases and norm parameters non-trivial so that they are checked too.
    rng = np.random.default_rng(1)
    for var in (disc.convs[0].bias, disc.convs[3].bias, disc.norms[0].scale, disc.norms[0].bias, disc.norms[1].bias):
        var[...] = var[...] + jnp.asarray(rng.normal(size=var.shape), jnp.float32) * 0.3
    p = {tuple(k.split(".")): v for k, v in flat(nnx.state(disc, nnx.Param)).items()}
    d_graphdef, d_params = nnx.split(disc, nnx.Param)

    def lrelu(t):
        return np.where(t > 0, t, 0.2 * t)

    def conv(i, t, stride):
        return np_conv(t, p["convs", str(i), "kernel"], stride)

    def norm(i, t, groups):  # GroupNorm with gcd(32, channels) groups: one channel per group at these widths
        return np_group_norm(t, groups, p["norms", str(i), "scale"], p["norms", str(i), "bias"])

    h = lrelu(conv(0, x, 2) + p["convs", "0", "bias"])  # [2, 8, 8, 8]
    h = lrelu(norm(0, conv(1, h, 2), 16))  # [2, 4, 4, 16]
    h = lrelu(norm(1, conv(2, h, 1), 32))  # [2, 3, 3, 32]
    ref = np_conv(h, p["convs", "3", "kernel"], 1) + p["convs", "3", "bias"]
    out = jit(lambda d_params, x: nnx.merge(d_graphdef, d_params)(x))(d_params, jnp.asarray(x))  # one compile
    assert out.shape == ref.shape == (2, 2, 2, 1)  # 16 -> 8 -> 4 -> 3 -> 2
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_discriminator_geometry_and_errors():
    # pix2pix's 70x70 PatchGAN (n_layers=3) maps 256x256 to 30x30 logits, widths capped at 8 * ndf.
    disc = nnx.eval_shape(lambda: PatchDiscriminator(3, ndf=8, n_layers=5, rngs=nnx.Rngs(0)))
    assert disc.convs[4].kernel.shape == (4, 4, 64, 64) and disc.convs[5].kernel.shape == (4, 4, 64, 64)
    disc = nnx.eval_shape(lambda: PatchDiscriminator(3, ndf=8, n_layers=3, rngs=nnx.Rngs(0)))
    assert nnx.eval_shape(lambda m, x: m(x), disc, jnp.zeros((1, 256, 256, 3))).shape == (1, 30, 30, 1)
    assert nnx.eval_shape(lambda m, x: m(x), disc, jnp.zeros((1, 24, 40, 3))).shape == (1, 1, 3, 1)
    assert [patch_output_size(s, 3) for s in (23, 24, 256)] == [0, 1, 30] and min_image_size(2) == 12
    with pytest.raises(ValueError, match=r"a 16x16 image is too small .* n_layers=3 .* >= 3 \* 2\*\*n_layers = 24"):
        nnx.eval_shape(lambda m, x: m(x), disc, jnp.zeros((1, 16, 16, 3)))
    with pytest.raises(ValueError, match=r"x: expected images \[B, H, W, 3\]"):
        nnx.eval_shape(lambda m, x: m(x), disc, jnp.zeros((1, 32, 32, 1)))
    with pytest.raises(ValueError, match=r"n_layers: must be a positive integer, got 0"):
        PatchDiscriminator(3, n_layers=0, rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------- generator and discriminator losses


@pytest.fixture(scope="module")
def setup():
    """The tiny autoencoder and discriminator, 4 digits at 16x16, and the compiled generator loss."""
    digits = load_digits()
    x = digits.images[:4] / 8.0 - 1.0  # [4, 8, 8] in [-1, 1]
    x = jnp.asarray(np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)[..., None], jnp.float32)  # [4, 16, 16, 1]
    ae = AutoencoderKL(
        in_channels=1, block_out_channels=(8, 16), layers_per_block=1, latent_channels=2, rngs=nnx.Rngs(init_key(0))
    )
    disc = PatchDiscriminator(1, ndf=8, n_layers=2, rngs=nnx.Rngs(init_key(1)))
    graphdef, params = nnx.split(ae, nnx.Param)
    d_graphdef, d_params = nnx.split(disc, nnx.Param)

    def loss(params, d_params, x, key, step):
        return ael.autoencoder_loss(
            params, graphdef, {"image": x, "label": jnp.zeros(4, jnp.int32)}, key, (d_graphdef, d_params), step,
            kl_weight=KL_WEIGHT, disc_start=DISC_START, disc_weight=DISC_WEIGHT,
        )  # fmt: skip

    def reference(params, d_params, x, key):
        """The loss terms written out again, and their gradients by plain jax.grad (no vjp trick)."""

        def base(params):  # L_rec + kl_weight * L_KL, LDM's sum-over-pixels L1
            x_rec, post = nnx.merge(graphdef, params)(x, key=key)
            rec = jnp.mean(jnp.sum(jnp.abs(x - x_rec), axis=(1, 2, 3)))
            kl = jnp.mean(jnp.sum(0.5 * (post.mean**2 + jnp.exp(post.logvar) - 1 - post.logvar), axis=(1, 2, 3)))
            return rec + KL_WEIGHT * kl, (rec, kl)

        def g_adv(params):
            x_rec, _ = nnx.merge(graphdef, params)(x, key=key)
            return -jnp.mean(nnx.merge(d_graphdef, d_params)(x_rec))

        (total, (rec, kl)), g_base = jax.value_and_grad(base, has_aux=True)(params)
        adv, g_g = jax.value_and_grad(g_adv)(params)
        no_disc = ael.autoencoder_loss(params, graphdef, x, key, None, 10**6, kl_weight=KL_WEIGHT)
        return dict(total=total, rec=rec, kl=kl, g_adv=adv, grad_base=g_base, grad_adv=g_g, no_disc=no_disc)

    @jit
    def run(params, d_params, x, key, step):
        """((loss, aux), grads) of autoencoder_loss and the reference, in one program: one compile, not two."""
        generator = jax.value_and_grad(loss, has_aux=True)(params, d_params, x, key, step)
        return generator, reference(params, d_params, x, key)

    return dict(x=x, params=params, d_params=d_params, d_graphdef=d_graphdef, graphdef=graphdef, run=run)


def assert_grads_close(grads, expected) -> None:
    """Leaf by leaf, to 1e-4 relative, with an absolute floor of 1e-6 of the largest entry of all gradients.

    The floor covers leaves whose exact gradient is 0 (the bias of a conv followed by GroupNorm), where both
    computations return float32 rounding noise.
    """
    scale = max(float(jnp.abs(leaf).max()) for leaf in jax.tree.leaves(expected))
    flat_expected = dict(nnx.to_flat_state(expected))
    for path, g in nnx.to_flat_state(grads):
        np.testing.assert_allclose(g[...], flat_expected[path][...], rtol=1e-4, atol=1e-6 * scale, err_msg=str(path))


def last_kernel(grads) -> jax.Array:
    """The entry of a gradient State for the decoder's last conv kernel (W_L of Esser et al. eq. (7))."""
    return grads["decoder"]["conv_out"]["kernel"][...]


def test_generator_loss_before_disc_start_ignores_the_discriminator(setup):
    s = setup
    key = jax.random.key(3)
    ((loss, aux), grads), ref = s["run"](s["params"], s["d_params"], s["x"], key, DISC_START - 1)
    assert float(aux["disc_factor"]) == 0.0
    assert float(loss) == float(aux["rec"] + KL_WEIGHT * aux["kl"])  # exactly: no adversarial term
    np.testing.assert_allclose(aux["rec"], ref["rec"], rtol=1e-5)
    np.testing.assert_allclose(aux["kl"], ref["kl"], rtol=1e-5)
    np.testing.assert_allclose(loss, ref["total"], rtol=1e-5)
    assert float(aux["g_adv"]) != 0.0 and float(aux["d_weight"]) > 0.0  # computed and logged, but weighted by 0
    # The gradient is that of L_rec + kl_weight * L_KL, for every parameter ...
    assert_grads_close(grads, ref["grad_base"])
    # ... and a different discriminator changes nothing anywhere before disc_start.
    other = jax.tree.map(lambda p: p * 3.0 + 0.1, s["d_params"])
    ((loss2, _), grads2), _ = s["run"](s["params"], other, s["x"], key, 0)
    assert float(loss2) == float(loss)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2), strict=True):
        np.testing.assert_array_equal(a, b)
    # Without a discriminator: the same value at any step.
    loss_none, aux_none = ref["no_disc"]
    np.testing.assert_allclose(loss_none, loss, rtol=1e-6)
    assert float(aux_none["disc_factor"]) == float(aux_none["d_weight"]) == float(aux_none["g_adv"]) == 0.0


def test_generator_loss_after_disc_start_uses_the_adaptive_weight(setup):
    s = setup
    key = jax.random.key(4)
    ((loss, aux), grads), ref = s["run"](s["params"], s["d_params"], s["x"], key, DISC_START)
    # Esser et al. eq. (7) by hand from plain gradients w.r.t. the decoder's last kernel (KL does not reach it).
    g_rec, g_gan = np.asarray(last_kernel(ref["grad_base"])), np.asarray(last_kernel(ref["grad_adv"]))
    expected_w = np.linalg.norm(g_rec) / (np.linalg.norm(g_gan) + 1e-4)
    np.testing.assert_allclose(aux["d_weight"], min(expected_w, 1e4), rtol=1e-4)
    assert float(aux["disc_factor"]) == DISC_WEIGHT
    np.testing.assert_allclose(aux["g_adv"], ref["g_adv"], rtol=1e-5)
    expected = ref["rec"] + KL_WEIGHT * ref["kl"] + DISC_WEIGHT * expected_w * ref["g_adv"]
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    # The gradient treats d_weight as a constant (LDM's .detach()): grad L_rec+KL + disc_weight * d_weight * grad L_adv.
    lam = DISC_WEIGHT * float(aux["d_weight"])
    assert_grads_close(grads, jax.tree.map(lambda b, a: b + lam * a, ref["grad_base"], ref["grad_adv"]))
    # At the last layer the adversarial gradient is scaled to disc_weight times the reconstruction gradient's norm.
    np.testing.assert_allclose(np.linalg.norm(lam * g_gan), DISC_WEIGHT * np.linalg.norm(g_rec), rtol=1e-3)


def test_adam_steps_lower_the_generator_loss(setup):
    s = setup
    key = jax.random.key(5)
    tx = optax.adam(1e-3)
    update = jit(lambda g, o, p: (lambda u, o: (optax.apply_updates(p, u), o))(*tx.update(g, o, p)))
    params, opt = s["params"], tx.init(s["params"])
    losses = []
    for _ in range(6):
        ((loss, aux), grads), _ = s["run"](params, s["d_params"], s["x"], key, DISC_START + 1)
        assert float(aux["disc_factor"]) > 0  # the adversarial term is on
        losses.append(float(loss))
        params, opt = update(grads, opt, params)
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.95 * losses[0], losses
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses


def test_discriminator_loss(setup):
    s = setup
    x = s["x"]
    x_rec = x[::-1] * 0.5  # any other images

    def d_loss(d_params, step):
        return ael.discriminator_loss(d_params, s["d_graphdef"], {"image": x}, x_rec, step, disc_start=DISC_START)

    def by_hand(d_params):
        disc = nnx.merge(s["d_graphdef"], d_params)
        real, fake = disc(x), disc(x_rec)
        return 0.5 * (jnp.mean(jax.nn.relu(1 - real)) + jnp.mean(jax.nn.relu(1 + fake))), jnp.mean(real)

    run = jit(lambda d_params, step: (jax.value_and_grad(d_loss, has_aux=True)(d_params, step), by_hand(d_params)))
    vg = lambda d_params, step: run(d_params, step)[0]  # noqa: E731
    expected, mean_real = run(s["d_params"], 0)[1]
    (loss, aux), grads = vg(s["d_params"], DISC_START)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(aux["d_loss"], expected, rtol=1e-5)
    np.testing.assert_allclose(aux["logits_real"], mean_real, rtol=1e-5, atol=1e-7)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 0.0
    (loss, aux), grads = vg(s["d_params"], DISC_START - 1)
    assert float(loss) == 0.0 and float(aux["disc_factor"]) == 0.0
    np.testing.assert_allclose(aux["d_loss"], expected, rtol=1e-5)  # still logged
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) == 0.0
    with pytest.raises(ValueError, match=r"loss: must be one of \['hinge', 'vanilla'\], got 'wgan'"):
        ael.discriminator_loss(s["d_params"], s["d_graphdef"], x, x_rec, 0, loss="wgan")


# ----------------------------------------------------------------------------- PSNR and SSIM


def test_psnr():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(3, 8, 8, 2)).astype(np.float32)
    y = x + rng.normal(scale=[[[[0.01]]], [[[0.1]]], [[[0.3]]]], size=x.shape).astype(np.float32)
    mse = np.mean((x.astype(np.float64) - y) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(image_quality.psnr(jnp.asarray(x), jnp.asarray(y)), 10 * np.log10(4.0 / mse), rtol=1e-5)
    np.testing.assert_allclose(image_quality.psnr(x, y, data_range=1.0), 10 * np.log10(1.0 / mse), rtol=1e-5)
    same = image_quality.psnr(jnp.asarray(x), jnp.asarray(x))
    assert same.shape == (3,) and bool(jnp.all(jnp.isposinf(same)))
    with pytest.raises(ValueError, match=r"y: expected the shape of x"):
        image_quality.psnr(x, y[:, :4])


def ssim_wang(x: np.ndarray, y: np.ndarray, data_range: float) -> np.ndarray:
    """SSIM from Wang et al. 2004's definitions, eq. (13)-(15), with the 11x11 sigma-1.5 window at every valid position.

    mu = sum w_i x_i, sigma_x^2 = sum w_i (x_i - mu_x)^2, sigma_xy = sum w_i (x_i - mu_x)(y_i - mu_y);
    averaged over positions and channels. float64, [B].
    """
    i = np.arange(-5, 6)
    w = np.exp(-(i[:, None] ** 2 + i[None, :] ** 2) / (2 * 1.5**2))
    w /= w.sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    px = sliding_window_view(x.astype(np.float64), (11, 11), axis=(1, 2))  # [B, h', w', C, 11, 11]
    py = sliding_window_view(y.astype(np.float64), (11, 11), axis=(1, 2))
    mx, my = (px * w).sum((-2, -1)), (py * w).sum((-2, -1))
    dx, dy = px - mx[..., None, None], py - my[..., None, None]
    vx, vy, cxy = (dx * dx * w).sum((-2, -1)), (dy * dy * w).sum((-2, -1)), (dx * dy * w).sum((-2, -1))
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.mean(axis=(1, 2, 3))


def ssim_skimage_semantics(x: np.ndarray, y: np.ndarray, data_range: float, win_size: int) -> np.ndarray:
    """scikit-image's structural_similarity(gaussian_weights=True, use_sample_covariance=False, channel_axis=-1)
    re-implemented from its algorithm: scipy.ndimage.gaussian_filter (sigma 1.5, truncate 3.5, mode 'reflect')
    of x, y, x^2, y^2, xy, then the SSIM map cropped by (win_size - 1) // 2; mean per channel, then over channels.
    """
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    pad = (win_size - 1) // 2
    out = np.zeros(x.shape[0])
    for b in range(x.shape[0]):
        per_channel = []
        for c in range(x.shape[-1]):
            a, d = x[b, ..., c].astype(np.float64), y[b, ..., c].astype(np.float64)
            f = lambda t: scipy.ndimage.gaussian_filter(t, sigma=1.5, truncate=3.5, mode="reflect")  # noqa: E731
            ux, uy = f(a), f(d)
            vx, vy, vxy = f(a * a) - ux * ux, f(d * d) - uy * uy, f(a * d) - ux * uy
            s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
            per_channel.append(s[pad : s.shape[0] - pad, pad : s.shape[1] - pad].mean())
        out[b] = np.mean(per_channel)
    return out


@pytest.mark.parametrize("size, win_size", [(16, 11), (8, 7), (5, 5)])
def test_ssim_against_references(size, win_size):
    rng = np.random.default_rng(size)
    base = scipy.ndimage.gaussian_filter(rng.uniform(-1, 1, size=(3, size, size, 3)), sigma=(0, 1, 1, 0))
    x = np.clip(base * 2, -1, 1).astype(np.float32)
    y = np.clip(x + rng.normal(scale=[[[[0.05]]], [[[0.2]]], [[[0.5]]]], size=x.shape), -1, 1).astype(np.float32)
    assert image_quality.ssim_win_size(size, size) == win_size
    got = np.asarray(image_quality.ssim(jnp.asarray(x), jnp.asarray(y)))
    assert got.shape == (3,)
    np.testing.assert_allclose(got, ssim_skimage_semantics(x, y, 2.0, win_size), atol=2e-5)
    if size >= 11:  # the 11x11 window fits: valid-only, Wang et al.'s formula
        np.testing.assert_allclose(got, ssim_wang(x, y, 2.0), atol=2e-5)
    assert got[0] > got[1] > got[2]  # more noise, less similar
    # Identity; and scaling the images and data_range together leaves SSIM unchanged (C1, C2 scale with L^2).
    np.testing.assert_allclose(image_quality.ssim(jnp.asarray(x), jnp.asarray(x)), 1.0, atol=1e-6)
    np.testing.assert_allclose(image_quality.ssim(x / 2, y / 2, data_range=1.0), got, atol=2e-5)


def test_ssim_errors():
    x = jnp.zeros((1, 16, 16, 1))
    with pytest.raises(ValueError, match=r"win_size: must be odd, >= 3 and at most the image side 16, got 8"):
        image_quality.ssim(x, x, win_size=8)
    with pytest.raises(ValueError, match=r"SSIM needs images of at least 3x3, got 2x16"):
        image_quality.ssim(x[:, :2], x[:, :2])
    with pytest.raises(ValueError, match=r"x: expected images \[B, H, W, C\]"):
        image_quality.ssim(x[0], x[0])
