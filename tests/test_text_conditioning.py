"""Conditioning as one pytree: its null condition and dropout, the U-Net's cross-attention and jointly trained
text encoder, digits captions in the batches, and classifier-free guidance on text."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_digits_config
from flax import nnx

from diffusion_jax import conditioning, models
from diffusion_jax.data import captions, create_iterator
from diffusion_jax.training import experiment
from diffusion_jax.training.sampling import generate, sample_prompts


def RNGS() -> nnx.Rngs:  # noqa: N802  rbg keys: eager initialisation compiles far less than with threefry
    return nnx.Rngs(jax.random.key(0, impl="rbg"))


TEXT = dict(vocab_size=captions.vocabulary().size, max_len=captions.max_caption_length(), width=16, depth=1,
            num_heads=2)


def test_dropout_nulls_every_entry_of_an_example_together():
    b, length = 4000, 5
    cond = {"label": jnp.arange(b) % 10, "tokens": jnp.ones((b, length), jnp.int32),
            "pooled": jnp.ones((b, 3))}
    dropped = conditioning.drop(jax.random.key(0), cond, 0.3, 10)
    null_label = np.asarray(dropped["label"]) == 10
    assert abs(null_label.mean() - 0.3) < 0.03
    np.testing.assert_array_equal(~np.asarray(dropped["token_mask"]).any(1), null_label)  # mask added, then nulled
    np.testing.assert_array_equal(np.asarray(dropped["pooled"]).any(1), ~null_label)
    assert conditioning.null(None) is None and conditioning.drop(jax.random.key(0), None, 0.5) is None
    both = conditioning.concat(cond, conditioning.null(cond, 10))
    assert both["label"].shape == (2 * b,) and both["token_mask"].shape == (2 * b, length)
    with pytest.raises(ValueError, match=r"cond: unknown entries \['labels'\]"):
        conditioning.as_dict({"labels": cond["label"]})


@pytest.fixture(scope="module")
def text_unet():
    model = models.create("unet", rngs=RNGS(), image_size=8, in_channels=1, ch=8, ch_mult=(1, 2),
                          num_res_blocks=1, attn_resolutions=(4,), dropout=0.0, text_encoder=TEXT)
    graphdef, params = nnx.split(model)
    # Trained-looking weights: every zero-initialised output projection made non-zero.
    params = jax.tree.map(lambda p: p + 0.05 * jnp.sin(jnp.arange(p.size).reshape(p.shape)), params)
    apply = jax.jit(lambda x, t, cond: nnx.merge(graphdef, params)(x, t, cond))
    return model, apply


def test_the_unet_attends_to_text_and_its_null_is_an_empty_caption(text_unet):
    model, apply = text_unet
    paths = {".".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(model))}
    assert "down.1.stages.0.attn.transformer_blocks.0.attn2.to_k.kernel" in paths  # LDM's SpatialTransformer
    assert "mid_attn.transformer_blocks.0.attn2.to_k.kernel" in paths
    assert "cond.pooled.kernel" in paths  # the encoder's pooled output joins the time embedding
    assert any(p.startswith("text_encoder.") for p in paths)

    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    t = jnp.array([10, 60])
    vocab = captions.vocabulary()
    tokens, mask = vocab.encode(["a thick seven", "a thin two, leaning left"], captions.max_caption_length())
    cond = {"tokens": jnp.asarray(tokens), "token_mask": jnp.asarray(mask)}
    other_tokens, other_mask = vocab.encode(["a thin seven", "a thick two"], captions.max_caption_length())
    out = apply(x, t, cond)
    assert np.abs(out - apply(x, t, {"tokens": jnp.asarray(other_tokens), "token_mask": jnp.asarray(other_mask)})
                  ).max() > 1e-4  # the caption matters
    # Padding changes nothing.
    noisy = jnp.where(cond["token_mask"], cond["tokens"], 7)
    np.testing.assert_allclose(apply(x, t, cond | {"tokens": noisy}), out, atol=1e-6)
    # The null condition (an all-padded caption) is the unconditional model (no condition at all).
    np.testing.assert_allclose(apply(x, t, conditioning.null(cond)), apply(x, t, None), atol=1e-6)
    with pytest.raises(ValueError, match="cond: tokens were given to a model built without model.text_encoder"):
        models.create("unet", rngs=RNGS(), image_size=8, in_channels=1, ch=8, ch_mult=(1, 2),
                      num_res_blocks=1, attn_resolutions=(4,))(x, t, cond)


def test_precomputed_context_feeds_the_cross_attention():
    model = models.create("unet", rngs=RNGS(), image_size=8, in_channels=1, ch=8, ch_mult=(1, 2),
                          num_res_blocks=1, attn_resolutions=(4,), context_dim=12, pooled_dim=6)
    x, t = jnp.zeros((1, 8, 8, 1)), jnp.array([3])
    context = jax.random.normal(jax.random.key(0), (1, 5, 12))
    assert model(x, t, {"context": context, "pooled": jnp.ones((1, 6))}).shape == (1, 8, 8, 1)
    with pytest.raises(ValueError, match="context: width 7 != model.context_dim 12"):
        model(x, t, {"context": jnp.zeros((1, 5, 7))})


def test_captioned_digits_train_and_sample_with_guidance(digits_data_dir):
    config = tiny_digits_config(digits_data_dir)
    config.data.captions = True
    config.model.text_encoder = dict(width=16, depth=1, num_heads=2)
    config.training.label_dropout = 0.2
    config.sample.update(guidance_scale=2.0, num_samples=8, batch_size=8, steps=3)
    exp = experiment.build(config)
    batch = next(create_iterator(config.data, global_batch_size=16, seed=0, sharding=exp.batch_sharding))
    assert batch["tokens"].shape == (16, captions.max_caption_length()) and batch["token_mask"].dtype == bool
    texts = captions.vocabulary().decode(np.asarray(batch["tokens"]), np.asarray(batch["token_mask"]))
    for text, label in zip(texts, np.asarray(batch["label"]), strict=True):
        assert captions.parse_caption(text)[0] == label  # each caption names its image's digit

    initial = jax.device_get(exp.init_state().params["text_encoder"])
    state = exp.init_state()
    step = experiment.jit_train_step(exp, config)
    for _ in range(4):  # lr 0 at step 0 (warmup); the zero-initialised conv_out passes no gradient before it moves
        state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    moved = [np.abs(np.asarray(a) - b).max() for a, b in zip(
        jax.tree.leaves(state.params["text_encoder"]), jax.tree.leaves(initial), strict=True)]
    assert min(moved) > 0  # the text encoder trains jointly with the U-Net: every weight moved
    samples, _ = generate(exp.sample_fn, experiment.sampling_params(config, state), jax.random.key(0), 8)
    assert samples.shape == (8, 8, 8, 1) and np.isfinite(samples).all()
    prompts = sample_prompts(None, 20)
    assert [captions.parse_caption(p) for p in prompts[:10]] == [(i, {"thickness": "thick"}) for i in range(10)]
    assert [captions.parse_caption(p)[1] for p in prompts[10:12]] == [{"thickness": "thin"}] * 2
    assert sample_prompts(("a seven",), 3) == ["a seven"] * 3
