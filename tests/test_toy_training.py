"""The toy world end to end at smoke size: build the model family, train from the procedural
source with the real trainer, resume it, export it, and evaluate the export analytically."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from qwen_jax.eval import toy as toy_eval
from qwen_jax.toy.build import main as build_main
from qwen_jax.toy.data import ToyLoader
from qwen_jax.train import train
from qwen_jax.training.metrics import read_metrics
from launch import xla_flags
from test_train import CONFIG


@pytest.fixture(scope="session")
def toy_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    cwd = os.getcwd()
    os.chdir(root)
    try:  # the CLI's usual case: a relative output path
        # every weight drawn: the distillation tests use this random model as their teacher, and
        # an adaLN-zero one outputs exactly 0 (true CFG's norm rescale would divide 0 by 0)
        assert build_main(["--out", "base", "--init", "random"]) == 0
        assert build_main(["--out", "base"]) == 1  # exists: refused
    finally:
        os.chdir(cwd)
    return root / "base"


def toy_config(base, **overrides):
    """configs/flow_matching.py:toy from `base`, its 4 blocks scanned one at a time: the recipe
    unrolls them for CPU throughput at twice the compile time of these few steps (see
    test_distillation_train.load_config; the recipe as it is trains in test_toy_models.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("flow_matching_config", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("toy")
    c.model.pretrained = str(base)
    c.update_from_flattened_dict({"model.scan_unroll": 1, **overrides})
    c.lock()
    return c


def test_toy_loader_is_sharded_and_resumable():
    whole = next(iter(ToyLoader(3, 8)))
    halves = [next(iter(ToyLoader(3, 4, shard_index=i, shard_count=2))) for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([h["images"] for h in halves]), whole["images"])
    it = ToyLoader(3, 8).iterator()
    next(it)
    state = it.get_state()
    second = next(it)
    np.testing.assert_array_equal(next(ToyLoader(3, 8).iterator(state))["ids"], second["ids"])
    assert whole["images"].shape == (8, 32, 32, 3) and whole["images"].min() >= -1 and len(whole["captions"]) == 8


def test_toy_teacher_trains_resumes_exports_and_evaluates(toy_base, tmp_path):
    overrides = {"total_steps": 4, "data.batch_size": 16, "checkpoint.every": 2, "eval.every": 4, "eval.num_steps": 2,
                 "log.every": 1, "log.progress": False}
    one = jax.devices()[:1]  # the recipe on 8 devices: test_toy_models.py
    train(toy_config(toy_base, **{**overrides, "total_steps": 2}), tmp_path / "run", devices=one)
    result = train(toy_config(toy_base, **overrides), tmp_path / "run", devices=one)  # resumes at step 2
    assert result["step"] == 4 and sorted(m["step"] for m in read_metrics(tmp_path / "run")) == [1, 2, 3, 4]
    assert np.isfinite(result["last_metrics"]["loss"])
    prompts = ["a red circle on a blue background", "a black triangle on a white background"]
    assert toy_eval.main(["--model", str(tmp_path / "run" / "export"), "--steps", "2", "--guidance", "2",
                          "--seeds", "2", "--prompts", *prompts, "--out", str(tmp_path / "eval"), "--quiet"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["count"] == 4 and 0 <= metrics["accuracy"] <= 1 and set(metrics["per_prompt"]) == set(prompts)
    assert (tmp_path / "eval" / "grid.png").is_file()
    assert toy_eval.main(["--model", str(toy_base), "--prompts", "a purple circle", "--out", str(tmp_path / "x")]) == 2
    # --stochastic (a student trained with distill.renoise=sde): the last step lands on x0 either way,
    # so one step is the same image; at two steps the fresh noise of the middle step shows
    export = tmp_path / "run" / "export"
    kw = dict(prompts=prompts[:1], seeds=2, guidance=1.0, progress=False)
    one = [toy_eval.evaluate_model(export, tmp_path / f"s1{s}", steps=1, stochastic=s, **kw)[1] for s in (False, True)]
    two = [toy_eval.evaluate_model(export, tmp_path / f"s2{s}", steps=2, stochastic=s, **kw)[1] for s in (False, True)]
    np.testing.assert_allclose(one[0], one[1], atol=1e-6)
    assert np.abs(two[0] - two[1]).max() > 1e-2
    assert json.loads((tmp_path / "s2True" / "metrics.json").read_text())["stochastic"] is True

    # a trained transformer with the seeded text encoder regenerated (how a committed teacher ships)
    from qwen_jax.toy.build import build_toy_pipeline, text_encoder_digest
    from qwen_jax.pipeline import load_text_encoder

    digest = text_encoder_digest(load_text_encoder(toy_base / "text_encoder"))
    trained = str(tmp_path / "run" / "export" / "transformer")
    assert build_main(["--out", str(tmp_path / "again"), "--transformer", trained, "--expect-digest", "0" * 64]) == 1
    assert not (tmp_path / "again").exists()
    assert build_toy_pipeline(tmp_path / "again", transformer=trained, expect_digest=digest) == digest


def test_demo_shortened_uses_the_committed_teacher_and_compares(tmp_path, capsys):
    """`make demo` without its distillation: the committed teacher regenerates its text encoder
    exactly (digest checked), samples the right colours, and the demo prints one table and a grid."""
    from qwen_jax.toy import demo

    prompts = ["a red circle on a blue background", "a green square on a black background",
               "a white triangle on a magenta background", "a cyan square on a yellow background"]
    args = ["--out", str(tmp_path / "demo"), "--prompts", *prompts, "--seeds", "2", "--teacher-steps", "12",
            "--no-distill"]
    assert demo.main(args) == 0
    printed = capsys.readouterr().out
    assert "teacher 12 steps, CFG 2" in printed and "teacher 2 steps, CFG 2" in printed
    assert (tmp_path / "demo" / "compare.png").is_file()
    m = json.loads((tmp_path / "demo" / "eval_teacher_12_steps_CFG_2" / "metrics.json").read_text())
    assert m["bg_accuracy"] == 1.0 and m["fg_accuracy"] >= 0.75 and m["count"] == 8  # chance: 1/7
    assert demo.main(args[:2] + ["--prompts", prompts[0], "--seeds", "1", "--teacher-steps", "2", "--no-distill"]) == 0
    from qwen_jax.toy import distill  # the demo's engine: a bad flag stops it before anything is written

    assert distill.main(["--out", str(tmp_path / "bad"), "--regression-steps", "-1"]) == 1
    assert not (tmp_path / "bad").exists()


def test_demo_distills_the_student(tmp_path, capsys, monkeypatch):
    """`make demo` at smoke size: a DMD2 + GAN stage, the three-way table, a loadable student.
    (PCM -> DMD2 is tested in-process in test_distillation_train.py; --retrain runs the toy
    teacher config, tested in-process above.)"""
    from qwen_jax.toy import demo

    # the stages it launches (teacher pairs, DMD2 training) see the one CPU device `make demo`
    # has, not the 8 simulated ones (DMD2 on an 8-device mesh: test_distillation_train.py); the
    # 8-device compile of the DMD2 step alone took 40 s longer
    monkeypatch.setenv("XLA_FLAGS", xla_flags())
    out = tmp_path / "demo"
    # its blocks scanned, not unrolled as in the recipe: half the compile (see toy_config)
    assert demo.main(["--out", str(out), "--pcm-steps", "0", "--dmd2-steps", "2", "--override=--config.model.scan_unroll=1",
                      "--prompts", "a red circle on a blue background", "--seeds", "1", "--teacher-steps", "3"]) == 0
    assert read_metrics(out / "dmd2")[-1]["step"] == 2 and not (out / "pcm").exists()
    assert json.loads((out / "dmd2" / "config.json").read_text())["model"]["scan_unroll"] == 1  # --override
    assert "student 2 steps, CFG 1" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["teacher 3 steps, CFG 2", "teacher 2 steps, CFG 2", "student 2 steps, CFG 1"]
    from qwen_jax.pipeline import Pipeline

    Pipeline.from_pretrained(out / "student")  # a pipeline folder the sampler loads


def test_demo_retrain_trains_from_the_committed_init(tmp_path, monkeypatch):
    """--retrain runs the committed recipe as it is (configs/flow_matching.py:toy starts from
    models/toy/init, no assembly step) and distills from that run's export."""
    from qwen_jax.toy import demo

    commands = []
    monkeypatch.setattr(demo.subprocess, "run", lambda cmd, check: commands.append(cmd))  # no training
    assert demo.retrain(tmp_path, steps=3) == tmp_path / "teacher_run" / "export"
    assert commands[0][-2:] == [f"--workdir={tmp_path / 'teacher_run'}", "--config.total_steps=3"]
    assert not any("pretrained" in arg for arg in commands[0])
