"""Block-by-block comparison of a PyTorch model and its import, for parity tests that say where they diverge;
`randomised` perturbs every parameter of a reference model first, so no zero-initialised layer hides a wrong
mapping.

`first_divergence` runs the torch model once with forward hooks on the named submodules, feeds each
submodule's recorded inputs (NCHW -> NHWC) to our corresponding module, and returns the first block, in the
torch model's execution order, whose output differs by more than `tol` relative to its scale.
"""

from collections.abc import Callable, Sequence

import numpy as np
import torch

Block = tuple[str, Callable[..., object], Callable[[tuple], tuple]]  # (torch name, our call, inputs adapter)


def to_nhwc(t: torch.Tensor) -> np.ndarray:
    a = t.detach().float().numpy()
    return a.transpose(0, 2, 3, 1) if a.ndim == 4 else a


def relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(ours) - theirs)) / max(float(np.max(np.abs(theirs))), 1e-6))


def first_divergence(torch_model: torch.nn.Module, run: Callable[[], object], blocks: Sequence[Block],
                     tol: float = 1e-4) -> str | None:
    """'<torch name>: relative error e' of the first of `blocks` whose output our module does not reproduce
    from the same inputs, or None when every block agrees."""
    records: dict[str, tuple[tuple, object]] = {}
    order: list[str] = []
    handles = []
    for name, _, _ in blocks:
        module = torch_model.get_submodule(name)

        def hook(module, args, kwargs, output, name=name):
            records[name] = (args + tuple(kwargs.values()), output)
            order.append(name)

        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    calls = {name: (ours, adapt) for name, ours, adapt in blocks}
    for name in order:
        args, output = records[name]
        ours, adapt = calls[name]
        output = output[0] if isinstance(output, tuple) else output
        error = relative_error(np.asarray(ours(*adapt(args))), to_nhwc(output))
        if error > tol:
            return f"{name}: relative error {error:.2e}"
    return None


def randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """`model` with every parameter perturbed (no zero-initialised layer hides a wrong mapping)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=generator))
    return model.eval()


def saved_and_imported(model: torch.nn.Module, folder, config, example_shape: tuple[int, ...]) -> tuple:
    """`model` (a diffusers model) saved to `folder` with `save_pretrained`, then imported into `config`'s model
    for examples of `example_shape`: (graphdef, params)."""

    from diffusion_jax import convert
    from diffusion_jax.training.setup import build_model

    model.save_pretrained(folder)
    graphdef, init = build_model(config, example_shape)
    return graphdef, convert.import_weights(config, init, example_shape, folder)
