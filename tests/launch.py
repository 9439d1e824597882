"""The environment of the training CLIs that tests launch as subprocesses.

Those launches compile the same programs again and again (a straight run, a killed one and its
resume; two processes, then both resuming). They inherit the run's persistent XLA compilation
cache from os.environ (conftest.py), so a repeat loads the executable instead of compiling it.
(In a multi-process job only process 0 writes the cache, and the other's programs differ in
their keys: process 1 compiles at every launch.)
"""

import os


def subprocess_env(**extra: str) -> dict[str, str]:
    """os.environ (which carries the run's compilation cache) plus `extra`."""
    return {**os.environ, **extra}
