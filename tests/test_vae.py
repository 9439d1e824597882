"""The Flax VAE and latent packing compute what diffusers' AutoencoderKLQwenImage and
QwenImagePipeline compute, and the VAE key table covers the real checkpoint exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLQwenImage as TorchVAE
from diffusers import QwenImagePipeline
from flax import nnx

from qwen_jax.conversion.errors import ConversionError
from qwen_jax.conversion.plan import SKIP
from qwen_jax.conversion.vae_keys import TABLE, plan_vae, vae_state_dict_to_params
from qwen_jax.models import vae as vae_lib
from qwen_jax.models.latents import denormalize_latents, normalize_latents, pack_latents, unpack_latents
from qwen_jax.models.vae import VAEConfig, abstract_params, model_from_params
from qwen_jax.pytree import flatten_params

from reference import rel_err, state_dict_numpy, to_numpy

# diffusers configs: 4x VAE as VAEConfig.tiny(); 8x VAE with the real temporal pattern, a
# channel drop in the middle (dim_mult 4 -> 2) and encoder attention at scale 1/2.
CONFIGS = {
    "tiny_4x": dict(base_dim=16, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True]),
    "attn_8x": dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 2], num_res_blocks=1, attn_scales=[0.5],
                    temperal_downsample=[False, True, True]),
}
MEAN, STD = [0.3, -0.7, 1.1, 0.05], [2.1, 0.6, 1.4, 3.3]


def torch_vae(name: str, seed: int = 0) -> TorchVAE:
    """A diffusers VAE with every parameter random (gammas around 1, unit-scale convs)."""
    torch.manual_seed(seed)
    model = TorchVAE(**CONFIGS[name], latents_mean=MEAN, latents_std=STD).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.endswith("gamma"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif key.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:  # fan-in of the 2-D conv a single frame sees (the last time slice)
                fan_in = p.shape[1] * p.shape[-1] * p.shape[-2]
                gain = 0.5 if key.startswith("decoder.conv_out") else 1.0  # keep most pixels inside the clamp
                p.copy_(gain * torch.randn_like(p) / fan_in ** 0.5)
    return model


def jax_twin(tv: TorchVAE, **runtime) -> vae_lib.AutoencoderKLQwenImage:
    cfg = VAEConfig.from_diffusers_config(dict(tv.config), **runtime)
    return model_from_params(cfg, vae_state_dict_to_params(cfg, state_dict_numpy(tv), dtype=cfg.jnp_param_dtype))


# One compiled program per call is ~2x faster on CPU than op-by-op dispatch of the many conv shapes.
decode = nnx.jit(lambda model, z: model.decode(z))
encode_moments = nnx.jit(lambda model, x: model.encode_moments(x))
encode = nnx.jit(lambda model, x: model.encode(x))


def nhwc(t: torch.Tensor) -> jax.Array:
    """diffusers (B, C, 1, H, W) -> (B, H, W, C)."""
    return jnp.asarray(to_numpy(t[:, :, 0].permute(0, 2, 3, 1)))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fp32_parity(name):
    tv = torch_vae(name)
    model = jax_twin(tv)
    f = model.config.spatial_factor
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 4, 1, 3, 5, generator=g)  # non-square latent grid
    x = torch.rand(2, 3, 1, 3 * f, 5 * f, generator=g) * 2 - 1
    with torch.no_grad():
        ref_img = tv.decode(z).sample
        if tv.config.attn_scales:
            # diffusers' cached encode passes (x, cache, idx) to encoder attention blocks, which take
            # only x (TypeError); without a cache one frame takes the same path, so call it directly.
            ref_mean, ref_logvar = tv.quant_conv(tv.encoder(x)).chunk(2, dim=1)
            ref_logvar = ref_logvar.clamp(-30.0, 20.0)
        else:
            posterior = tv.encode(x).latent_dist
            ref_mean, ref_logvar = posterior.mean, posterior.logvar
    img = decode(model, nhwc(z))
    mean, logvar = encode_moments(model, nhwc(x))
    ref_img, ref_mean, ref_logvar = nhwc(ref_img), nhwc(ref_mean), nhwc(ref_logvar)
    assert img.shape == (2, 3 * f, 5 * f, 3) and mean.shape == (2, 3, 5, 4)
    assert float(jnp.mean(jnp.abs(ref_img) < 1)) > 0.5  # the clamp does not hide the comparison
    assert rel_err(img, ref_img) <= 1e-5
    assert rel_err(mean, ref_mean) <= 1e-5
    assert rel_err(logvar, ref_logvar) <= 1e-5
    assert rel_err(encode(model, nhwc(x)), mean) <= 1e-6  # encode is the posterior mean


def test_config_round_trip():
    tv = torch_vae("attn_8x")
    cfg = VAEConfig.from_diffusers_config(dict(tv.config))
    assert cfg.spatial_factor == 8 and cfg.attn_scales == (0.5,) and cfg.latents_std == tuple(STD)
    assert VAEConfig.from_diffusers_config(cfg.to_diffusers_config()) == cfg
    assert cfg.to_diffusers_config()["_class_name"] == "AutoencoderKLQwenImage"
    with torch.device("meta"):
        assert VAEConfig.from_diffusers_config(dict(TorchVAE().config)) == VAEConfig.qwen_image()
    assert VAEConfig.tiny().spatial_factor == 4
    with pytest.raises(ValueError, match="AutoencoderKLWan"):
        VAEConfig.from_diffusers_config({"_class_name": "AutoencoderKLWan"})


# ---- latents --------------------------------------------------------------------------------------
def test_pack_unpack_match_diffusers():
    rng = np.random.default_rng(0)
    b, c, h, w = 2, 16, 6, 10
    z = rng.standard_normal((b, h, w, c)).astype(np.float32)
    packed = pack_latents(jnp.asarray(z))
    ref = QwenImagePipeline._pack_latents(torch.from_numpy(z).permute(0, 3, 1, 2), b, c, h, w)
    np.testing.assert_array_equal(np.asarray(packed), ref.numpy())
    # unpack takes pixel sizes and the VAE factor, returns (B, C, 1, h, w)
    ref_z = QwenImagePipeline._unpack_latents(ref, h * 8, w * 8, 8)
    np.testing.assert_array_equal(np.asarray(unpack_latents(packed, h, w)), ref_z[:, :, 0].permute(0, 2, 3, 1).numpy())
    np.testing.assert_array_equal(unpack_latents(pack_latents(z), h, w), z)  # numpy in, numpy out
    with pytest.raises(ValueError):
        pack_latents(z[:, :5])
    with pytest.raises(ValueError):
        unpack_latents(packed, h, w + 2)


def test_normalize_latents():
    z = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 5, 4)), jnp.float32)
    n = normalize_latents(z, MEAN, STD)
    np.testing.assert_allclose(n, (np.asarray(z) - np.array(MEAN)) / np.array(STD), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(denormalize_latents(n, MEAN, STD), z, rtol=1e-6, atol=1e-6)
    assert normalize_latents(z.astype(jnp.bfloat16), MEAN, STD).dtype == jnp.bfloat16


# ---- conversion -------------------------------------------------------------------------------------
def test_full_size_key_coverage():
    with torch.device("meta"):
        tv = TorchVAE()  # class defaults are the released Qwen-Image VAE
    shapes = {k: tuple(v.shape) for k, v in tv.state_dict().items()}
    cfg = VAEConfig.from_diffusers_config(dict(tv.config))
    assert cfg == VAEConfig.qwen_image()
    expected = {p: tuple(s.shape) for p, s in abstract_params(cfg).items()}

    mapped, skipped = {}, []
    for key, shape in shapes.items():
        m = TABLE.map_key(key)
        assert m is not None, key
        if m == SKIP:
            skipped.append(key)
            continue
        assert m.flax_path not in mapped, key
        mapped[m.flax_path] = m.flax_shape(shape)
        assert TABLE.slot_name(m.flax_path, None) == key
    assert mapped == expected
    assert sorted(skipped) == sorted(
        f"{module}.time_conv.{t}" for module in ("encoder.down_blocks.5", "encoder.down_blocks.8",
                                                 "decoder.up_blocks.0.upsamplers.0", "decoder.up_blocks.1.upsamplers.0")
        for t in ("weight", "bias"))
    assert plan_vae(cfg, shapes).skipped == sorted(skipped)

    n = {k: int(np.prod(s)) for k, s in shapes.items()}
    total, n_skipped = sum(n.values()), sum(n[k] for k in skipped)
    assert total == 126_892_531 and len(shapes) == 194
    # time_conv: enc 192*192*3+192 and 384*384*3+384; dec 2 * (768*384*3+768) = 2,324,544
    assert n_skipped == 2_324_544
    # A k3 causal conv keeps 1 of its 3 time slices: 2/3 of every (O, I, 3, 3, 3) weight is dropped.
    dropped = sum(v * 2 // 3 for k, v in n.items() if len(shapes[k]) == 5 and shapes[k][2] == 3 and k not in skipped)
    assert dropped == 79_968_384
    flax_total = sum(int(np.prod(s)) for s in expected.values())
    assert flax_total == total - n_skipped - dropped == 44_599_603


@pytest.fixture(scope="module")
def tiny_state():
    tv = torch_vae("attn_8x")
    return VAEConfig.from_diffusers_config(dict(tv.config)), state_dict_numpy(tv)


def test_strict_missing_key(tiny_state):
    cfg, sd = tiny_state
    key = "decoder.up_blocks.1.resnets.0.conv_shortcut.weight"
    with pytest.raises(ConversionError, match=rf"missing.*{key}"):
        vae_state_dict_to_params(cfg, {k: v for k, v in sd.items() if k != key})
    key = "encoder.mid_block.attentions.0.norm.gamma"
    with pytest.raises(ConversionError, match=rf"missing.*{key}"):
        vae_state_dict_to_params(cfg, {k: v for k, v in sd.items() if k != key})


@pytest.mark.parametrize("key", [
    "decoder.up_blocks.9.resnets.0.conv1.weight",  # no such block
    "encoder.down_blocks.1.time_conv.weight",  # down_blocks.1 is a 2-D resample: no time_conv
    "encoder.down_blocks.0.norm1.weight",  # norms hold gamma, not weight
])
def test_strict_extra_key(tiny_state, key):
    cfg, sd = tiny_state
    with pytest.raises(ConversionError, match=rf"unexpected.*{key}"):
        vae_state_dict_to_params(cfg, {**sd, key: np.zeros((8, 8, 3, 3, 3), np.float32)})


def test_strict_wrong_shape(tiny_state):
    cfg, sd = tiny_state
    key = "encoder.down_blocks.0.conv1.weight"
    with pytest.raises(ConversionError, match=rf"wrong-shape.*{key}"):
        vae_state_dict_to_params(cfg, {**sd, key: np.zeros((8, 9, 3, 3, 3), np.float32)})
    key = "encoder.conv_in.weight"  # a Conv2d-shaped tensor where a causal Conv3d weight belongs
    with pytest.raises(ConversionError, match=rf"wrong-shape.*{key}"):
        vae_state_dict_to_params(cfg, {**sd, key: np.zeros((8, 3, 3, 3), np.float32)})
    key = "decoder.mid_block.attentions.0.to_qkv.weight"
    with pytest.raises(ConversionError, match=rf"wrong-shape.*{key}"):
        vae_state_dict_to_params(cfg, {**sd, key: np.zeros((48, 16, 3, 3), np.float32)})


def test_string_keyed_params_update_model(tiny_state):
    # Checkpoint trees have string keys ("0", "1", ...) for module sequences; nnx.update must take them.
    cfg, sd = tiny_state
    params = vae_state_dict_to_params(cfg, sd)
    model = model_from_params(cfg, params)
    nnx.update(model, jax.tree.map(jnp.zeros_like, params))
    assert not np.any(np.asarray(model.decoder.up_blocks["1"].resnets["0"].conv_shortcut.kernel[...]))
    assert set(flatten_params(nnx.state(model, nnx.Param))) == set(abstract_params(cfg))


def test_chunked_attention_is_exact(monkeypatch):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 15, 8)), jnp.float32) for _ in range(3))
    full = vae_lib._attention(q, k, v)
    monkeypatch.setattr(vae_lib, "ATTENTION_QUERY_CHUNK", 4)  # 15 queries -> 4 chunks, last one padded
    np.testing.assert_allclose(vae_lib._attention(q, k, v), full, rtol=1e-6, atol=1e-6)


def test_bf16_decode():
    tv = torch_vae("tiny_4x")
    ref = jax_twin(tv)
    model = jax_twin(tv, param_dtype="bfloat16", dtype="bfloat16")
    # the parity test's shape, so the fp32 decode compiled there is reused
    z = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 5, 4)), jnp.float32)
    img = decode(model, z)
    assert img.dtype == jnp.bfloat16 and model.decoder.conv_in.kernel[...].dtype == jnp.bfloat16
    assert rel_err(img.astype(jnp.float32), decode(ref, z)) <= 3e-2
