"""The optimizer from a config: AdamW with warm-up, a decay schedule and gradient clipping.

    config.optim = dict(lr, b1, b2, eps, weight_decay, warmup_steps, schedule, final_lr_fraction, grad_clip)

schedule: "constant", "cosine" or "linear", decaying from `lr` after warm-up to
`final_lr_fraction * lr` at `total_steps`. grad_clip <= 0 disables clipping.
"""

from __future__ import annotations

import optax

SCHEDULES = ("constant", "cosine", "linear")


def learning_rate_schedule(optim, total_steps: int) -> optax.Schedule:
    warmup = int(optim.warmup_steps)
    decay_steps = max(1, int(total_steps) - warmup)
    final = float(optim.lr) * float(optim.final_lr_fraction)
    if optim.schedule == "constant":
        after = optax.constant_schedule(float(optim.lr))
    elif optim.schedule == "cosine":
        after = optax.cosine_decay_schedule(float(optim.lr), decay_steps, alpha=float(optim.final_lr_fraction))
    elif optim.schedule == "linear":
        after = optax.linear_schedule(float(optim.lr), final, decay_steps)
    else:
        raise ValueError(f"config.optim.schedule={optim.schedule!r}: choose one of {SCHEDULES}")
    if warmup <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, float(optim.lr), warmup), after], [warmup])


def make_optimizer(optim, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(AdamW with clipping, its learning-rate schedule) for `config.optim`."""
    schedule = learning_rate_schedule(optim, total_steps)
    adamw = optax.adamw(schedule, b1=float(optim.b1), b2=float(optim.b2), eps=float(optim.eps),
                        weight_decay=float(optim.weight_decay))
    if float(optim.grad_clip) > 0:
        return optax.chain(optax.clip_by_global_norm(float(optim.grad_clip)), adamw), schedule
    return adamw, schedule


def apply_gradients(state: dict, grads, tx: optax.GradientTransformation, ema_decay: float = 0.0):
    """One optimizer step on a train state {"step", "params", "opt_state"[, "ema"]}.

    Returns (new state, metrics): gradient, update and parameter global norms. The EMA, when the
    state has one, is `decay * ema + (1 - decay) * params` after the update.
    """
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = {**state, "step": state["step"] + 1, "params": params, "opt_state": opt_state}
    if "ema" in state:
        new["ema"] = optax.incremental_update(params, state["ema"], 1.0 - ema_decay)
    metrics = {"grad_norm": optax.tree.norm(grads), "update_norm": optax.tree.norm(updates),
               "param_norm": optax.tree.norm(params)}
    return new, metrics
