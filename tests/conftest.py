"""Test setup: 8 simulated CPU devices, full-precision matmuls, and tiny reference models."""

import os

# Must happen before jax initialises its backend.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Conversions and the toy family's shared parts (built on first use of a models/toy folder) go to
# a cache of this run's own, never the user's ~/.cache: a fresh machine's first use is what CI tests.
if "QWEN_JAX_CACHE" not in os.environ:
    import tempfile

    os.environ["QWEN_JAX_CACHE"] = tempfile.mkdtemp(prefix="qwen_jax_cache_")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
