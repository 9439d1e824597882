"""End to end: a diffusers Qwen-Image folder converted in one command, then images from JAX
identical to diffusers' QwenImagePipeline; the sampling CLI; hub ids offline."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

from qwen_jax.conversion.errors import ConversionError
from qwen_jax.models.text_encoder import TextEncoderConfig
from qwen_jax.pipeline import Pipeline
from qwen_tokenizer import qwen_tokenizer  # noqa: F401  (session fixture)
from reference import torch_transformer
from test_conversion import REPO, convert
from test_flow import QWEN_SCHEDULER
from test_text_encoder import torch_text_encoder
from test_vae import torch_vae

PROMPTS = ["A red fox in the snow, watercolor.", "cat"]
HEIGHT, WIDTH = 64, 96  # non-square: 4 x 6 packed tokens with the 8x VAE


@pytest.fixture(scope="module")
def folders(qwen_tokenizer, tmp_path_factory):  # noqa: F811
    """A tiny random diffusers Qwen-Image folder and its qwen_jax conversion."""
    root = tmp_path_factory.mktemp("pipe")
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER), vae=torch_vae("attn_8x"),
        text_encoder=torch_text_encoder(TextEncoderConfig.tiny(), seed=1), tokenizer=qwen_tokenizer,
        transformer=torch_transformer())
    pipe.save_pretrained(root / "diffusers")
    return pipe, root


def test_whole_folder_converts_in_one_command(folders, capsys):
    _, root = folders
    assert convert(root / "diffusers", root / "jax") == 0
    out = capsys.readouterr().out
    assert "text_encoder:" in out and "skipped" in out and "visual (" in out and "lm_head (1)" in out
    assert "vae:" in out and "time_conv" in out
    for name in ("transformer", "vae", "text_encoder"):
        assert (root / "jax" / name / "params").is_dir()
    assert (root / "jax" / "tokenizer" / "tokenizer.json").is_file()
    assert (root / "jax" / "scheduler" / "scheduler_config.json").is_file()


def test_images_match_diffusers_pipeline(folders):
    pipe, root = folders
    if not (root / "jax").exists():
        assert convert(root / "diffusers", root / "jax") == 0
    latents = torch.randn(2, (HEIGHT // 16) * (WIDTH // 16), 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = pipe(prompt=PROMPTS, negative_prompt=" ", true_cfg_scale=4.0, height=HEIGHT, width=WIDTH,
                    num_inference_steps=4, latents=latents, output_type="np").images
    ours = Pipeline.from_pretrained(root / "jax")
    got = ours(PROMPTS, " ", height=HEIGHT, width=WIDTH, num_steps=4, guidance=4.0, latents=latents.numpy())
    assert got.array.shape == want.shape == (2, HEIGHT, WIDTH, 3)
    assert float(np.abs(got.array - want).max()) <= 1e-3
    assert got.images[0].size == (WIDTH, HEIGHT)
    assert 0.02 < float(want.std())  # not a blank image: the comparison means something

    # the few-step student path: 2 steps, no CFG, sigmas 1.0 / 0.75
    with torch.no_grad():
        want2 = pipe(prompt=PROMPTS, height=HEIGHT, width=WIDTH, sigmas=[1.0, 0.5], true_cfg_scale=1.0,
                     num_inference_steps=2, latents=latents, output_type="np").images
    got2 = ours(PROMPTS, height=HEIGHT, width=WIDTH, num_steps=2, guidance=1.0, sigmas=[1.0, 0.5],
                latents=latents.numpy())
    assert float(np.abs(got2.array - want2).max()) <= 1e-3


def test_sample_cli_writes_pngs_and_manifest(folders, tmp_path):
    _, root = folders
    if not (root / "jax").exists():
        assert convert(root / "diffusers", root / "jax") == 0
    (tmp_path / "prompts.txt").write_text("a cat\n\na dog on a hill\n")
    result = subprocess.run(
        [sys.executable, "-m", "qwen_jax.sample", "--model", str(root / "jax"), "--prompt-file",
         str(tmp_path / "prompts.txt"), "--steps", "2", "--guidance", "1", "--fixed-shift", "3",
         "--height", "32", "--width", "48", "--num-images", "2", "--seed", "5", "--batch-size", "2",
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["a cat", "a cat", "a dog on a hill", "a dog on a hill"]
    assert [r["seed"] for r in rows] == [5, 6, 7, 8]
    assert all((tmp_path / "out" / r["file"]).is_file() and r["steps"] == 2 for r in rows)


def test_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ConversionError, match="cannot be reached"):
        Pipeline.from_pretrained("Qwen/Qwen-Image", cache_dir=tmp_path / "cache")
    with pytest.raises(ConversionError, match="no such folder"):
        Pipeline.from_pretrained(str(tmp_path / "missing" / "deeper" / "x"))


def test_notebook_runs_on_tiny_components_and_matches_its_script(folders, tmp_path, monkeypatch):
    _, root = folders
    if not (root / "jax").exists():
        assert convert(root / "diffusers", root / "jax") == 0
    notebook = json.loads((REPO / "notebooks" / "sample.ipynb").read_text())
    code = ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]

    sys.path.insert(0, str(REPO / "tools"))
    from sync_notebook import percent_cells

    script = (REPO / "notebooks" / "sample.py").read_text()
    assert code == [src for kind, src in percent_cells(script) if kind == "code"], "run tools/sync_notebook.py"

    monkeypatch.setenv("QWEN_JAX_MODEL", str(root / "jax"))
    monkeypatch.setenv("QWEN_JAX_SIZE", "48x32")
    monkeypatch.setenv("QWEN_JAX_STEPS", "2")
    monkeypatch.setenv("QWEN_JAX_GRID", str(tmp_path / "grid.png"))
    namespace: dict = {}
    for source in code:  # the notebook's cells, in order, in one namespace (as a kernel runs them)
        exec(compile(source, "sample.ipynb", "exec"), namespace)
    from PIL import Image

    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (2 * 48 + 2, 2 * 32 + 2)
    assert namespace["fast"].array.shape == (4, 32, 48, 3)


def test_converted_vae_and_text_encoder_match_their_references(folders):
    import jax.numpy as jnp

    from qwen_jax.pipeline import load_text_encoder, load_vae

    pipe, root = folders
    if not (root / "jax").exists():
        assert convert(root / "diffusers", root / "jax") == 0
    vae = load_vae(root / "jax" / "vae")
    z = torch.randn(2, 4, 1, 5, 7, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = pipe.vae.decode(z).sample[:, :, 0].permute(0, 2, 3, 1).numpy()
    got = np.asarray(vae.decode(jnp.asarray(z[:, :, 0].permute(0, 2, 3, 1).numpy())))
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-5
    # encode: diffusers' cached `encode` breaks with attn_scales (its bug); one frame through
    # encoder + quant_conv is the same computation
    x = torch.rand(2, 3, 1, 40, 56, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        want_mean = pipe.vae.quant_conv(pipe.vae.encoder(x))[:, :4, 0].permute(0, 2, 3, 1).numpy()
    got_mean = np.asarray(vae.encode(jnp.asarray(x[:, :, 0].permute(0, 2, 3, 1).numpy())))
    assert np.linalg.norm(got_mean - want_mean) / np.linalg.norm(want_mean) <= 1e-5

    te = load_text_encoder(root / "jax" / "text_encoder")
    ids = torch.randint(0, 151000, (2, 11), generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[1] * 11, [1] * 7 + [0] * 4])
    with torch.no_grad():
        want = pipe.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    got = np.asarray(te(jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy())))
    real = mask.numpy().astype(bool)
    assert np.linalg.norm(got[real] - want.numpy()[real]) / np.linalg.norm(want.numpy()[real]) <= 1e-5


def test_bad_pipeline_folders_write_nothing(folders, tmp_path, capsys):
    import shutil

    _, root = folders
    broken = tmp_path / "broken"
    shutil.copytree(root / "diffusers", broken)
    vae_file = broken / "vae" / "diffusion_pytorch_model.safetensors"
    vae_file.write_bytes(vae_file.read_bytes()[:-100])  # truncated VAE weights
    assert convert(broken, tmp_path / "out") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "truncated" in err and "vae" in err and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]

    shutil.rmtree(broken / "vae")
    assert convert(broken, tmp_path / "out") == 1
    assert "no vae/" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]
