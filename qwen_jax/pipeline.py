"""Text to image, end to end: `Pipeline.from_pretrained(folder)(prompts, ...)`.

    prompts --tokenizer--> ids --text encoder (jit)--> prompt states, mask
    seeds --> noise (B, L_img, 64) --sampler (one jit: all steps, CFG)--> latents
    latents --unpack, denormalise, VAE decode (jit)--> images in [0, 1]

The teacher is the shipped schedule with true CFG (`num_steps=50, guidance=4`, a negative
prompt); a few-step student is the same pipeline built with `SchedulerConfig.fixed_shift(3)`
and run with `num_steps=2, guidance=1` (sigmas 1.0, 0.75). See `qwen_jax.sampling.sampler`
for what triggers a compilation.

With `mesh=` (e.g. `make_mesh(data=1, fsdp=1, sequence=8)`) the transformer's parameters live on
the mesh and sampling runs under it: batch over "data"/"fsdp", each image's tokens over
"sequence" (one large image on several chips). Text encoding and VAE decoding stay on one device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qwen_jax import checkpoints, flow
from qwen_jax import sharding as sharding_lib
from qwen_jax.conversion.errors import ConversionError
from qwen_jax.conversion.pipeline import convert_pipeline, is_pipeline_folder
from qwen_jax.models import codec as codec_lib
from qwen_jax.models import sequence_parallel
from qwen_jax.models import vae as vae_lib
from qwen_jax.models.latents import denormalize_latents, pack_latents, unpack_latents
from qwen_jax.models.text_encoder import QwenTextEncoder, TextEncoderConfig
from qwen_jax.models.text_encoder import abstract_model as abstract_text_encoder
from qwen_jax.sampling import prompts as prompt_lib
from qwen_jax.sampling import sampler
from qwen_jax.toy.folders import is_toy_model_folder, resolve_toy_folder

# Qwen-Image's recommended sizes (width, height) at ~1.3 MP, and the same shapes at 2K.
ASPECT_RATIOS = {"1:1": (1328, 1328), "16:9": (1664, 928), "9:16": (928, 1664), "4:3": (1472, 1104),
                 "3:4": (1104, 1472), "3:2": (1584, 1056), "2:3": (1056, 1584)}
ASPECT_RATIOS_2K = {k: (16 * round(w * 2048 / 1328 / 16), 16 * round(h * 2048 / 1328 / 16))
                    for k, (w, h) in ASPECT_RATIOS.items()}
PIXELS_PER_TOKEN = 16  # Qwen-Image: 8x VAE downsampling times 2x2 packing (`Pipeline.pixels_per_token`)


def default_cache_dir() -> Path:
    return Path(os.environ.get("QWEN_JAX_CACHE", Path.home() / ".cache" / "qwen_jax")) / "converted"


@dataclasses.dataclass
class PipelineOutput:
    images: list  # PIL.Image.Image, one per image: `array` rounded to 8 bits (up to 0.5/255 off it)
    array: np.ndarray  # (B, H, W, 3) float32 in [0, 1]; what diffusers' output_type="np" returns
    latents: np.ndarray | None = None  # (B, L_img, C) packed final latents, before decoding


class Pipeline:
    """Qwen-Image text-to-image in JAX. Build with `from_pretrained`; call with prompts."""

    def __init__(self, transformer, vae, text_encoder, tokenizer, scheduler: flow.SchedulerConfig,
                 mesh: jax.sharding.Mesh | None = None):
        self.transformer, self.vae, self.text_encoder = transformer, vae, text_encoder
        self.tokenizer, self.scheduler, self.mesh = tokenizer, scheduler, mesh
        self.graphdef, self.state = nnx.split(transformer)
        if mesh is not None:  # a no-op for parameters already placed (from_pretrained loads them so)
            self.state = sharding_lib.place_state(self.state, mesh)
        self.encode_text = prompt_lib.jit_encoder(text_encoder)
        self.vae_graphdef, self.vae_state = nnx.split(vae)

    # ---- loading -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike, *, dtype: str | None = None, attention: str = "xla",
        scheduler: flow.SchedulerConfig | None = None, cache_dir: str | os.PathLike | None = None,
        mesh: jax.sharding.Mesh | None = None,
    ) -> "Pipeline":
        """Loads a converted qwen_jax folder; converts a diffusers folder or hub id first (once).

        name_or_path: a folder written by `tools/convert_weights.py`, a diffusers Qwen-Image
          folder, or a hub id such as "Qwen/Qwen-Image" (downloaded with huggingface_hub).
          Conversions are cached under `cache_dir` (default $QWEN_JAX_CACHE/converted or
          ~/.cache/qwen_jax/converted) and reused.
        dtype: parameter and compute dtype of all components (default: as stored).
        scheduler: overrides the folder's scheduler (e.g. `SchedulerConfig.fixed_shift(3)` for a
          few-step student).
        mesh: sample on this device mesh (`qwen_jax.sharding.make_mesh`; `sequence=n` splits each
          image over n devices); the transformer is loaded straight into its sharding there.
        """
        folder = resolve_folder(name_or_path, cache_dir)
        from transformers import AutoTokenizer

        transformer = checkpoints.load_transformer(folder / "transformer", param_dtype=dtype, attention=attention,
                                                   mesh=mesh)
        vae = load_vae(folder / "vae", dtype)
        text_encoder = load_text_encoder(folder / "text_encoder", dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
        if scheduler is None:
            with open(folder / "scheduler" / "scheduler_config.json") as f:
                scheduler = flow.SchedulerConfig.from_diffusers_config(json.load(f))
        return cls(transformer, vae, text_encoder, tokenizer, scheduler, mesh)

    # ---- the steps -----------------------------------------------------------------------------
    def encode_prompt(self, prompts: str | Sequence[str], max_sequence_length: int = 512):
        """(prompt states (B, T, D), mask (B, T)) as diffusers' `encode_prompt` computes them."""
        return prompt_lib.encode_prompts(prompts, self.tokenizer, self.encode_text,
                                         max_sequence_length=max_sequence_length)

    def _on_mesh(self):
        """The frame sampling runs in: the pipeline's mesh (activations follow its rules), if any."""
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

    @property
    def pixels_per_token(self) -> int:
        """Image pixels per side of one transformer token: the VAE factor times the 2x2 packing."""
        return 2 * self.vae.config.spatial_factor

    def decode_latents(self, latents: jax.Array, height: int, width: int) -> jax.Array:
        """Packed latents (B, L_img, 4C) -> images (B, H, W, 3) in [0, 1]."""
        px = self.pixels_per_token
        return decode_images(self.vae_graphdef, self.vae_state,
                             unpack_latents(latents, 2 * (height // px), 2 * (width // px)))

    def sigmas(self, num_steps: int, image_seq_len: int, sigmas: Sequence[float] | None = None) -> np.ndarray:
        return flow.sampling_sigmas(num_steps, self.scheduler, image_seq_len=image_seq_len, sigmas=sigmas)

    def __call__(
        self,
        prompts: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        *,
        height: int = 1024,
        width: int = 1024,
        num_steps: int = 50,
        guidance: float = 4.0,
        seed: int | Sequence[int] = 0,
        latents: np.ndarray | jax.Array | None = None,
        sigmas: Sequence[float] | None = None,
        max_sequence_length: int = 512,
        stochastic: bool = False,
    ) -> PipelineOutput:
        """Images for `prompts` (one image per prompt).

        True CFG runs when `guidance > 1` and a negative prompt is given (as in diffusers).
        seed: an int (image i uses seed + i) or one seed per image; `latents` (B, L_img, 64)
        packed, replaces the seeds' initial noise. `sigmas` overrides the base grid of the schedule.
        stochastic: each step predicts x0 and re-noises it (the DMD2 student's multi-step
        sampling), image i with noise from seeds[i] alone, whatever the batch.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        px = self.pixels_per_token
        if height % px or width % px:
            raise ValueError(f"height and width must be multiples of {px}, got {height}x{width}")
        grid = (1, height // px, width // px)
        n_img = grid[1] * grid[2]
        if self.mesh is not None:
            sequence_parallel.check_divisible(n_img, sequence_parallel.num_shards(self.mesh))
        channels = self.transformer.config.in_channels
        seeds = [seed + i for i in range(len(prompts))] if isinstance(seed, int) else list(seed)
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        if latents is None:
            noise = sampler.initial_noise(seeds, (2 * grid[1], 2 * grid[2], channels // 4))
            latents = pack_latents(noise)
        latents = jnp.asarray(latents, jnp.float32)
        if latents.shape != (len(prompts), n_img, channels):
            raise ValueError(f"latents must be {(len(prompts), n_img, channels)}, got {latents.shape}")

        text, mask = self.encode_prompt(prompts, max_sequence_length)
        neg_text = neg_mask = None
        if guidance > 1 and negative_prompt is not None:
            negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
            neg_text, neg_mask = self.encode_prompt(negatives, max_sequence_length)
        length = sampler.bucket_length(max(text.shape[1], 0 if neg_text is None else neg_text.shape[1]))
        text, mask = sampler.pad_text(text, mask, length)
        if neg_text is not None:
            neg_text, neg_mask = sampler.pad_text(neg_text, neg_mask, length)

        sig = self.sigmas(num_steps, n_img, sigmas)
        dtype = self.transformer.config.jnp_dtype
        key = sampler.renoise_keys(seeds)  # stochastic: image i re-noised from seeds[i] alone
        inputs = (latents.astype(dtype), text.astype(dtype), mask,
                  None if neg_text is None else neg_text.astype(dtype), neg_mask)
        with self._on_mesh():
            x, text, mask, neg_text, neg_mask = (inputs if self.mesh is None
                                                 else sampler.shard_inputs(self.mesh, *inputs))
            out = sampler.sample(
                self.graphdef, self.state, x, jnp.asarray(sig), jnp.asarray(flow.model_time(sig[:-1])),
                text, mask, neg_text, neg_mask, jnp.float32(guidance), key, img_shapes=(grid,), stochastic=stochastic)
        if self.mesh is not None:  # the VAE runs on one device (see the module docstring)
            out = jax.device_put(out, sharding_lib.single_device())
        images = np.asarray(self.decode_latents(out, height, width))
        return PipelineOutput([to_pil(img) for img in images], images, np.asarray(out, np.float32))


@functools.partial(jax.jit, static_argnums=0)
def decode_images(vae_graphdef, vae_state, z: jax.Array) -> jax.Array:
    """Normalised latents (B, h, w, C) -> images (B, H, W, 3) in [0, 1], with the VAE (or codec)
    held by (vae_graphdef, vae_state): the one decode the pipeline and training grids share."""
    vae = nnx.merge(vae_graphdef, vae_state)
    cfg = vae.config
    z = denormalize_latents(z.astype(cfg.jnp_dtype), cfg.latents_mean, cfg.latents_std)
    return jnp.clip(vae.decode(z).astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


def to_pil(image: np.ndarray):
    from PIL import Image

    return Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))


def load_vae(folder: Path, dtype: str | None = None) -> vae_lib.AutoencoderKLQwenImage | codec_lib.PixelShuffleCodec:
    """The pipeline's latent codec: the Qwen-Image VAE, or the parameter-free pixel-shuffle codec."""
    with open(Path(folder) / checkpoints.CONFIG_FILE) as f:
        config = json.load(f)
    if config.get("_class_name") == codec_lib.CLASS_NAME:
        dtype = dtype or "float32"
        return codec_lib.PixelShuffleCodec(codec_lib.PixelShuffleConfig.from_diffusers_config(
            config, param_dtype=dtype, dtype=dtype))
    dtype = dtype or checkpoints.stored_dtype(folder)
    cfg = vae_lib.VAEConfig.from_diffusers_config(config, param_dtype=dtype, dtype=dtype)
    return checkpoints.load_into(folder, vae_lib.abstract_model(cfg))


def load_text_encoder(folder: Path, dtype: str | None = None) -> QwenTextEncoder:
    dtype = dtype or checkpoints.stored_dtype(folder)
    with open(folder / checkpoints.CONFIG_FILE) as f:
        cfg = TextEncoderConfig.from_transformers_config(json.load(f), param_dtype=dtype, dtype=dtype)
    return checkpoints.load_into(folder, abstract_text_encoder(cfg))


def save_pipeline(
    folder: str | os.PathLike, *, transformer, vae, text_encoder, tokenizer, scheduler: flow.SchedulerConfig,
    overwrite: bool = False,
) -> None:
    """Writes a converted pipeline folder (what `from_pretrained` reads) from in-memory components.

    Used by training exports and by tests and the toy world to assemble small pipelines. The
    transformer is written merged if it carries LoRA adapters.
    """
    with checkpoints.atomic_output_dir(folder, overwrite=overwrite) as tmp:
        checkpoints.save_transformer(transformer, tmp / "transformer")
        if isinstance(vae, codec_lib.PixelShuffleCodec):  # no parameters: its config is all of it
            (tmp / "vae").mkdir()
            checkpoints.write_config(tmp / "vae", vae.config.to_diffusers_config())
        else:
            checkpoints.save_module(vae, vae.config.to_diffusers_config(), tmp / "vae")
        checkpoints.save_module(text_encoder, text_encoder.config.to_transformers_config(), tmp / "text_encoder")
        tokenizer.save_pretrained(tmp / "tokenizer")
        (tmp / "scheduler").mkdir()
        with open(tmp / "scheduler" / "scheduler_config.json", "w") as f:
            json.dump(scheduler.to_diffusers_config(), f, indent=2)


def is_converted(folder: Path) -> bool:
    if not all((folder / c / checkpoints.PARAMS_DIR).is_dir() for c in ("transformer", "text_encoder")):
        return False
    vae_config = folder / "vae" / checkpoints.CONFIG_FILE
    return (folder / "vae" / checkpoints.PARAMS_DIR).is_dir() or (
        vae_config.is_file() and json.loads(vae_config.read_text()).get("_class_name") == codec_lib.CLASS_NAME)


def resolve_folder(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A converted folder for a converted folder, a diffusers folder or a hub id (converted once), or
    a toy model folder (`toy/folders.py`: linked to its family's shared parts, built once)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if is_converted(path):
            return path
        if is_toy_model_folder(path):  # models/toy/*: the family's shared parts are built on demand
            return resolve_toy_folder(path, cache_dir)
        if not is_pipeline_folder(path):
            raise ConversionError(f"{path}: neither a converted qwen_jax folder, a toy model folder (toy.json) "
                                  "nor a diffusers Qwen-Image folder")
        source = path.resolve()
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", str(name_or_path)):
        source = _download(str(name_or_path))
    else:
        raise ConversionError(f"{name_or_path}: no such folder (and not a hub id like Qwen/Qwen-Image)")
    key = hashlib.sha256(str(source).encode()).hexdigest()[:12]
    target = Path(cache_dir or default_cache_dir()) / f"{source.name}-{key}"
    if not is_converted(target):
        convert_pipeline(source, target, overwrite=True)
    return target


def _download(repo_id: str) -> Path:
    """The hub snapshot of a Qwen-Image repo (weights as safetensors only)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    patterns = ["*.json", "*.safetensors", "tokenizer/*", "scheduler/*", "*.txt"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=offline, etag_timeout=10))
    except LocalEntryNotFoundError:
        raise ConversionError(f"{repo_id}: not in the local hub cache and the hub cannot be reached "
                              "(offline or HF_HUB_OFFLINE set); download it where the network allows") from None
    except Exception as e:  # network and HTTP errors come in many types; all mean the same here
        raise ConversionError(f"{repo_id}: download failed ({type(e).__name__}: {e})") from None
