"""Z-Image L2P: Z-Image's transformer turned into a pixel-space model, sampled as ai-toolkit's ``zimage_l2p`` arch.

L2P ("latent to pixel") keeps Z-Image's trunk (refiners and main layers, diffusers' ``ZImageTransformer2DModel``) but
embeds 16x16 RGB patches instead of VAE latents and replaces the final layer and unpatchify with a small U-Net
(``local_decoder``) that reads the noisy image and takes the trunk's image tokens, as a feature map, at its
bottleneck. There is no VAE: the model denoises RGB in ``[-1, 1]``. The published checkpoint is one file,
``model-1k-merge.safetensors`` in ``zhen-nan/L2P``; the text encoder and tokenizer are Z-Image-Turbo's.

What ai-toolkit does when it samples this arch (``extensions_built_in/diffusion_models/z_image/z_image_l2p_model.py``,
a subclass of its ``ZImageModel``), and so do we:

* it runs diffusers' stock ``ZImagePipeline`` loop unchanged, with a stand-in VAE whose decode is the identity and
  whose scale factor is 1, so the "latents" are the image: ``randn(B, 3, H, W)`` in float32 for the seed;
* the schedule, guidance and size floor are Z-Image's (see ``families/zimage.py``): FlowMatch Euler at a static shift
  of 3.0, standard CFG passed as ``max(0, g - 1)``, sizes floored to a multiple of 16;
* the transformer's ``forward`` is patched: the trunk runs as in Z-Image, then the first ``(H/16)(W/16)`` tokens of the
  unified sequence (the image tokens) become a ``[B, dim, H/16, W/16]`` map for the U-Net, whose output is the
  prediction. The final layer is deleted, so the checkpoint has no ``all_final_layer`` weights.

:class:`ZImageL2PPipeline` is diffusers' ``ZImagePipeline`` without a VAE: its loop runs as it is on pixels and the
result is post-processed directly. :class:`ZImageL2PTransformer2DModel` and :class:`PixelUNetDecoder` are our own
implementation of the architecture, with the checkpoint's parameter names (``local_decoder.enc1.0.weight`` ...),
proven equal to ai-toolkit's on the same weights in ``tests/test_zimage_l2p.py``.
"""

from __future__ import annotations

import os

import torch
from diffusers import ZImagePipeline, ZImageTransformer2DModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.pipelines.z_image.pipeline_output import ZImagePipelineOutput
from diffusers.utils import apply_lora_scale
from torch import nn

from ..registry import ModelSpec, ZImageL2POptions
from .zimage import ZImageFamilyPipeline

#: the U-Net's widths per resolution level in the published checkpoint (ai-toolkit's ``MicroDiffusionModel``)
DECODER_CHANNELS = (64, 128, 256, 512)
#: pixels per patch side; the image is pooled ``len(DECODER_CHANNELS)`` times, down to the token grid
PATCH_SIZE = 16


class PixelUNetDecoder(nn.Module):
    """L2P's pixel decoder: a U-Net over the noisy image, ``channels[i]`` wide at 1/2^i of its size, that joins the
    transformer's feature map at the bottleneck (1x1 conv) and predicts ``in_channels`` pixel channels.

    Module names are the checkpoint's: ``enc1..4`` (conv 3x3 + SiLU) each followed by a 2x2 max pool, ``bottleneck``,
    then per level, from the deepest up, ``upN`` (nearest 2x upsample + conv 3x3) and ``decN`` (conv 3x3 + SiLU over the
    upsampled map and the level's encoder output), and ``out_conv`` (1x1).
    """

    def __init__(self, in_channels: int, feature_channels: int, channels: tuple[int, ...] = DECODER_CHANNELS):
        super().__init__()
        self.levels = len(channels)
        previous = in_channels
        for level, width in enumerate(channels, start=1):
            self.add_module(f"enc{level}", nn.Sequential(nn.Conv2d(previous, width, 3, padding=1), nn.SiLU()))
            self.add_module(f"pool{level}", nn.MaxPool2d(2, stride=2))
            previous = width
        self.bottleneck = nn.Sequential(nn.Conv2d(channels[-1] + feature_channels, channels[-1], 1), nn.SiLU())
        for level in range(self.levels, 0, -1):
            width = channels[level - 1]
            below = channels[max(level - 2, 0)]
            self.add_module(f"up{level}", nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                                        nn.Conv2d(width, width, 3, padding=1)))
            self.add_module(f"dec{level}", nn.Sequential(nn.Conv2d(2 * width, below, 3, padding=1), nn.SiLU()))
        self.out_conv = nn.Conv2d(channels[0], in_channels, 1)

    def forward(self, pixels: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        skips = []
        hidden = pixels
        for level in range(1, self.levels + 1):
            hidden = getattr(self, f"enc{level}")(hidden)
            skips.append(hidden)
            hidden = getattr(self, f"pool{level}")(hidden)
        if features.shape[-2:] != hidden.shape[-2:]:
            features = nn.functional.interpolate(features, size=hidden.shape[-2:], mode="nearest")
        hidden = self.bottleneck(torch.cat([hidden, features.to(hidden.dtype)], dim=1))
        for level in range(self.levels, 0, -1):
            upsampled = getattr(self, f"up{level}")(hidden)
            hidden = getattr(self, f"dec{level}")(torch.cat([upsampled, skips[level - 1]], dim=1))
        return self.out_conv(hidden)


class ZImageL2PTransformer2DModel(ZImageTransformer2DModel):
    """Z-Image's trunk with L2P's pixel decoder in place of the final layer (see the module docstring).

    The configuration is Z-Image's with the published L2P values as defaults (RGB in, 16x16 patches, rope length
    1536), plus ``decoder_channels``. ``forward`` takes and returns what the Z-Image transformer does (a list of
    ``[C, 1, H, W]`` per item), so ``ZImagePipeline``'s loop drives it unchanged.
    """

    def __init__(
        self,
        all_patch_size=(PATCH_SIZE,),
        all_f_patch_size=(1,),
        in_channels=3,
        dim=3840,
        n_layers=30,
        n_refiner_layers=2,
        n_heads=30,
        n_kv_heads=30,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=2560,
        siglip_feat_dim=None,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=(32, 48, 48),
        axes_lens=(1536, 512, 512),
        decoder_channels=DECODER_CHANNELS,
    ) -> None:
        super().__init__(
            all_patch_size=all_patch_size, all_f_patch_size=all_f_patch_size, in_channels=in_channels, dim=dim,
            n_layers=n_layers, n_refiner_layers=n_refiner_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
            norm_eps=norm_eps, qk_norm=qk_norm, cap_feat_dim=cap_feat_dim, siglip_feat_dim=siglip_feat_dim,
            rope_theta=rope_theta, t_scale=t_scale, axes_dims=list(axes_dims), axes_lens=list(axes_lens),
        )
        self.register_to_config(decoder_channels=tuple(decoder_channels))
        del self.all_final_layer  # never run: the decoder predicts the pixels
        self.local_decoder = PixelUNetDecoder(in_channels, dim, tuple(decoder_channels))

    @apply_lora_scale("joint_attention_kwargs")
    def forward(self, x, t, cap_feats, return_dict: bool = True, patch_size: int = PATCH_SIZE,
                f_patch_size: int = 1, joint_attention_kwargs=None):
        """``x``: one ``[C, 1, H, W]`` noisy image per item; ``t``: ``[B]`` in ``[0, 1]`` (1 = clean);
        ``cap_feats``: one ``[L_i, cap_feat_dim]`` prompt embedding per item. Returns one ``[C, 1, H, W]`` per item."""
        if isinstance(x[0], list):
            raise ValueError("Z-Image L2P takes one image per batch item; Z-Image Omni's nested inputs are not "
                             "supported.")
        if (patch_size, f_patch_size) not in zip(self.all_patch_size, self.all_f_patch_size):
            raise ValueError(f"patch size {patch_size}-{f_patch_size} is not one of this model's "
                             f"{list(zip(self.all_patch_size, self.all_f_patch_size))}.")
        device = x[0].device
        pixels = torch.stack(x).squeeze(2)
        batch, _, height, width = pixels.shape
        conditioning = self.t_embedder(t * self.t_scale).type_as(x[0])

        patches, captions, _, image_positions, caption_positions, image_padding, caption_padding = (
            self.patchify_and_embed(x, cap_feats, patch_size, f_patch_size))

        image_lengths = [len(p) for p in patches]
        image = self.all_x_embedder[f"{patch_size}-{f_patch_size}"](torch.cat(patches))
        image, image_freqs, image_mask, _, _ = self._prepare_sequence(
            list(image.split(image_lengths)), image_positions, image_padding, self.x_pad_token, None, device)
        for block in self.noise_refiner:
            image = block(image, image_mask, image_freqs, conditioning)

        caption_lengths = [len(c) for c in captions]
        caption = self.cap_embedder(torch.cat(captions))
        caption, caption_freqs, caption_mask, _, _ = self._prepare_sequence(
            list(caption.split(caption_lengths)), caption_positions, caption_padding, self.cap_pad_token, None, device)
        for block in self.context_refiner:
            caption = block(caption, caption_mask, caption_freqs)

        # basic (non-omni) order: each item's image tokens first, then its caption tokens
        unified, unified_freqs, unified_mask, _ = self._build_unified_sequence(
            image, image_freqs, image_lengths, None, caption, caption_freqs, caption_lengths, None,
            None, None, None, None, False, device)
        for block in self.layers:
            unified = block(unified, unified_mask, unified_freqs, conditioning)

        rows, cols = height // patch_size, width // patch_size
        feature_map = unified[:, : rows * cols].reshape(batch, rows, cols, self.dim).permute(0, 3, 1, 2)
        prediction = self.local_decoder(pixels, feature_map.contiguous()).unsqueeze(2)
        output = list(prediction.unbind(0))
        return Transformer2DModelOutput(sample=output) if return_dict else (output,)


class ZImageL2PPipeline(ZImagePipeline):
    """diffusers' ``ZImagePipeline`` without a VAE: its loop runs on ``[B, 3, H, W]`` pixels (scale factor 1) and the
    final "latents" are the image in ``[-1, 1]``."""

    model_cpu_offload_seq = "text_encoder->transformer"

    def __init__(self, scheduler, text_encoder, tokenizer, transformer: ZImageL2PTransformer2DModel):
        DiffusionPipeline.__init__(self)
        self.register_modules(scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer)
        self.vae_scale_factor = 1
        # the stock loop asks sizes to be multiples of vae_scale_factor * 2; the transformer needs its patch size
        self.image_processor = VaeImageProcessor(vae_scale_factor=2)

    def __call__(self, *args, output_type: str = "pil", return_dict: bool = True, **kwargs):
        """``ZImagePipeline.__call__`` (same arguments); ``output_type="latent"`` gives the ``[-1, 1]`` pixels."""
        pixels = super().__call__(*args, output_type="latent", return_dict=False, **kwargs)[0]
        images = pixels if output_type == "latent" else self.image_processor.postprocess(pixels, output_type)
        return ZImagePipelineOutput(images=images) if return_dict else (images,)


def load_l2p_transformer(path: str, torch_dtype) -> ZImageL2PTransformer2DModel:
    """The published single-file checkpoint (``all_final_layer.*``, unused, is dropped as ai-toolkit does)."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file

    state = {k: v.to(torch_dtype) for k, v in load_file(path).items() if not k.startswith("all_final_layer.")}
    if "all_x_embedder.16-1.weight" not in state or not any(k.startswith("local_decoder.") for k in state):
        raise ValueError(f"{path!r} is not a Z-Image L2P checkpoint (it has no all_x_embedder.16-1 / local_decoder "
                         "weights). Give zhen-nan/L2P's model-1k-merge.safetensors or a diffusers folder of L2P.")
    in_channels = state["local_decoder.enc1.0.weight"].shape[1]
    with init_empty_weights():
        transformer = ZImageL2PTransformer2DModel(in_channels=in_channels)
    transformer.load_state_dict(state, strict=True, assign=True)  # no buffers: every tensor comes from the file
    return transformer


class ZImageL2PFamilyPipeline(ZImageFamilyPipeline):
    """``zimage_l2p``: Z-Image's prompts, schedule and guidance (inherited) on the L2P pixel-space pipeline."""

    options_type = ZImageL2POptions

    @classmethod
    def diffusers_pipeline_class(cls, spec: ModelSpec):
        return ZImageL2PPipeline

    @classmethod
    def load_diffusers_pipeline(cls, spec: ModelSpec, source: str, torch_dtype, **overrides):
        """A folder saved from this pipeline (``model_index.json``, the tiny kit's layout) has every component in its
        subfolders. Otherwise ``source`` is the checkpoint file, or a folder or hub repo holding it, and the text
        encoder and tokenizer come from ``spec.options.extras`` (Z-Image-Turbo), as ai-toolkit loads them."""
        device_map = overrides.get("device_map")
        if os.path.isfile(os.path.join(source, "model_index.json")):
            transformer = ZImageL2PTransformer2DModel.from_pretrained(
                source, subfolder="transformer", dtype=torch_dtype, device_map=device_map)
            extras = source
        else:
            transformer = load_l2p_transformer(cls.checkpoint_file(spec, source), torch_dtype)
            extras = spec.options.extras
        from transformers import AutoModel, AutoTokenizer

        return ZImageL2PPipeline(
            scheduler=cls.make_scheduler(spec), transformer=transformer,
            text_encoder=AutoModel.from_pretrained(extras, subfolder="text_encoder", dtype=torch_dtype,
                                                   device_map=device_map).eval(),
            tokenizer=AutoTokenizer.from_pretrained(extras, subfolder="tokenizer"),
        )

    @staticmethod
    def checkpoint_file(spec: ModelSpec, source: str) -> str:
        """The L2P file: ``source`` itself, the options' file name in the folder or hub repo ``source``, or a hub
        path ``owner/repo/file.safetensors`` (how ai-toolkit jobs name it)."""
        if os.path.isfile(source):
            return source
        if os.path.isdir(source):
            path = os.path.join(source, spec.options.checkpoint_file)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{source!r} has neither model_index.json nor {spec.options.checkpoint_file}; "
                                        f"give the L2P checkpoint file, its folder or the hub repo {spec.base}.")
            return path
        from huggingface_hub import hf_hub_download

        if source.endswith(".safetensors") and source.count("/") >= 2:
            repo, filename = source.rsplit("/", 1)
            return hf_hub_download(repo, filename)
        return hf_hub_download(source, spec.options.checkpoint_file)
