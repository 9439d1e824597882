"""Transformer configuration: the architecture (what a checkpoint fixes) plus runtime choices.

Tensor layout used throughout `qwen_jax.models` (documented here once):

  B        batch
  L_img    packed image tokens = sum over images of frames * (H_px/16) * (W_px/16)
  L_txt    text tokens (padded length; a mask marks the real ones)
  C_in     packed latent channels = 4 * latent channels (64 for Qwen-Image)
  D        inner width = heads * head_dim (3072)
  H, Dh    attention heads and head dim (24, 128)
  L        number of blocks (60); stacked parameters carry it as their leading axis

  hidden_states          (B, L_img, C_in)     packed latents, token features ordered (c, dy, dx)
  encoder_hidden_states  (B, L_txt, D_txt)    text-encoder states (D_txt = joint_attention_dim)
  encoder_hidden_states_mask (B, L_txt)       True/1 = real token, False/0 = padding; or None
  timestep               (B,)                 sigma in [0, 1] (the model scales by 1000 inside)
  output                 (B, L_img, 4 * C_out) velocity (noise - x0) in packed layout
  attention q/k/v        (B, S, H, Dh)        joint sequence S = L_txt + L_img, text first
"""

from __future__ import annotations

import dataclasses
from typing import Any


from qwen_jax.models.dtypes import DtypePolicy
from qwen_jax.models.attention import ATTENTION_FNS
from qwen_jax.models.remat import REMAT_POLICIES

# Fields that describe the network and are stored with a checkpoint (diffusers names).
ARCHITECTURE_FIELDS = (
        "patch_size",
        "in_channels",
        "out_channels",
        "num_layers",
        "attention_head_dim",
        "num_attention_heads",
        "joint_attention_dim",
        "axes_dims_rope",
)

# diffusers config keys that exist for other Qwen-Image variants; a checkpoint that switches
# one of them on is a different model that this port does not implement.
_UNSUPPORTED_TRUE_FLAGS = ("guidance_embeds", "zero_cond_t", "use_additional_t_cond", "use_layer3d_rope")



@dataclasses.dataclass(frozen=True)
class TransformerConfig(DtypePolicy):
    """Architecture of `QwenImageTransformer` (diffusers field names) and how to run it.

    The architecture defaults are the real Qwen-Image (20,430,401,088 parameters).
    Runtime fields are not stored with checkpoints:
        param_dtype: storage dtype of parameters.
        dtype: compute dtype of matmuls and the residual streams; norms, softmax and RoPE run in fp32.
        attention: "xla" (default, any backend), "cudnn" (GPU, bf16/fp16) or "splash" (TPU, Pallas);
            `models/attention.py` lists each kernel's constraints.
        remat: a policy name from `qwen_jax.models.remat.REMAT_POLICIES`.
        scan_unroll: blocks per iteration of the scan over the stacked blocks. 1 (default) keeps
            compile time independent of depth; `num_layers` unrolls it fully, which on CPU saves
            the per-block weight slices and stacked residuals of a small model (~15 % of the toy
            training step) at the cost of compile time growing with depth.
        lora_rank, lora_alpha, lora_targets: LoRA adapters (see `qwen_jax.models.lora`).
    """

    patch_size: int = 2
    in_channels: int = 64
    out_channels: int = 16
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)

    param_dtype: str = "float32"
    dtype: str = "float32"
    attention: str = "xla"
    remat: str = "none"
    scan_unroll: int = 1
    lora_rank: int = 0  # 0: no adapters
    lora_alpha: float | None = None  # None: alpha = rank (scale 1)
    lora_targets: tuple[str, ...] = ("attn", "mlp", "mod")

    def __post_init__(self):
        object.__setattr__(self, "axes_dims_rope", tuple(int(a) for a in self.axes_dims_rope))
        if len(self.axes_dims_rope) != 3 or any(a <= 0 or a % 2 for a in self.axes_dims_rope):
            raise ValueError(f"axes_dims_rope must be three positive even numbers, got {self.axes_dims_rope}")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                    f"sum(axes_dims_rope)={sum(self.axes_dims_rope)} must equal attention_head_dim={self.attention_head_dim}"
            )
        self.check_dtypes()
        if self.attention not in ATTENTION_FNS:
            raise ValueError(f"attention must be one of {sorted(ATTENTION_FNS)}, got {self.attention!r}")
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if self.lora_rank < 0 or any(t not in ("attn", "mlp", "mod") for t in self.lora_targets):
            raise ValueError(f"lora_rank must be >= 0 and lora_targets within attn/mlp/mod, got "
                             f"{self.lora_rank}, {self.lora_targets}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}")
        if int(self.scan_unroll) < 1:
            raise ValueError(f"scan_unroll must be >= 1 (blocks per scan iteration), got {self.scan_unroll}")

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def lora_scale(self) -> float:
        return (self.lora_alpha or self.lora_rank) / self.lora_rank if self.lora_rank else 0.0

    @property
    def out_features(self) -> int:
        return self.patch_size * self.patch_size * self.out_channels

    # ---- presets -------------------------------------------------------------------------------
    @classmethod
    def qwen_image(cls, **runtime) -> "TransformerConfig":
        """The released Qwen-Image transformer: 60 blocks, 24 x 128 heads, text dim 3584."""
        return cls(**runtime)

    @classmethod
    def tiny(cls, **overrides) -> "TransformerConfig":
        """A 0.3M-parameter model with every feature of the real one, for tests and the toy world."""
        base = dict(
                in_channels=16, out_channels=4, num_layers=2, attention_head_dim=32,
                num_attention_heads=2, joint_attention_dim=64, axes_dims_rope=(8, 12, 12),
        )
        return cls(**{**base, **overrides})

    # ---- diffusers config.json ----------------------------------------------------------------
    def to_diffusers_config(self) -> dict[str, Any]:
        cfg = {name: getattr(self, name) for name in ARCHITECTURE_FIELDS}
        cfg["axes_dims_rope"] = list(self.axes_dims_rope)
        cfg.update(guidance_embeds=False, zero_cond_t=False, use_additional_t_cond=False, use_layer3d_rope=False)
        return {"_class_name": "QwenImageTransformer2DModel", "_diffusers_version": "0.42.1", **cfg}

    @classmethod
    def from_diffusers_config(cls, cfg: dict[str, Any], **runtime) -> "TransformerConfig":
        """Reads a diffusers `transformer/config.json` dict; unknown bookkeeping keys are ignored."""
        class_name = cfg.get("_class_name", "QwenImageTransformer2DModel")
        if class_name != "QwenImageTransformer2DModel":
            raise ValueError(f"config.json describes a {class_name}, not a QwenImageTransformer2DModel")
        for flag in _UNSUPPORTED_TRUE_FLAGS:
            if cfg.get(flag):
                raise ValueError(f"config.json sets {flag}=true: that Qwen-Image variant is not supported")
        arch = {k: cfg[k] for k in ARCHITECTURE_FIELDS if k in cfg}
        if arch.get("out_channels") is None:
            arch["out_channels"] = arch.get("in_channels", cls.in_channels)
        return cls(**arch, **runtime)
