"""The Flax Qwen2.5-VL text encoder and prompt encoding compute what transformers/diffusers compute."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding

from qwen_jax.conversion.errors import ConversionError
from qwen_jax.conversion.plan import SKIP
from qwen_jax.conversion.text_encoder_keys import map_key, plan_text_encoder, text_encoder_state_dict_to_params
from qwen_jax.models.text_encoder import (
    QwenTextEncoder, TextEncoderConfig, abstract_params, count_params, from_params, rope_tables,
)
from qwen_jax.sampling.prompts import (
    DROP_IDX, PROMPT_TEMPLATE, encode_prompts, jit_encoder, pad_to_bucket, prompt_token_indices,
)
from qwen_tokenizer import qwen_tokenizer  # noqa: F401  (session fixture)
from reference import rel_err, state_dict_numpy, to_numpy

SMALL_VOCAB = 1000


def torch_text_encoder(cfg: TextEncoderConfig, seed: int = 0, dtype=torch.float32):
    """A transformers Qwen2.5-VL whose every parameter, RMSNorm scales included, is random."""
    d = cfg.to_transformers_config()
    if cfg.vocab_size <= 151645:  # keep bos/eos in range (transformers warns otherwise)
        d["text_config"].update(bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**d)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.copy_(torch.randn_like(p))
            elif p.ndim == 2:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model.to(dtype)


def legacy_names(state_dict: dict) -> dict:
    """The pre-4.52 layout: model.layers..., model.embed_tokens..., visual.*."""
    out = {}
    for k, v in state_dict.items():
        k = re.sub(r"^model\.visual\.", "visual.", k)
        out[re.sub(r"^model\.language_model\.", "model.", k)] = v
    return out


def jax_twin(tm, cfg: TextEncoderConfig, state_dict=None) -> QwenTextEncoder:
    sd = state_dict if state_dict is not None else state_dict_numpy(tm)
    return from_params(cfg, text_encoder_state_dict_to_params(cfg, sd))


def run(model, ids, mask):
    """The jitted forward (eager NNX calls of a scanned model are slow on CPU)."""
    return jit_encoder(model)(jnp.asarray(ids), jnp.asarray(mask))


def torch_last_hidden(tm, ids, mask):
    with torch.no_grad():
        out = tm(input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask),
                 output_hidden_states=True)
    return to_numpy(out.hidden_states[-1])


def padded_batch(lengths, n, side, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, SMALL_VOCAB, (len(lengths), n)).astype(np.int32)
    mask = np.zeros_like(ids)
    for b, k in enumerate(lengths):
        if side == "right":
            mask[b, :k] = 1
        else:
            mask[b, n - k:] = 1
    return ids, mask


@pytest.fixture(scope="module")
def small():
    cfg = TextEncoderConfig.tiny(vocab_size=SMALL_VOCAB, num_hidden_layers=3)
    tm = torch_text_encoder(cfg)
    return cfg, tm, state_dict_numpy(tm)


# ---- hidden-state parity -------------------------------------------------------------------------
@pytest.mark.parametrize("naming", ["current", "legacy"])
def test_last_hidden_state_parity_right_padded(small, naming):
    cfg, tm, sd = small
    assert next(iter(sd)).startswith(("model.language_model.", "model.visual.", "lm_head."))
    model = jax_twin(tm, TextEncoderConfig.from_transformers_config(tm.config.to_dict()),
                     legacy_names(sd) if naming == "legacy" else sd)
    ids, mask = padded_batch([13, 8, 3], 13, "right")
    ref = torch_last_hidden(tm, ids, mask)
    out = np.asarray(run(model, ids, mask))
    assert out.shape == ref.shape == (3, 13, cfg.hidden_size)
    assert rel_err(out, ref) <= 1e-5  # every row: padded rows attend to the real keys before them


def test_last_hidden_state_parity_left_padded_real_rows(small):
    # transformers uses positions arange(L) whatever the padding; so do we. Fully masked rows
    # (left padding) are meaningless in both, so only real rows are compared.
    cfg, tm, sd = small
    model = jax_twin(tm, cfg, sd)
    ids, mask = padded_batch([11, 6, 2], 11, "left", seed=1)
    ref = torch_last_hidden(tm, ids, mask)
    out = np.asarray(run(model, ids, mask))
    real = mask.astype(bool)
    assert np.isfinite(out).all()
    assert rel_err(out[real], ref[real]) <= 1e-5


def test_right_padding_to_a_bucket_leaves_real_tokens_unchanged(small):
    cfg, tm, sd = small
    model = jax_twin(tm, cfg, sd)
    ids, mask = padded_batch([9, 4], 9, "right", seed=2)
    for side_ids, side_mask in ((ids, mask), padded_batch([9, 4], 9, "left", seed=2)):
        big_ids, big_mask = pad_to_bucket(side_ids, side_mask, 16, pad_id=7)
        a = np.asarray(run(model, side_ids, side_mask))
        b = np.asarray(run(model, big_ids, big_mask))[:, :9]
        real = side_mask.astype(bool)
        np.testing.assert_allclose(b[real], a[real], rtol=1e-6, atol=1e-6)


def test_bf16_parity(small):
    cfg, _, _ = small
    cfg16 = cfg.replace(param_dtype="bfloat16", dtype="bfloat16")
    tm = torch_text_encoder(cfg, dtype=torch.bfloat16)
    model = jax_twin(tm, cfg16)
    ids, mask = padded_batch([10, 5], 10, "right", seed=3)
    out = run(model, ids, mask)
    assert out.dtype == jnp.bfloat16 and model.layers.self_attn.q_proj.kernel[...].dtype == jnp.bfloat16
    assert rel_err(np.asarray(out.astype(jnp.float32)), torch_last_hidden(tm, ids, mask)) <= 2e-2


def test_remat_names_are_tagged_and_policies_validated(small):
    # Remat policies select tensors by checkpoint_name; all three names must exist in a layer.
    cfg, tm, sd = small
    graphdef, state = nnx.split(jax_twin(tm, cfg.replace(remat="save_qkv_attn_out"), sd))
    ids, mask = (jnp.asarray(a) for a in padded_batch([7, 4], 7, "right", seed=4))
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda s: jnp.sum(nnx.merge(graphdef, s)(ids, mask))))(state))
    for name in ("qkv", "attn_out", "mlp_hidden"):
        assert f"name={name}" in jaxpr, name
    assert "checkpoint" in jaxpr or "remat" in jaxpr
    with pytest.raises(ValueError, match="remat"):
        cfg.replace(remat="sometimes")
    model = QwenTextEncoder(TextEncoderConfig.tiny(vocab_size=SMALL_VOCAB), rngs=nnx.Rngs(0))  # random init works
    assert model.layers.mlp.down_proj.kernel[...].shape == (2, 128, 64)


# ---- RoPE ----------------------------------------------------------------------------------------
def test_mrope_with_identical_rows_is_1d_rope():
    cfg = TextEncoderConfig.qwen2_5_vl_7b()
    text_config = Qwen2_5_VLConfig(**cfg.to_transformers_config()).text_config
    assert text_config.rope_parameters["mrope_section"] == [16, 24, 24]
    rotary = Qwen2_5_VLRotaryEmbedding(text_config)
    rng = np.random.default_rng(0)
    rows = np.stack([np.arange(1100), rng.integers(0, 1100, 1100)])  # (B=2, L): plain and arbitrary
    x = torch.zeros(1, dtype=torch.float32)
    for dtype, jdtype, tol in ((torch.float32, jnp.float32, 1e-6), (torch.bfloat16, jnp.bfloat16, 8e-3)):
        cos_t, sin_t = rotary(x.to(dtype), torch.as_tensor(rows)[None].expand(3, -1, -1))  # identical mRoPE rows
        cos_j, sin_j = rope_tables(jnp.asarray(rows), cfg.head_dim, cfg.rope_theta, jdtype)
        assert cos_j.dtype == jdtype and cos_t.shape == cos_j.shape == (2, 1100, 128)
        # fp32: inv_freq may differ by an ulp (pow implementations), measured <= 6e-8 after
        # cos/sin; bf16: equal up to at most one bf16 rounding step.
        assert np.max(np.abs(to_numpy(cos_t) - np.asarray(cos_j, np.float32))) <= tol
        assert np.max(np.abs(to_numpy(sin_t) - np.asarray(sin_j, np.float32))) <= tol
    # Distinct rows (vision tokens) are not 1-D RoPE: the check above can fail.
    distinct = torch.as_tensor(np.stack([rows, rows + 5, rows + 9]))
    cos_t, _ = rotary(x, distinct)
    cos_j, _ = rope_tables(jnp.asarray(rows), cfg.head_dim, cfg.rope_theta, jnp.float32)
    assert np.max(np.abs(to_numpy(cos_t) - np.asarray(cos_j))) > 0.1


# ---- conversion: full size on the meta device, strictness ----------------------------------------
HUB_7B_CONFIG = dict(  # Qwen2.5-VL-7B config.json, legacy top-level layout (typed in by hand)
    architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl", vocab_size=152064,
    hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1000000.0, hidden_act="silu",
    rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, max_position_embeddings=128000,
    tie_word_embeddings=False, use_sliding_window=False, sliding_window=32768, max_window_layers=28,
    bos_token_id=151643, eos_token_id=151645, image_token_id=151655, video_token_id=151656,
    vision_start_token_id=151652, vision_end_token_id=151653,
    vision_config=dict(depth=32, hidden_act="silu", hidden_size=1280, intermediate_size=3420, num_heads=16,
                       in_chans=3, out_hidden_size=3584, patch_size=14, spatial_merge_size=2, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, temporal_patch_size=2),
)


def test_meta_7b_keys_map_exactly_onto_the_abstract_flax_tree():
    cfg = TextEncoderConfig.qwen2_5_vl_7b()
    assert TextEncoderConfig.from_transformers_config(HUB_7B_CONFIG) == cfg
    with torch.device("meta"):
        reference = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**HUB_7B_CONFIG))
    assert TextEncoderConfig.from_transformers_config(reference.config.to_dict()) == cfg  # nested layout
    shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    flax_shapes = {path: tuple(s.shape) for path, s in abstract_params(cfg).items()}
    for naming in (shapes, legacy_names(shapes)):
        implied: dict[tuple[str, ...], dict] = {}
        for key, shape in naming.items():
            m = map_key(key)
            if m == SKIP:
                assert key.startswith(("model.visual.", "visual.", "lm_head.")), key
                continue
            assert m is not None, key
            implied.setdefault(m.flax_path, {})[m.layer] = m.flax_shape(shape)
        implied_shapes = {}
        for path, slices in implied.items():
            if None in slices:
                implied_shapes[path] = slices[None]
            else:  # every layer once, all the same shape
                assert sorted(slices) == list(range(28)) and len(set(slices.values())) == 1, path
                implied_shapes[path] = (28,) + slices[0]
        assert implied_shapes == flax_shapes
        plan = plan_text_encoder(cfg, naming)
        unused = sorted(k for k in naming if k.startswith(("model.visual.", "visual.", "lm_head.")))
        assert sorted(plan.skipped) == unused
        assert len(plan.skipped) == len(naming) - 1 - 28 * 12 - 1  # embed_tokens, 12 per layer, norm
    lm = sum(int(np.prod(s)) for k, s in shapes.items() if k.startswith("model.language_model."))
    assert lm == count_params(cfg) == 7_070_619_136
    assert sum(int(np.prod(s)) for s in shapes.values()) == 8_292_166_656


@pytest.fixture(scope="module")
def tiny_sd():
    cfg = TextEncoderConfig.tiny(vocab_size=SMALL_VOCAB)
    return cfg, state_dict_numpy(torch_text_encoder(cfg))


def expect_error(cfg, sd, *fragments):
    with pytest.raises(ConversionError) as err:
        text_encoder_state_dict_to_params(cfg, sd)
    for f in fragments:
        assert f in str(err.value), str(err.value)


def test_missing_extra_and_wrong_shape_keys_are_named(tiny_sd):
    cfg, sd = tiny_sd
    missing = {k: v for k, v in sd.items() if k != "model.language_model.layers.1.mlp.up_proj.weight"}
    expect_error(cfg, missing, "1 missing", "model.language_model.layers.1.mlp.up_proj.weight")
    extra = {**sd, "model.language_model.layers.0.self_attn.o_proj.bias": np.zeros(64, np.float32),
             "model.layers.2.input_layernorm.weight": np.ones(64, np.float32)}  # layer 2 of a 2-layer model
    expect_error(cfg, extra, "2 unexpected", "o_proj.bias", "model.layers.2.input_layernorm.weight")
    wrong = {**sd, "model.language_model.layers.0.self_attn.k_proj.weight": np.zeros((64, 64), np.float32)}
    expect_error(cfg, wrong, "1 wrong-shape", "k_proj.weight (64, 64) vs expected (32, 64)")
    legacy_missing = legacy_names({k: v for k, v in sd.items() if k != "model.language_model.norm.weight"})
    expect_error(cfg, legacy_missing, "missing", "model.language_model.norm.weight")
    expect_error(cfg, {**sd, "model.embed_tokens.weight": sd["model.language_model.embed_tokens.weight"]},
                 "filled twice", "model.embed_tokens.weight")
    expect_error(cfg.replace(num_hidden_layers=3), sd, "missing", "model.language_model.layers.2.")


def test_vision_and_lm_head_are_skipped_and_not_required(tiny_sd):
    cfg, sd = tiny_sd
    text_only = {k: v for k, v in sd.items() if k.startswith("model.language_model.")}
    a = text_encoder_state_dict_to_params(cfg, text_only)
    b = text_encoder_state_dict_to_params(cfg, legacy_names(sd), dtype=np.float16)
    assert b["layers"]["self_attn"]["q_proj"]["kernel"].dtype == np.float16
    np.testing.assert_array_equal(a["layers"]["mlp"]["down_proj"]["kernel"][1],
                                  sd["model.language_model.layers.1.mlp.down_proj.weight"].T)


def test_config_from_transformers_dicts():
    cfg = TextEncoderConfig.tiny()
    d = cfg.to_transformers_config()
    assert TextEncoderConfig.from_transformers_config(d) == cfg
    assert TextEncoderConfig.from_transformers_config(Qwen2_5_VLConfig(**d).to_dict()) == cfg
    flat = {**{k: v for k, v in d.items() if k != "text_config"}, **d["text_config"], "model_type": "qwen2_5_vl"}
    assert TextEncoderConfig.from_transformers_config(flat, dtype="bfloat16") == cfg.replace(dtype="bfloat16")
    for bad in ({**d, "model_type": "llama"}, {**d, "model_type": "qwen2_vl"},
                {**d, "architectures": ["LlamaForCausalLM"]},
                {**d, "text_config": {**d["text_config"], "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}}):
        with pytest.raises(ValueError):
            TextEncoderConfig.from_transformers_config(bad)


# ---- tokenizer and prompt encoding ---------------------------------------------------------------
def test_tokenizer_matches_known_qwen_ids(qwen_tokenizer):  # noqa: F811
    assert qwen_tokenizer("Hello world").input_ids == [9707, 1879]
    prefix = PROMPT_TEMPLATE.split("{}")[0]
    ids = qwen_tokenizer(prefix).input_ids
    assert len(ids) == DROP_IDX == 34 and ids[-3:] == [151644, 872, 198]  # <|im_start|> user \n
    assert qwen_tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|image_pad|>", "<|file_sep|>"]) == [
        151643, 151655, 151664]


def test_prompt_token_indices_either_padding_side():
    mask = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    index, out = prompt_token_indices(mask, drop_idx=2, max_sequence_length=8)
    np.testing.assert_array_equal(index, [[4, 5, 0, 0], [2, 0, 0, 0], [2, 3, 4, 5]])
    np.testing.assert_array_equal(out, [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    index, out = prompt_token_indices(mask, drop_idx=2, max_sequence_length=3)
    np.testing.assert_array_equal(index, [[4, 5, 0], [2, 0, 0], [2, 3, 4]])


@pytest.fixture(scope="module")
def pipeline(qwen_tokenizer):  # noqa: F811
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    from reference import torch_transformer

    cfg = TextEncoderConfig.tiny()
    te = torch_text_encoder(cfg, seed=1)
    vae = AutoencoderKLQwenImage(base_dim=16, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                                 temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                                 latents_std=[1.0] * 4)
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=vae, text_encoder=te,
                             tokenizer=qwen_tokenizer, transformer=torch_transformer())
    return pipe, jit_encoder(jax_twin(te, cfg))


PROMPTS = ["A red fox in the snow, watercolor.", "cat",
           "A busy night market in Taipei: neon signs (\u591c\u5e02), steam rising from food stalls, 4K."]


@pytest.mark.parametrize("max_sequence_length", [512, 9, 4])
def test_prompt_embeds_match_pipeline_encode_prompt(pipeline, qwen_tokenizer, max_sequence_length):  # noqa: F811
    pipe, encoder = pipeline
    with torch.no_grad():
        ref, ref_mask = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=max_sequence_length)
    embeds, mask = encode_prompts(PROMPTS, qwen_tokenizer, encoder, max_sequence_length=max_sequence_length)
    assert embeds.shape == tuple(ref.shape) and mask.shape == embeds.shape[:2]
    if ref_mask is None:  # diffusers drops an all-ones mask; we always return one
        assert max_sequence_length == 4 and bool(jnp.all(mask == 1))
    else:
        np.testing.assert_array_equal(np.asarray(mask), to_numpy(ref_mask))
        assert float(jnp.max(jnp.abs(jnp.where(mask[..., None] == 0, embeds, 0)))) == 0.0
    assert rel_err(embeds, to_numpy(ref)) <= 1e-5


def test_single_prompt_and_images_per_prompt(pipeline, qwen_tokenizer):  # noqa: F811
    pipe, encoder = pipeline
    with torch.no_grad():
        ref, ref_mask = pipe.encode_prompt(PROMPTS[1], device="cpu", max_sequence_length=512)
        ref2, _ = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=2)
    embeds, mask = encode_prompts(PROMPTS[1], qwen_tokenizer, encoder)
    assert ref_mask is None and embeds.shape == tuple(ref.shape) == (1, 1 + 5, 64) and bool(jnp.all(mask == 1))
    assert rel_err(embeds, to_numpy(ref)) <= 1e-5
    embeds2, mask2 = encode_prompts(PROMPTS, qwen_tokenizer, encoder, num_images_per_prompt=2)
    assert rel_err(embeds2, to_numpy(ref2)) <= 1e-5  # copies of a prompt are adjacent: p0 p0 p1 p1 ...
    # diffusers tiles its mask the other way (p0 p1 p2 p0 ...), out of step with its embeds; ours
    # follows the embeds.
    _, mask1 = encode_prompts(PROMPTS, qwen_tokenizer, encoder)
    np.testing.assert_array_equal(np.asarray(mask2), np.repeat(np.asarray(mask1), 2, axis=0))
