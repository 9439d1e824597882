"""Test setup: 8 simulated CPU devices, full-precision matmuls, and tiny reference models."""

import os

# Must happen before jax initialises its backend.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
