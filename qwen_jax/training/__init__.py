"""Training: one loop (`qwen_jax.train`) for every objective, on any device mesh.

    config ─> mesh ─> data (grain Loader) ─> Conditioner (frozen VAE + text encoder, or a cache)
                                                   │ latents, prompt states, mask
                                                   v
    TrainState {step, params, opt_state, ema} ─> objective.train_step (jit, donated) ─> metrics
                                                   │
                      Checkpoints (orbax, async, resume) · MetricWriter (console, TB, jsonl) · export
"""
