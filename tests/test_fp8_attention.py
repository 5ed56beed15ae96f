"""``attention="flash_attn_3_fp8"`` (``runtime.fp8_attention``): q, k and v rounded to e4m3 with one scale per image
and key/value head, then FlashAttention-3's FP8 kernel. The kernel needs a Hopper GPU (``tests/test_gpu.py``); here
a CPU stand-in with its contract (e4m3 inputs, float32 scales per image and head, bf16 out) checks the quantization
and that every attention layer runtime.rope covers routes to it."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aitk_inference.pipelines.registry import REGISTRY
from aitk_inference.pipelines.runtime import fp8_attention
from aitk_inference.pipelines.runtime.rope import FusedRopeProcessor

pytestmark = pytest.mark.usefixtures("one_thread")


def test_each_head_is_scaled_so_its_largest_magnitude_is_e4m3s_largest():
    tensor = torch.randn(2, 50, 4, 16) * torch.tensor([1.0, 1e-3, 300.0, 0.0]).view(1, 1, 4, 1)
    quantized, scale = fp8_attention.quantize_per_head(tensor, scale_heads=4)
    assert quantized.dtype == torch.float8_e4m3fn and quantized.shape == tensor.shape
    assert scale.dtype == torch.float32 and scale.shape == (2, 4)
    largest = quantized.float().abs().amax(dim=(1, 3))
    assert torch.equal(largest[:, :3], torch.full((2, 3), fp8_attention.E4M3_MAX))
    assert torch.equal(quantized[:, :, 3].float(), torch.zeros(2, 50, 16))  # an all-zero head stays zero
    restored = quantized.float() * scale[:, None, :, None]
    for head in range(3):  # e4m3 keeps 3 mantissa bits: at most half of 2^-3 off, relative, above its normal range
        error = (restored[:, :, head] - tensor[:, :, head]).norm() / tensor[:, :, head].norm()
        assert error < 0.04, (head, error)


def test_query_heads_share_the_scale_of_their_key_value_head():
    query = torch.randn(1, 10, 6, 8) * torch.arange(1.0, 7.0).view(1, 1, 6, 1)
    _, scale = fp8_attention.quantize_per_head(query, scale_heads=2)
    expected = torch.stack([query[:, :, :3].abs().amax(), query[:, :, 3:].abs().amax()]) / fp8_attention.E4M3_MAX
    assert torch.allclose(scale[0], expected)


def test_centring_the_keys_leaves_the_attention_and_cuts_the_fp8_error_of_keys_with_a_common_part(monkeypatch):
    """Keys of real models share a large common part (SageAttention's observation); rounding it to e4m3 costs the
    bits that tell the keys apart. Taking each head's mean key away changes every score of a query by the same
    amount, which the softmax ignores."""
    from diffusers.models import attention_dispatch

    monkeypatch.setattr(attention_dispatch, "flash_attn_3_func", _flash_attention_3_fp8_on_the_cpu([]))
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, 256, 2, 64, generator=generator) for _ in range(3))
    key = key + 8 * torch.randn(1, 1, 2, 64, generator=generator)  # a common part 8x the spread
    exact = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (query, key, value))).transpose(1, 2)
    centred = key - key.mean(dim=1, keepdim=True)
    assert torch.allclose(F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (query, centred, value))),
                          exact.transpose(1, 2), atol=1e-5)

    def error(out):
        return float((out.float() - exact).norm() / exact.norm())

    with_centring = error(fp8_attention.fp8_attention(query, key, value))
    quantize = fp8_attention.quantize_per_head
    monkeypatch.setattr(fp8_attention, "quantize_per_head", lambda t, heads, centre=False: quantize(t, heads))
    without = error(fp8_attention.fp8_attention(query, key, value))
    assert with_centring < without / 2, (with_centring, without)


def test_heads_of_other_sizes_are_padded_to_the_kernels_multiple_of_16(monkeypatch):
    """FlashAttention-3's FP8 kernel refuses head dims that are not multiples of 16 (tiny models' 8 and 12): zero
    columns added to q, k and v change no score, the softmax scale stays that of the real head dim, and the padding
    is cut from the output."""
    from diffusers.models import attention_dispatch

    calls = []
    monkeypatch.setattr(attention_dispatch, "flash_attn_3_func", _flash_attention_3_fp8_on_the_cpu(calls))
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, 64, 2, 12, generator=generator) for _ in range(3))
    exact = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (query, key, value))).transpose(1, 2)
    out = fp8_attention.fp8_attention(query, key, value)
    assert out.shape == exact.shape and calls
    assert float((out.float() - exact).norm() / exact.norm()) < 0.08


def _flash_attention_3_fp8_on_the_cpu(calls):
    """FlashAttention-3's FP8 contract on the CPU: e4m3 (batch, tokens, heads, head dim) inputs with float32
    (batch, key/value heads) scales, head dims in multiples of 16, attention of the scaled values in float32, bf16
    out."""
    def attention(q, k, v, softmax_scale=None, q_descale=None, k_descale=None, v_descale=None):
        if q.shape[-1] % 16:
            raise RuntimeError("head_size should be a multiple of 16")
        calls.append((q.dtype, k.dtype, v.dtype, tuple(q_descale.shape)))

        def restored(t, scale):
            return (t.float().unflatten(2, (scale.shape[1], -1)) * scale[:, None, :, None, None]).flatten(2, 3)

        q, k, v = (restored(t, s).transpose(1, 2) for t, s in ((q, q_descale), (k, k_descale), (v, v_descale)))
        return F.scaled_dot_product_attention(q, k, v, scale=softmax_scale).transpose(1, 2).to(torch.bfloat16)
    return attention


def _generate_with_and_without_fp8_attention(load_tiny, monkeypatch, model_id, flash_attention_backend=False):
    """The tiny model's image with its own attention, then with FP8 attention on in its layers (with
    ``flash_attention_backend``, also FlashAttention-3's backend, as ``set_attention_kernel`` sets it on CUDA: only for
    models whose every attention call goes through ``rope.attend``); returns both and the stand-in's calls."""
    from diffusers.models import attention_dispatch

    calls = []
    monkeypatch.setattr(attention_dispatch, "flash_attn_3_func", _flash_attention_3_fp8_on_the_cpu(calls))
    pipeline = load_tiny(model_id)
    spec = REGISTRY[model_id]
    gen = dict(prompt="a red cube", width=64, height=64, steps=2, seed=5)
    if spec.video:
        gen["num_frames"] = spec.video.frames(1)
    full_precision = pipeline.generate(**gen).images
    processors = [m.processor for m in pipeline.pipe.transformer.modules()
                  if isinstance(getattr(m, "processor", None), FusedRopeProcessor)]
    assert processors
    for processor in processors:
        processor.fp8_attention = True
        if flash_attention_backend:  # which takes no mask
            processor._attention_backend = attention_dispatch.AttentionBackendName._FLASH_3
    return full_precision, pipeline.generate(**gen).images, calls


def _assert_fp8_calls_and_a_close_image(full_precision, fp8, calls):
    assert calls and all(c[:3] == (torch.float8_e4m3fn,) * 3 and len(c[3]) == 2 for c in calls)
    difference = np.abs(fp8.astype(np.float32) - full_precision.astype(np.float32))
    assert 0 < difference.mean() < 0.02, difference.mean()


@pytest.mark.parametrize("model_id", ["flux", "flux2_klein_4b", "wan21_1b", "hidream", "ltx2"])
def test_fp8_attention_layers_give_an_image_close_to_the_full_precision_one(load_tiny, monkeypatch, model_id):
    _assert_fp8_calls_and_a_close_image(*_generate_with_and_without_fp8_attention(load_tiny, monkeypatch, model_id))


def test_fp8_attention_runs_masked_attention_with_torchs_sdpa(load_tiny, monkeypatch):
    """FlashAttention takes no mask. LTX-2 masks its text cross-attention (those calls run torch's SDPA, the rest
    FP8); Chroma masks every call (padded text tokens): all run torch's SDPA, and the image is the model's own."""
    ltx2 = _generate_with_and_without_fp8_attention(load_tiny, monkeypatch, "ltx2", flash_attention_backend=True)
    _assert_fp8_calls_and_a_close_image(*ltx2)
    full_precision, fp8, calls = _generate_with_and_without_fp8_attention(load_tiny, monkeypatch, "chroma",
                                                                          flash_attention_backend=True)
    assert not calls and np.array_equal(fp8, full_precision)


def test_fp8_attention_is_refused_where_it_cannot_run(load_tiny):
    from aitk_inference.pipelines.runtime.accelerate import set_attention_kernel

    with pytest.raises(ValueError, match="is a CUDA kernel"):
        load_tiny("wan21_1b", attention="flash_attn_3_fp8")
    wan = load_tiny("wan21_1b").pipe.transformer
    for kernel in ("flash_attn_3", "flash_attn_3_fp8"):  # tiny Wan's heads are 12 wide
        with pytest.raises(ValueError, match=r"multiple of 8, and wan21_1b's attention has heads of \[12\]"):
            set_attention_kernel([wan], kernel, "cuda", "wan21_1b")
    unet = load_tiny("sd15").pipe.unet
    with pytest.raises(ValueError, match="cannot choose its attention kernel"):
        set_attention_kernel([unet], "flash_attn_3_fp8", "cuda", "sd15")
