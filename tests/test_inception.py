"""The FID Inception-v3 (metrics/inception.py), its weight loaders and FID reference statistics (metrics/fid.py).

The network runs at 75x75 here (the smallest valid Inception-v3 input) so the tests stay fast;
the PyTorch cross-check at the end runs the real 299x299 pipeline when torch and pytorch-fid are
installed and skips otherwise.
"""

import collections
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from diffusion_jax.errors import ConfigError
from diffusion_jax.metrics import fid, inception, stats

# ---------------------------------------------------------------------------------------------
# pytorch-fid's state dict, written out from torchvision's Inception3 constructor
# (num_classes=1008, aux_logits=False) independently of the module under test.


def _basic_conv(name: str, cin: int, cout: int, kh: int, kw: int | None = None) -> dict[str, tuple[int, ...]]:
    bn = {f"{name}.bn.{leaf}": (cout,) for leaf in ("weight", "bias", "running_mean", "running_var")}
    conv = {f"{name}.conv.weight": (cout, cin, kh, kh if kw is None else kw)}
    return conv | bn | {f"{name}.bn.num_batches_tracked": ()}


def _block(prefix: str, convs: list[tuple]) -> dict[str, tuple[int, ...]]:
    return {k: v for name, *dims in convs for k, v in _basic_conv(f"{prefix}.{name}", *dims).items()}


def _inception_a(p: str, cin: int, pool: int) -> dict:
    return _block(p, [("branch1x1", cin, 64, 1), ("branch5x5_1", cin, 48, 1), ("branch5x5_2", 48, 64, 5),
                      ("branch3x3dbl_1", cin, 64, 1), ("branch3x3dbl_2", 64, 96, 3), ("branch3x3dbl_3", 96, 96, 3),
                      ("branch_pool", cin, pool, 1)])


def _inception_c(p: str, c7: int) -> dict:
    return _block(p, [("branch1x1", 768, 192, 1), ("branch7x7_1", 768, c7, 1), ("branch7x7_2", c7, c7, 1, 7),
                      ("branch7x7_3", c7, 192, 7, 1), ("branch7x7dbl_1", 768, c7, 1), ("branch7x7dbl_2", c7, c7, 7, 1),
                      ("branch7x7dbl_3", c7, c7, 1, 7), ("branch7x7dbl_4", c7, c7, 7, 1),
                      ("branch7x7dbl_5", c7, 192, 1, 7), ("branch_pool", 768, 192, 1)])


def _inception_e(p: str, cin: int) -> dict:
    return _block(p, [("branch1x1", cin, 320, 1), ("branch3x3_1", cin, 384, 1), ("branch3x3_2a", 384, 384, 1, 3),
                      ("branch3x3_2b", 384, 384, 3, 1), ("branch3x3dbl_1", cin, 448, 1),
                      ("branch3x3dbl_2", 448, 384, 3), ("branch3x3dbl_3a", 384, 384, 1, 3),
                      ("branch3x3dbl_3b", 384, 384, 3, 1), ("branch_pool", cin, 192, 1)])


def fid_state_dict_shapes() -> dict[str, tuple[int, ...]]:
    shapes = _block("", [("Conv2d_1a_3x3", 3, 32, 3), ("Conv2d_2a_3x3", 32, 32, 3), ("Conv2d_2b_3x3", 32, 64, 3),
                         ("Conv2d_3b_1x1", 64, 80, 1), ("Conv2d_4a_3x3", 80, 192, 3)])
    shapes = {k[1:]: v for k, v in shapes.items()}  # drop the leading "."
    shapes |= _inception_a("Mixed_5b", 192, 32) | _inception_a("Mixed_5c", 256, 64) | _inception_a("Mixed_5d", 288, 64)
    shapes |= _block("Mixed_6a", [("branch3x3", 288, 384, 3), ("branch3x3dbl_1", 288, 64, 1),
                                  ("branch3x3dbl_2", 64, 96, 3), ("branch3x3dbl_3", 96, 96, 3)])
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        shapes |= _inception_c(name, c7)
    shapes |= _block("Mixed_7a", [("branch3x3_1", 768, 192, 1), ("branch3x3_2", 192, 320, 3),
                                  ("branch7x7x3_1", 768, 192, 1), ("branch7x7x3_2", 192, 192, 1, 7),
                                  ("branch7x7x3_3", 192, 192, 7, 1), ("branch7x7x3_4", 192, 192, 3)])
    shapes |= _inception_e("Mixed_7b", 1280) | _inception_e("Mixed_7c", 2048)
    return shapes | {"fc.weight": (1008, 2048), "fc.bias": (1008,)}


def random_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    """He-scaled conv weights and non-trivial BN statistics, so activations stay O(1) through the net."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in fid_state_dict_shapes().items():
        if key.endswith("num_batches_tracked"):
            out[key] = np.asarray(7, np.int64)
        elif key.endswith("conv.weight"):
            out[key] = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[1:])), shape).astype(np.float32)
        elif key.endswith(("bn.weight", "running_var")):
            out[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif key == "fc.weight":
            out[key] = rng.normal(0.0, 2048**-0.5, shape).astype(np.float32)
        else:
            out[key] = rng.normal(0.0, 0.1, shape).astype(np.float32)
    return out


# ---------------------------------------------------------------------------------------------
# torch.save files, in both of its formats; the strided fc.weight (stored transposed) and a running_var that
# views running_mean's storage at an offset exercise the reader's handling of storages.


def _torch_state_dict(state_dict: dict[str, np.ndarray]) -> collections.OrderedDict:
    tensors = collections.OrderedDict((k, torch.from_numpy(np.array(v))) for k, v in state_dict.items())
    tensors["fc.weight"] = torch.from_numpy(np.ascontiguousarray(state_dict["fc.weight"].T)).t()
    shared = torch.cat([tensors["Conv2d_1a_3x3.bn.running_mean"], tensors["Conv2d_1a_3x3.bn.running_var"]])
    tensors["Conv2d_1a_3x3.bn.running_mean"], tensors["Conv2d_1a_3x3.bn.running_var"] = shared[:32], shared[32:]
    return tensors


def write_torch_zip(path, state_dict: dict[str, np.ndarray]) -> None:
    """torch >= 1.6's format (a zip archive)."""
    torch.save(_torch_state_dict(state_dict), path)


def write_torch_legacy(path, state_dict: dict[str, np.ndarray]) -> None:
    """torch < 1.6's single-stream format, which pytorch-fid's pt_inception-2015-12-05 file uses."""
    torch.save(_torch_state_dict(state_dict), path, _use_new_zipfile_serialization=False)


# ---------------------------------------------------------------------------------------------

IMAGE_SIZE, BATCH = 75, 4


@pytest.fixture(scope="module")
def state_dict() -> dict[str, np.ndarray]:
    return random_state_dict(0)


@pytest.fixture(scope="module")
def model(state_dict):
    return inception.model_from_torch_state_dict(state_dict)


@pytest.fixture(scope="module")
def extractor(model):
    return inception.InceptionFeatures(model, batch_size=BATCH, image_size=IMAGE_SIZE)


def _images(n: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, channels), dtype=np.uint8)


def _torch_bilinear(x: np.ndarray, out: int) -> np.ndarray:
    """F.interpolate(mode='bilinear', align_corners=False) on NHWC, float32 index arithmetic as in
    ATen's upsample kernels: src = max(in/out * (dst + 1/2) - 1/2, 0), taps floor(src) and +1 (clamped)."""

    def taps(n_in: int):
        src = np.maximum(np.float32(n_in / out) * (np.arange(out, dtype=np.float32) + 0.5) - 0.5, 0).astype(np.float32)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        return i0, np.minimum(i0 + 1, n_in - 1), (src - i0).astype(np.float32)

    h0, h1, lh = taps(x.shape[1])
    w0, w1, lw = taps(x.shape[2])
    rows = x[:, h0] * (1 - lh)[:, None, None] + x[:, h1] * lh[:, None, None]
    return rows[:, :, w0] * (1 - lw)[:, None] + rows[:, :, w1] * lw[:, None]


def test_parameter_count_is_the_fid_inception():
    # torchvision's inception_v3 has 27,161,264 parameters; without AuxLogits (3,326,696) and
    # with 1008 instead of 1000 classes (+8 * 2049) that is 23,850,960 (running stats excluded).
    shapes = inception.param_shapes()
    count = sum(int(np.prod(s)) for name, s in shapes.items() if not name.endswith((".mean", ".var")))
    assert count == 23_850_960
    assert len(shapes) == len([k for k in fid_state_dict_shapes() if not k.endswith("num_batches_tracked")])


@pytest.mark.parametrize("size_in", [20, 150, 400])
def test_resize_matches_torch_bilinear(size_in):
    x = np.random.default_rng(size_in).random((2, size_in, size_in + 3, 3), dtype=np.float32)
    got = np.asarray(inception.preprocess(jnp.asarray(x), IMAGE_SIZE))
    np.testing.assert_allclose(got, 2 * _torch_bilinear(x, IMAGE_SIZE) - 1, atol=2e-5)
    assert got.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)


def test_pools_match_pytorch_semantics():
    x = np.random.default_rng(1).normal(size=(1, 4, 5, 2)).astype(np.float32)
    padded_sum = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    padded_max = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    count = np.pad(np.ones((4, 5)), 1)
    avg, mx = np.zeros_like(x), np.zeros_like(x)
    for i in range(4):
        for j in range(5):
            avg[0, i, j] = padded_sum[0, i : i + 3, j : j + 3].sum((0, 1)) / count[i : i + 3, j : j + 3].sum()
            mx[0, i, j] = padded_max[0, i : i + 3, j : j + 3].max((0, 1))
    np.testing.assert_allclose(inception.avg_pool_3x3(jnp.asarray(x)), avg, rtol=1e-6)  # count_include_pad=False
    np.testing.assert_allclose(inception.max_pool_3x3(jnp.asarray(x), stride=1), mx, rtol=1e-6)
    np.testing.assert_allclose(inception.max_pool_3x3(jnp.asarray(x), stride=2), mx[:, 1:2, 1:4:2], rtol=1e-6)


@pytest.mark.parametrize(
    "block, cin, pool", [("Mixed_5b", 192, "avg"), ("Mixed_7b", 1280, "avg"), ("Mixed_7c", 2048, "max")]
)
def test_pool_branch_kind_and_position(model, block, cin, pool):
    """The last 32/192 channels of an A/E block are the pool branch, FIDInceptionE_2 (Mixed_7c) max-pools."""
    module = getattr(model, block)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 3, 3, cin)), jnp.float32)
    pooled = inception.avg_pool_3x3(x) if pool == "avg" else inception.max_pool_3x3(x, stride=1)
    expected = module.branch_pool(pooled)
    np.testing.assert_allclose(module(x)[..., -expected.shape[-1] :], expected, rtol=1e-5, atol=1e-5)


def test_features_rgb_grey_uint8_float(extractor):
    images = _images(5)  # 5 = one full batch of 4 + one padded batch
    pool, logits = extractor(images)
    assert pool.shape == (5, 2048) and logits.shape == (5, 1008)
    assert pool.dtype == np.float32 and logits.dtype == np.float32
    assert np.all(np.isfinite(pool)) and pool.std() > 1e-2 and np.all(pool >= 0)  # mean of ReLUs
    pool_f, logits_f = extractor(images / 255.0)
    np.testing.assert_allclose(pool_f, pool, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits_f, logits, rtol=1e-5, atol=1e-6)
    grey = _images(5, seed=1, channels=1)
    np.testing.assert_array_equal(extractor(grey)[0], extractor(np.repeat(grey, 3, axis=-1))[0])
    # padding the last batch does not leak into the real rows
    np.testing.assert_allclose(extractor(images[4:])[0], pool[4:], rtol=1e-5, atol=1e-6)
    assert not np.allclose(pool[0], pool[1])


def test_logits_are_the_fc_of_pool3(extractor, state_dict):
    pool, logits = extractor(_images(3, seed=3))
    expected = pool.astype(np.float64) @ state_dict["fc.weight"].T.astype(np.float64) + state_dict["fc.bias"]
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_input_errors(extractor, model):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        extractor(np.full((1, 32, 32, 3), -0.5, np.float32))
    with pytest.raises(ValueError, match="C = 1 or 3"):
        extractor(np.zeros((1, 32, 32, 4), np.uint8))
    with pytest.raises(ValueError, match="dtype"):
        extractor(np.zeros((1, 32, 32, 3), np.int32))
    with pytest.raises(ConfigError, match="image_size must be >= 75"):
        inception.InceptionFeatures(model, image_size=74)
    assert [a.shape for a in extractor(np.zeros((0, 32, 32, 3), np.uint8))] == [(0, 2048), (0, 1008)]


@pytest.mark.parametrize("writer", [write_torch_zip, write_torch_legacy], ids=["zip", "legacy"])
def test_pth_loader_layouts(tmp_path, state_dict, writer):
    path = tmp_path / "pt_inception.pth"
    writer(path, state_dict)
    net = inception.load_inception(path)
    leaf = {"weight": "kernel", "bias": "bias", "running_mean": "mean", "running_var": "var"}
    for key, value in state_dict.items():  # every parameter lands in its place, transposed to HWIO / [in, out]
        if key.endswith("num_batches_tracked"):
            continue
        *path_, name = key.split(".")
        module = net
        for part in path_:
            module = getattr(module, part)
        ours = np.asarray(getattr(module, "scale" if key.endswith("bn.weight") else leaf[name])[...])
        expected = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
        np.testing.assert_array_equal(ours, expected, err_msg=key)
    # a 1x7 convolution against lax.conv in PyTorch's own layouts (NCHW input, OIHW raw weight)
    x = np.random.default_rng(4).normal(size=(2, 9, 9, 128)).astype(np.float32)
    w = state_dict["Mixed_6b.branch7x7_2.conv.weight"]  # [128, 128, 1, 7]
    ref = jax.lax.conv_general_dilated(
        x.transpose(0, 3, 1, 2), w, (1, 1), ((0, 0), (3, 3)), dimension_numbers=("NCHW", "OIHW", "NCHW"),
        precision=jax.lax.Precision.HIGHEST,
    ).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(net.Mixed_6b.branch7x7_2.conv(jnp.asarray(x)), ref, rtol=1e-5, atol=1e-5)
    # batch norm with PyTorch's eval formula on the raw arrays
    bn = {k: state_dict[f"Mixed_6b.branch7x7_2.bn.{k}"] for k in ("weight", "bias", "running_mean", "running_var")}
    y = x[..., :128]
    ref_bn = (y - bn["running_mean"]) / np.sqrt(bn["running_var"] + 1e-3) * bn["weight"] + bn["bias"]
    np.testing.assert_allclose(net.Mixed_6b.branch7x7_2.bn(jnp.asarray(y)), ref_bn, rtol=1e-5, atol=1e-5)


def test_pth_loader_errors(tmp_path, state_dict):
    missing = dict(state_dict)
    del missing["Mixed_6c.branch7x7dbl_3.bn.running_var"]
    write_torch_zip(tmp_path / "missing.pth", missing)
    with pytest.raises(ConfigError, match=r"^eval.inception_weights: PyTorch file .*missing.pth lacks 1 tensors the "
                                          r"model needs: Mixed_6c.branch7x7dbl_3.bn.running_var"):
        inception.load_inception(tmp_path / "missing.pth")

    wrong = dict(state_dict, **{"Mixed_7a.branch3x3_2.conv.weight": np.zeros((320, 192, 3, 1), np.float32)})
    write_torch_legacy(tmp_path / "wrong.pth", wrong)
    with pytest.raises(ConfigError, match=r"^eval.inception_weights: Mixed_7a/branch3x3_2/conv/kernel has shape "
                                          r"\(3, 3, 192, 320\) here, but Mixed_7a.branch3x3_2.conv.weight "
                                          r"\(320, 192, 3, 1\) makes \(3, 1, 192, 320\)"):
        inception.load_inception(tmp_path / "wrong.pth")

    extra = dict(state_dict, **{"AuxLogits.fc.bias": np.zeros(1008, np.float32)})
    write_torch_zip(tmp_path / "extra.pth", extra)
    with pytest.raises(ConfigError, match=r"^eval.inception_weights: 1 tensors of .* are used by no rule.*"
                                          r"AuxLogits.fc.bias"):
        inception.load_inception(tmp_path / "extra.pth")

    class RunsCode:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"x": RunsCode()}, protocol=2))
    with pytest.raises(ConfigError, match=r"^eval.inception_weights: .*evil.pth could not be read with "
                                          r"torch.load\(weights_only=True\): UnpicklingError"):
        inception.load_inception(tmp_path / "evil.pth")

    with pytest.raises(ConfigError, match="not found. Nothing is downloaded.*pt_inception-2015-12-05"):
        inception.load_inception(tmp_path / "absent.pth")


def test_npz_round_trip(tmp_path, model):
    inception.save_params(model, tmp_path / "fid_inception.npz")
    reloaded = inception.load_inception(tmp_path / "fid_inception.npz")
    original, restored = inception.flat_params(model), inception.flat_params(reloaded)
    assert set(original) == set(restored) and len(original) == 472
    for name in original:
        np.testing.assert_array_equal(restored[name], original[name], err_msg=name)

    params = dict(original)
    params["fc.kernel"] = params["fc.kernel"][:, :1000]
    np.savez(tmp_path / "bad.npz", **params)
    with pytest.raises(ConfigError, match=r"'fc.kernel' has shape \(2048, 1000\), expected \(2048, 1008\)"):
        inception.load_inception(tmp_path / "bad.npz")


def test_reference_stats_from_batches(extractor):
    images = _images(9, seed=5)
    pool, logits = extractor(images)
    batches = iter([images[:3], images[3:5], images[5:9]])  # regrouped into 4 + 4 + 1
    got_pool, got_logits = fid.compute_features(batches, extractor)
    np.testing.assert_allclose(got_pool, pool, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_logits, logits, rtol=1e-5, atol=1e-6)
    ref = fid.reference_stats(images, extractor)
    expected = stats.feature_stats(pool)
    assert ref.num == 9 and ref.mu.shape == (2048,) and ref.sigma.shape == (2048, 2048)
    np.testing.assert_allclose(ref.mu, expected.mu, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ref.sigma, expected.sigma, rtol=1e-4, atol=1e-8)
    with pytest.raises(ValueError, match="share"):
        fid.compute_features([images[:2], _images(2, channels=1)], extractor)


def test_matches_pytorch_fid(tmp_path, monkeypatch):
    """pytorch-fid's network (random weights, random BN statistics) against ours at 299x299."""
    torchvision = pytest.importorskip("torchvision")
    fid_inception = pytest.importorskip("pytorch_fid.inception")
    # fid_inception_v3() downloads and loads the FID weights: keep only its architecture
    monkeypatch.setattr(fid_inception, "load_state_dict_from_url", lambda *args, **kwargs: {})
    monkeypatch.setattr(torchvision.models.Inception3, "load_state_dict", lambda self, *args, **kwargs: None)
    net = fid_inception.fid_inception_v3().eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        net.fc.weight.normal_(0.0, 2048**-0.5)
        net.fc.bias.normal_(0.0, 0.1)
    torch.save(net.state_dict(), tmp_path / "zip.pth")

    images = _images(3, seed=6)
    # pytorch-fid's InceptionV3.forward: uint8 / 255, bilinear resize to 299, 2x - 1
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = 2 * torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
    captured = {}
    net.avgpool.register_forward_hook(lambda module, inputs, output: captured.update(pool=output))
    with torch.no_grad():
        ref_logits = net(x).numpy()
    ref_pool = captured["pool"].flatten(1).numpy()

    pool, logits = inception.InceptionFeatures(tmp_path / "zip.pth", batch_size=4)(images)
    assert np.abs(ref_pool).max() > 0.1  # the comparison is not between near-zero features
    np.testing.assert_allclose(pool, ref_pool, rtol=1e-4, atol=1e-4 * np.abs(ref_pool).max())
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-4 * np.abs(ref_logits).max())
