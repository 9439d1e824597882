"""Weight conversion diffusers <-> Flax: round trips, formats, dtypes, loading onto a mesh."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from diffusers import QwenImageTransformer2DModel
from jax.sharding import AxisType, PartitionSpec
from safetensors.torch import save_file

from qwen_jax import load_transformer
from qwen_jax.checkpoints import param_metadata
from qwen_jax.conversion.safetensors_io import SafetensorsFile, read_tensor
from reference import rel_err, state_dict_numpy, to_numpy, torch_transformer

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("convert_weights", REPO / "tools" / "convert_weights.py")
convert_weights = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_weights)


def convert(*args) -> int:
    return convert_weights.main([str(a) for a in args] + ["--quiet"])


def read_folder(folder: Path) -> dict[str, np.ndarray]:
    """All tensors of a diffusers folder, as written (bit-exact numpy views)."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({k: np.array(read_tensor(i)) for k, i in SafetensorsFile(f).tensors.items()})
    return out


def forward_both(tm, model, batch=2):
    """Both models on the same inputs; torch runs in the Flax model's parameter dtype."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 24, tm.config.in_channels, generator=g)
    txt = torch.randn(batch, 7, tm.config.joint_attention_dim, generator=g)
    mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4][:batch])
    t = torch.rand(batch, generator=g)
    torch_dtype = torch.bfloat16 if model.config.param_dtype == "bfloat16" else torch.float32
    x, txt = x.to(torch_dtype), txt.to(torch_dtype)
    with torch.no_grad():
        ref = to_numpy(tm.to(torch_dtype)(x, txt, mask, t, [(1, 4, 6)] * batch).sample)
    j = lambda a: jnp.asarray(to_numpy(a)).astype(model.config.dtype)  # noqa: E731
    return np.asarray(model(j(x), j(txt), j(mask), j(t), [(1, 4, 6)] * batch).astype(jnp.float32)), ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    tm = torch_transformer(dtype=dtype)
    original = state_dict_numpy(tm)
    # fp32: a sharded diffusers folder with an index; bf16: one file.
    tm.save_pretrained(tmp_path / "src", max_shard_size="200KB" if dtype == torch.float32 else "10GB")
    assert (tmp_path / "src" / "diffusion_pytorch_model.safetensors.index.json").exists() == (dtype == torch.float32)

    assert convert(tmp_path / "src", tmp_path / "flax") == 0
    stored_dtypes = {d for _, d in param_metadata(tmp_path / "flax").values()}
    assert stored_dtypes == {np.dtype(ml_dtypes.bfloat16) if dtype == torch.bfloat16 else np.dtype(np.float32)}

    assert convert("--to", "diffusers", "--max-shard-size", "150KB", tmp_path / "flax", tmp_path / "back") == 0
    index = json.loads((tmp_path / "back" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and set(index["weight_map"]) == set(original)

    back = read_folder(tmp_path / "back")
    assert set(back) == set(original)
    for key, value in original.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        assert back[key].tobytes() == value.tobytes(), key

    reloaded, info = QwenImageTransformer2DModel.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert reloaded.config.num_layers == tm.config.num_layers


def test_loaded_folder_matches_diffusers(tmp_path):
    tm = torch_transformer()
    tm.save_pretrained(tmp_path / "src")
    assert convert(tmp_path / "src", tmp_path / "flax") == 0
    model = load_transformer(tmp_path / "flax")
    out, ref = forward_both(tm, model)
    assert rel_err(out, ref) <= 1e-5


def test_dtype_flag_casts(tmp_path):
    tm = torch_transformer()
    tm.save_pretrained(tmp_path / "src")
    assert convert("--dtype", "bfloat16", tmp_path / "src", tmp_path / "flax") == 0
    assert {d for _, d in param_metadata(tmp_path / "flax").values()} == {np.dtype(ml_dtypes.bfloat16)}
    model = load_transformer(tmp_path / "flax")
    assert model.config.param_dtype == "bfloat16" and model.config.dtype == "bfloat16"
    out, ref = forward_both(tm, model)
    assert rel_err(out, ref) <= 2e-2
    model32 = load_transformer(tmp_path / "flax", param_dtype="float32")  # cast up while loading
    assert model32.img_in.kernel[...].dtype == jnp.float32


def test_comfyui_single_file(tmp_path):
    # head_dim 128 lets the converter infer the whole config from the tensor shapes.
    tm = torch_transformer(attention_head_dim=128, num_attention_heads=1, axes_dims_rope=(16, 56, 56), num_layers=1)
    sd = {f"model.diffusion_model.{k}": v.contiguous() for k, v in tm.state_dict().items()}
    save_file(sd, tmp_path / "qwen_image_comfy.safetensors")
    assert convert(tmp_path / "qwen_image_comfy.safetensors", tmp_path / "flax") == 0
    model = load_transformer(tmp_path / "flax")
    assert model.config.num_attention_heads == 1 and model.config.num_layers == 1
    out, ref = forward_both(tm, model)
    assert rel_err(out, ref) <= 1e-5


def test_single_file_with_explicit_config(tmp_path):
    tm = torch_transformer()
    save_file({k: v.contiguous() for k, v in tm.state_dict().items()}, tmp_path / "weights.safetensors")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(dict(tm.config)))
    assert convert(tmp_path / "weights.safetensors", tmp_path / "no_cfg") == 1  # head_dim 32: cannot infer
    assert not (tmp_path / "no_cfg").exists()
    assert convert("--config", tmp_path / "cfg" / "config.json", tmp_path / "weights.safetensors", tmp_path / "flax") == 0
    out, ref = forward_both(tm, load_transformer(tmp_path / "flax"))
    assert rel_err(out, ref) <= 1e-5


def test_load_onto_mesh(tmp_path):
    tm = torch_transformer()
    tm.save_pretrained(tmp_path / "src")
    assert convert(tmp_path / "src", tmp_path / "flax") == 0
    mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(AxisType.Auto,) * 2)
    model = load_transformer(tmp_path / "flax", mesh=mesh)
    q = model.transformer_blocks.attn.to_q.kernel[...]
    assert q.sharding.spec == PartitionSpec(None, "fsdp", "tensor")
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (2, 32, 16)
    out, ref = forward_both(tm, model)
    assert rel_err(out, ref) <= 1e-5


def test_conversion_never_imports_torch(tmp_path):
    tm = torch_transformer()
    tm.save_pretrained(tmp_path / "src")
    code = (
        "import sys, runpy; sys.argv = ['convert_weights.py', sys.argv[1], sys.argv[2], '--quiet'];\n"
        "try:\n    runpy.run_path(%r, run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code == 0, e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    ) % str(REPO / "tools" / "convert_weights.py")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "src"), str(tmp_path / "flax")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "flax" / "config.json").exists()
