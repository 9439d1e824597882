"""Does the caption steer the drawing? `python -m qwen_jax.eval.toy_steering --model DIR --out DIR`.

    python -m qwen_jax.eval.toy_steering --model models/toy/teacher --sigma0 0.8 0.6 0.4 --out runs/steer

Accuracy from noise says whether a model draws the captioned shape; it cannot say why not. This
asks the model directly. One real image per prompt (168) is noised to sigma0 with fixed noise
and denoised from there, once under its own caption and once under a caption with one word
changed (the shape to the next of circle/square/triangle; as a control, the foreground colour
to the next palette colour). The analytic decoder then reads what was drawn:

    kept       P(drawn = the image's own shape | its own caption)
    followed   P(drawn = the new shape | the changed caption)
    steering   followed - P(drawn = the new shape | its own caption): how much the word alone
               moves the drawing, 0 for a model that ignores it, up to 1 - P(new | own)

A model that has not yet learned a word scores steering ~0 for it at every sigma0, whatever its
accuracy; one that has, scores high where the image still leaves the choice open (sigma0 >= 0.6
for shapes). So it separates "cannot draw a square" from "does not read the word", and it
moves long before accuracy from noise does. Writes steering.json to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

WORDS = ("shape", "colour")


def changed_caption(caption: str, word: str) -> str:
    """`caption` with its shape (or foreground colour) replaced by the next one in the world's order."""
    from qwen_jax.toy import PALETTE, SHAPES, caption as make_caption, parse_prompt

    fg, shape, bg = parse_prompt(caption)
    if word == "shape":
        return make_caption(fg, SHAPES[(SHAPES.index(shape) + 1) % len(SHAPES)], bg)
    colours = [c for c in PALETTE if c != bg]
    return make_caption(colours[(colours.index(fg) + 1) % len(colours)], shape, bg)


def denoise_from(pipe, x0_latents, noise, captions, sigma0: float, *, steps: int, guidance: float) -> np.ndarray:
    """Images (N, 32, 32, 3) in [0, 1]: the packed latents noised to sigma0 (flow convention), then
    `steps` Euler steps on a uniform grid from sigma0 to 0 under `captions`."""
    from qwen_jax import flow

    latents = np.asarray(flow.add_noise(x0_latents, noise, sigma0))
    if pipe.scheduler.use_dynamic_shifting or pipe.scheduler.shift_terminal:
        raise ValueError("toy_steering needs a fixed-shift scheduler (the toy family's)")
    shift = pipe.scheduler.shift
    # the pipeline shifts the base grid it is given, so hand it the base grid of the sigmas wanted
    base = flow.static_unshift(np.linspace(sigma0, sigma0 / steps, steps), shift)
    out = pipe(list(captions), " " if guidance > 1 else None, height=32, width=32, num_steps=steps,
               guidance=guidance, seed=list(range(len(captions))), latents=latents, sigmas=list(base))
    return out.array


def measure(model, sigma0s=(0.8, 0.6, 0.4), *, steps: int = 20, guidance: float = 2.0, seed: int = 777,
            words=WORDS, prompts=None) -> dict:
    """{word: {sigma0: {"kept", "followed", "steering"}}} over one real image per prompt (all 168
    unless `prompts`)."""
    import jax.numpy as jnp

    from qwen_jax.eval import toy_metrics
    from qwen_jax.models.latents import pack_latents
    from qwen_jax.pipeline import Pipeline
    from qwen_jax.toy import all_prompts, parse_prompt, real_set

    pipe = Pipeline.from_pretrained(model)
    real, captions = real_set(list(prompts or all_prompts()), 1, seed=seed)
    x0 = pack_latents(pipe.vae.encode(jnp.asarray(real.astype(np.float32) / 127.5 - 1.0)))
    noise = np.random.default_rng(seed).standard_normal(x0.shape).astype(np.float32)
    pick = {"shape": 2, "colour": 1}   # in the decoded (background, foreground, shape) names
    results = {}
    for word in words:
        changed = [changed_caption(c, word) for c in captions]
        part = (lambda c: parse_prompt(c)[1]) if word == "shape" else (lambda c: parse_prompt(c)[0])
        own, new = [part(c) for c in captions], [part(c) for c in changed]
        results[word] = {}
        for sigma0 in sigma0s:
            drawn = {}
            for name, caps in (("own", captions), ("changed", changed)):
                images = denoise_from(pipe, x0, noise, caps, float(sigma0), steps=steps, guidance=guidance)
                drawn[name] = [n[pick[word]] for n in toy_metrics.decode_names(images)]
            kept = float(np.mean([d == o for d, o in zip(drawn["own"], own)]))
            followed = float(np.mean([d == n for d, n in zip(drawn["changed"], new)]))
            baseline = float(np.mean([d == n for d, n in zip(drawn["own"], new)]))
            results[word][float(sigma0)] = {"kept": kept, "followed": followed, "steering": followed - baseline}
    return results


def format_table(results: dict) -> str:
    lines = ["| word | sigma0 | kept | followed | steering |", "| --- | --- | --- | --- | --- |"]
    for word, rows in results.items():
        for sigma0, r in rows.items():
            lines.append(f"| {word} | {sigma0:g} | {r['kept']:.3f} | {r['followed']:.3f} | {r['steering']:+.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwen_jax.eval.toy_steering", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a toy-family pipeline or model folder")
    p.add_argument("--sigma0", type=float, nargs="+", default=[0.8, 0.6, 0.4], help="noise levels to start from")
    p.add_argument("--steps", type=int, default=20, help="Euler steps from sigma0 to 0")
    p.add_argument("--guidance", type=float, default=2.0, help="true CFG scale; 1 disables CFG")
    p.add_argument("--words", nargs="+", default=list(WORDS), choices=WORDS)
    p.add_argument("--prompts", nargs="+", help="a subset of the 168 captions (default: all)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    from qwen_jax.eval.toy import prompts_error

    bad = [s for s in args.sigma0 if not 0.0 < s <= 1.0]
    error = f"--sigma0 must be in (0, 1], got {bad[0]}" if bad else prompts_error(args.prompts)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    results = measure(args.model, args.sigma0, steps=args.steps, guidance=args.guidance, words=args.words,
                      prompts=args.prompts)
    print(format_table(results))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"model": str(args.model), "steps": args.steps, "guidance": args.guidance,
               "prompts": len(args.prompts) if args.prompts else 168, "results": results}
    tmp = out / "steering.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(out / "steering.json")
    print(f"wrote {out / 'steering.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
