"""The training system: state, optimiser, step, mesh, checkpoints, loop (DESIGN §3).

A run in a notebook, with the same parts `main` uses:

    exp = dj.training.experiment.build(config)             # model, process, optimiser, mesh; validates config
    state = exp.init_state()
    train_step = dj.training.experiment.jit_train_step(exp, config)  # state, batch -> state, metrics
    batches = dj.training.experiment.training_batches(exp, config)
    for _ in range(100):
        state, metrics = train_step(state, next(batches))
    model = dj.training.experiment.trained_model(exp, config, state)  # what dj.load gives: model.sample(...)
    dj.training.loop.train(config, workdir)                 # or the whole loop: checkpoints, logs, samples
"""

import importlib
import pkgutil
from types import ModuleType

SUBMODULES = frozenset(module.name for module in pkgutil.iter_modules(__path__))


def __getattr__(name: str) -> ModuleType:
    """Submodules on first use (`dj.training.experiment`): they import orbax, grain and the models."""
    if name in SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
