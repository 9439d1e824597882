"""Can the GAN's heads tell real toy images from a student's samples? An offline probe.

    python tools/probe_discriminator.py --teacher runs/toy_distill/teacher \\
        --student runs/toy_distill/pcm/export --t-max 0.3 --pool mean

Samples the student (2 steps, the training step's own generator: raw x0 latents, exit step 1)
and draws as many real images for the same 168 prompts, then trains fresh discriminator heads
(`distillation/heads.py`) on the frozen teacher's block features of both, noised to t' ~ U[t_min,
t_max], and prints held-out accuracy and the real-fake logit gap. Nothing else trains, so it
separates "are the two distinguishable through these features" from the training dynamics
(docs/distillation.md, "Making the discriminator learn"). --projection gives the heads a caption
projection (gan.projection); --mismatched F replaces a share F of the fakes by real images under
another prompt's caption, a test only the caption can pass.
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qwen_jax import checkpoints, flow
from qwen_jax.distillation import heads as heads_lib
from qwen_jax.distillation import roles
from qwen_jax.models.latents import pack_latents
from qwen_jax.toy import all_prompts, real_set
from qwen_jax.training.conditioning import Conditioner
from qwen_jax.training.flow_matching import image_grid
from qwen_jax.training.state import split_trainable


def pooled_logits(heads, features, pool: str, text=None):
    """The heads' per-token logits pooled by mean (the trainer's `heads.logits`), max or log-mean-exp."""
    if pool == "mean":
        return heads_lib.logits(heads, features, text)
    total = 0.0
    for i, f in enumerate(features):
        tokens = heads_lib.token_logits(heads[str(i)], f, text)
        total = total + (tokens.max(-1) if pool == "max" else jax.nn.logsumexp(tokens, -1) - jnp.log(tokens.shape[-1]))
    return total


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="toy pipeline folder (its transformer is the backbone)")
    p.add_argument("--student", required=True, help="student pipeline folder (e.g. a PCM export)")
    p.add_argument("--seeds", type=int, default=2, help="images per prompt, real and fake each")
    p.add_argument("--t-min", type=float, default=0.02)
    p.add_argument("--t-max", type=float, default=0.98)
    p.add_argument("--pool", choices=("mean", "max", "lse"), default="mean")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--b1", type=float, default=0.0, help="Adam b1 (DMD2's critic: 0)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--projection", action="store_true", help="caption-projection heads (gan.projection)")
    p.add_argument("--mismatched", type=float, default=0.0,
                   help="the share of fake rows that are real images under another prompt's caption")
    args = p.parse_args(argv)

    prompts = [q for q in all_prompts() for _ in range(args.seeds)]
    cond = Conditioner.from_pretrained(args.teacher, text_bucket=16)
    text, mask = cond.encode_text(prompts)
    real_images, real_captions = real_set(all_prompts(), args.seeds, seed=777)
    assert list(real_captions) == prompts
    real_latents = cond.encode_images(jnp.asarray(real_images, jnp.float32) / 127.5 - 1)
    real, shapes = pack_latents(real_latents), image_grid(real_latents)

    student = checkpoints.load_transformer(f"{args.student}/transformer")
    s_graphdef, s_params, s_frozen = split_trainable(student, False)
    student_v = roles.denoiser(s_graphdef, s_params, s_frozen, text, mask, shapes)
    sigmas = roles.student_sigmas(SimpleNamespace(student_steps=2, student_shift=3.0))  # 1.0, 0.75, 0
    last_exit = jnp.int32(len(sigmas) - 2)  # the 2-step sample: the second step's x0
    fake = roles.generate(student_v, jax.random.normal(jax.random.key(5), real.shape), jnp.asarray(sigmas),
                          last_exit, jax.random.key(6), "ode")

    teacher = checkpoints.load_transformer(f"{args.teacher}/transformer")
    graphdef, params, frozen = split_trainable(teacher, False)
    blocks = heads_lib.blocks_at((0.5, 0.75, 1.0), teacher.config.num_layers)
    width = teacher.config.num_attention_heads * teacher.config.attention_head_dim
    heads = heads_lib.init_heads(jax.random.key(1), width, len(blocks),
                                 teacher.config.joint_attention_dim if args.projection else 0)
    if args.mismatched:  # real images whose caption is another prompt's: a fake only the caption gives away
        swap = np.random.default_rng(3).random(len(prompts)) < args.mismatched
        fake = jnp.where(jnp.asarray(swap)[:, None, None], jnp.roll(real, 2 * args.seeds + 1, axis=0), fake)
    n = len(prompts)
    train_rows, test_rows = jnp.arange(n * 3 // 4), jnp.arange(n * 3 // 4, n)

    def logits(h, x0, key, rows):
        k_noise, k_t = jax.random.split(key)
        t = jax.random.uniform(k_t, (len(rows),), minval=args.t_min, maxval=args.t_max)
        x_t = flow.add_noise(x0[rows], jax.random.normal(k_noise, x0[rows].shape), t)
        features = roles.features(graphdef, params, frozen, x_t, t, text[rows], mask[rows], shapes, blocks)
        return pooled_logits(h, features, args.pool, heads_lib.pooled_text(text[rows], mask[rows]))

    def loss(h, key, rows):
        k_real, k_fake = jax.random.split(key)
        r, f = logits(h, real, k_real, rows), logits(h, fake, k_fake, rows)
        return jnp.mean(jax.nn.softplus(f)) + jnp.mean(jax.nn.softplus(-r)), (r, f)

    tx = optax.adam(args.lr, b1=args.b1)
    opt = tx.init(heads)

    @jax.jit
    def step(h, opt, key):
        rows = jax.random.choice(key, train_rows, (args.batch,), replace=False)
        (value, _), grads = jax.value_and_grad(loss, has_aux=True)(h, jax.random.fold_in(key, 1), rows)
        updates, opt = tx.update(grads, opt, h)
        return optax.apply_updates(h, updates), opt, value

    held_out = jax.jit(lambda h, key: loss(h, key, test_rows))
    start = time.time()
    for i in range(args.steps + 1):
        heads, opt, value = step(heads, opt, jax.random.key(i))
        if i % 50 == 0:
            test_loss, (r, f) = held_out(heads, jax.random.key(10**6 + i))
            accuracy = 0.5 * (float(jnp.mean(r > 0)) + float(jnp.mean(f < 0)))
            print(f"step {i}: train loss {float(value):.3f}, held-out loss {float(test_loss):.3f}, accuracy "
                  f"{accuracy:.3f}, logit gap {float(r.mean() - f.mean()):.2f} ({time.time() - start:.0f} s)",
                  flush=True)


if __name__ == "__main__":
    main()
