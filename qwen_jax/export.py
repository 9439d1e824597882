"""Export a training checkpoint as a pipeline folder (and LoRA adapters), at any saved step.

    python -m qwen_jax.export --workdir runs/ft                 # latest step, EMA if trained with one
    python -m qwen_jax.export --workdir runs/ft --step 1500 --no-ema --out runs/ft/export-1500

Writes what training writes at its end (`training/export.py`): <out>/transformer (LoRA merged),
the base pipeline's other components, and <out>/lora.safetensors under LoRA. The run's
`config.json` says how to rebuild the model; the checkpoint is restored onto this host's devices.
Then `tools/convert_weights.py --to diffusers <out>/transformer DIR` gives a diffusers folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwen_jax.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a training workdir (config.json, checkpoints/)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights even if an EMA was kept")
    p.add_argument("--out", help="output folder (default: <workdir>/export-<step>)")
    args = p.parse_args(argv)

    import jax
    import ml_collections

    from qwen_jax import sharding as sharding_lib
    from qwen_jax.conversion.errors import ConversionError
    from qwen_jax.train import OBJECTIVES, load_model
    from qwen_jax.training.checkpointing import Checkpoints
    from qwen_jax.training.export import export_run

    workdir = Path(args.workdir)
    try:
        config_file = workdir / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{workdir}: not a training workdir (no config.json)")
        config = ml_collections.ConfigDict(json.loads(config_file.read_text()))
        ckpt = Checkpoints(workdir, every=1, keep=max(1, config.checkpoint.keep))
        steps = ckpt.all_steps()
        step = args.step if args.step is not None else (max(steps) if steps else None)
        if step is None or step not in steps:
            raise FileNotFoundError(f"{workdir}: no checkpoint at step {step} (saved: {steps or 'none'})")
        mesh = sharding_lib.make_mesh(1, -1, 1, devices=jax.local_devices())
        objective = OBJECTIVES.get(config.get("objective", "flow_matching"))
        if objective is None:
            raise ValueError(f"{config_file}: unknown objective {config.objective!r}")
        graphdef, params, frozen = load_model(config, mesh)
        # The run's own objective knows its state (DMD2's holds a generator, a fake score, heads
        # and two optimisers) and which tree is the student.
        trainer = objective(config, graphdef, params, frozen, mesh)
        state, _ = ckpt.restore(step, trainer.abstract_state())
        ckpt.close()
        use_ema = not args.no_ema and "ema" in state
        weights = trainer.student(state, use_ema)
        out = Path(args.out) if args.out else workdir / f"export-{step}"
        export_run(out, graphdef, weights, frozen, pipeline=config.model.pretrained, lora=config.model.lora_rank > 0)
    except (FileNotFoundError, ValueError, ConversionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} (step {step}, {'EMA' if use_ema else 'raw'} weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
