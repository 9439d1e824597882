"""DMD2 with a GAN on real data: the 2-step generator (`configs/dmd2.py`, the project's main job).

Three roles over one graphdef (`roles.py`): the frozen teacher (real score, CFG), the generator
(the student, from the teacher or a PCM export) and the fake score (from the teacher), plus
discriminator heads on image-token features (`heads.py`). Two optimisers, two jitted steps,
chosen per iteration on the host (TTUR, `losses.should_update_generator`):

  generator turn (iteration % dfake_gen_update_ratio == 0), before the critic turn:
      k ~ U{0..K-1}; x = student x0 at exit step k after backward simulation from noise
      L = L_DM(x; teacher CFG, fake score; t ~ U[t_min, t_max]) + gan.gen_weight * L_G(heads(x_t'))
          [+ dmd2.regression_weight * MSE(student sample from z_pair, teacher ODE sample from z_pair)]
      only the generator's tree gets a gradient (teacher, fake score, heads are constants)
  critic turn (every iteration):
      x = sg(a fresh student sample); L = L_fake(x) + gan.disc_weight * L_D(real x0 vs x, noised to t')
      the fake score and the heads get gradients (the backbone too when gan.backbone == "fake")

Train state (checkpointed as one tree):
  {"step", "params": {"generator", "fake", "heads"}, "opt_state": {"generator", "critic"},
   "ema": generator copy (optional)}
`step` counts iterations (critic updates); the generator's Adam count counts its own updates.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from qwen_jax import flow
from qwen_jax import sharding as sharding_lib
from qwen_jax.distillation import heads as heads_lib
from qwen_jax.distillation import losses, real_pool, roles
from qwen_jax.models.latents import pack_latents
from qwen_jax.training import optim
from qwen_jax.training import state as state_lib
from qwen_jax.training.flow_matching import image_grid

sg = jax.lax.stop_gradient
BACKBONES = ("fake", "teacher")


GENERATOR_TURN, CRITIC_TURN = 1, 2


def turn_keys(config, step, turn: int):
    """The six keys of iteration `step`'s generator or critic turn, in this order: initial noise z,
    exit step, backward simulation, DM timestep t, re-noising noise, GAN. A function of (seed, step,
    turn) alone, so a resumed run and an outside replay (bench/dmd2_step.py) draw the same."""
    return jax.random.split(jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), step), turn), 6)


def _gan_on(config) -> bool:
    return config.gan.gen_weight > 0 or config.gan.disc_weight > 0


def _gan_sigma(config, key, t):
    """The GAN's noise level t': the DM loss's t, or with gan.t_max > 0 its own draw U[t_min, gan.t_max]
    (real and fake noised alike: near t = 1 both are mostly noise and the heads cannot tell them apart)."""
    if not config.gan.t_max:
        return t
    return losses.dmd_timesteps(jax.random.fold_in(key, 1), t.shape, config.dmd2.t_min, config.gan.t_max)


def _logits(graphdef, backbone, frozen, heads, x0, noise, sigma, text, mask, shapes, blocks):
    x_t = flow.add_noise(x0, noise, sigma)  # diffusion-GAN: real and fake noised to the same t'
    features = roles.features(graphdef, backbone, frozen, x_t, sigma, text, mask, shapes, blocks)
    return heads_lib.logits(heads, features, heads_lib.pooled_text(text, mask))


def generator_step(state, teacher, frozen, batch, *, graphdef, tx, config, sigmas, blocks):
    k_z, k_exit, k_sim, k_t, k_noise, k_gan = turn_keys(config, state["step"], GENERATOR_TURN)
    text, mask, shapes = batch["prompt_embeds"], batch["prompt_mask"], image_grid(batch["latents"])
    shape = pack_latents(batch["latents"]).shape
    z = jax.random.normal(k_z, shape, jnp.float32)
    k = roles.exit_step(k_exit, len(sigmas) - 1)
    t = losses.dmd_timesteps(k_t, (shape[0],), config.dmd2.t_min, config.dmd2.t_max, config.dmd2.dm_shift or None)
    noise = jax.random.normal(k_noise, shape, jnp.float32)
    params = state["params"]
    teacher_v = roles.real_score(graphdef, teacher, frozen, text, mask, shapes, batch, config.distill)
    fake_v = roles.denoiser(graphdef, params["fake"], frozen, text, mask, shapes)

    def loss_fn(generator):
        student_v = roles.denoiser(graphdef, generator, frozen, text, mask, shapes)
        x = roles.generate(student_v, z, jnp.asarray(sigmas), k, k_sim, config.distill.renoise)
        loss, metrics = losses.distribution_matching_loss(x, teacher_v, fake_v, noise, t)
        # DMD1's regression on teacher ODE pairs (`ode_pairs.py`); the batch holds them only on the
        # generator turns before dmd2.regression_until (a second compile for the turns after it)
        if config.dmd2.regression_weight > 0 and "pair_noise" in batch:
            pair_v = roles.denoiser(graphdef, generator, frozen, batch["pair_embeds"], batch["pair_mask"], shapes)
            sample = roles.generate(pair_v, batch["pair_noise"], jnp.asarray(sigmas), len(sigmas) - 2, k_sim,
                                    config.distill.renoise)
            regression = losses.regression_loss(sample, batch["pair_latents"])
            loss = loss + config.dmd2.regression_weight * regression
            metrics = {**metrics, "regression_loss": sg(regression)}
        if config.gan.gen_weight > 0:
            backbone = params["fake"] if config.gan.backbone == "fake" else teacher
            gan_noise = jax.random.normal(k_gan, shape, jnp.float32)
            fake_logits = _logits(graphdef, sg(backbone), frozen, sg(params["heads"]), x, gan_noise,
                                  _gan_sigma(config, k_gan, t), text, mask, shapes, blocks)
            gan = losses.gan_generator_loss(fake_logits, config.gan.kind)
            loss = loss + config.gan.gen_weight * gan
            metrics = {**metrics, "gan_generator_loss": sg(gan)}
        return loss, metrics

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params["generator"])
    updates, opt_state = tx.update(grads, state["opt_state"]["generator"], params["generator"])
    generator = optax.apply_updates(params["generator"], updates)
    new = {**state, "params": {**params, "generator": generator},
           "opt_state": {**state["opt_state"], "generator": opt_state}}
    if "ema" in state:
        new["ema"] = optax.incremental_update(generator, state["ema"], 1.0 - config.ema.decay)
    metrics = {**metrics, "generator_loss": loss, "generator_grad_norm": optax.tree.norm(grads),
               "exit_step": k}
    return new, metrics


def critic_step(state, teacher, frozen, batch, *, graphdef, tx, schedule, config, sigmas, blocks):
    k_z, k_exit, k_sim, k_t, k_noise, k_gan = turn_keys(config, state["step"], CRITIC_TURN)
    text, mask, shapes = batch["prompt_embeds"], batch["prompt_mask"], image_grid(batch["latents"])
    real = pack_latents(batch["latents"].astype(jnp.float32))
    z = jax.random.normal(k_z, real.shape, jnp.float32)
    k = roles.exit_step(k_exit, len(sigmas) - 1)
    params = state["params"]
    student_v = roles.denoiser(graphdef, params["generator"], frozen, text, mask, shapes)
    x = sg(roles.generate(student_v, z, jnp.asarray(sigmas), k, k_sim, config.distill.renoise))
    t = losses.dmd_timesteps(k_t, (real.shape[0],), config.dmd2.t_min, config.dmd2.t_max,
                             config.dmd2.dm_shift or None)
    noise = jax.random.normal(k_noise, real.shape, jnp.float32)

    def loss_fn(critic):
        fake_v = roles.denoiser(graphdef, critic["fake"], frozen, text, mask, shapes)
        loss, metrics = losses.fake_score_loss(fake_v, x, noise, t)
        if config.gan.disc_weight > 0:
            backbone = critic["fake"] if config.gan.backbone == "fake" else sg(teacher)
            n_real, n_fake = jax.random.split(k_gan)
            t_gan = _gan_sigma(config, k_gan, t)
            real_logits = _logits(graphdef, backbone, frozen, critic["heads"], real,
                                  jax.random.normal(n_real, real.shape, jnp.float32), t_gan, text, mask, shapes, blocks)
            fake_logits = _logits(graphdef, backbone, frozen, critic["heads"], x,
                                  jax.random.normal(n_fake, real.shape, jnp.float32), t_gan, text, mask, shapes, blocks)
            gan = losses.gan_discriminator_loss(real_logits, fake_logits, config.gan.kind)
            loss = loss + config.gan.disc_weight * gan
            metrics = {**metrics, "gan_discriminator_loss": sg(gan), "real_logit": sg(real_logits.mean()),
                       "fake_logit": sg(fake_logits.mean())}
        return loss, metrics

    critic = {"fake": params["fake"], "heads": params["heads"]}
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(critic)
    updates, opt_state = tx.update(grads, state["opt_state"]["critic"], critic)
    # The heads' own step size: Adam makes their updates blind to gan.disc_weight, so this is the
    # knob that lets a discriminator learn faster than the fake score it sits on.
    updates = {**updates, "heads": jax.tree.map(lambda u: u * config.gan.head_lr_scale, updates["heads"])}
    critic = optax.apply_updates(critic, updates)
    new = {**state, "step": state["step"] + 1, "params": {**params, **critic},
           "opt_state": {**state["opt_state"], "critic": opt_state}}
    return new, {**metrics, "loss": loss, "critic_grad_norm": optax.tree.norm(grads),
                 "lr": schedule(state["step"])}


class Trainer:
    """The DMD2 objective for `train.py` (the interface is in `training/objective.py`)."""

    needs_negative = True

    @staticmethod
    def check_config(config) -> None:
        """Config errors, before anything is loaded (`train.py` calls it first)."""
        if config.gan.backbone not in BACKBONES:
            raise ValueError(f"config.gan.backbone={config.gan.backbone!r}: choose one of {BACKBONES}")
        losses.should_update_generator(0, config.dmd2.dfake_gen_update_ratio)  # validates the ratio
        roles.check_config(config)
        real_pool.check_mix(config.gan.real_share, config.gan.teacher_pool)
        if config.dmd2.regression_weight < 0:
            raise ValueError(f"config.dmd2.regression_weight={config.dmd2.regression_weight}: must be >= 0")
        if config.dmd2.regression_weight > 0 and not config.dmd2.regression_pairs:
            raise ValueError("config.dmd2.regression_weight > 0 needs config.dmd2.regression_pairs "
                             "(python -m qwen_jax.distillation.ode_pairs)")
        if config.dmd2.regression_until < 0:
            raise ValueError(f"config.dmd2.regression_until={config.dmd2.regression_until}: must be >= 0 "
                             "(0: the regression for the whole run)")
        if config.dmd2.regression_until and not config.dmd2.regression_weight:
            raise ValueError(f"config.dmd2.regression_until={config.dmd2.regression_until} needs "
                             "config.dmd2.regression_weight > 0")
        if config.gan.head_lr_scale <= 0:
            raise ValueError(f"config.gan.head_lr_scale={config.gan.head_lr_scale}: must be > 0")
        if config.gan.t_max and not config.dmd2.t_min < config.gan.t_max <= 1.0:
            raise ValueError(f"config.gan.t_max={config.gan.t_max}: 0 (the DM loss's t) or in "
                             f"(dmd2.t_min={config.dmd2.t_min}, 1]")

    def __init__(self, config, graphdef, params: dict, frozen: dict, mesh):
        self.check_config(config)
        self.config, self.graphdef, self.teacher = config, graphdef, params
        model_config = state_lib.merge_model(graphdef, params, frozen).config  # a view: nothing is copied
        self.blocks = heads_lib.blocks_at(config.gan.blocks, model_config.num_layers) if _gan_on(config) else ()
        width = model_config.num_attention_heads * model_config.attention_head_dim
        heads = heads_lib.init_heads(jax.random.key(config.seed + 1), width, len(self.blocks),
                                     model_config.joint_attention_dim if config.gan.projection else 0)
        self.initial_heads = heads
        self.params = {"generator": roles.initial_student(config, params, mesh), "fake": params, "heads": heads}
        self.gen_tx, self.schedule = optim.make_optimizer(config.optim, config.total_steps)
        self.critic_tx, _ = optim.make_optimizer(config.critic_optim, config.total_steps)
        self.shardings = self._state_shardings(mesh)
        sigmas = roles.student_sigmas(config.distill)
        common = dict(graphdef=graphdef, config=config, sigmas=tuple(float(s) for s in sigmas), blocks=self.blocks)
        frozen_sh, repl = state_lib.tree_shardings(frozen, mesh), sharding_lib.replicated(mesh)
        teacher_sh = self.shardings["params"]["fake"]
        self._gen = jax.jit(functools.partial(generator_step, tx=self.gen_tx, **common),
                            in_shardings=(self.shardings, teacher_sh, frozen_sh, None),
                            out_shardings=(self.shardings, repl), donate_argnums=(0,))
        self._critic = jax.jit(functools.partial(critic_step, tx=self.critic_tx, schedule=self.schedule, **common),
                               in_shardings=(self.shardings, teacher_sh, frozen_sh, None),
                               out_shardings=(self.shardings, repl), donate_argnums=(0,))
        self._last_gen = None

    def _state_shardings(self, mesh) -> dict:
        repl = sharding_lib.replicated(mesh)
        model_sh = state_lib.tree_shardings(self.teacher, mesh)
        # The heads stay replicated: split along their input axis, their first matmul meets
        # batch-split features on the same mesh axis and GSPMD gathers the activations instead
        # (full_v5e64 generator: 12.9 -> 22 GiB of temporaries per device).
        param_sh = {"generator": model_sh, "fake": model_sh, "heads": jax.tree.map(lambda _: repl, self.params["heads"])}
        critic = {"fake": self.params["fake"], "heads": self.params["heads"]}
        critic_sh = {"fake": model_sh, "heads": param_sh["heads"]}
        out = {"step": repl, "params": param_sh, "opt_state": {
            "generator": state_lib.opt_state_shardings(self.gen_tx, self.params["generator"], model_sh, mesh),
            "critic": state_lib.opt_state_shardings(self.critic_tx, critic, critic_sh, mesh)}}
        if self.config.ema.decay > 0:
            out["ema"] = model_sh
        return out

    def _init(self, params: dict) -> dict:
        critic = {"fake": params["fake"], "heads": params["heads"]}
        state = {"step": jnp.zeros((), jnp.int32), "params": params,
                 "opt_state": {"generator": self.gen_tx.init(params["generator"]), "critic": self.critic_tx.init(critic)}}
        if self.config.ema.decay > 0:
            state["ema"] = jax.tree.map(jnp.copy, params["generator"])
        return state

    def init_state(self) -> dict:
        state = jax.jit(self._init, out_shardings=self.shardings)(self.params)
        self.params = None
        return state

    def abstract_state(self) -> dict:
        shapes = jax.eval_shape(self._init, self.params)
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, self.shardings)

    def jitted_steps(self) -> dict:
        """{"generator", "critic"}: the two jitted steps, each (state, teacher, frozen, batch) ->
        (state, metrics); `qwen_jax.plan` lowers them with abstract arguments."""
        return {"generator": self._gen, "critic": self._critic}

    def step(self, state: dict, frozen: dict, batch: dict, step: int):
        if losses.should_update_generator(step, self.config.dmd2.dfake_gen_update_ratio):
            state, self._last_gen = self._gen(state, self.teacher, frozen, batch)
        # the critic never reads the regression pairs: one batch structure, one compile
        critic_batch = {k: v for k, v in batch.items() if not k.startswith("pair_")}
        state, metrics = self._critic(state, self.teacher, frozen, critic_batch)
        return state, {**metrics, **(self._last_gen or {})}

    def student(self, state: dict, use_ema: bool) -> dict:
        return state["ema"] if use_ema and "ema" in state else state["params"]["generator"]

