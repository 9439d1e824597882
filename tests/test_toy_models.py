"""The committed toy models (`models/toy/*`) load as they are, from a fresh clone, wherever a model
folder is taken; the toy configs train from a clean workdir with nothing built by hand first.

The session's QWEN_JAX_CACHE starts empty (conftest), so the first load here builds the family's
shared parts exactly as a new user's first command does.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from qwen_jax.conversion.errors import ConversionError
from qwen_jax.eval import toy_metrics
from qwen_jax.pipeline import Pipeline, resolve_folder
from qwen_jax.toy import parse_prompt
from qwen_jax.toy.folders import INIT, STUDENT, TEACHER
from qwen_jax.train import train

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle on a blue background", "a white square on a black background"]


def config(name: str, variant: str = "toy", **overrides):
    spec = importlib.util.spec_from_file_location(f"{name}_config", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(variant)
    c.update_from_flattened_dict({"log.progress": False, "eval.every": 0, **overrides})
    c.lock()
    return c


def colours_right(images, captions) -> float:
    """Fraction of images whose background and foreground colours are the caption's."""
    decoded = [toy_metrics.decode_image(image) for image in images]
    return float(np.mean([(d["fg"], d["bg"]) == (fg, bg) for d, (fg, _, bg) in
                          zip(decoded, map(parse_prompt, captions))]))


def test_committed_models_load_through_every_entry_point(tmp_path):
    from qwen_jax.eval import toy as toy_eval
    from qwen_jax.sample import main as sample_main

    for folder, steps, guidance in ((TEACHER, 8, 2.0), (STUDENT, 2, 1.0)):
        resolved = resolve_folder(folder)
        assert (resolved / "transformer").resolve() == (folder / "transformer").resolve()  # linked, not copied
        pipe = Pipeline.from_pretrained(folder)
        out = pipe(PROMPTS, " " if guidance > 1 else None, height=32, width=32, num_steps=steps, guidance=guidance,
                   seed=[0, 1])
        # colours right for both prompts: the regenerated text encoder is the one trained with
        assert colours_right(out.array, PROMPTS) == 1.0, folder
    assert resolve_folder(INIT).joinpath("transformer", "config.json").is_file()  # the family's random start

    assert sample_main(["--model", str(STUDENT), "--prompt", PROMPTS[0], "--steps", "2", "--guidance", "1",
                        "--height", "32", "--width", "32", "--num-images", "2", "--out", str(tmp_path / "s")]) == 0
    assert len(list((tmp_path / "s").glob("*.png"))) == 2
    assert toy_eval.main(["--model", str(TEACHER), "--prompts", PROMPTS[0], "--seeds", "1", "--steps", "2",
                          "--out", str(tmp_path / "e")]) == 0
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["count"] == 1


def test_toy_model_folder_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "toy.json").write_text("{")
    with pytest.raises(ConversionError, match="toy.json: not readable"):
        resolve_folder(bad)
    (bad / "toy.json").write_text(json.dumps({"seed": 0}))
    with pytest.raises(ConversionError, match="text_encoder_sha256"):
        resolve_folder(bad)
    meta = json.loads((TEACHER / "toy.json").read_text())
    (bad / "toy.json").write_text(json.dumps(meta))
    with pytest.raises(ConversionError, match="needs transformer/"):
        resolve_folder(bad)
    shutil.copytree(TEACHER / "transformer", bad / "transformer")
    # another encoder: neither the digest nor (moved by 1e-3 of the rms, 100x the tolerance) the fingerprint
    fingerprint = meta["text_encoder_fingerprint"]
    moved = {**fingerprint, "projections": [p + 1e-3 * fingerprint["rms"] for p in fingerprint["projections"]]}
    (bad / "toy.json").write_text(json.dumps({**meta, "text_encoder_sha256": "0" * 64,
                                              "text_encoder_fingerprint": moved}))
    with pytest.raises(ConversionError, match="differs from the one the transformer was trained with"):
        resolve_folder(bad, cache_dir=tmp_path / "cache")
    assert not any(p.name.startswith("bad-") for p in (tmp_path / "cache" / "toy-models").iterdir())


def test_encoder_check_accepts_rounding_and_refuses_another_draw():
    """The committed encoder is recognised by its fingerprint when this host rounds the draw
    differently (every parameter one ulp off: the digest changes), never when it is another draw."""
    from qwen_jax.models import QwenTextEncoder, TextEncoderConfig
    from qwen_jax.models.random_init import random_module
    from qwen_jax.toy.build import fingerprints_match, text_encoder_digest, text_encoder_fingerprint

    committed = json.loads((TEACHER / "toy.json").read_text())
    encoder = random_module(QwenTextEncoder, TextEncoderConfig.tiny(), 1)  # the family's seed 0 encoder
    assert fingerprints_match(text_encoder_fingerprint(encoder), committed["text_encoder_fingerprint"])
    state = nnx.state(encoder, nnx.Param)
    nudged = jax.tree.map(lambda x: np.nextafter(np.asarray(x), np.float32(np.inf)), state)
    nnx.update(encoder, nudged)
    assert text_encoder_digest(encoder) != committed["text_encoder_sha256"]
    assert fingerprints_match(text_encoder_fingerprint(encoder), committed["text_encoder_fingerprint"])
    other = random_module(QwenTextEncoder, TextEncoderConfig.tiny(), 2)
    assert not fingerprints_match(text_encoder_fingerprint(other), committed["text_encoder_fingerprint"])
    assert not fingerprints_match({"rms": 1.0}, committed["text_encoder_fingerprint"])


def test_toy_configs_train_from_a_clean_workdir_and_export(tmp_path):
    """configs/flow_matching.py:toy as it is (from models/toy/init) on 8 devices, and from the
    committed teacher as model.pretrained on 1 device (blocks scanned), then `python -m qwen_jax.export`."""
    from qwen_jax.export import main as export_main

    small = {"total_steps": 1, "data.batch_size": 8, "checkpoint.every": 1, "log.every": 1}
    assert config("flow_matching").model.pretrained == str(INIT) and config("pcm").model.pretrained == str(TEACHER)
    result = train(config("flow_matching", **small), tmp_path / "eight")
    assert len(jax.devices()) == 8 and result["step"] == 1 and np.isfinite(result["last_metrics"]["loss"])
    Pipeline.from_pretrained(tmp_path / "eight" / "export")

    # (its blocks scanned: the unrolled recipe compiled once above is enough)
    result = train(config("flow_matching", **small, **{"model.pretrained": str(TEACHER), "model.scan_unroll": 1}),
                   tmp_path / "one", devices=jax.devices()[:1])
    assert result["step"] == 1 and np.isfinite(result["last_metrics"]["loss"])
    assert export_main(["--workdir", str(tmp_path / "one"), "--out", str(tmp_path / "one_export")]) == 0
    Pipeline.from_pretrained(tmp_path / "one_export")


def test_family_transformer_starts_adaln_zero_for_both_token_sizes():
    """The family's random transformer outputs exactly 0 (adaLN-zero) and knows its token size."""
    from qwen_jax.models import QwenImageTransformer
    from qwen_jax.models.random_init import random_module
    from qwen_jax.toy.build import adaln_zero, token_pixels_of, toy_transformer_config

    for pixels, grid in ((4, 8), (2, 16)):
        cfg = toy_transformer_config(pixels)
        assert token_pixels_of(cfg) == pixels
        graphdef, state = nnx.split(adaln_zero(random_module(QwenImageTransformer, cfg, 0)))
        x = jax.random.normal(jax.random.key(0), (2, grid * grid, cfg.in_channels))
        text = jax.random.normal(jax.random.key(1), (2, 5, cfg.joint_attention_dim))
        forward = jax.jit(lambda state, *args: nnx.merge(graphdef, state)(*args, ((1, grid, grid),)))  # one compile, not op by op
        out = forward(state, x, text, np.ones((2, 5), np.int32), np.array([0.3, 0.9], np.float32))
        assert out.shape == (2, grid * grid, cfg.out_features) and not np.any(np.asarray(out))
    with pytest.raises(ValueError, match="token_pixels must be one of"):
        toy_transformer_config(8)


def test_px2_init_resolves_to_a_factor_1_codec():
    """configs/flow_matching.py:toy_px2 starts from models/toy/init_px2: 2x2-pixel tokens, so the
    family built for it has the identity-sized codec and a 12-channel transformer."""
    from qwen_jax.toy.folders import INIT_PX2

    c = config("flow_matching", "toy_px2")
    assert c.model.pretrained == str(INIT_PX2)
    folder = resolve_folder(c.model.pretrained)
    assert json.loads((folder / "vae" / "config.json").read_text())["factor"] == 1
    assert json.loads((folder / "transformer" / "config.json").read_text())["in_channels"] == 12
    assert Pipeline.from_pretrained(folder).pixels_per_token == 2
