"""Full-size architectures with random weights, and the inputs of one denoising forward, per benchmarked model.

Nothing is downloaded: each transformer is built from its published config on the target device (in the target
dtype, so a 20B model never exists in float32), then its matrices are re-drawn from N(0, 0.02) so that no layer is
zero-initialised (zeros can time faster than real data). ``size="tiny"`` uses the tiny kit's transformer of the same
class with a workload scaled down to match, so the same code runs on CPU in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..pipelines.families.ltx2_comfy import TRANSFORMER_CONFIG as LTX25_TRANSFORMER_CONFIG

# The published configs of the released checkpoints (diffusers layout).
FULL_CONFIGS = {
    "flux": ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56))),
    "qwen_image": ("QwenImageTransformer2DModel", dict(
        patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128, num_attention_heads=24,
        joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56))),
    "zimage_turbo": ("ZImageTransformer2DModel", dict(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
        n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0, t_scale=1000.0,
        axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512])),
    "wan21_14b": ("WanTransformer3DModel", dict(
        patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)),
    # HiDream-I1 (17B, mixture of experts): the values ComfyUI's model detection sets for its checkpoints
    "hidream": ("HiDreamImageTransformer2DModel", dict(
        patch_size=2, in_channels=16, out_channels=16, num_layers=16, num_single_layers=32, attention_head_dim=128,
        num_attention_heads=20, caption_channels=[4096, 4096], text_emb_dim=2048, num_routed_experts=4,
        num_activated_experts=2, axes_dims_rope=(64, 32, 32), max_resolution=(128, 128),
        llama_layers=list(range(32)) + [31] * 16)),
    "ltx2.5": ("LTX2VideoTransformer3DModel", LTX25_TRANSFORMER_CONFIG),  # 19.0B, video and audio streams
}


@dataclass(frozen=True)
class Workload:
    """The shape of one forward: latent height/width (in latent pixels), latent frames, text tokens."""

    label: str
    height: int
    width: int
    text_tokens: int
    frames: int = 1
    forwards_per_step: int = 1
    architecture: str | None = None  # the FULL_CONFIGS key, when it is not the workload's own name

    def config_key(self, name: str) -> str:
        return self.architecture or name


# Full: 1024x1024 images (128x128 latents) and Wan 480p x 33 frames (9 x 60 x 104 latents) or x 81 frames (21 latent
# frames: 32,760 tokens, the size of issue 9's Wan target), and Wan 720p x 81 frames (21 x 90 x 160 latents: 75,600
# tokens, the context-parallel target).
WORKLOADS = {
    "full": {
        "flux": Workload("1024x1024, 512 text tokens", 128, 128, 512),
        "qwen_image": Workload("1024x1024, 128 text tokens, true CFG", 128, 128, 128, forwards_per_step=2),
        "zimage_turbo": Workload("1024x1024, 128 text tokens", 128, 128, 128),
        "wan21_14b": Workload("832x480 x 33 frames, 512 text tokens, CFG", 60, 104, 512, frames=9, forwards_per_step=2),
        "wan21_14b_81f": Workload("832x480 x 81 frames, 512 text tokens, CFG", 60, 104, 512, frames=21,
                                  forwards_per_step=2, architecture="wan21_14b"),
        "wan21_14b_720p_81f": Workload("1280x720 x 81 frames, 512 text tokens, CFG", 90, 160, 512, frames=21,
                                       forwards_per_step=2, architecture="wan21_14b"),
        "hidream": Workload("1024x1024, 128 T5 and 128 Llama tokens, CFG", 128, 128, 128, forwards_per_step=2),
        # LTX-2.5's default 768x768 x 121 frames: 16 x 24 x 24 latents (9,216 video tokens), 126 audio tokens
        "ltx2.5": Workload("768x768 x 121 frames with audio, 1024 text tokens, CFG", 24, 24, 1024, frames=16,
                           forwards_per_step=2),
    },
    "tiny": {
        "flux": Workload("tiny 8x8 latents", 8, 8, 8),
        "qwen_image": Workload("tiny 8x8 latents", 8, 8, 8, forwards_per_step=2),
        "zimage_turbo": Workload("tiny 8x8 latents", 8, 8, 32),
        "wan21_14b": Workload("tiny 2x8x8 latents", 8, 8, 8, frames=2, forwards_per_step=2),
        "wan21_14b_81f": Workload("tiny 3x8x8 latents", 8, 8, 8, frames=3, forwards_per_step=2,
                                  architecture="wan21_14b"),
        "wan21_14b_720p_81f": Workload("tiny 3x8x8 latents", 8, 8, 8, frames=3, forwards_per_step=2,
                                       architecture="wan21_14b"),
        "hidream": Workload("tiny 8x8 latents", 8, 8, 8, forwards_per_step=2),
        "ltx2.5": Workload("tiny 2x8x8 latents", 8, 8, 8, frames=2, forwards_per_step=2),
    },
}


def build_transformer(model_id: str, size: str, device: str, dtype, seed: int = 0,
                      config_changes: dict | None = None):
    """The denoiser of ``model_id``: full size with random weights, or the tiny kit's, on ``device`` in ``dtype``.
    ``config_changes`` change entries of the full config (a small model of the full one's shape, e.g. one head)."""
    import torch

    if size == "tiny":
        from ..tiny import build_tiny_pipeline

        return build_tiny_pipeline(model_id).transformer.to(device, dtype).eval()
    import diffusers

    class_name, config = FULL_CONFIGS[model_id]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = getattr(diffusers, class_name)(**{**config, **(config_changes or {})})
    finally:
        torch.set_default_dtype(previous)
    randomize_(model, seed)
    return model.eval()


def randomize_(module, seed: int = 0) -> None:
    """Re-draw every matrix from N(0, 0.02); make any uninitialised (non-finite) vector finite."""
    import torch

    generator = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.02, generator=generator)
            elif not torch.isfinite(param).all():
                param.fill_(1.0)


def forward_inputs(model_id: str, transformer, workload: Workload, seed: int = 0) -> dict:
    """Keyword arguments of one denoiser forward at ``workload``, shaped as the diffusers pipeline passes them."""
    import torch

    param = next(transformer.parameters())
    device, dtype = param.device, param.dtype
    generator = torch.Generator(device="cpu").manual_seed(seed)
    config = transformer.config

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    h, w, text = workload.height, workload.width, workload.text_tokens
    if model_id == "flux":
        ids = torch.zeros(h // 2, w // 2, 3)
        ids[..., 1] = torch.arange(h // 2)[:, None]
        ids[..., 2] = torch.arange(w // 2)[None, :]
        return dict(hidden_states=randn(1, (h // 2) * (w // 2), config.in_channels),
                    encoder_hidden_states=randn(1, text, config.joint_attention_dim),
                    pooled_projections=randn(1, config.pooled_projection_dim),
                    timestep=torch.tensor([0.5], device=device, dtype=dtype),
                    img_ids=ids.reshape(-1, 3).to(device, dtype),
                    txt_ids=torch.zeros(text, 3, device=device, dtype=dtype),
                    guidance=torch.tensor([4.0], device=device, dtype=dtype) if config.guidance_embeds else None,
                    return_dict=False)
    if model_id == "qwen_image":
        return dict(hidden_states=randn(1, (h // 2) * (w // 2), config.in_channels),
                    encoder_hidden_states=randn(1, text, config.joint_attention_dim),
                    encoder_hidden_states_mask=torch.ones(1, text, device=device, dtype=torch.long),
                    timestep=torch.tensor([0.5], device=device, dtype=dtype),
                    img_shapes=[[(1, h // 2, w // 2)]], return_dict=False)
    if model_id == "zimage_turbo":
        return dict(x=[randn(config.in_channels, 1, h, w)], t=torch.tensor([0.5], device=device, dtype=dtype),
                    cap_feats=[randn(text, config.cap_feat_dim)], return_dict=False)
    if model_id == "wan21_14b":
        return dict(hidden_states=randn(1, config.in_channels, workload.frames, h, w),
                    timestep=torch.tensor([500.0], device=device),
                    encoder_hidden_states=randn(1, text, config.text_dim), return_dict=False)
    if model_id == "hidream":
        t5_width, llama_width = config.caption_channels
        return dict(hidden_states=randn(1, config.in_channels, h, w),
                    timesteps=torch.tensor([500.0], device=device, dtype=dtype),
                    encoder_hidden_states_t5=randn(1, text, t5_width),
                    encoder_hidden_states_llama3=randn(max(config.llama_layers) + 1, 1, text, llama_width),
                    pooled_embeds=randn(1, config.text_emb_dim), return_dict=False)
    if model_id == "ltx2.5":
        fps = 24.0
        pixel_frames = (workload.frames - 1) * 8 + 1  # the video VAE keeps the first frame, then 8 frames a latent
        audio_tokens = round(pixel_frames / fps * config.audio_sampling_rate / config.audio_hop_length
                             / config.audio_scale_factor)
        timestep = torch.tensor([500.0], device=device)
        text_mask = torch.ones(1, text, device=device, dtype=torch.long)
        return dict(hidden_states=randn(1, workload.frames * h * w, config.in_channels),
                    audio_hidden_states=randn(1, audio_tokens, config.audio_in_channels),
                    encoder_hidden_states=randn(1, text, config.cross_attention_dim),
                    audio_encoder_hidden_states=randn(1, text, config.audio_cross_attention_dim),
                    timestep=timestep, sigma=timestep, encoder_attention_mask=text_mask,
                    audio_encoder_attention_mask=text_mask, num_frames=workload.frames, height=h, width=w, fps=fps,
                    audio_num_frames=audio_tokens, return_dict=False)
    raise ValueError(f"No benchmark inputs for model {model_id!r}; use one of {sorted(FULL_CONFIGS)}.")


# ------------------------------------------------------------------------------------------------ full FLUX.1-dev pipeline
def build_flux_pipeline(device: str, dtype, seed: int = 0):
    """FluxPipeline at full size (T5-XXL, CLIP-L, the 12B transformer, the 16-channel VAE), random weights.

    The tokenizers are the tiny kit's character-level stand-ins (no hub); T5 still pads to 512 tokens, so the text
    encoders do the real amount of work.
    """
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from ..pipelines.registry import FLUX_FLOWMATCH
    from ..tiny.tokenizers import clip_tokenizer, t5_tokenizer

    clip_tok, t5_tok = clip_tokenizer(), t5_tokenizer()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            clip = CLIPTextModel(CLIPTextConfig(
                vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
                bos_token_id=len(clip_tok) - 2, eos_token_id=len(clip_tok) - 1, pad_token_id=len(clip_tok) - 1))
            t5 = T5EncoderModel(T5Config(
                vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                pad_token_id=0, eos_token_id=1))
            vae = AutoencoderKL(
                in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                layers_per_block=2, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
                shift_factor=0.1159, scaling_factor=0.3611)
    finally:
        torch.set_default_dtype(previous)
    for module in (clip, t5):
        randomize_(module, seed)
    transformer = build_transformer("flux", "full", device, dtype, seed)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(FLUX_FLOWMATCH), text_encoder=clip.eval(),
                        tokenizer=clip_tok, text_encoder_2=t5.eval(), tokenizer_2=t5_tok, transformer=transformer,
                        vae=vae.eval())


# ---------------------------------------------------------------------------- full Qwen-Image and Wan 2.2 A14B pipelines
def _with_default(device: str, dtype, build):
    """``build()`` with new tensors created on ``device`` in ``dtype``."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return build()
    finally:
        torch.set_default_dtype(previous)


def build_qwen_image_pipeline(device: str, dtype, seed: int = 0, text_layers: int = 2):
    """QwenImagePipeline with the full 20B transformer and the full VAE, random weights; the Qwen2.5-VL text encoder
    keeps its width (3584, what the transformer reads) but only ``text_layers`` layers and a stand-in vision tower, so
    that the folder fits a GPU machine's disk (the parity of the denoiser and its LoRA is what is measured)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from ..pipelines.registry import QWEN_FLOWMATCH
    from ..tiny.tokenizers import qwen_tokenizer

    tokenizer = qwen_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
           ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")}
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=text_layers,
                         num_attention_heads=28, num_key_value_heads=4, rope_theta=1e6, vocab_size=len(tokenizer),
                         rms_norm_eps=1e-6, rope_scaling={"mrope_section": [16, 24, 24], "rope_type": "default",
                                                          "type": "default"}),
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=64, num_heads=2, out_hidden_size=3584,
                           fullatt_block_indexes=[1], window_size=112),
        hidden_size=3584, vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=None,
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"])
    text_encoder = _with_default(device, dtype, lambda: Qwen2_5_VLForConditionalGeneration(config))
    vae = _with_default(device, dtype, AutoencoderKLQwenImage)
    randomize_(text_encoder, seed)
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(QWEN_FLOWMATCH), vae=vae.eval(),
                             text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                             transformer=build_transformer("qwen_image", "full", device, dtype, seed))


def build_wan22_14b_pipeline(device: str, dtype, seed: int = 0, text_layers: int = 2):
    """WanPipeline of Wan 2.2 A14B T2V with ONE full 14B expert (the caller stores it as both ``transformer`` and
    ``transformer_2``: two 28.6 GB experts do not fit a GPU machine's disk beside the rest), the full Wan 2.1 VAE,
    and a UMT5 encoder of full width (4096) with ``text_layers`` layers; random weights. ``transformer_2`` is left
    out here; see :func:`..harness.materialize_wan22_14b`."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    from ..tiny.tokenizers import t5_tokenizer

    tokenizer = t5_tokenizer()
    config = UMT5Config(vocab_size=len(tokenizer), d_model=4096, d_kv=64, d_ff=10240, num_layers=text_layers,
                        num_heads=64, relative_attention_num_buckets=32, feed_forward_proj="gated-gelu",
                        dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    text_encoder = _with_default(device, dtype, lambda: UMT5EncoderModel(config))
    vae = _with_default(device, dtype, AutoencoderKLWan)
    randomize_(text_encoder, seed)
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae.eval(),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=12.0),
                       transformer=build_transformer("wan21_14b", "full", device, dtype, seed), boundary_ratio=0.875)
