"""DMD2 iteration benchmark: qwen_jax's jitted DMD2 steps vs the same iteration in PyTorch on diffusers'
QwenImageTransformer2DModel, CPU fp32, same weights, same random draws.

One iteration = a generator turn + a critic turn (qwen_jax/distillation/dmd2.py with
dfake_gen_update_ratio 1, so both turns run every iteration). Model: bench/train_step.py's
(bench/forward.py's 4 blocks, 12 heads x 64, text dim 3584), full weights, remat none; batch 1 of
64x64 latents (1024 image tokens) and 64 text tokens (with --batch 2, train_step.py's batch, the
second prompt is padded after 48), the negative prompt 8 valid tokens of 64. Config:
configs/dmd2.py "qwen_image" made full-weight (lora_rank 0) with ratio 1 and the GAN off
(gan.gen_weight = gan.disc_weight = 0: no heads on either side), no EMA; otherwise as
configured: teacher CFG 4 with Qwen's norm rescale, 2-step student on [1, 0.75, 0] (ode
transitions), DM sigmas shift-3 clipped to [0.02, 0.98], generator AdamW lr 5e-5 b1 0 wd 0.01
clip 1, critic AdamW lr 2e-5 b1 0 clip 1.

  ours   `dmd2.Trainer(config, graphdef, params, frozen, mesh)`, `init_state()`, then its two
         jitted, state-donating steps as `Trainer.step` calls them (generator, then critic) on a
         1-device mesh under `jax.set_mesh`; synchronised after each turn to time them apart.
  torch  three diffusers models (teacher frozen, generator, fake score) with torch AdamW:
         generator turn: backward simulation of the student's first k steps under no_grad, its
                 x0 prediction at step k with grad; under no_grad the re-noised sample's teacher
                 (CFG: conditional and negative halves in one batch-4 call) and fake-score x0;
                 g = (x0_fake - x0_real) / mean|x - x0_real|; L = 0.5 mse(x, sg(x - g)); backward,
                 clip, AdamW step;
         critic turn: a fresh student sample under no_grad, the fake score's flow-matching loss on
                 it, backward, clip, AdamW step.

Torch is given the draws our steps make at every iteration (exit step k, noise z, DM sigma and
noise, per turn: `dmd2.turn_keys`), so both sides do the same work; the first iteration's losses,
pre-clip gradient norms and parameter updates of both trained models are compared. Timed
iterations are interleaved; medians, minima and speedup = torch / jax are reported, with the
per-iteration times and the median of per-iteration ratios (iteration i has the same exit steps
on both sides; the minima may not). Prints one
JSON line on stdout; progress goes to stderr. About 1.5 minutes at the defaults on an idle 2-core
machine (2.5 CPU-minutes: two compiles, parity conversions, 4 iterations per side); --batch 2
about twice that.

Run: .venv/bin/python bench/dmd2_step.py [--repeats 3] [--warmup 1] [--batch 1] [--quick]
"""

import argparse
import copy
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_info, interleaved, jax_twin, log, ratio, rel_diff, summary, update_rel_err, versions
from diffusers import QwenImageTransformer2DModel

from qwen_jax import sharding as sharding_lib
from qwen_jax.conversion.transformer import state_dict_to_params
from qwen_jax.distillation import dmd2, losses, roles
from qwen_jax.pytree import flatten_params

ROOT = Path(__file__).resolve().parent.parent

# bench/train_step.py's sizes.
ARCH = dict(in_channels=64, out_channels=16, num_layers=4, attention_head_dim=64,
            num_attention_heads=12, joint_attention_dim=3584, axes_dims_rope=(16, 24, 24))
LATENT_HW, N_TXT = 64, 64
QUICK_ARCH = dict(in_channels=64, out_channels=16, num_layers=2, attention_head_dim=32,
                  num_attention_heads=4, joint_attention_dim=256, axes_dims_rope=(8, 12, 12))
QUICK_LATENT_HW, QUICK_N_TXT = 32, 16
NEG_VALID = 8  # valid tokens of the negative prompt (Qwen encodes " " to a few)


def load_config():
    spec = importlib.util.spec_from_file_location("dmd2_config", ROOT / "configs" / "dmd2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("qwen_image")
    c.model.update(lora_rank=0, lora_alpha=0.0, dtype="float32", remat="none")
    c.dmd2.dfake_gen_update_ratio = 1  # an iteration = generator turn + critic turn
    c.gan.update(gen_weight=0.0, disc_weight=0.0)  # no GAN heads (on either side)
    c.ema.decay = 0.0
    return c


def make_batch(batch: int, hw: int, channels: int, n_txt: int, text_dim: int) -> dict:
    rng = np.random.default_rng(0)
    mask = np.ones((batch, n_txt), np.int32)
    mask[1:, n_txt * 3 // 4:] = 0  # rows after the first: a padded prompt
    neg_mask = np.zeros((batch, n_txt), np.int32)
    neg_mask[:, :min(NEG_VALID, n_txt)] = 1
    return {"latents": rng.standard_normal((batch, hw, hw, channels), np.float32),
            "prompt_embeds": rng.standard_normal((batch, n_txt, text_dim), np.float32),
            "prompt_mask": mask,
            "negative_embeds": rng.standard_normal((batch, n_txt, text_dim), np.float32),
            "negative_mask": neg_mask}


def draws(config, step: int, turn: int, shape: tuple, num_steps: int) -> dict:
    """The random values dmd2.generator_step (turn 1) / critic_step (turn 2) draw at `step`."""
    k_z, k_exit, _k_sim, k_t, k_noise, _k_gan = dmd2.turn_keys(config, jnp.int32(step), turn)
    d = config.dmd2
    return {"z": np.array(jax.random.normal(k_z, shape, jnp.float32)),
            "k": int(roles.exit_step(k_exit, num_steps)),
            "t": np.array(losses.dmd_timesteps(k_t, (shape[0],), d.t_min, d.t_max, d.dm_shift or None)),
            "noise": np.array(jax.random.normal(k_noise, shape, jnp.float32))}


class TorchDMD2:
    """The same DMD2 iteration on diffusers transformers (teacher frozen; generator and fake score trained)."""

    def __init__(self, tm: QwenImageTransformer2DModel, batch: dict, config, sigmas):
        self.teacher = tm.eval().requires_grad_(False)
        self.gen = copy.deepcopy(tm).train().requires_grad_(True)
        self.fake = copy.deepcopy(tm).train().requires_grad_(True)

        def adamw(model, o):
            params = list(model.parameters())
            return params, torch.optim.AdamW(params, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps,
                                             weight_decay=o.weight_decay), o.grad_clip

        self.gen_opt = adamw(self.gen, config.optim)
        self.critic_opt = adamw(self.fake, config.critic_optim)
        self.guidance = float(config.distill.guidance)
        self.sigmas = [float(s) for s in sigmas]
        b, h, w, _ = batch["latents"].shape
        self.text = torch.from_numpy(batch["prompt_embeds"])
        self.mask = torch.from_numpy(batch["prompt_mask"])
        self.both_text = torch.cat([self.text, torch.from_numpy(batch["negative_embeds"])])
        self.both_mask = torch.cat([self.mask, torch.from_numpy(batch["negative_mask"])])
        self.img_shapes = [[(1, h // 2, w // 2)]] * b  # as QwenImagePipeline passes them
        self.batch = b

    def v(self, model, x, sigma):
        t = sigma if torch.is_tensor(sigma) else torch.full((self.batch,), sigma)
        return model(x, self.text, self.mask, t, self.img_shapes, return_dict=False)[0]

    def teacher_v(self, x, t):
        """True CFG in one batch-2B call, with Qwen's per-token norm rescale (sampler.cfg_combine)."""
        both = self.teacher(torch.cat([x, x]), self.both_text, self.both_mask, torch.cat([t, t]),
                            self.img_shapes * 2, return_dict=False)[0]
        cond, neg = both.chunk(2)
        comb = neg + self.guidance * (cond - neg)
        return comb * (cond.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True))

    def generate(self, z, k: int):
        """The student's x0 at exit step k: steps 0..k-1 without gradient (Euler), then one x0 prediction."""
        s = self.sigmas
        with torch.no_grad():
            x = z
            for j in range(k):
                x = x + (s[j + 1] - s[j]) * self.v(self.gen, x, s[j])
        return x - s[k] * self.v(self.gen, x, s[k])

    @staticmethod
    def _update(opt):
        params, optimizer, clip = opt
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def generator_turn(self, d: dict) -> dict:
        z, noise, t = (torch.from_numpy(d[n]) for n in ("z", "noise", "t"))
        x = self.generate(z, d["k"])
        with torch.no_grad():
            xd, tt = x.detach(), t.view(-1, 1, 1)
            x_t = (1 - tt) * xd + tt * noise
            x0_real = x_t - tt * self.teacher_v(x_t, t)
            x0_fake = x_t - tt * self.v(self.fake, x_t, t)
            norm = (xd - x0_real).abs().mean(dim=(1, 2), keepdim=True) + 1e-6
            g = torch.nan_to_num((x0_fake - x0_real) / norm)
        loss = 0.5 * torch.nn.functional.mse_loss(x, xd - g)
        loss.backward()
        return {"loss": float(loss.detach()), "grad_norm": self._update(self.gen_opt)}

    def critic_turn(self, d: dict) -> dict:
        z, noise, t = (torch.from_numpy(d[n]) for n in ("z", "noise", "t"))
        with torch.no_grad():
            x = self.generate(z, d["k"])
        tt = t.view(-1, 1, 1)
        v = self.v(self.fake, (1 - tt) * x + tt * noise, t)
        loss = torch.nn.functional.mse_loss(v, noise - x)
        loss.backward()
        return {"loss": float(loss.detach()), "grad_norm": self._update(self.critic_opt)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed iterations per framework (interleaved)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed iterations, the first (parity, compile) included")
    parser.add_argument("--batch", type=int, default=1, help="2 = train_step.py's batch (twice the time)")
    parser.add_argument("--quick", action="store_true", help="a small model and batch, for a smoke run")
    args = parser.parse_args()
    if args.warmup < 1 or args.repeats < 1:
        parser.error("--warmup and --repeats must be >= 1 (the first iteration is the parity check)")
    arch, hw, n_txt = (QUICK_ARCH, QUICK_LATENT_HW, QUICK_N_TXT) if args.quick else (ARCH, LATENT_HW, N_TXT)
    torch.set_num_threads(os.cpu_count())  # use every core, as XLA's CPU backend does
    torch.manual_seed(0)
    config = load_config()
    config.data.batch_size = args.batch
    sigmas = roles.student_sigmas(config.distill)

    log("building torch model")
    tm = QwenImageTransformer2DModel(patch_size=2, **arch)
    n_params = sum(p.numel() for p in tm.parameters())
    batch_np = make_batch(args.batch, hw, arch["in_channels"] // 4, n_txt, arch["joint_attention_dim"])
    shape = (args.batch, (hw // 2) ** 2, arch["in_channels"])

    log("converting weights to JAX, building the DMD2 trainer")
    cfg, graphdef, params, frozen, old_flat, mesh = jax_twin(tm, arch)
    trainer = dmd2.Trainer(config, graphdef, params, frozen, mesh)
    state = trainer.init_state()
    batch = {k: jax.device_put(v, sharding_lib.batch_sharding(mesh, v.ndim)) for k, v in batch_np.items()}
    torch_dmd = TorchDMD2(tm, batch_np, config, sigmas)
    del tm

    n_iters = args.warmup + args.repeats
    log(f"drawing our steps' random values for {n_iters} iterations")
    plan = [{"generator": draws(config, i, dmd2.GENERATOR_TURN, shape, len(sigmas) - 1),
             "critic": draws(config, i, dmd2.CRITIC_TURN, shape, len(sigmas) - 1)} for i in range(n_iters)]
    turn_times = {"jax": {"generator": [], "critic": []}, "torch": {"generator": [], "critic": []}}
    counters = {"jax": 0, "torch": 0}
    steps = trainer.jitted_steps()

    def run_jax():
        nonlocal state
        with jax.set_mesh(mesh):  # as train.py calls Trainer.step: generator turn, then critic turn
            start = time.perf_counter()
            state, gen_m = steps["generator"](state, trainer.teacher, frozen, batch)
            jax.block_until_ready((state, gen_m))
            mid = time.perf_counter()
            state, critic_m = steps["critic"](state, trainer.teacher, frozen, batch)
            jax.block_until_ready((state, critic_m))
            end = time.perf_counter()
        turn_times["jax"]["generator"].append(mid - start)
        turn_times["jax"]["critic"].append(end - mid)
        counters["jax"] += 1
        return gen_m, critic_m

    def run_torch():
        i = counters["torch"]
        start = time.perf_counter()
        gen_m = torch_dmd.generator_turn(plan[i]["generator"])
        mid = time.perf_counter()
        critic_m = torch_dmd.critic_turn(plan[i]["critic"])
        end = time.perf_counter()
        turn_times["torch"]["generator"].append(mid - start)
        turn_times["torch"]["critic"].append(end - mid)
        counters["torch"] += 1
        return gen_m, critic_m

    # ---- First iteration on both sides: the same draws, compared ------------------------------
    log("first JAX iteration (compile included)")
    start = time.perf_counter()
    gen_j, critic_j = jax.device_get(run_jax())
    jax_first_s = time.perf_counter() - start
    assert int(gen_j["exit_step"]) == plan[0]["generator"]["k"], "draws() no longer matches generator_step"
    new_jax = {name: {p: np.asarray(v) for p, v in flatten_params(jax.device_get(state["params"][name])).items()}
               for name in ("generator", "fake")}
    log("first torch iteration")
    start = time.perf_counter()
    gen_t, critic_t = run_torch()
    torch_first_s = time.perf_counter() - start
    new_torch = {name: flatten_params(state_dict_to_params(cfg, {k: v.detach().numpy() for k, v in
                                                                 m.state_dict().items()}))
                 for name, m in (("generator", torch_dmd.gen), ("fake", torch_dmd.fake))}
    first = {
        "exit_steps": [plan[0]["generator"]["k"], plan[0]["critic"]["k"]],
        "generator_loss_jax": float(gen_j["generator_loss"]), "generator_loss_torch": gen_t["loss"],
        "generator_loss_rel_diff": rel_diff(float(gen_j["generator_loss"]), gen_t["loss"]),
        "generator_grad_norm_jax": float(gen_j["generator_grad_norm"]), "generator_grad_norm_torch": gen_t["grad_norm"],
        "generator_grad_norm_rel_diff": rel_diff(float(gen_j["generator_grad_norm"]), gen_t["grad_norm"]),
        "generator_update_rel_err":
            float(f"{update_rel_err(old_flat, new_jax['generator'], new_torch['generator']):.3g}"),
        "critic_loss_jax": float(critic_j["loss"]), "critic_loss_torch": critic_t["loss"],
        "critic_loss_rel_diff": rel_diff(float(critic_j["loss"]), critic_t["loss"]),
        "critic_grad_norm_jax": float(critic_j["critic_grad_norm"]), "critic_grad_norm_torch": critic_t["grad_norm"],
        "critic_grad_norm_rel_diff": rel_diff(float(critic_j["critic_grad_norm"]), critic_t["grad_norm"]),
        "fake_update_rel_err": float(f"{update_rel_err(old_flat, new_jax['fake'], new_torch['fake']):.3g}"),
    }
    del old_flat, new_jax, new_torch
    log(json.dumps(first))

    for _ in range(args.warmup - 1):
        run_jax()
        run_torch()
    for side in turn_times.values():  # keep only the timed iterations' turns
        for v in side.values():
            v.clear()

    # ---- Timed iterations ---------------------------------------------------------------------
    times = interleaved({"jax": run_jax, "torch": run_torch}, args.repeats, label="iteration")
    jax_s, torch_s = summary(times["jax"]), summary(times["torch"])
    turns = {side: {turn: summary(v) for turn, v in per.items()} for side, per in turn_times.items()}
    log(f"jax {jax_s} ms, torch {torch_s} ms")

    print(json.dumps({
        "bench": "dmd2_step",
        "device": device_info(torch.get_num_threads()),
        "versions": versions(),
        "config": {"size": "quick" if args.quick else "mid (train_step.py's)", **arch,
                   "axes_dims_rope": list(arch["axes_dims_rope"]), "patch_size": 2, "dtype": "float32",
                   "params_per_model": n_params, "batch": args.batch, "image_tokens": (hw // 2) ** 2,
                   "text_tokens": n_txt, "text_valid_tokens": batch_np["prompt_mask"].sum(1).tolist(),
                   "negative_valid_tokens": int(batch_np["negative_mask"][0].sum()),
                   "dfake_gen_update_ratio": 1, "gan": "off (gen_weight = disc_weight = 0, no heads either side)",
                   "guidance": float(config.distill.guidance), "student_sigmas": [float(s) for s in sigmas],
                   "renoise": config.distill.renoise, "dm_shift": float(config.dmd2.dm_shift),
                   "generator_optim": "adamw lr 5e-5 b1 0 wd 0.01 clip 1.0",
                   "critic_optim": "adamw lr 2e-5 b1 0 wd 0 clip 1.0", "ema": 0, "remat": "none"},
        "repeats": args.repeats,
        "warmup": args.warmup,
        # exit step k per timed iteration (generator, critic): k = 1 adds one student forward
        "exit_steps": [[p["generator"]["k"], p["critic"]["k"]] for p in plan[args.warmup:]],
        "jax_iter_ms_median": jax_s["median"],
        "torch_iter_ms_median": torch_s["median"],
        "speedup": ratio(torch_s["median"], jax_s["median"]),
        "jax_iter_ms_min": jax_s["min"],
        "torch_iter_ms_min": torch_s["min"],
        "speedup_min": ratio(torch_s["min"], jax_s["min"]),
        # Iteration i does the same work on both sides (same exit steps) back to back: its ratio is
        # the least load-dependent comparison; minima may come from iterations with different k.
        "jax_iter_ms": [round(t * 1e3) for t in times["jax"]],
        "torch_iter_ms": [round(t * 1e3) for t in times["torch"]],
        "speedup_per_iter_median": round(statistics.median(t / j for j, t in zip(times["jax"], times["torch"])), 3),
        "turn_ms_median": {side: {turn: v["median"] for turn, v in per.items()} for side, per in turns.items()},
        "jax_first_iter_s": round(jax_first_s, 2),  # compile of both steps included
        "torch_first_iter_s": round(torch_first_s, 2),
        "first_iter": first,
    }))


if __name__ == "__main__":
    main()
