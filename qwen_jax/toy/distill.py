"""The toy distillation, one command: PCM warm start -> teacher pairs -> DMD2 + GAN + regression
for 1000 iterations -> DMD2 + GAN alone for 750 more.

    python -m qwen_jax.toy.distill --out runs/toy_distill                                    # the full recipe
    python -m qwen_jax.toy.distill --out runs/abl_dmd2 --pcm-steps 0 --regression 0          # DMD2 + GAN only
    python -m qwen_jax.toy.distill --out runs/abl_pcm --dmd2-steps 0                         # PCM only
    python -m qwen_jax.toy.distill --out runs/abl_nogan --pcm-steps 0 --regression 0 --no-gan  # DMD2 alone

Stages are `python -m qwen_jax.train` runs of configs/pcm.py:toy and configs/dmd2.py:toy, with
the teacher's ODE pairs for DMD2's regression term made in between by
`python -m qwen_jax.distillation.ode_pairs` (each stage resumable: run the command again after
an interruption). The regression pins the student's noise -> image map to the teacher's; its
MSE toward samples a 2-step student cannot match exactly also blurs a little, so the last
iterations drop it (`dmd2.regression_until`) and DMD2 + GAN sharpen the edges again
(docs/distillation.md, "Toy results"). Then it evaluates on the 168 prompts:
the teacher at 50 steps with CFG, the teacher at 2 Euler steps, the student at 2 steps without
CFG; prints the table and writes `compare.png` (the three side by side, same prompts and seeds)
and `results.json`. The student is left as a pipeline folder in <out>/student.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from qwen_jax.conversion.errors import ConversionError

REPO = Path(__file__).resolve().parents[2]
COMPARE_PROMPTS = 12
REGRESSION_WEIGHT = 1.0  # DMD2's weight on the teacher-pair regression (docs/distillation.md)
REGRESSION_STEPS = 1000  # DMD2 iterations with the regression; the rest are DMD2 + GAN alone


def train_stage(name: str, out: Path, teacher: Path, steps: int, overrides: list[str]) -> Path:
    """Runs configs/<name>.py:toy for `steps` iterations in <out>/<name>; returns its export folder."""
    workdir = out / name
    cmd = [sys.executable, "-m", "qwen_jax.train", f"--config={REPO / 'configs' / f'{name}.py'}:toy",
           f"--workdir={workdir}", f"--config.model.pretrained={teacher}", f"--config.total_steps={steps}",
           *overrides]
    if not (workdir / "export" / "transformer").is_dir():
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True)
    return workdir / "export"


def teacher_pairs(out: Path, teacher: Path, per_prompt: int, steps: int, guidance: float) -> Path:
    """The teacher's ODE pairs for DMD2's regression term (`ode_pairs.py`): per_prompt samples of
    each of the 168 prompts at the evaluation's teacher setting; <out>/pairs.npz, made once."""
    path = out / "pairs.npz"
    if not path.is_file():
        cmd = [sys.executable, "-m", "qwen_jax.distillation.ode_pairs", f"--model={teacher}", "--toy-prompts",
               f"--per-prompt={per_prompt}", f"--steps={steps}", f"--guidance={guidance}", "--batch-size=168",
               f"--out={path}"]
        print(f"== pairs: {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True)
    return path


def evaluate(rows: dict[str, tuple[Path, dict]], out: Path, prompts, seeds: int) -> dict:
    """Evaluates each (model, sampler kwargs), prints the table, writes compare.png and results.json."""
    from qwen_jax.eval import toy_metrics
    from qwen_jax.eval.toy import evaluate_model

    shown = sorted({round(i * (len(prompts) - 1) / max(1, COMPARE_PROMPTS - 1)) for i in range(COMPARE_PROMPTS)})
    results, panels = {}, {}
    for label, (model, kw) in rows.items():
        print(f"== evaluating {label}", flush=True)
        name = "eval_" + label.replace(" ", "_").replace(",", "")
        metrics, images, _ = evaluate_model(model, out / name, prompts=prompts, seeds=seeds, progress=False, **kw)
        results[label] = {k: v for k, v in metrics.items() if k != "per_prompt"}
        panels[label] = images.reshape(len(prompts), seeds, *images.shape[1:])[shown].reshape(-1, *images.shape[1:])
    toy_metrics.save_comparison(panels, out / "compare.png", cols=seeds)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    print()
    print(toy_metrics.format_comparison(results))
    print(f"\n{len(prompts)} prompts x {seeds} seeds; grid (same prompts and seeds per column): {out / 'compare.png'}")
    return results


def distill(out: Path, *, pcm_steps: int, dmd2_steps: int, gan: bool = True, extra_pcm=(), extra_dmd2=(),
            seeds: int = 8, prompts=None, teacher_steps: int = 50, guidance: float = 2.0,
            teacher_source: Path | None = None, regression: float = REGRESSION_WEIGHT,
            regression_steps: int | None = None, pairs_per_prompt: int = 8) -> dict:
    """PCM then DMD2 (either may be 0 steps) from the committed teacher (or `teacher_source`, a
    folder like models/toy/teacher), then the evaluation; returns {label: metrics}. With
    `regression` > 0, DMD2 also regresses on `pairs_per_prompt` teacher samples per prompt, for
    its first `regression_steps` iterations (None: all of them; 0: none)."""
    from qwen_jax.pipeline import resolve_folder
    from qwen_jax.toy import all_prompts
    from qwen_jax.toy.folders import TEACHER

    if regression_steps is not None and regression_steps < 0:
        raise ValueError(f"--regression-steps={regression_steps}: must be >= 0 (0: no regression)")
    out = out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    teacher = Path(teacher_source or TEACHER).absolute()
    resolve_folder(teacher)  # a toy model folder's shared parts are built (and checked) once, here
    student = None
    if pcm_steps:
        student = train_stage("pcm", out, teacher, pcm_steps, list(extra_pcm))
    if dmd2_steps:
        overrides = list(extra_dmd2)
        if student is not None:
            overrides.append(f"--config.distill.student_init={student / 'transformer'}")
        if not gan:
            overrides += ["--config.gan.gen_weight=0", "--config.gan.disc_weight=0"]
        if regression > 0 and regression_steps != 0:
            pairs = teacher_pairs(out, teacher, pairs_per_prompt, teacher_steps, guidance)
            overrides += [f"--config.dmd2.regression_weight={regression}", f"--config.dmd2.regression_pairs={pairs}"]
            if regression_steps is not None and regression_steps < dmd2_steps:
                overrides.append(f"--config.dmd2.regression_until={regression_steps}")
        student = train_stage("dmd2", out, teacher, dmd2_steps, overrides)
    rows = {f"teacher {teacher_steps} steps, CFG {guidance:g}": (teacher, dict(steps=teacher_steps, guidance=guidance)),
            f"teacher 2 steps, CFG {guidance:g}": (teacher, dict(steps=2, guidance=guidance))}
    if student is not None:
        link = out / "student"
        if not link.exists():
            link.symlink_to(student)
        rows["student 2 steps, CFG 1"] = (link, dict(steps=2, guidance=1.0))
    return evaluate(rows, out, list(prompts or all_prompts()), seeds)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwen_jax.toy.distill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--pcm-steps", type=int, default=1000, help="PCM iterations (0: no warm start)")
    p.add_argument("--dmd2-steps", type=int, default=1750, help="DMD2 iterations (0: PCM only)")
    p.add_argument("--no-gan", action="store_true", help="DMD2 without the GAN terms")
    p.add_argument("--regression", type=float, default=REGRESSION_WEIGHT,
                   help="weight of DMD2's regression on teacher ODE pairs (0: none)")
    p.add_argument("--regression-steps", type=int, default=REGRESSION_STEPS,
                   help="DMD2 iterations with the regression (the rest: DMD2 + GAN alone; 0: none)")
    p.add_argument("--pairs-per-prompt", type=int, default=8, help="teacher pairs per prompt for the regression")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--prompts", nargs="+")
    p.add_argument("--pcm-override", action="append", default=[], help="extra --config.* flag for the PCM stage")
    p.add_argument("--dmd2-override", action="append", default=[], help="extra --config.* flag for the DMD2 stage")
    args = p.parse_args(argv)
    start = time.perf_counter()
    try:
        distill(Path(args.out), pcm_steps=args.pcm_steps, dmd2_steps=args.dmd2_steps, gan=not args.no_gan,
                extra_pcm=args.pcm_override, extra_dmd2=args.dmd2_override, seeds=args.seeds, prompts=args.prompts,
                regression=args.regression, regression_steps=args.regression_steps,
                pairs_per_prompt=args.pairs_per_prompt)
    except (FileExistsError, FileNotFoundError, ValueError, ConversionError, subprocess.CalledProcessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"finished in {(time.perf_counter() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
