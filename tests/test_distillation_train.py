"""The distillation objectives in the real trainer, on the toy model family at smoke size:
PCM and DMD2 + GAN run, resume and export; the teacher is never touched; the generator and
critic update on their schedule; the exported student loads in diffusers and matches JAX."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from qwen_jax import checkpoints
from qwen_jax.distillation.ode_pairs import load_pairs
from qwen_jax.pytree import flatten_params
from qwen_jax.train import train
from qwen_jax.training.metrics import read_metrics
from test_toy_training import toy_base  # noqa: F401  (module fixture: the toy model family)

REPO = Path(__file__).resolve().parents[1]


def load_config(name: str, base, **overrides):
    """configs/<name>.py:toy at smoke size. The blocks are scanned one at a time (scan_unroll 1,
    the qwen_image configs' setting): the toy recipe unrolls its 4 blocks for CPU throughput,
    which nearly doubles what these few-step runs pay, the compile (one DMD2 iteration on one
    CPU device: 32 s scanned, 57 s unrolled). Unrolled blocks give the same outputs and
    gradients (test_transformer_model.py)."""
    spec = importlib.util.spec_from_file_location(f"{name}_config", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("toy")
    c.model.pretrained = str(base)
    c.update_from_flattened_dict({"data.batch_size": 8, "log.every": 1, "log.progress": False, "eval.every": 0,
                                  "checkpoint.every": 3, "model.scan_unroll": 1, **overrides})
    c.lock()
    return c


def flat(tree) -> dict:
    return {k: np.asarray(v) for k, v in flatten_params(jax.device_get(tree)).items()}


def assert_trees_equal(a, b):
    a, b = flat(a), flat(b)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg="/".join(k))


def moved(a, b) -> bool:
    a, b = flat(a), flat(b)
    return any(not np.array_equal(a[k], b[k]) for k in a)


def adam_count(opt_state) -> int:
    counts = [int(s.count) for s in jax.tree.leaves(opt_state, is_leaf=lambda s: hasattr(s, "count") and hasattr(
        s, "mu")) if hasattr(s, "mu")]
    assert counts, "no Adam state found"
    return counts[0]


def transformer_params(folder):
    from qwen_jax.training.state import split_trainable

    return split_trainable(checkpoints.load_transformer(folder), lora=False)[1]


def teacher_params(base):
    return transformer_params(Path(base) / "transformer")


def test_pcm_then_dmd2_with_gan_on_schedule_teacher_untouched_resumes_and_exports_to_diffusers(toy_base, tmp_path):
    teacher = teacher_params(toy_base)
    pcm = train(load_config("pcm", toy_base, total_steps=2), tmp_path / "pcm")
    assert_trees_equal(pcm["trainer"].teacher, teacher)
    assert moved(pcm["state"]["params"], teacher)
    assert all(np.isfinite(m["train/pcm_loss"]) for m in read_metrics(tmp_path / "pcm"))
    student_init = tmp_path / "pcm" / "export" / "transformer"

    ratio, steps = 3, 6
    dmd2 = {"dmd2.dfake_gen_update_ratio": ratio, "distill.student_init": str(student_init)}
    first = train(load_config("dmd2", toy_base, total_steps=4, **dmd2), tmp_path / "run")
    assert_trees_equal(first["trainer"].teacher, teacher)  # the real score: the teacher, bit-identical after training
    state = first["state"]
    assert int(state["step"]) == 4 and adam_count(state["opt_state"]["critic"]) == 4
    assert adam_count(state["opt_state"]["generator"]) == math.ceil(4 / ratio)  # iterations 0 and 3
    assert moved(state["params"]["generator"], transformer_params(student_init))
    assert moved(state["params"]["fake"], teacher) and moved(state["params"]["heads"], first["trainer"].initial_heads)

    # resumes from the step-4 checkpoint; the GAN now reads the frozen teacher's features (same heads)
    # at its own noise levels t' <= 0.5, its heads stepping 10x faster
    result = train(load_config("dmd2", toy_base, total_steps=steps, **dmd2,
                               **{"gan.backbone": "teacher", "gan.t_max": 0.5, "gan.head_lr_scale": 10.0}),
                   tmp_path / "run")
    state = result["state"]
    assert int(state["step"]) == steps and adam_count(state["opt_state"]["generator"]) == math.ceil(steps / ratio)
    assert_trees_equal(result["trainer"].teacher, teacher)
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    for key in ("fake_score_loss", "gan_discriminator_loss", "real_logit", "fake_logit"):  # every iteration
        assert all(np.isfinite(m[f"train/{key}"]) for m in metrics), key
    generator_turns = [m for m in metrics if (m["step"] - 1) % ratio == 0]  # step s logs iteration s - 1
    assert [m["step"] for m in generator_turns] == [1, 4]
    for key in ("dmd_loss", "gan_generator_loss", "generator_grad_norm", "exit_step"):
        assert all(np.isfinite(m[f"train/{key}"]) for m in generator_turns), key
    exported = transformer_params(tmp_path / "run" / "export" / "transformer")
    assert_trees_equal(exported, state["ema"])  # the export is the generator's EMA
    # `python -m qwen_jax.export` restores a DMD2 checkpoint through its own objective
    from qwen_jax import export

    assert export.main(["--workdir", str(tmp_path / "run"), "--step", str(steps), "--no-ema",
                        "--out", str(tmp_path / "raw")]) == 0
    assert_trees_equal(transformer_params(tmp_path / "raw" / "transformer"), state["params"]["generator"])

    # the exported student -> diffusers folder -> QwenImageTransformer2DModel reproduces the JAX output
    spec = importlib.util.spec_from_file_location("convert_weights", REPO / "tools" / "convert_weights.py")
    convert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert)
    exported = tmp_path / "run" / "export" / "transformer"
    assert convert.main(["--to", "diffusers", str(exported), str(tmp_path / "diffusers")]) == 0
    from diffusers import QwenImageTransformer2DModel

    tm, info = QwenImageTransformer2DModel.from_pretrained(tmp_path / "diffusers", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    model = checkpoints.load_transformer(exported)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 64, 48)).astype(np.float32)
    txt = rng.standard_normal((2, 12, 64)).astype(np.float32)
    mask = np.ones((2, 12), np.int64)
    mask[1, 7:] = 0
    t = np.array([1.0, 0.75], np.float32)
    out = np.asarray(model(x, txt, mask, t, ((1, 8, 8),)))
    with torch.no_grad():
        ref = tm.eval()(torch.from_numpy(x), torch.from_numpy(txt), torch.from_numpy(mask), torch.from_numpy(t),
                        [(1, 8, 8)] * 2).sample.numpy()
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-4


def test_configs_load_with_their_variants():
    for name in ("pcm", "dmd2"):
        spec = importlib.util.spec_from_file_location(f"{name}_cfg", REPO / "configs" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        real, toy = module.get_config(None), module.get_config("toy")
        assert real.objective == toy.objective == name and real.model.lora_rank == 64 and real.distill.guidance == 4
        assert toy.model.lora_rank == 0 and toy.data.toy and toy.eval.num_steps == 2 and toy.eval.guidance == 1
        with pytest.raises(ValueError, match="unknown variant"):
            module.get_config("sdxl")


def test_dmd2_lora_student_and_config_errors_name_the_field(toy_base, tmp_path):
    from qwen_jax.conversion.errors import ConversionError

    # the real config's shape: LoRA student and fake score on one frozen base (the teacher = base)
    # on one device: ~25 % less compile than 8; the DMD2 iteration runs sharded in the test above,
    # and this recipe is compiled sharded, at full size, in test_plan.py
    # ... with half of the GAN's real pool made of teacher samples, and caption-projection heads
    # ... and DMD1's regression on teacher ODE pairs, made by the pairs CLI, for the first of two
    # generator updates (regression_until=1): the second one is DMD2 + GAN alone
    pool = _teacher_pool(tmp_path / "pool")
    pairs = _regression_pairs(toy_base, tmp_path)
    lora = train(load_config("dmd2", toy_base, total_steps=2, **{"model.lora_rank": 4, "gan.real_share": 0.5,
                                                                  "gan.teacher_pool": str(pool), "gan.projection": True,
                                                                  "dmd2.dfake_gen_update_ratio": 1,
                                                                  "dmd2.regression_weight": 1.0,
                                                                  "dmd2.regression_pairs": str(pairs),
                                                                  "dmd2.regression_until": 1}),
                 tmp_path / "lora", devices=jax.devices()[:1])
    logged = read_metrics(tmp_path / "lora")
    assert np.isfinite(logged[0]["train/regression_loss"]) and "train/regression_loss" not in logged[1]
    assert np.isfinite(logged[1]["train/dmd_loss"])
    assert all("proj" in head for head in lora["state"]["params"]["heads"].values())
    assert moved(lora["state"]["params"]["heads"], lora["trainer"].initial_heads)
    assert all(k[-1] in ("lora_a", "lora_b") for k in flat(lora["state"]["params"]["generator"]))
    assert not any(np.any(v) for k, v in flat(lora["trainer"].teacher).items() if k[-1] == "lora_b")
    assert moved(lora["state"]["params"]["generator"], lora["trainer"].teacher)
    assert (tmp_path / "lora" / "export" / "lora.safetensors").is_file()

    for field, value, match in [("gan.backbone", "vae", "gan.backbone"), ("distill.renoise", "euler", "renoise"),
                                ("gan.real_share", 0.5, "teacher_pool"), ("dmd2.dfake_gen_update_ratio", 0, "ratio"),
                                ("gan.t_max", 0.01, "gan.t_max"), ("gan.head_lr_scale", 0.0, "head_lr_scale"),
                                ("distill.guidance_interval", (0.6, 0.4), "guidance_interval"),
                                ("dmd2.regression_weight", 0.5, "regression_pairs"),
                                ("dmd2.regression_weight", -1.0, "regression_weight"),
                                ("dmd2.regression_until", 5, "needs config.dmd2.regression_weight"),
                                ("dmd2.regression_until", -1, "regression_until")]:
        with pytest.raises(ValueError, match=match):
            train(load_config("dmd2", toy_base, total_steps=1, **{field: value}), tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="regression_pairs: .*missing.npz does not exist"):
        train(load_config("dmd2", toy_base, total_steps=1, **{"dmd2.regression_weight": 1.0,
                                                               "dmd2.regression_pairs": str(tmp_path / "missing.npz")}),
              tmp_path / "bad")
    with pytest.raises(ValueError, match="not a regression-pairs file, missing noise"):
        np.savez(tmp_path / "other.npz", latents=np.zeros(3))
        load_pairs(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="student_init"):  # a merged export cannot seed LoRA adapters
        train(load_config("dmd2", toy_base, total_steps=1, **{"distill.student_init": str(tmp_path),
                                                               "model.lora_rank": 4}), tmp_path / "bad")
    with pytest.raises(ConversionError, match="student_init: .*not a qwen_jax transformer folder"):
        train(load_config("dmd2", toy_base, total_steps=1, **{"distill.student_init": str(tmp_path)}), tmp_path / "b")


def _regression_pairs(base: Path, tmp_path: Path) -> Path:
    """Teacher pairs from the CLI (3 prompts x 2, 2 steps): each pair is the teacher's sample from its noise."""
    from qwen_jax.distillation import ode_pairs
    from qwen_jax.pipeline import Pipeline

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a blue background\n\na green square on a black background\n"
                       "a white triangle on a magenta background\n")
    out = tmp_path / "pairs.npz"
    assert ode_pairs.main(["--model", str(base), "--prompt-file", str(prompts), "--per-prompt", "2", "--steps", "2",
                           "--guidance", "2", "--batch-size", "4", "--out", str(out)]) == 0
    pairs = ode_pairs.load_pairs(out)
    assert pairs["noise"].shape == pairs["latents"].shape and pairs["noise"].shape[:2] == (6, 64) and len(set(pairs["captions"])) == 3
    assert len({p.tobytes() for p in pairs["noise"]}) == 6  # one noise per pair
    again = Pipeline.from_pretrained(base)(list(pairs["captions"][:4]), " ", height=32, width=32, num_steps=2,
                                           guidance=2.0, latents=pairs["noise"][:4])
    np.testing.assert_allclose(again.latents, pairs["latents"][:4], rtol=1e-5, atol=1e-5)
    assert ode_pairs.main(["--model", str(base), "--prompt-file", str(prompts), "--per-prompt", "0",
                           "--out", str(tmp_path / "none.npz")]) == 1 and not (tmp_path / "none.npz").exists()
    return out


def _teacher_pool(folder: Path, n: int = 5, size: int = 32) -> Path:
    """A sampler-style pool: PNGs + manifest.jsonl (file, prompt)."""
    import json

    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(folder / "manifest.jsonl", "w") as f:
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
            f.write(json.dumps({"file": f"{i}.png", "prompt": f"pool caption {i}", "seed": i}) + "\n")
    return folder / "manifest.jsonl"


def test_teacher_pool_mixing_is_global_deterministic_and_checked(tmp_path):
    from qwen_jax.data.images import load_image
    from qwen_jax.distillation.real_pool import TeacherPoolMixer

    pool = _teacher_pool(tmp_path / "pool")
    raw = {"images": np.zeros((8, 32, 32, 3), np.float32), "captions": [f"real {i}" for i in range(8)]}
    mixer = TeacherPoolMixer(str(pool), real_share=0.5, seed=3)
    whole = mixer(raw, step=11, offset=0, global_batch=8)
    halves = [mixer({k: v[h * 4:(h + 1) * 4] for k, v in raw.items()}, step=11, offset=4 * h, global_batch=8)
              for h in range(2)]  # two hosts' shares draw the same rows
    assert whole["captions"] == halves[0]["captions"] + halves[1]["captions"]
    swapped = whole["teacher_rows"]
    assert 0 < swapped.sum() < 8
    for row in range(8):
        if swapped[row]:
            index = int(whole["captions"][row].split()[-1])
            np.testing.assert_array_equal(whole["images"][row], load_image(tmp_path / "pool" / f"{index}.png", (32, 32)))
        else:
            assert whole["captions"][row] == f"real {row}" and not whole["images"][row].any()
    assert mixer(raw, 11, 0, 8)["captions"] == whole["captions"] and mixer(raw, 12, 0, 8)["captions"] != whole[
        "captions"]
    assert not TeacherPoolMixer(str(pool), 1.0, 3)(raw, 11, 0, 8)["teacher_rows"].any()
    with pytest.raises(ValueError, match="training size"):
        TeacherPoolMixer(str(_teacher_pool(tmp_path / "big", size=48)), 0.0, 3)(raw, 0, 0, 8)
    with pytest.raises(ValueError, match="teacher_pool"):
        TeacherPoolMixer("", 0.5, 3)


def test_gan_noise_levels_follow_the_dm_loss_or_their_own_range():
    from qwen_jax.distillation import dmd2
    from qwen_jax.distillation.defaults import distill_config

    config = distill_config("dmd2", "toy")
    t = jnp.linspace(0.02, 0.98, 64)
    key = jax.random.key(3)
    assert dmd2._gan_sigma(config, key, t) is t  # gan.t_max = 0: DMD2's shared t
    config.gan.t_max = 0.4
    t_gan = np.asarray(dmd2._gan_sigma(config, key, t))
    assert t_gan.shape == t.shape and t_gan.min() >= 0.02 and t_gan.max() <= 0.4 and np.ptp(t_gan) > 0.2


def test_guidance_interval_guides_only_the_samples_whose_sigma_is_inside(toy_base):
    from qwen_jax.distillation import roles
    from qwen_jax.training.state import split_trainable

    scale = np.asarray(roles.guidance_scale(jnp.array([0.0, 0.3, 0.5, 0.51, 1.0]), 3.0, (0.0, 0.5)))
    np.testing.assert_array_equal(scale, [3, 3, 3, 1, 1])
    model = checkpoints.load_transformer(Path(toy_base) / "transformer")
    graphdef, params, frozen = split_trainable(model, lora=False)
    cfg, grid = model.config, (1, 4, 6)  # 24 image tokens, 5 text tokens with padding in the negative
    ks = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(ks[0], (2, 24, cfg.in_channels))
    text = jax.random.normal(ks[1], (2, 5, cfg.joint_attention_dim))
    neg = jax.random.normal(ks[2], (2, 5, cfg.joint_attention_dim))
    mask, neg_mask = jnp.ones((2, 5), jnp.int32), jnp.array([[1, 1, 1, 0, 0]] * 2, jnp.int32)
    sigma = jnp.array([0.3, 0.8])  # one sample inside (0, 0.5), one outside
    plain = roles.denoiser(graphdef, params, frozen, text, mask, (grid,))(x, sigma)
    guided = roles.denoiser(graphdef, params, frozen, text, mask, (grid,), (neg, neg_mask), 3.0)(x, sigma)
    interval = roles.denoiser(graphdef, params, frozen, text, mask, (grid,), (neg, neg_mask), 3.0, (0.0, 0.5))(x, sigma)
    np.testing.assert_allclose(interval[0], guided[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(interval[1], plain[1], rtol=1e-5, atol=1e-6)
    assert np.abs(guided[1] - plain[1]).max() > 1e-3  # the guidance is not a no-op on this model
