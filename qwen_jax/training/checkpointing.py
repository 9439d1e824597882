"""Training checkpoints: orbax `CheckpointManager` under `<workdir>/checkpoints/<step>/`.

Each step folder holds two items:
  state   the train state (`training/state.py`), every array restored straight into its sharding
  data    the data iterator position (grain state, JSON), so a resumed run sees the next batch
Saves are asynchronous (training continues while arrays are written); orbax writes into a
temporary folder and renames it when complete, so a process killed mid-save leaves the previous
checkpoint as the latest. `keep` bounds how many are kept.
"""

from __future__ import annotations

import os
from pathlib import Path

import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


class Checkpoints:
    """Saves every `every` steps (and when forced), keeps `keep`, restores the latest."""

    def __init__(self, workdir: str | os.PathLike, *, every: int, keep: int, async_save: bool = True):
        if every < 1 or keep < 1:
            raise ValueError(f"config.checkpoint.every={every} and .keep={keep} must both be >= 1")
        self.every = every
        self.directory = Path(workdir).absolute() / CHECKPOINT_DIR
        # The interval is decided here (orbax would also save the first step it sees).
        options = ocp.CheckpointManagerOptions(save_interval_steps=1, max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: dict, data_state: dict, *, force: bool = False) -> bool:
        """Starts saving when `step` is a multiple of `every` (or forced); True if a save was started."""
        if not (force or step % self.every == 0) or step == self.manager.latest_step():
            return False
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)

    def restore(self, step: int, abstract_state: dict) -> tuple[dict, dict]:
        """(train state in the shardings of `abstract_state`, data iterator state) at `step`."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return restored["state"], restored["data"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
