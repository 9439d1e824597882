"""`python -m qwen_jax.plan` on a 2-block slice of the real width: it compiles the DMD2 steps and
the sequence-sharded sampler for 8 simulated devices and reports XLA's memory beside the floor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from launch import xla_flags

REPO = Path(__file__).resolve().parents[1]


def run_plan(tmp_path, *args):
    env = {**os.environ, "XLA_FLAGS": xla_flags()}  # the command sets its own device count
    out = tmp_path / "plan.jsonl"
    proc = subprocess.run([sys.executable, "-m", "qwen_jax.plan", *args, "--json", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    return proc, ([json.loads(line) for line in out.read_text().splitlines()] if out.exists() else [])


def test_plan_compiles_dmd2_steps_and_sharded_sampling(tmp_path):
    small = ["--config.plan.layers=1", "--config.data.resolution=256", "--config.data.batch_size=8",
             "--text_tokens=32", "--devices=8", "--config.gan.gen_weight=0", "--config.gan.disc_weight=0"]
    proc, rows = run_plan(tmp_path, "--config=configs/dmd2.py:lora_h100x8", *small)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r["job"] for r in rows] == ["generator", "critic"]
    for r in rows:
        c = r["compiled_gib"]
        assert abs(c["peak"] - (c["arguments"] + c["outputs"] - c["aliased"] + c["temporaries"])) < 0.01
        assert c["aliased"] > 0  # the state is donated
        # nothing replicated (GAN off: its heads are): adapters, their Adam moments, the frozen base
        assert r["arguments_per_device_gib"] < 1.05 * r["floor_arguments_gib"]
        assert r["ratio_to_floor"] > 0 and r["hbm_gib"] == 80.0 and r["flops_xla"] > 0
        # the floor: an FSDP split of the arguments, our activations, one gathered block (weights split 8 ways)
        parts = r["floor_arguments_gib"] + r["floor_activations_gib"] + r["floor_gathered_gib"]
        assert r["floor_gathered_gib"] > 0 and abs(r["floor_gib"] - parts) < 0.005
        assert r["compiler_options"] == {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}
    assert "ratio" in proc.stdout and "generator" in proc.stdout

    proc, rows = run_plan(tmp_path, "--config=configs/dmd2.py:sample_2k", "--config.plan.layers=1",
                          "--config.plan.sample_resolution=512", "--text_tokens=32", "--devices=8")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r["job"] for r in rows] == ["sample"] and "'sequence': 2" in proc.stdout


def test_plan_refuses_bad_flags(tmp_path):
    proc, _ = run_plan(tmp_path, "--config=configs/dmd2.py:lora_h100x8", "--devices=6", "--config.plan.layers=1")
    assert proc.returncode != 0 and "needs 8 devices, found 6" in proc.stderr
    proc, _ = run_plan(tmp_path, "--config=configs/dmd2.py", "--only=train", "--devices=2")
    assert proc.returncode != 0 and "--only" in proc.stderr


def test_accelerator_like_compile_drops_the_cpu_fp32_weight_stacks():
    # XLA:CPU converts bf16 dot operands to fp32 and, with loop-invariant code motion on, hoists
    # that conversion of the whole scanned weight stack out of the loop. The plan compiles with
    # the pass off; the regex that measures the artifact must see it only with the pass on.
    import jax
    import jax.numpy as jnp

    from qwen_jax.xla_memory import ACCELERATOR_LIKE, cpu_upcast_bytes

    layers, width = 6, 256

    def loss(stack, x):
        h, _ = jax.lax.scan(jax.checkpoint(lambda h, w: (jnp.tanh(h @ w), None)), x, stack)
        return jnp.sum(h.astype(jnp.float32))

    args = (jax.ShapeDtypeStruct((layers, width, width), jnp.bfloat16), jax.ShapeDtypeStruct((64, width), jnp.bfloat16))
    lowered = jax.jit(jax.grad(loss)).lower(*args)
    hoisting, accelerator_like = lowered.compile(), lowered.compile(compiler_options=ACCELERATOR_LIKE)
    assert cpu_upcast_bytes(hoisting, layers) >= 4 * layers * width * width
    assert cpu_upcast_bytes(accelerator_like, layers) == 0
    temps = [c.memory_analysis().temp_size_in_bytes for c in (hoisting, accelerator_like)]
    assert temps[1] < temps[0] - 2 * layers * width * width, temps
