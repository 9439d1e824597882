"""What XLA's compile of a program holds: its memory analysis, read the same way everywhere, and
the compile options and HLO accounting that keep XLA:CPU's own artifacts out of a memory plan
(`qwen_jax.plan`). Importable without the plan's command-line flags."""

from __future__ import annotations

import math
import re

# XLA:CPU has no native bf16 matmul: it converts bf16 dot operands to fp32, and its
# while-loop-invariant code motion then rewrites convert(dynamic-slice(stack)) in the scanned
# layer loop as a slice of convert(stack), hoisted out of the loop: a fp32 copy of every weight
# stack, live for the whole loop (f32[60, 3072, 12288] beside its bf16 original). GPU and TPU
# compilers multiply bf16 natively, so there is nothing for that pass to hoist there. The plan
# switches the pass off for its CPU compile, so the memory it reads is the accelerator program's
# and not this artifact (`--cpu_hoisting` keeps the CPU default; `docs/scaling.md` shows both).
ACCELERATOR_LIKE = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


def compiled_memory(compiled) -> dict:
    """Bytes per device of a compiled program: arguments, outputs, aliased (donated), temporaries,
    and the peak they imply. Empty where the backend gives no memory analysis."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
           "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes}
    out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
    return out


_UPCAST = re.compile(r"ROOT %convert[\w.]* = f32\[(\d+(?:,\d+)*)\]\{[^}]*\} convert\(")


def cpu_upcast_bytes(compiled, num_layers: int) -> int:
    """Bytes of the fp32 copies XLA:CPU makes of stacked (layer-first) weights before layer loops.

    The CPU backend has no native bf16 matmul: it converts bf16 dot operands to fp32, and for the
    scanned weights it converts whole stacks at once. GPU and TPU compilers multiply bf16
    natively, so these buffers are an artifact of planning on a CPU. Counted from the optimised
    HLO: fused computations whose root converts a stack of `num_layers` layers to f32. Compiled
    with `ACCELERATOR_LIKE`, the hoisted copies are gone and what remains is counted (e.g. a
    sharded fp32 copy for an update). Forward and backward loops convert separately and are not
    all live at the peak, so this bounds the artifact's share of the peak from above; the plan
    reports it and does not subtract it.
    """
    total = 0
    for match in _UPCAST.finditer(compiled.as_text()):
        dims = [int(d) for d in match.group(1).split(",")]
        if dims[0] == num_layers and len(dims) > 1:
            total += 4 * math.prod(dims)
    return total
