"""Tiny Z-Image L2P pipeline: our ``ZImageL2PTransformer2DModel`` (Z-Image's trunk on 16x16 RGB patches plus the pixel
U-Net decoder, at toy widths) with the tiny Z-Image text encoder and tokenizer, random weights, no VAE."""

from __future__ import annotations

from .zimage import zimage_components

#: the tiny Z-Image trunk (tiny/zimage.py) on RGB patches, with a narrow decoder; the goldens use the published widths
TRANSFORMER_CONFIG = dict(
    all_patch_size=(16,), all_f_patch_size=(1,), in_channels=3, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2,
    n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
    axes_dims=(8, 4, 4), axes_lens=(256, 32, 32), decoder_channels=(8, 8, 16, 16),
)


def zimage_l2p_transformer(seed: int = 0, **config):
    import torch

    from ..pipelines.families.zimage_l2p import ZImageL2PTransformer2DModel

    torch.manual_seed(seed)
    transformer = ZImageL2PTransformer2DModel(**{**TRANSFORMER_CONFIG, **config})
    # redrawn so the trunk (where LoRAs act) visibly moves the decoder's output; the stock init leaves it nearly mute,
    # and the pad tokens are torch.empty-initialised
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, parameter[0].numel() ** -0.5)
            else:
                parameter.normal_(1.0 if "norm" in name else 0.0, 0.1)
    return transformer


def build_zimage_l2p():
    from ..pipelines.families.zimage_l2p import ZImageL2PPipeline

    components = zimage_components(zimage_l2p_transformer())
    del components["vae"]
    return ZImageL2PPipeline(**components)
