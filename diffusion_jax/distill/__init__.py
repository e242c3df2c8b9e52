"""Few-step generation from a trained diffusion model: progressive distillation (`progressive`)."""
