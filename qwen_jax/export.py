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
    from qwen_jax.train import load_model
    from qwen_jax.training import optim, state as state_lib
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
        graphdef, params, frozen = load_model(config, mesh)
        tx, _ = optim.make_optimizer(config.optim, config.total_steps)
        shardings = state_lib.state_shardings(tx, params, mesh, ema=config.ema.decay > 0)
        state, _ = ckpt.restore(step, state_lib.abstract_train_state(tx, params, shardings))
        ckpt.close()
        weights = state["params"] if args.no_ema or "ema" not in state else state["ema"]
        out = Path(args.out) if args.out else workdir / f"export-{step}"
        export_run(out, graphdef, weights, frozen, pipeline=config.model.pretrained, lora=config.model.lora_rank > 0)
    except (FileNotFoundError, ValueError, ConversionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} (step {step}, {'raw' if weights is state['params'] else 'EMA'} weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
