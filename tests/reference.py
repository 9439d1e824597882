"""Tiny diffusers reference transformers with random weights, and helpers to compare with them."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import QwenImageTransformer2DModel
from flax import nnx

from qwen_jax.conversion.transformer import state_dict_to_params
from qwen_jax.models import QwenImageTransformer, TransformerConfig

TINY = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=32,
            num_attention_heads=2, joint_attention_dim=64, axes_dims_rope=(8, 12, 12))


def torch_transformer(seed: int = 0, dtype=torch.float32, **config) -> QwenImageTransformer2DModel:
    """A diffusers transformer whose every parameter, norm scales included, is random."""
    torch.manual_seed(seed)
    model = QwenImageTransformer2DModel(**{**TINY, **config}).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.split(".")[-2]:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))  # RMSNorm scales around 1, not ones
            elif p.ndim == 2:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model.to(dtype)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return (t.float() if t.dtype == torch.bfloat16 else t).detach().cpu().numpy()


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """bf16 tensors come out as ml_dtypes.bfloat16 arrays, bit for bit."""
    import ml_dtypes

    out = {}
    for k, v in model.state_dict().items():
        if v.dtype == torch.bfloat16:
            out[k] = v.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            out[k] = v.numpy()
    return out


def jax_twin(tm: QwenImageTransformer2DModel, **runtime) -> QwenImageTransformer:
    """The Flax model holding the same weights as the diffusers one."""
    cfg = TransformerConfig.from_diffusers_config(dict(tm.config), **runtime)
    model = QwenImageTransformer(cfg, rngs=nnx.Rngs(0))
    nnx.update(model, state_dict_to_params(cfg, state_dict_numpy(tm), dtype=cfg.jnp_param_dtype))
    return model


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
