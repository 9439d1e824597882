"""Evaluate a model on the toy world: `python -m qwen_jax.eval.toy --model DIR --out DIR`.

    python -m qwen_jax.eval.toy --model runs/demo/teacher --steps 50 --guidance 2 --out runs/demo/eval50
    python -m qwen_jax.eval.toy --model runs/demo/teacher --steps 2 --guidance 1 --out runs/demo/eval2
    python -m qwen_jax.eval.toy --model runs/toy_distill/student --steps 2 --guidance 1 --seeds 8 --breakdown --out E

Samples --seeds images for each of the 168 prompts (or --prompts), decodes them analytically
(`toy_metrics.py`) and prints the table (with --breakdown, also the toy-FD feature by
feature: which of the 10 features the distance comes from); writes metrics.json and grid.png
(one row per prompt shown, one column per seed) to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm


def sample_all(pipe, prompts, seeds: int, *, steps: int, guidance: float, sigmas, negative: str,
               batch_size: int, progress: bool = True, stochastic: bool = False) -> tuple[np.ndarray, list[str]]:
    """(images float (N, 32, 32, 3) in [0, 1], captions), prompt-major; image s of prompt k uses
    seed 1000 k + s (k = the prompt's index among the 168), whatever the subset or batch size."""
    from qwen_jax.toy import prompt_index

    jobs = [(p, s) for p in prompts for s in range(seeds)]
    images = []
    for start in tqdm(range(0, len(jobs), batch_size), desc="sampling", disable=not progress):
        chunk = jobs[start:start + batch_size]
        pad = batch_size - len(chunk)  # keep one compiled shape: pad the last batch with repeats
        chunk_p = [p for p, _ in chunk] + [chunk[-1][0]] * pad
        chunk_s = [1000 * prompt_index(p) + s for p, s in chunk]  # one seed per (prompt, s)
        chunk_s += [chunk_s[-1]] * pad
        out = pipe(chunk_p, negative if guidance > 1 else None, height=32, width=32, num_steps=steps,
                   guidance=guidance, seed=chunk_s, sigmas=sigmas, stochastic=stochastic)
        images.append(out.array[:len(chunk)])
    return np.concatenate(images), [p for p, _ in jobs]


def evaluate_model(model, out, *, prompts=None, seeds: int = 4, steps: int = 50, guidance: float = 2.0,
                   sigmas=None, negative: str = " ", batch_size: int = 168, reference_seeds: int = 16,
                   progress: bool = True, stochastic: bool = False) -> tuple[dict, np.ndarray, list[str]]:
    """Samples, scores and writes `out`/metrics.json and `out`/grid.png for one model folder.

    Returns (metrics with per_prompt, images (N, 32, 32, 3) in [0, 1] prompt-major, captions).
    """
    from qwen_jax.eval import toy_metrics
    from qwen_jax.pipeline import Pipeline
    from qwen_jax.toy import all_prompts, real_set

    prompts = list(prompts or all_prompts())
    pipe = Pipeline.from_pretrained(model)
    images, captions = sample_all(pipe, prompts, seeds, steps=steps, guidance=guidance, sigmas=sigmas,
                                  negative=negative, batch_size=min(batch_size, len(prompts) * seeds),
                                  progress=progress, stochastic=stochastic)
    real, real_captions = real_set(prompts, reference_seeds, seed=12345)
    metrics = toy_metrics.evaluate(images, captions, toy_metrics.reference_stats(real, real_captions))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {k: v for k, v in metrics.items() if k != "per_prompt"}
    summary.update(model=str(model), steps=steps, guidance=guidance, sigmas=sigmas, seeds=seeds,
                   prompts=len(prompts), stochastic=stochastic)
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps({**summary, "per_prompt": metrics["per_prompt"]}, indent=2, default=float))
    tmp.replace(out / "metrics.json")
    shown = min(len(prompts), 24)
    toy_metrics.save_grid(images[: shown * seeds], out / "grid.png", cols=seeds)
    return metrics, images, captions


def prompts_error(prompts) -> str | None:
    """The one-line error for the first of `prompts` that is not one of the 168 captions, or None."""
    from qwen_jax.toy import parse_prompt

    try:
        for prompt in prompts or ():
            parse_prompt(prompt)
    except ValueError as e:
        return f"--prompts: {e}"
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwen_jax.eval.toy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a pipeline folder (toy family)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=2.0, help="true CFG scale; 1 disables CFG")
    p.add_argument("--negative-prompt", default=" ")
    p.add_argument("--sigmas", type=float, nargs="+", help="explicit sigmas (e.g. 1.0 0.75 for 2 Euler steps)")
    p.add_argument("--stochastic", action="store_true",
                   help="re-noise each step's x0 with fresh noise (a student trained with distill.renoise=sde)")
    p.add_argument("--seeds", type=int, default=4, help="images per prompt")
    p.add_argument("--prompts", nargs="+", help="a subset of the 168 captions (default: all)")
    p.add_argument("--batch-size", type=int, default=168)
    p.add_argument("--reference-seeds", type=int, default=16, help="real images per prompt for the statistics")
    p.add_argument("--out", required=True)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--breakdown", action="store_true",
                   help="also print the toy-FD feature by feature (metrics.json always holds it)")
    args = p.parse_args(argv)

    from qwen_jax.eval import toy_metrics

    error = prompts_error(args.prompts)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    metrics, _, _ = evaluate_model(args.model, args.out, prompts=args.prompts, seeds=args.seeds, steps=args.steps,
                                   guidance=args.guidance, sigmas=args.sigmas, negative=args.negative_prompt,
                                   batch_size=args.batch_size, reference_seeds=args.reference_seeds,
                                   progress=not args.quiet, stochastic=args.stochastic)
    print(toy_metrics.format_table(metrics))
    if args.breakdown:
        print(toy_metrics.format_features(metrics))
    print(f"wrote {Path(args.out) / 'metrics.json'} and {Path(args.out) / 'grid.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
