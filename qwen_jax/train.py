"""Training entry point: `python -m qwen_jax.train --config=configs/<name>.py[:variant] --workdir=DIR`.

    python -m qwen_jax.train --config=configs/flow_matching.py:tiny --workdir=runs/tiny \\
        --config.model.pretrained=PIPELINE_DIR --config.data.images=FOLDER --config.total_steps=100

One loop for every objective, read top to bottom: devices and mesh, logging, data, frozen
encoders, model and train state, resume, evaluation setup, the loop, export. Starting again
with the same --workdir resumes from the latest checkpoint (parameters, optimizer, EMA, data
position); SIGTERM or SIGINT saves the current step and exits 0.

Workdir layout:
  config.json            the resolved config of the latest start
  checkpoints/<step>/    orbax checkpoints (training/checkpointing.py)
  metrics.jsonl, tensorboard/, samples/   logs (training/metrics.py)
  export/                the trained pipeline folder, and lora.safetensors under LoRA (training/export.py)
"""

from __future__ import annotations

import json
import logging as python_logging
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from qwen_jax import checkpoints, data as data_lib
from qwen_jax import sharding as sharding_lib
from qwen_jax.conversion.errors import ConversionError
from qwen_jax.training import distributed, evaluation, export as export_lib
from qwen_jax.distillation import dmd2, ode_pairs, pcm, real_pool
from qwen_jax.training import flow_matching
from qwen_jax.training import state as state_lib
from qwen_jax.training.checkpointing import Checkpoints
from qwen_jax.training.conditioning import Conditioner, drop_captions
from qwen_jax.training.metrics import MetricWriter

OBJECTIVES = {"flow_matching": flow_matching.Trainer, "pcm": pcm.Trainer, "dmd2": dmd2.Trainer}


class StopRequested:
    """Remembers a SIGTERM/SIGINT so the loop can save and exit between two steps."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def install(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        self.signal = signum
        logging.warning("received %s: saving a checkpoint after this step, then exiting",
                        signal.Signals(signum).name)

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested(self) -> bool:
        return distributed.any_process(self.signal is not None)


def make_loader(cfg, process_index: int, process_count: int) -> data_lib.Loader:
    """The grain loader of this process's share of each global batch."""
    if sum(map(bool, (cfg.images, cfg.cache, cfg.toy))) != 1:
        raise data_lib.DataError("set exactly one of --config.data.images, --config.data.cache and "
                                 "--config.data.toy")
    if cfg.batch_size % process_count:
        raise ValueError(f"config.data.batch_size={cfg.batch_size} is not divisible by {process_count} processes")
    if cfg.toy:  # the procedural toy world (qwen_jax.toy), unlimited
        from qwen_jax.toy.data import ToyLoader

        return ToyLoader(cfg.toy_seed, cfg.batch_size // process_count, shard_index=process_index,
                         shard_count=process_count, num_threads=cfg.num_threads, prefetch=cfg.prefetch)
    if cfg.cache:
        source, buckets = data_lib.CachedSource(cfg.cache), None
    else:
        source = data_lib.ImageCaptionSource(cfg.images, num_threads=max(1, cfg.num_threads))
        buckets = parse_buckets(cfg.buckets) if cfg.buckets else data_lib.official_buckets(cfg.resolution)
    return data_lib.Loader(source, cfg.batch_size // process_count, buckets=buckets, shard_index=process_index,
                           shard_count=process_count, num_threads=cfg.num_threads, prefetch=cfg.prefetch)


def parse_buckets(text: str) -> list[tuple[int, int]]:
    try:
        return [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"config.data.buckets={text!r}: expected WxH pairs like '1328x1328,1664x928'") from None


class BatchMaker:
    """Raw loader batches -> the conditioning layout (`training/conditioning.py`) as global arrays.

    Caption dropout is decided for the whole global batch from (seed, step), so it does not
    depend on how many processes share the batch, and a resumed run drops the same rows.
    """

    def __init__(self, config, conditioner: Conditioner | None, loader: data_lib.Loader, mesh, negative: bool = False,
                 mixer=None, pairs=None, pair_encoder: Conditioner | None = None):
        self.config, self.conditioner, self.mesh, self.negative = config, conditioner, mesh, negative
        self.mixer = mixer  # swaps rows for teacher samples (distillation/real_pool.py), or None
        # teacher ODE pairs for DMD2's regression loss (distillation/ode_pairs.py), or None; their
        # captions are encoded here even when the batch comes from a cache
        self.pairs, self.pair_encoder = pairs, pair_encoder
        if conditioner is None:
            self.uncond = loader.source.uncond()
        else:
            self.uncond = tuple(map(np.asarray, conditioner.encode_text([config.data.uncond_prompt])))
        self.local_batch = loader.batch_size
        self.offset = loader.shard_index * loader.batch_size

    def _pairs(self, step: int, latent_shape) -> dict:
        """This process's rows of the step's regression pairs: pair_noise, pair_latents, pair_embeds, pair_mask."""
        rows = self.pairs(step, self.offset, self.local_batch, self.config.data.batch_size)
        tokens = (latent_shape[1] // 2) * (latent_shape[2] // 2)  # (B, h, w, C) latents, 2x2 packing
        if rows["noise"].shape[1] != tokens:
            raise ValueError(f"config.dmd2.regression_pairs holds {rows['noise'].shape[1]} image tokens per "
                             f"pair, the batch {tokens}: make the pairs at the training resolution")
        embeds, mask = map(np.asarray, self.pair_encoder.encode_text(rows["captions"]))
        length = distributed.max_over_processes(embeds.shape[1])
        return {"pair_noise": rows["noise"].astype(np.float32), "pair_latents": rows["latents"].astype(np.float32),
                "pair_embeds": np.pad(embeds, ((0, 0), (0, length - embeds.shape[1]), (0, 0))),
                "pair_mask": np.pad(mask, ((0, 0), (0, length - mask.shape[1])))}

    def __call__(self, raw: dict, step: int) -> dict:
        if self.mixer is not None:
            raw = self.mixer(raw, step, self.offset, self.config.data.batch_size)
        if "latents" in raw:  # from a cache
            latents, embeds, mask = raw["latents"], raw["prompt_embeds"], raw["prompt_mask"]
        else:
            latents = np.asarray(self.conditioner.encode_images(raw["images"]))
            embeds, mask = map(np.asarray, self.conditioner.encode_text(raw["captions"]))
        global_batch = self.config.data.batch_size
        rng = np.random.default_rng([self.config.seed, step])
        dropped = rng.random(global_batch) < self.config.data.caption_dropout
        embeds, mask = drop_captions(embeds, mask, dropped[self.offset:self.offset + self.local_batch], *self.uncond,
                                     bucket=self.config.data.text_bucket)
        length = distributed.max_over_processes(embeds.shape[1])  # one text length for the global batch
        embeds = np.pad(embeds, ((0, 0), (0, length - embeds.shape[1]), (0, 0)))
        mask = np.pad(mask, ((0, 0), (0, length - mask.shape[1])))
        local = {"latents": np.asarray(latents, np.float32), "prompt_embeds": embeds, "prompt_mask": mask}
        if self.negative:  # the unconditional prompt's states per row, for a CFG teacher
            neg, neg_mask = drop_captions(embeds, mask, np.ones(len(embeds), bool), *self.uncond,
                                          bucket=self.config.data.text_bucket)
            local["negative_embeds"] = np.pad(neg, ((0, 0), (0, length - neg.shape[1]), (0, 0)))[:, :length]
            local["negative_mask"] = np.pad(neg_mask, ((0, 0), (0, length - neg_mask.shape[1])))[:, :length]
        if self.pairs is not None and self.pairs.wanted(step):  # generator turns only
            local.update(self._pairs(step, latents.shape))
        return {k: jax.make_array_from_process_local_data(sharding_lib.batch_sharding(self.mesh, v.ndim), v)
                for k, v in local.items()}


def load_model(config, mesh) -> tuple:
    """(graphdef, trainable, frozen) of the configured transformer, placed on `mesh`."""
    pretrained = config.model.pretrained
    with jax.set_mesh(mesh):
        model = checkpoints.load_transformer(
            config.model.transformer or Path(_resolve(pretrained)) / "transformer",
            param_dtype=config.model.param_dtype, dtype=config.model.dtype, attention=config.model.attention,
            remat=config.model.remat, scan_unroll=config.model.get("scan_unroll", 1), mesh=mesh,
            lora_rank=config.model.lora_rank, lora_alpha=config.model.lora_alpha or None, seed=config.seed)
    return state_lib.split_trainable(model, config.model.lora_rank > 0)


def train(config, workdir: str | Path, devices=None) -> dict:
    """Runs (or resumes) training in `workdir`.

    devices: the devices of the mesh (default: all). Returns {"step", "stopped_by_signal",
    "last_metrics", "skipped", "state", "frozen", "trainer"} (the final train state, the frozen
    tree, and the objective's trainer, which holds the teacher under distillation).
    """
    workdir = Path(workdir)
    objective = OBJECTIVES.get(config.objective)
    if objective is None:
        raise ValueError(f"config.objective={config.objective!r}: choose one of {sorted(OBJECTIVES)}")
    objective.check_config(config)  # fail before loading anything

    # ---- Devices and mesh -------------------------------------------------------------------
    distributed.initialize(config.distributed)
    pid, nproc = jax.process_index(), jax.process_count()
    mesh = sharding_lib.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=devices)
    replicas = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.data.batch_size % replicas:
        raise ValueError(f"config.data.batch_size={config.data.batch_size} must be divisible by "
                         f"data x fsdp = {replicas} (mesh {dict(mesh.shape)})")
    if pid == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        _write_json(workdir / "config.json", json.loads(config.to_json_best_effort()))

    # ---- Checkpoints and logging ------------------------------------------------------------
    ckpt = Checkpoints(workdir, every=config.checkpoint.every, keep=config.checkpoint.keep,
                       async_save=config.checkpoint.async_save)
    start_step = ckpt.latest_step() or 0
    writer = MetricWriter(workdir, total_steps=config.total_steps, start_step=start_step, enabled=pid == 0,
                          tensorboard=config.log.tensorboard, progress=config.log.progress)
    logging.info("mesh %s over %d devices, %d process(es); %s", dict(mesh.shape), mesh.size, nproc,
                 f"resuming from step {start_step}" if start_step else "starting from scratch")

    # ---- Data and frozen encoders ----------------------------------------------------------
    loader = make_loader(config.data, pid, nproc)
    pretrained = config.model.pretrained
    if not pretrained:
        raise ValueError("set --config.model.pretrained to a pipeline folder (or hub id)")
    pairs = ode_pairs.sampler_from_config(config)
    needs_encoders = not config.data.cache or config.eval.every or pairs is not None
    conditioner = (Conditioner.from_pretrained(pretrained, dtype=config.model.encoder_dtype,
                                               max_sequence_length=config.data.max_sequence_length,
                                               text_bucket=config.data.text_bucket)
                   if needs_encoders else None)
    make_batch = BatchMaker(config, None if config.data.cache else conditioner, loader, mesh,
                            negative=objective.needs_negative, mixer=real_pool.mixer_from_config(config),
                            pairs=pairs, pair_encoder=conditioner)

    # ---- Model, objective, train state -------------------------------------------------------
    lora = config.model.lora_rank > 0
    graphdef, params, frozen = load_model(config, mesh)
    trainer = objective(config, graphdef, params, frozen, mesh)
    del params  # the trainer (then the state) owns them
    if start_step:
        state, data_state = ckpt.restore(start_step, trainer.abstract_state())
    else:
        state, data_state = trainer.init_state(), None
    data_iter = loader.iterator(data_state)
    logging.info("training %s parameters (%s, %s), %s frozen", f"{_count(state['params']):,}", config.objective,
                 "LoRA" if lora else "full", f"{_count(frozen):,}")

    sampler = (evaluation.GridSampler(config.eval, conditioner, graphdef, _scheduler(pretrained), mesh)
               if config.eval.every else None)

    # ---- The loop ---------------------------------------------------------------------------
    stop = StopRequested().install()
    step, metrics, stopped = start_step, {}, False
    timer, last_logged = time.perf_counter(), start_step
    try:
        while step < config.total_steps:
            batch = make_batch(next(data_iter), step)
            with jax.set_mesh(mesh):  # the frame in which activations follow the mesh's rules
                state, metrics = trainer.step(state, frozen, batch, step)
            step += 1
            ckpt.save(step, state, data_iter.get_state())
            if step % config.log.every == 0 or step == config.total_steps:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                elapsed, steps_done = time.perf_counter() - timer, step - last_logged
                writer.scalars(step, {**{f"train/{k}": v for k, v in metrics.items()},
                                      "perf/step_time_s": elapsed / steps_done,
                                      "perf/images_per_s": steps_done * config.data.batch_size / elapsed,
                                      "data/skipped": loader.num_skipped})
                timer, last_logged = time.perf_counter(), step
            # only host floats: formatting a device array would wait for the step every time
            writer.progress(step, loss=metrics["loss"] if isinstance(metrics.get("loss"), float) else None)
            if sampler and step % config.eval.every == 0:
                with jax.set_mesh(mesh):
                    writer.images(step, "samples/grid", sampler(trainer.student(state, config.eval.use_ema), frozen))
            if stop.requested():
                stopped = True
                break
    finally:
        stop.restore()
    ckpt.save(step, state, data_iter.get_state(), force=True)
    ckpt.close()
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}  # also when stopped between logs
    if loader.num_skipped:
        logging.warning("%d unreadable images were skipped: %s", loader.num_skipped,
                        ", ".join(p for p, _ in loader.skipped[:10]))
    if not stopped and config.export.at_end and step >= config.total_steps:
        export_lib.export_run(workdir / "export", graphdef, trainer.student(state, config.export.use_ema), frozen,
                              pipeline=pretrained, lora=lora)
    writer.close()
    logging.info("%s at step %d", "stopped by signal" if stopped else "finished", step)
    return {"step": step, "stopped_by_signal": stopped, "last_metrics": metrics, "skipped": loader.num_skipped,
            "state": state, "frozen": frozen, "trainer": trainer}


def _resolve(pretrained: str) -> Path:
    from qwen_jax.pipeline import resolve_folder

    return resolve_folder(pretrained)


def _scheduler(pretrained: str):
    from qwen_jax import flow

    with open(_resolve(pretrained) / "scheduler" / "scheduler_config.json") as f:
        return flow.SchedulerConfig.from_diffusers_config(json.load(f))


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    tmp.replace(path)


# ---- command line ----------------------------------------------------------------------------
_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/<name>.py[:variant] file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "folder for checkpoints, logs and exports (resumed if it has any)")


class _QuietLibraries:
    """Keeps orbax's per-save INFO chatter out of the training log (warnings still show)."""

    def filter(self, record) -> bool:
        # Python's level numbers: absl.logging.WARNING is absl's verbosity (-1), not 30
        return record.levelno >= python_logging.WARNING or "orbax" not in record.pathname


def main(argv) -> None:
    for handler in {logging.get_absl_handler(), *python_logging.getLogger().handlers}:
        handler.addFilter(_QuietLibraries())
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _CONFIG.value is None or not _WORKDIR.value:
        print("error: --config and --workdir are required", file=sys.stderr)
        sys.exit(2)
    try:
        summary = train(_CONFIG.value, _WORKDIR.value)
    except (data_lib.DataError, ConversionError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps({"step": summary["step"], "stopped_by_signal": summary["stopped_by_signal"],
                      "skipped": summary["skipped"], **{k: summary["last_metrics"].get(k) for k in ("loss",)}}))


if __name__ == "__main__":
    app.run(main)
