"""The environment of the training CLIs that tests launch as subprocesses.

Those launches compile the same programs again and again (a straight run, a killed one and its
resume; two processes, then both resuming). They inherit the run's persistent XLA compilation
cache from os.environ (conftest.py), so a repeat loads the executable instead of compiling it.
(In a multi-process job only process 0 writes the cache, and the other's programs differ in
their keys: process 1 compiles at every launch.)
"""

import os


def xla_flags(device_count: int | None = None) -> str:
    """The run's XLA_FLAGS (conftest.py's) with the simulated CPU device count set to
    `device_count`, or left to the launched command (None)."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join(flags + ([f"--xla_force_host_platform_device_count={device_count}"] if device_count else []))


def subprocess_env(**extra: str) -> dict[str, str]:
    """os.environ (which carries the run's compilation cache) plus `extra`."""
    return {**os.environ, **extra}
