"""Tiny Flex.2 pipeline: the real FluxTransformer2DModel with Flex.2's channel layout, tiny FLUX.1 VAE and encoders."""

from __future__ import annotations

from .flux import flux_components, flux_transformer

LATENT_CHANNELS = 16


def build_flex2():
    from ..pipelines.families.flex2 import Flex2Pipeline, flex2_in_channels

    # noisy latent + inpaint latent + mask + control latent, packed 2x2 (196); the output is one packed latent (64)
    transformer = flux_transformer(in_channels=flex2_in_channels(LATENT_CHANNELS), out_channels=4 * LATENT_CHANNELS)
    return Flex2Pipeline(**flux_components(transformer=transformer))
