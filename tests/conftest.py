"""Test setup: 8 simulated CPU devices, full-precision matmuls, and tiny reference models."""

import atexit
import os
import shutil
import tempfile

# Must happen before jax initialises its backend. The suite is mostly XLA compiles of small
# programs that then run for milliseconds, and a third of a compile is LLVM optimising the CPU
# code: at level 0 the suite needs about a third less CPU time. The programs (HLO, sharding,
# memory plans) are the same; only the machine code is less tuned, and rounds a few ops
# (erf_inv, so the toy family's text encoder draw) in other last bits, as another backend would.
# Speed is measured by bench/, at the default level.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                           " --xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Conversions and the toy family's shared parts (built on first use of a models/toy folder) go to
# a cache of this run's own, never the user's ~/.cache: a fresh machine's first use is what CI tests.
if "QWEN_JAX_CACHE" not in os.environ:
    os.environ["QWEN_JAX_CACHE"] = tempfile.mkdtemp(prefix="qwen_jax_cache_")
# One persistent XLA compilation cache for the whole run: in-process tests, both xdist workers
# (they inherit the controller's environment) and every CLI a test launches. The same small
# programs compile again and again (each model's random init, the toy family's text encoder, a
# sampler, a run's train step and its resume), and a repeat loads the executable instead. It is
# fresh per run and removed by the process that made it, so nothing depends on an earlier run;
# every program is cached, however fast it compiled. A loaded executable is the compiled one: the
# same numbers, HLO text, memory and cost analyses.
if "QWEN_JAX_TEST_XLA_CACHE" not in os.environ:
    os.environ["QWEN_JAX_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="qwen_jax_tests_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["QWEN_JAX_TEST_XLA_CACHE"], ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["QWEN_JAX_TEST_XLA_CACHE"]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


# `make test` runs two xdist workers that each take whole files (--dist loadfile). xdist queues
# the files with the most tests first, which leaves the slowest ones (a few tests of minutes
# each) for last, one worker finishing them while the other idles. These files go first instead,
# slowest first (a file not named follows them, in its usual order); a stale order only costs
# time, never a test.
SLOWEST_FIRST = (
    "test_distillation_train.py",
    "test_train.py",
    "test_toy_training.py",
    "test_attention_kernels.py",
    "test_train_multiprocess.py",
    "test_toy_models.py",
    "test_plan.py",
    "test_transformer_model.py",
    "test_pipeline.py",
    "test_data_cache.py",
    "test_lora.py",
    "test_conversion.py",
    "test_sequence_parallel.py",
    "test_transformer_parity.py",
    "test_distillation_losses.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


def pytest_configure(config):
    """--dist loadfile hands out files in the collection order above (xdist >= 3.6 reorders them
    by test count unless told not to; older versions keep the order anyway)."""
    config.option.loadscopereorder = False
