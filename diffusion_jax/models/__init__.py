"""Denoising networks, registered by name for configs (`model.name`).

Every model is a Flax NNX module called as
`model(x, t, cond=None, train=False, *, rngs=None)` and returns an array shaped
like `x` (twice the channels with `learn_sigma=True`); the noise-aware classifier
('classifier') returns logits [B, num_classes] instead. Models hold only
`nnx.Param` state; dropout keys come from the call (`rngs=nnx.Rngs(dropout=key)`).
"""

from collections.abc import Callable

import jax
from flax import nnx

from diffusion_jax.models import dit, layers
from diffusion_jax.models.classifier import EncoderUNet
from diffusion_jax.models.controlnet import ControlledUNet
from diffusion_jax.models.dit import DiT
from diffusion_jax.models.first_stage import FirstStage
from diffusion_jax.models.mlp import MLP
from diffusion_jax.models.preconditioned import Preconditioned
from diffusion_jax.models.unet import UNet
from diffusion_jax.models.vdm_network import VDMNetwork
from diffusion_jax.registry import Registry

MODELS: Registry[Callable[..., nnx.Module]] = Registry("model", "model.name")
MODELS.register("autoencoder_kl")(FirstStage)  # training.objective='autoencode'
MODELS.register("classifier")(EncoderUNet)
MODELS.register("controlnet_unet")(ControlledUNet)  # a frozen U-Net steered by a ControlNet
MODELS.register("dit")(DiT)
for _name in dit.VARIANTS:  # 'DiT-S/2' ... 'DiT-XL/8', the paper's Table 4
    MODELS.register(_name)(dit.variant(_name))
MODELS.register("mlp")(MLP)
MODELS.register("unet")(UNet)


def create(name: str, *, rngs: nnx.Rngs, **kwargs) -> nnx.Module:
    """Build the model registered as `name` with constructor arguments `kwargs`.

    An unknown name raises ValueError naming `model.name` and the choices.
    """
    return MODELS.get(name)(rngs=rngs, **kwargs)


def names() -> list[str]:
    """The registered model names, sorted."""
    return MODELS.names()


def count_params(make: Callable[[], nnx.Module]) -> int:
    """Number of parameters of the model `make()` builds, found with `nnx.eval_shape`.

    Nothing is allocated: e.g. `count_params(lambda: create("unet", rngs=nnx.Rngs(0), ...))`.
    """
    abstract = nnx.eval_shape(make)
    return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


__all__ = [
    "MLP", "MODELS", "ControlledUNet", "DiT", "EncoderUNet", "FirstStage", "Preconditioned", "UNet", "VDMNetwork",
    "count_params", "create", "dit", "layers", "names",
]
