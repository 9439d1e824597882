"""The environment of the training CLIs that tests launch as subprocesses.

Those launches compile the same programs again and again (a straight run, a killed one and its
resume; two processes, then both resuming), so they share a persistent XLA compilation cache for
the session: a repeat loads the executable instead of compiling it. In-process tests do not use
it (some of them read compiled HLO and memory statistics).
"""

import atexit
import os
import shutil
import tempfile

COMPILATION_CACHE = tempfile.mkdtemp(prefix="qwen_jax_tests_xla_cache_")
atexit.register(shutil.rmtree, COMPILATION_CACHE, ignore_errors=True)


def subprocess_env(**extra: str) -> dict[str, str]:
    """os.environ plus the shared compilation cache (every program cached, however fast it compiled)."""
    return {**os.environ, "JAX_COMPILATION_CACHE_DIR": COMPILATION_CACHE,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", **extra}
