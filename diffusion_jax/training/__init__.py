"""The training system: state, optimiser, step, mesh, checkpoints, loop (DESIGN §3)."""
