"""Training-step benchmark: qwen_jax's flow-matching `train_step` (jit) vs a PyTorch step on diffusers'
QwenImageTransformer2DModel, CPU fp32, same weights, same AdamW.

Model: the reduced-width model of `bench/forward.py` (4 blocks, 12 heads x 64, text dim 3584),
full training (every weight), remat none. Batch 2 by default: 64x64 latents of 16 channels
(1024 image tokens) and 64 text tokens, the second row padded after 48 tokens.

  ours   `qwen_jax.training.flow_matching.train_step`, the trainer's step: configs/flow_matching.py
         "tiny" with lr 1e-4, constant schedule, no warm-up, no weight decay, grad clip 1.0, no EMA;
         state on a 1-device mesh, jitted with the trainer's shardings and the state donated,
         called under `jax.set_mesh` as the trainer calls it.
  torch  pack latents as diffusers' QwenImagePipeline does, sigma = sigmoid(N(0, 1)),
         x_t = (1 - sigma) x0 + sigma eps, forward (return_dict=False), MSE against eps - x0,
         backward, clip_grad_norm_(1.0), AdamW(lr 1e-4, betas (0.9, 0.999), eps 1e-8, wd 0), zero_grad.

Both sides draw their noise and sigma inside the timed step with their own RNG, except the first
step: torch is then given the noise and sigma our step draws at step 0, so the two first steps do
the same computation; their losses, pre-clip gradient norms and parameter updates are compared.
Timed steps are interleaved (jax, torch, torch, jax, ...) so machine noise hits both sides alike;
medians, minima and speedup = torch / jax are reported. Prints one JSON line on stdout;
progress goes to stderr.

Run: .venv/bin/python bench/train_step.py [--repeats 7] [--warmup 2] [--batch 2] [--quick]
"""

import argparse
import functools
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

import diffusers
from diffusers import QwenImagePipeline, QwenImageTransformer2DModel
from qwen_jax import flow
from qwen_jax import sharding as sharding_lib
from qwen_jax.conversion.transformer import state_dict_to_params
from qwen_jax.models.latents import pack_latents
from qwen_jax.pytree import flatten_params
from qwen_jax.training import state as state_lib
from qwen_jax.training.flow_matching import train_step
from qwen_jax.training.optim import make_optimizer

from common import jax_twin, rel_diff, update_rel_err

ROOT = Path(__file__).resolve().parent.parent

# bench/forward.py's mid-size model; latents 64x64 -> 32x32 packed tokens.
ARCH = dict(in_channels=64, out_channels=16, num_layers=4, attention_head_dim=64,
            num_attention_heads=12, joint_attention_dim=3584, axes_dims_rope=(16, 24, 24))
LATENT_HW, N_TXT = 64, 64
# --quick: a smoke-test size.
QUICK_ARCH = dict(in_channels=64, out_channels=16, num_layers=2, attention_head_dim=32,
                  num_attention_heads=4, joint_attention_dim=256, axes_dims_rope=(8, 12, 12))
QUICK_LATENT_HW, QUICK_N_TXT = 32, 16


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def load_config():
    """configs/flow_matching.py "tiny", set to the optimizer both sides run."""
    spec = importlib.util.spec_from_file_location("flow_matching_config", ROOT / "configs" / "flow_matching.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("tiny")
    config.optim.update(lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, warmup_steps=0,
                        schedule="constant", grad_clip=1.0)
    config.ema.decay = 0.0
    config.flow_matching.update(timestep_sampling="logit_normal", logit_mean=0.0, logit_std=1.0, shift=0.0)
    return config


def make_batch(batch: int, hw: int, channels: int, n_txt: int, text_dim: int) -> dict:
    rng = np.random.default_rng(0)
    mask = np.ones((batch, n_txt), np.int32)
    mask[1:, n_txt * 3 // 4:] = 0  # rows after the first: a padded prompt
    return {"latents": rng.standard_normal((batch, hw, hw, channels), np.float32),
            "prompt_embeds": rng.standard_normal((batch, n_txt, text_dim), np.float32),
            "prompt_mask": mask}


def step0_noise_and_sigma(config, latents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The noise and sigma `train_step` draws at step 0 (its key is fold_in(key(seed), step))."""
    key = jax.random.fold_in(jax.random.key(config.seed), 0)
    noise_key, sigma_key = jax.random.split(key)
    x0 = pack_latents(jnp.asarray(latents))
    fm = config.flow_matching
    noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
    sigma = flow.sample_training_sigmas(sigma_key, (x0.shape[0],), fm.timestep_sampling, fm.logit_mean,
                                        fm.logit_std, fm.shift or None)
    return np.array(noise), np.array(sigma)  # writable copies, for torch.from_numpy


class TorchStep:
    """One flow-matching step on a diffusers transformer with torch's AdamW."""

    def __init__(self, model: QwenImageTransformer2DModel, batch: dict, fm, optim):
        self.model = model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=optim.lr, betas=(optim.b1, optim.b2), eps=optim.eps,
                                     weight_decay=optim.weight_decay)
        self.grad_clip, self.fm = optim.grad_clip, fm
        b, h, w, _ = batch["latents"].shape
        self.latents = torch.from_numpy(batch["latents"]).permute(0, 3, 1, 2).contiguous()  # NCHW, as the VAE gives
        self.embeds = torch.from_numpy(batch["prompt_embeds"])
        self.mask = torch.from_numpy(batch["prompt_mask"])
        self.img_shapes = [[(1, h // 2, w // 2)]] * b  # as QwenImagePipeline passes them

    def __call__(self, noise: torch.Tensor | None = None, sigma: torch.Tensor | None = None):
        b, c, h, w = self.latents.shape
        x0 = QwenImagePipeline._pack_latents(self.latents, b, c, h, w)
        if noise is None:
            noise = torch.randn_like(x0)
        if sigma is None:
            sigma = torch.sigmoid(self.fm.logit_mean + self.fm.logit_std * torch.randn(b))
        s = sigma.view(b, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        v = self.model(x_t, self.embeds, self.mask, sigma, self.img_shapes, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(v, noise - x0)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach()), float(grad_norm)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per framework (interleaved)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per framework, the first included")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a small model and batch, for a smoke run")
    args = parser.parse_args()
    if args.warmup < 1 or args.repeats < 1:
        parser.error("--warmup and --repeats must be >= 1 (the first step is the parity check)")
    arch, hw, n_txt = (QUICK_ARCH, QUICK_LATENT_HW, QUICK_N_TXT) if args.quick else (ARCH, LATENT_HW, N_TXT)
    torch.set_num_threads(os.cpu_count())  # use every core, as XLA's CPU backend does
    torch.manual_seed(0)
    config = load_config()
    config.data.batch_size = args.batch

    log("building torch model")
    tm = QwenImageTransformer2DModel(patch_size=2, **arch)
    n_params = sum(p.numel() for p in tm.parameters())
    batch_np = make_batch(args.batch, hw, arch["in_channels"] // 4, n_txt, arch["joint_attention_dim"])

    log("converting weights to JAX, building the train state")
    cfg, graphdef, params, frozen, old_flat, mesh = jax_twin(tm, arch)
    tx, schedule = make_optimizer(config.optim, config.total_steps)
    shardings = state_lib.state_shardings(tx, params, mesh, ema=False)
    state = state_lib.create_train_state(tx, params, shardings)
    del params
    step_fn = jax.jit(
        functools.partial(train_step, graphdef=graphdef, tx=tx, schedule=schedule, config=config),
        in_shardings=(shardings, state_lib.tree_shardings(frozen, mesh), None),
        out_shardings=(shardings, sharding_lib.replicated(mesh)), donate_argnums=(0,))
    batch = {k: jax.device_put(v, sharding_lib.batch_sharding(mesh, v.ndim)) for k, v in batch_np.items()}

    torch_step = TorchStep(tm, batch_np, config.flow_matching, config.optim)

    def run_jax():
        nonlocal state
        with jax.set_mesh(mesh):  # as the trainer calls it: activations follow the mesh's rules
            state, metrics = step_fn(state, frozen, batch)
        jax.block_until_ready((state, metrics))
        return metrics

    # ---- First step on both sides: the same inputs, compared -------------------------------
    log("first JAX step (compile included)")
    start = time.perf_counter()
    metrics = jax.device_get(run_jax())
    jax_first_s = time.perf_counter() - start
    new_jax = {p: np.asarray(v) for p, v in flatten_params(jax.device_get(state["params"])).items()}
    noise0, sigma0 = step0_noise_and_sigma(config, batch_np["latents"])
    log("first torch step (same noise and sigma)")
    start = time.perf_counter()
    loss_t, gnorm_t = torch_step(torch.from_numpy(noise0), torch.from_numpy(sigma0))
    torch_first_s = time.perf_counter() - start
    sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    new_torch = flatten_params(state_dict_to_params(cfg, sd))
    loss_j, gnorm_j = float(metrics["loss"]), float(metrics["grad_norm"])
    upd_err = update_rel_err(old_flat, new_jax, new_torch)
    del old_flat, new_jax, new_torch, sd
    log(f"loss jax {loss_j:.7f} torch {loss_t:.7f}; grad norm jax {gnorm_j:.6f} torch {gnorm_t:.6f}; "
        f"update rel err {upd_err:.2e}")

    for _ in range(args.warmup - 1):
        run_jax()
        torch_step()

    # ---- Timed steps ------------------------------------------------------------------------
    times = {"jax": [], "torch": []}
    for i in range(args.repeats):
        order = [("jax", run_jax), ("torch", torch_step)]
        for name, fn in order if i % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
        log(f"repeat {i + 1}/{args.repeats}: jax {times['jax'][-1]:.0f} ms, torch {times['torch'][-1]:.0f} ms")
    jax_ms, torch_ms = statistics.median(times["jax"]), statistics.median(times["torch"])
    jax_min, torch_min = min(times["jax"]), min(times["torch"])
    log(f"jax {jax_ms:.1f} ms, torch {torch_ms:.1f} ms (medians); mins {jax_min:.1f} / {torch_min:.1f} ms")

    print(json.dumps({
        "bench": "train_step",
        "device": {"platform": jax.devices()[0].platform, "cpu_count": os.cpu_count(),
                   "torch_threads": torch.get_num_threads(),
                   "loadavg_1m": round(os.getloadavg()[0], 2),  # >cpu_count means the timings are contended
                   "glibc_tunables": os.environ.get("GLIBC_TUNABLES")},  # malloc settings change XLA's step time
        "versions": {"jax": jax.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__},
        "config": {"size": "quick" if args.quick else "mid", **arch, "axes_dims_rope": list(arch["axes_dims_rope"]),
                   "patch_size": 2, "dtype": "float32", "params": n_params, "batch": args.batch,
                   "image_tokens": (hw // 2) ** 2, "text_tokens": n_txt,
                   "text_valid_tokens": batch_np["prompt_mask"].sum(1).tolist(),
                   "optimizer": "adamw lr 1e-4 wd 0 clip 1.0", "remat": "none"},
        "repeats": args.repeats,
        "warmup": args.warmup,
        "jax_step_ms_median": round(jax_ms, 1),
        "torch_step_ms_median": round(torch_ms, 1),
        "speedup": round(torch_ms / jax_ms, 3),
        "jax_step_ms_min": round(jax_min, 1),
        "torch_step_ms_min": round(torch_min, 1),
        "speedup_min": round(torch_min / jax_min, 3),
        "jax_first_step_s": round(jax_first_s, 2),  # compile included
        "torch_first_step_s": round(torch_first_s, 2),
        "first_step": {"loss_jax": loss_j, "loss_torch": loss_t, "loss_rel_diff": float(f"{rel_diff(loss_j, loss_t):.3g}"),
                       "grad_norm_jax": gnorm_j, "grad_norm_torch": gnorm_t,
                       "grad_norm_rel_diff": float(f"{rel_diff(gnorm_j, gnorm_t):.3g}"),
                       "update_rel_err": float(f"{upd_err:.3g}")},
    }))


if __name__ == "__main__":
    main()
