"""`make demo`: the toy world from a fresh clone, on a CPU, in under 10 minutes.

    python -m qwen_jax.toy.demo [--out runs/demo] [--seeds 2] [--retrain [--train-steps N]]
                                [--pcm-steps 150] [--dmd2-steps 150] [--no-distill]

1. takes the committed teacher (`models/toy/teacher`: a trained transformer and the digest of the
   text encoder it was trained with; the family's shared parts are regenerated from their seed
   on first use, a different encoder refused: `toy/folders.py`); with --retrain it trains the
   teacher first (`configs/flow_matching.py:toy`, the committed recipe);
2. distills a 2-step student from it: the full recipe of `qwen_jax.toy.distill` (PCM warm start,
   then DMD2 + GAN + the regression on teacher pairs, one pair per prompt and seed), shortened
   (150 + 150 iterations, the regression throughout: no second phase without it at this length;
   --no-distill skips it);
3. evaluates on the 168 prompts (`qwen_jax.eval.toy`): the teacher at 50 steps with CFG, the
   teacher at 2 Euler steps (sigmas 1 -> 0.75 -> 0), the student at 2 steps without CFG;
4. prints one table and writes `runs/demo/compare.png` (the same prompts and seeds side by side).

Every model folder it uses or leaves (the teacher, <out>/student) loads with `python -m qwen_jax.sample --model`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from qwen_jax.conversion.errors import ConversionError

REPO = Path(__file__).resolve().parents[2]


def retrain(out: Path, steps: int | None) -> Path:
    """Trains the teacher with the committed recipe (from models/toy/init); returns its export, a
    pipeline folder."""
    workdir = out / "teacher_run"
    cmd = [sys.executable, "-m", "qwen_jax.train", f"--config={REPO / 'configs' / 'flow_matching.py'}:toy",
           f"--workdir={workdir}"]
    if steps:
        cmd.append(f"--config.total_steps={steps}")
    print("training the teacher:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return workdir / "export"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwen_jax.toy.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="where the model folders, metrics and grids go")
    p.add_argument("--seeds", type=int, default=2, help="images per prompt (the issue's tables use 8)")
    p.add_argument("--prompts", nargs="+", help="a subset of the 168 captions (default: all)")
    p.add_argument("--teacher-steps", type=int, default=50, help="sampling steps of the teacher")
    p.add_argument("--guidance", type=float, default=2.0, help="the teacher's CFG scale")
    p.add_argument("--retrain", action="store_true", help="train the teacher instead of using models/toy/teacher")
    p.add_argument("--train-steps", type=int, help="with --retrain: fewer steps than the recipe (smoke runs)")
    p.add_argument("--pcm-steps", type=int, default=150, help="PCM iterations of the shortened distillation")
    p.add_argument("--dmd2-steps", type=int, default=150, help="DMD2 + GAN iterations of the shortened distillation")
    p.add_argument("--no-distill", action="store_true", help="only the teacher, at 50 and 2 steps")
    p.add_argument("--override", action="append", default=[], metavar="--config.KEY=VALUE",
                   help="extra flag for both training stages, PCM and DMD2 (e.g. --override=--config.log.every=10)")
    args = p.parse_args(argv)

    from qwen_jax.toy.distill import distill
    from qwen_jax.toy.folders import TEACHER

    start = time.perf_counter()
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    try:
        source = retrain(out, args.train_steps) if args.retrain else TEACHER
        steps = (0, 0) if args.no_distill else (args.pcm_steps, args.dmd2_steps)
        distill(out, pcm_steps=steps[0], dmd2_steps=steps[1], seeds=args.seeds, prompts=args.prompts,
                teacher_steps=args.teacher_steps, guidance=args.guidance, teacher_source=source,
                pairs_per_prompt=args.seeds, extra_pcm=args.override, extra_dmd2=args.override)
    except (FileExistsError, FileNotFoundError, ValueError, ConversionError, subprocess.CalledProcessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"demo finished in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
