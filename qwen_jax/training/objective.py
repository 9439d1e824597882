"""What the training loop (`train.py`) asks of an objective, and the common single-optimiser case.

An objective is a class built as `Objective(config, graphdef, params, frozen, mesh)` with:
  check_config(config)          static: config errors found before anything is loaded;
  needs_negative                whether batches must carry the unconditional prompt's states;
  init_state() / abstract_state()
                                the train state, fresh or as the target a checkpoint restores into;
  shardings                     the state's NamedShardings;
  step(state, frozen, batch, step) -> (state, metrics);
  student(state, use_ema)       the trainable tree that samples, is evaluated and exported.

`SingleOptimizer` holds the parts shared by objectives with one trainable tree and one optax
optimiser (flow matching, PCM); DMD2 has two and defines its own state.
"""

from __future__ import annotations

from qwen_jax.training import optim
from qwen_jax.training import state as state_lib


class SingleOptimizer:
    """State {step, params, opt_state[, ema]} over one trainable tree; subclasses jit `step`."""

    needs_negative = False

    @staticmethod
    def check_config(config) -> None:
        """No objective-specific config errors (the shared ones are checked by `train.py`)."""

    def __init__(self, config, params: dict, mesh):
        self.config, self.params = config, params
        self.tx, self.schedule = optim.make_optimizer(config.optim, config.total_steps)
        self.shardings = state_lib.state_shardings(self.tx, params, mesh, ema=config.ema.decay > 0)

    def init_state(self) -> dict:
        state = state_lib.create_train_state(self.tx, self.params, self.shardings)
        self.params = None  # the state owns the weights now
        return state

    def abstract_state(self) -> dict:
        return state_lib.abstract_train_state(self.tx, self.params, self.shardings)

    def student(self, state: dict, use_ema: bool) -> dict:
        return state["ema"] if use_ema and "ema" in state else state["params"]
