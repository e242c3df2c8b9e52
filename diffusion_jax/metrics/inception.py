"""The FID Inception-v3 in Flax NNX (NHWC), its weight loaders and a batched feature extractor.

The network is the Inception-v3 (Szegedy et al. 2016, arXiv 1512.00567) of the TensorFlow graph
`inception-2015-12-05` that the reference FID code uses (Heusel et al. 2017, arXiv 1706.08500;
github.com/bioinf-jku/TTUR), in the form of pytorch-fid's `fid_inception_v3()` (github.com/mseitzer/
pytorch-fid, `src/pytorch_fid/inception.py`): torchvision's `Inception3(num_classes=1008,
aux_logits=False)` with the blocks `FIDInceptionA/C/E_1/E_2`. It differs from torchvision's
ImageNet Inception-v3 in exactly the ways of that TF graph:

- the 3x3 average pool of the pool branch in the A, C and first E blocks (Mixed_5b-d, 6b-e, 7b)
  divides by the number of pixels inside the image (`count_include_pad=False`);
- the pool branch of the last E block (Mixed_7c, pytorch-fid's `FIDInceptionE_2`) max-pools;
- batch norm uses eps = 0.001, and the classifier has 1008 outputs (the TF graph's class set).

Outputs are the 2048-d "pool3" features (global average pool after Mixed_7c, what FID and KID
use) and the 1008 logits of the fc layer (what the Inception Score uses).

Weights: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (the TF weights ported to PyTorch;
https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth),
which the user downloads; nothing here downloads. It is a pickle, so it is read only through
`torch.load(weights_only=True)` (torch's restricted unpickler; `diffusion_jax.convert.source`) and mapped by
the weight importer's rules (`diffusion_jax.convert.inception`). Convert once and keep an `.npz`, which then
needs no torch::

    save_params(load_inception("pt_inception-2015-12-05-6726825d.pth"), "fid_inception.npz")
    features = InceptionFeatures("fid_inception.npz")
    pool, logits = features(images_uint8)          # [N, 2048], [N, 1008]
"""

import functools
import os
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffusion_jax.convert import inception as convert_inception
from diffusion_jax.convert import mapping
from diffusion_jax.convert.source import TensorSource, open_source
from diffusion_jax.errors import ConfigError

FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
FID_IMAGE_SIZE = 299  # the input resolution of the TF graph and of pytorch-fid
MIN_IMAGE_SIZE = 75  # the smallest input for which every stride-2 stage keeps a pixel (torchvision docs)
POOL_DIM = 2048
NUM_CLASSES = 1008
BN_EPS = 1e-3

_HIGHEST = jax.lax.Precision.HIGHEST  # f32 convolutions on GPU/TPU too: FID is sensitive to bf16 passes


class FrozenBatchNorm(nnx.Module):
    """Inference-only batch norm with eps = 0.001: y = (x - mean) / sqrt(var + eps) * scale + bias.

    The running statistics are `nnx.Param`s, like the affine parameters: this network is never
    trained, so the split between trainable parameters and batch statistics that `nnx.BatchNorm`
    keeps (`nnx.BatchStat`) would only add a second state collection; with one collection,
    `nnx.state(model)` is the whole network, which the loaders and the `.npz` format rely on.
    """

    def __init__(self, features: int):
        self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))
        self.mean = nnx.Param(jnp.zeros((features,), jnp.float32))
        self.var = nnx.Param(jnp.ones((features,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., C] -> [..., C], as PyTorch's eval-mode kernel: x * alpha + (bias - mean * alpha)."""
        alpha = self.scale[...] * jax.lax.rsqrt(self.var[...] + BN_EPS)
        return x * alpha + (self.bias[...] - self.mean[...] * alpha)


class BasicConv2d(nnx.Module):
    """Conv (no bias) -> batch norm -> ReLU: torchvision's `BasicConv2d`.

    The kernel is HWIO (PyTorch's OIHW transposed); `padding` is (pad_h, pad_w) on both sides.
    Random initialisation is He-normal (He et al. 2015, arXiv 1502.01852), which keeps activations
    at unit scale through the ~50 ReLU layers, so a network built without weights still gives
    non-degenerate features.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int | tuple[int, int],
        *,
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
        rngs: nnx.Rngs,
    ):
        kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
        pad_h, pad_w = (padding, padding) if isinstance(padding, int) else padding
        self.conv = nnx.Conv(
            in_ch,
            out_ch,
            kernel,
            strides=stride,
            padding=((pad_h, pad_h), (pad_w, pad_w)),
            use_bias=False,
            precision=_HIGHEST,
            kernel_init=nnx.initializers.he_normal(),
            rngs=rngs,
        )
        self.bn = FrozenBatchNorm(out_ch)

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, in_ch] -> [B, H', W', out_ch]."""
        return jax.nn.relu(self.bn(self.conv(x)))


def avg_pool_3x3(x: jax.Array) -> jax.Array:
    """3x3 average, stride 1, zero padding 1, dividing by the pixels inside the image
    (`F.avg_pool2d(..., count_include_pad=False)`, TF's SAME average pool). [B, H, W, C] -> same."""
    return nnx.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def max_pool_3x3(x: jax.Array, stride: int) -> jax.Array:
    """3x3 max. stride 1: padding 1 with -inf (FIDInceptionE_2's pool branch), same size;
    stride 2: no padding (the stem and the B/D reductions), [B, H, W, C] -> [B, (H-3)//2+1, ...]."""
    padding = ((1, 1), (1, 1)) if stride == 1 else "VALID"
    return nnx.max_pool(x, (3, 3), strides=(stride, stride), padding=padding)


class InceptionA(nnx.Module):
    """Mixed_5b/c/d (pytorch-fid `FIDInceptionA`): [B, H, W, in_ch] -> [B, H, W, 224 + pool_features]."""

    def __init__(self, in_ch: int, pool_features: int, *, rngs: nnx.Rngs):
        self.branch1x1 = BasicConv2d(in_ch, 64, 1, rngs=rngs)
        self.branch5x5_1 = BasicConv2d(in_ch, 48, 1, rngs=rngs)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
        self.branch_pool = BasicConv2d(in_ch, pool_features, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.branch1x1(x)  # [B, H, W, 64]
        b5 = self.branch5x5_2(self.branch5x5_1(x))  # [B, H, W, 64]
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))  # [B, H, W, 96]
        bp = self.branch_pool(avg_pool_3x3(x))  # [B, H, W, pool_features]
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
    """Mixed_6a (torchvision `InceptionB`): [B, H, W, in_ch] -> [B, (H-3)//2+1, ..., 480 + in_ch]."""

    def __init__(self, in_ch: int, *, rngs: nnx.Rngs):
        self.branch3x3 = BasicConv2d(in_ch, 384, 3, stride=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3(x)
        b3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([b3, b3dbl, max_pool_3x3(x, stride=2)], axis=-1)


class InceptionC(nnx.Module):
    """Mixed_6b/c/d/e (pytorch-fid `FIDInceptionC`), factorised 7x7: [B, H, W, in_ch] -> [B, H, W, 768]."""

    def __init__(self, in_ch: int, channels_7x7: int, *, rngs: nnx.Rngs):
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_ch, 192, 1, rngs=rngs)
        self.branch7x7_1 = BasicConv2d(in_ch, c7, 1, rngs=rngs)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_1 = BasicConv2d(in_ch, c7, 1, rngs=rngs)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch_pool = BasicConv2d(in_ch, 192, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7dbl = conv(b7dbl)
        bp = self.branch_pool(avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, b7dbl, bp], axis=-1)  # 4 x 192 channels


class InceptionD(nnx.Module):
    """Mixed_7a (torchvision `InceptionD`): [B, H, W, in_ch] -> [B, (H-3)//2+1, ..., 512 + in_ch]."""

    def __init__(self, in_ch: int, *, rngs: nnx.Rngs):
        self.branch3x3_1 = BasicConv2d(in_ch, 192, 1, rngs=rngs)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
        self.branch7x7x3_1 = BasicConv2d(in_ch, 192, 1, rngs=rngs)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return jnp.concatenate([b3, b7, max_pool_3x3(x, stride=2)], axis=-1)


class InceptionE(nnx.Module):
    """Mixed_7b (`FIDInceptionE_1`, pool='avg') and Mixed_7c (`FIDInceptionE_2`, pool='max'):
    [B, H, W, in_ch] -> [B, H, W, 2048]. The max pool of Mixed_7c is a quirk of the TF graph that
    pytorch-fid reproduces; other Inception-v3s average-pool here."""

    def __init__(self, in_ch: int, pool: Literal["avg", "max"], *, rngs: nnx.Rngs):
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_ch, 320, 1, rngs=rngs)
        self.branch3x3_1 = BasicConv2d(in_ch, 384, 1, rngs=rngs)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 448, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch_pool = BasicConv2d(in_ch, 192, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.branch1x1(x)  # [B, H, W, 320]
        b3 = self.branch3x3_1(x)
        b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)  # [B, H, W, 768]
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)  # [B, H, W, 768]
        pooled = avg_pool_3x3(x) if self.pool == "avg" else max_pool_3x3(x, stride=1)
        return jnp.concatenate([b1, b3, bd, self.branch_pool(pooled)], axis=-1)  # + 192


class FIDInceptionV3(nnx.Module):
    """The FID Inception-v3 (see the module docstring). Attribute names follow torchvision's, so
    a PyTorch state-dict name maps onto a path of this module one to one."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
        self.Mixed_5b = InceptionA(192, pool_features=32, rngs=rngs)
        self.Mixed_5c = InceptionA(256, pool_features=64, rngs=rngs)
        self.Mixed_5d = InceptionA(288, pool_features=64, rngs=rngs)
        self.Mixed_6a = InceptionB(288, rngs=rngs)
        self.Mixed_6b = InceptionC(768, channels_7x7=128, rngs=rngs)
        self.Mixed_6c = InceptionC(768, channels_7x7=160, rngs=rngs)
        self.Mixed_6d = InceptionC(768, channels_7x7=160, rngs=rngs)
        self.Mixed_6e = InceptionC(768, channels_7x7=192, rngs=rngs)
        self.Mixed_7a = InceptionD(768, rngs=rngs)
        self.Mixed_7b = InceptionE(1280, pool="avg", rngs=rngs)
        self.Mixed_7c = InceptionE(2048, pool="max", rngs=rngs)
        self.fc = nnx.Linear(POOL_DIM, NUM_CLASSES, precision=_HIGHEST, rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x: [B, S, S, 3] in [-1, 1] with S >= 75 (299 for FID) -> (pool3 [B, 2048], logits [B, 1008])."""
        x = self.Conv2d_1a_3x3(x)  # [B, 149, 149, 32] at S = 299
        x = self.Conv2d_2a_3x3(x)  # [B, 147, 147, 32]
        x = self.Conv2d_2b_3x3(x)  # [B, 147, 147, 64]
        x = max_pool_3x3(x, stride=2)  # [B, 73, 73, 64]
        x = self.Conv2d_3b_1x1(x)  # [B, 73, 73, 80]
        x = self.Conv2d_4a_3x3(x)  # [B, 71, 71, 192]
        x = max_pool_3x3(x, stride=2)  # [B, 35, 35, 192]
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # [B, 35, 35, 288]
        x = self.Mixed_6a(x)  # [B, 17, 17, 768]
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # [B, 17, 17, 768]
        x = self.Mixed_7a(x)  # [B, 8, 8, 1280]
        x = self.Mixed_7c(self.Mixed_7b(x))  # [B, 8, 8, 2048]
        pool = jnp.mean(x, axis=(1, 2))  # [B, 2048]; dropout is the identity at inference
        return pool, self.fc(pool)


def preprocess(images: jax.Array, image_size: int = FID_IMAGE_SIZE) -> jax.Array:
    """pytorch-fid's input transform: [B, H, W, 3] in [0, 1] -> [B, S, S, 3] in [-1, 1].

    Resizes with `F.interpolate(mode='bilinear', align_corners=False)` semantics (no antialiasing)
    and maps x -> 2x - 1. `jax.image.resize(method='bilinear', antialias=False)` is that resize for
    upsampling and downsampling alike: both sample at the half-pixel positions (i + 1/2) H/S - 1/2
    with two taps per axis, and torch's clamping of positions outside [0, H-1] to the edge pixel
    equals JAX's dropping of the out-of-image tap and renormalising. Measured against
    torch 2.15's `F.interpolate`: max |difference| <= 7e-6 (of the [-1, 1] output) for 32x32, 64x48,
    75x75, 300x300, 512x400 and 1000x1000 inputs. Downsampling thus aliases exactly as in pytorch-fid
    (antialias=True would differ from it).
    """
    b, h, w, c = images.shape
    if (h, w) != (image_size, image_size):
        images = jax.image.resize(images, (b, image_size, image_size, c), method="bilinear", antialias=False)
    return 2.0 * images - 1.0


# --------------------------------------------------------------------------------------------
# Parameters: flat names for the .npz format; pytorch-fid's state dict through `diffusion_jax.convert`.


def _abstract_model() -> FIDInceptionV3:
    """The network with `jax.ShapeDtypeStruct` leaves: its names and shapes, no weights initialised."""
    return nnx.eval_shape(lambda: FIDInceptionV3(rngs=nnx.Rngs(0)))


@functools.cache
def _param_shapes() -> dict[str, tuple[int, ...]]:
    state = nnx.state(_abstract_model(), nnx.Param)
    return {".".join(map(str, path)): tuple(v.shape) for path, v in nnx.to_flat_state(state)}


def param_shapes() -> dict[str, tuple[int, ...]]:
    """Flat name ('Mixed_5b.branch1x1.conv.kernel', 'Mixed_5b.branch1x1.bn.mean', ...) -> shape."""
    return dict(_param_shapes())


def flat_params(model: FIDInceptionV3) -> dict[str, np.ndarray]:
    """The network's parameters as flat name -> NumPy array, in our layout (HWIO kernels)."""
    return {".".join(map(str, path)): np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _listing(names: list[str]) -> str:
    return f"{len(names)} ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})"


def model_from_params(params: dict[str, np.ndarray], source: str = "params") -> FIDInceptionV3:
    """The network from flat name -> array in our layout (see `param_shapes`); the names and shapes
    must be exactly the network's (errors name `source` and the parameter). This is also the fast
    way to a random-weight network: `FIDInceptionV3(rngs=...)` initialises eagerly (~30 s on 2 CPU cores)."""
    expected = _param_shapes()
    missing, unexpected = sorted(set(expected) - set(params)), sorted(set(params) - set(expected))
    if missing or unexpected:
        raise ConfigError(
            f"{source}: not the FID Inception-v3's parameters: missing {_listing(missing)}, "
            f"unexpected {_listing(unexpected)}"
        )
    for name, shape in expected.items():
        if tuple(params[name].shape) != shape:
            raise ConfigError(f"{source}: parameter {name!r} has shape {tuple(params[name].shape)}, expected {shape}")
    model = _abstract_model()
    arrays = {tuple(name.split(".")): jnp.asarray(params[name], jnp.float32) for name in expected}
    nnx.update(model, nnx.State.from_flat_path(arrays))
    return model


def model_from_tensors(tensors: TensorSource, field: str = "eval.inception_weights") -> FIDInceptionV3:
    """The network from pytorch-fid's state dict (torchvision names, OIHW kernels, [out, in] fc), mapped by
    `convert.inception`: every tensor used (BatchNorm's `num_batches_tracked` ignored) and every shape checked,
    errors one line naming `field`."""
    model = _abstract_model()
    params, _ = mapping.convert(convert_inception.RULES, nnx.state(model, nnx.Param), tensors,
                                ignore=convert_inception.IGNORED, field=field)
    nnx.update(model, params)
    return model


def model_from_torch_state_dict(state_dict: dict[str, np.ndarray], source: str = "state dict") -> FIDInceptionV3:
    """`model_from_tensors` of a state dict already in memory (name -> NumPy array)."""
    shapes = {name: tuple(np.shape(value)) for name, value in state_dict.items()}
    return model_from_tensors(TensorSource(shapes, lambda name: state_dict[name], source))


def save_params(model: FIDInceptionV3, path: str | os.PathLike) -> None:
    """Writes the parameters to an `.npz` of flat name -> float32 array (our layout), for `load_inception`."""
    np.savez(path, **flat_params(model))


def load_inception(path: str | os.PathLike) -> FIDInceptionV3:
    """The FID Inception-v3 with weights from an `.npz` written by `save_params`, or from pytorch-fid's `.pth`
    (read only through `torch.load(weights_only=True)`, so torch must be installed: `diffusion_jax[torch]`) or a
    `.safetensors` of its state dict (`diffusion_jax.convert.source`). Raises ConfigError naming
    `eval.inception_weights` when the file is missing or does not hold exactly this network's parameters."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"eval.inception_weights: {str(path)!r} not found. Nothing is downloaded automatically: fetch "
            f"{FID_WEIGHTS_URL} (or convert it once to .npz with save_params) and pass its path."
        )
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            return model_from_params({name: f[name] for name in f.files}, str(path))
    return model_from_tensors(open_source(path, field="eval.inception_weights"))


# --------------------------------------------------------------------------------------------
# The batched feature extractor.


def _check_images(images: np.ndarray) -> None:
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images: expected [N, H, W, C] with C = 1 or 3 (NHWC), got shape {images.shape}")
    if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images: expected uint8, or float in [0, 1], got dtype {images.dtype}")


def _as_unit_rgb(images: np.ndarray) -> np.ndarray:
    """uint8 [n, H, W, C] or float in [0, 1], C in {1, 3} -> float32 [n, H, W, 3] in [0, 1] (on the host)."""
    if images.dtype == np.uint8:
        x = images.astype(np.float32) / np.float32(255.0)
    else:
        x = images.astype(np.float32)
        if not np.all((x >= 0.0) & (x <= 1.0)):
            raise ValueError(
                f"images: float images must lie in [0, 1] (pytorch-fid's input range); got values in "
                f"[{np.nanmin(x):.3g}, {np.nanmax(x):.3g}] (map [-1, 1] data with (x + 1) / 2)"
            )
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


class InceptionFeatures:
    """pool3 features and logits of the FID Inception-v3 for images, with pytorch-fid's pipeline:
    uint8 -> x / 255 (floats must be in [0, 1]), grey -> 3 channels, bilinear resize to
    `image_size` (see `preprocess`), x -> 2x - 1.

    Images run in batches of `batch_size`, the last one padded, so one shape is compiled per input
    resolution. `weights`: a path (`.npz` or pytorch-fid's `.pth`, see `load_inception`) or a network.
    `image_size` other than 299 is for tests and experiments: FID is defined at 299.
    """

    def __init__(
        self,
        weights: str | os.PathLike | FIDInceptionV3,
        *,
        batch_size: int = 50,
        image_size: int = FID_IMAGE_SIZE,
    ):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if image_size < MIN_IMAGE_SIZE:
            raise ConfigError(f"image_size must be >= {MIN_IMAGE_SIZE} for Inception-v3, got {image_size}")
        self.batch_size = batch_size
        self.image_size = image_size
        model = weights if isinstance(weights, FIDInceptionV3) else load_inception(weights)
        graphdef, self._state = nnx.split(model)

        def forward(state: nnx.State, images: jax.Array) -> tuple[jax.Array, jax.Array]:
            # images: [batch_size, H, W, 3] float32 in [0, 1] -> ([batch_size, 2048], [batch_size, 1008])
            return nnx.merge(graphdef, state)(preprocess(images, image_size))

        self._forward = jax.jit(forward)

    def __call__(self, images: np.ndarray | jax.Array) -> tuple[np.ndarray, np.ndarray]:
        """images: uint8 [N, H, W, C] or float in [0, 1], C = 1 or 3 ->
        (pool3 [N, 2048] float32, logits [N, 1008] float32) as NumPy arrays."""
        images = np.asarray(images)
        _check_images(images)
        n, bs = images.shape[0], self.batch_size
        outputs = []
        for start in range(0, n, bs):
            chunk = _as_unit_rgb(images[start : start + bs])  # converted per batch: host memory stays O(batch)
            if len(chunk) < bs:
                chunk = np.concatenate([chunk, np.zeros((bs - len(chunk), *chunk.shape[1:]), chunk.dtype)])
            outputs.append(self._forward(self._state, chunk))  # dispatched asynchronously
        if not outputs:
            return np.zeros((0, POOL_DIM), np.float32), np.zeros((0, NUM_CLASSES), np.float32)
        pools, logits = zip(*jax.device_get(outputs), strict=True)
        return np.concatenate(pools)[:n], np.concatenate(logits)[:n]
