"""The pixel-space building blocks (``pipelines/families/pixel_space.py``); the families using them prove them against
ai-toolkit's goldens in their own tests."""

import math

import pytest
import torch

from aitk_inference.pipelines.families.pixel_space import (
    DctPatchEmbedder, dct_features, dct_position_code, patchify_pixels, patchify_pixels_channels_last, unpatchify_pixels,
    unpatchify_pixels_channels_last, velocity_from_x0,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_patchify_order_and_round_trip():
    images = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    tokens = patchify_pixels(images, 2)
    assert tokens.shape == (2, 6, 12)
    # second patch of the first row: columns 2-3 of rows 0-1, channel by channel
    assert tokens[0, 1].tolist() == [images[0, c, y, x].item() for c in range(3) for y in (0, 1) for x in (2, 3)]
    assert torch.equal(unpatchify_pixels(tokens, 4, 6, 2), images)


def test_channels_last_patchify_order_and_round_trip():
    images = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    tokens = patchify_pixels_channels_last(images, 2)
    assert tokens.shape == (2, 6, 12)
    # second patch of the first row: pixel by pixel (rows 0-1, columns 2-3), the three channels of each together
    assert tokens[0, 1].tolist() == [images[0, c, y, x].item() for y in (0, 1) for x in (2, 3) for c in range(3)]
    assert torch.equal(unpatchify_pixels_channels_last(tokens, 4, 6, 2), images)


def test_dct_position_code_values():
    code = dct_position_code(patch_size=3, max_freqs=2)
    assert code.shape == (1, 9, 4)
    # pixel (row 0, col 0): every cosine is 1, so the code is 1 / (1 + fx fy)
    assert torch.allclose(code[0, 0], torch.tensor([1.0, 1.0, 1.0, 0.5]))
    # pixel (row 2, col 1): x = 0.5, y = 1 -> (fx, fy) = (1, 1) gives cos(pi/2) cos(pi) / 2
    assert math.isclose(code[0, 7, 3].item(), math.cos(math.pi / 2) * math.cos(math.pi) / 2, abs_tol=1e-7)
    assert math.isclose(code[0, 7, 1].item(), math.cos(math.pi), abs_tol=1e-7)  # (fx, fy) = (0, 1)


def test_dct_embedder_goes_through_its_linear_and_returns_the_input_dtype():
    torch.manual_seed(0)
    embedder = DctPatchEmbedder(in_channels=3, hidden_size=8, max_freqs=4)
    pixels = torch.randn(2, 16, 3)
    expected = torch.cat([pixels, dct_position_code(4, 4).expand(2, -1, -1)], -1) @ embedder.embedder[0].weight.T
    expected = expected + embedder.embedder[0].bias
    assert torch.allclose(embedder(pixels), expected, atol=1e-6)
    assert set(embedder.state_dict()) == {"embedder.0.weight", "embedder.0.bias"}
    assert embedder(pixels.bfloat16()).dtype == torch.bfloat16  # a float32 embedder in a bf16 model
    seen = []
    embedder.embedder[0].register_forward_hook(lambda module, args, out: seen.append(args[0].dtype))
    embedder(pixels)
    assert seen == [torch.float32]  # hooks (and LoRA layers) on the Linear see the call


def test_velocity_from_x0_with_a_time_floor():
    noisy, x0 = torch.full((2, 1, 2, 2), 3.0), torch.ones(2, 1, 2, 2)
    velocity = velocity_from_x0(noisy, x0, torch.tensor([0.5, 0.01]), min_time=0.05)
    assert torch.allclose(velocity[0], torch.full((1, 2, 2), 4.0))
    assert torch.allclose(velocity[1], torch.full((1, 2, 2), 40.0))


def test_dct_features_feed_the_embedder_linear():
    embedder = DctPatchEmbedder(3, 8, 4)
    pixels = torch.randn(2, 16, 3).to(torch.bfloat16)
    features = dct_features(pixels, 4)
    assert features.dtype == torch.float32 and features.shape == (2, 16, 3 + 16)
    expected = embedder(pixels)
    assert torch.equal(embedder.embedder(features).to(torch.bfloat16), expected)
