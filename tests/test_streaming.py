"""Block streaming (``runtime.streaming``) on the CPU: the CPU stands in for the GPU (the same slots, views and hooks;
the copies are plain and in order). tests/test_gpu.py streams between host and GPU on a copy stream."""

import numpy as np
import pytest
import torch

from aitk_inference.pipelines.runtime.streaming import HOST_COPY, BlockStreamer, is_streamed
from family_streaming import PRETENDED_BUDGET, one_id_per_family, pretend_the_weights_do_not_fit

pytestmark = pytest.mark.usefixtures("one_thread")


class Block(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.up = torch.nn.Linear(width, 2 * width)
        self.down = torch.nn.Linear(2 * width, width, bias=False)
        self.register_buffer("shift", torch.randn(width))
        self.down.weight.data = self.down.weight.data.t().contiguous().t()  # a transposed weight keeps its strides

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(x))) + self.shift


def _model(widths=(8, 8, 16, 8)):
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList()
    for width, following in zip(widths, widths[1:] + (widths[-1],)):
        blocks.append(torch.nn.Sequential(Block(width), torch.nn.Linear(width, following)))
    return blocks


def _forward(blocks, x, order=None):
    for index in order or range(len(blocks)):
        x = blocks[index](x)
    return x


def _host_pointers(blocks) -> list:
    return [t.data_ptr() for block in blocks for t in [*block.parameters(), *block.buffers()]]


@pytest.mark.parametrize("streamed", [[1, 3], [0, 1, 2, 3], [2]])
def test_streamed_blocks_give_the_same_output_and_hold_host_copies_between_forwards(streamed):
    """Streamed blocks (one slot each in turn, the next one fetched when one starts, the first again after the last)
    compute exactly what they computed before, forward after forward; between forwards each holds its host copy,
    and while one runs its weights are views of a slot, not of the host buffer."""
    blocks = _model()
    x = torch.randn(3, 8)
    want = _forward(blocks, x)
    before = {name: tensor.clone() for name, tensor in blocks.state_dict().items()}
    streamer = BlockStreamer([blocks[i] for i in streamed], "cpu")
    assert [is_streamed(block) for block in blocks] == [i in streamed for i in range(len(blocks))]
    host = _host_pointers(blocks)
    seen = []
    probe = blocks[streamed[0]][0].up
    probe.register_forward_pre_hook(lambda module, args: seen.append(module.weight.data_ptr()))
    for _ in range(3):
        assert torch.equal(_forward(blocks, x), want)
        assert _host_pointers(blocks) == host
    slot_bytes = streamer.slots[0].numel()
    assert seen and all(any(slot.data_ptr() <= ptr < slot.data_ptr() + slot_bytes for slot in streamer.slots)
                        for ptr in seen)
    assert all(torch.equal(tensor, before[name]) for name, tensor in blocks.state_dict().items())
    assert blocks[3][0].down.weight.stride() == (1, 8)  # (8, 16), stored transposed


def test_each_block_is_fetched_when_the_streamed_block_two_before_it_ends():
    """The schedule: the first forward fetches the first two blocks when the first starts; from then on, when block k
    ends, block k + 2 (the first ones again after the last) goes into the slot k leaves, so each copy overlaps the
    block before it and everything kept between them. No block is fetched twice in a forward."""
    blocks = _model(widths=(8,) * 5)
    streamer = BlockStreamer(list(blocks), "cpu")
    log, fetch = [], streamer._fetch
    streamer._fetch = lambda index, slot: (log.append(index), fetch(index, slot))
    for index, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda module, args, index=index: log.append(f"run {index}"))
    x = torch.randn(2, 8)
    _forward(blocks, x)
    assert log == [0, 1, "run 0", 2, "run 1", 3, "run 2", 4, "run 3", 0, "run 4", 1]
    log.clear()
    _forward(blocks, x)
    assert log == ["run 0", 2, "run 1", 3, "run 2", 4, "run 3", 0, "run 4", 1]


def test_blocks_run_out_of_order_are_fetched_when_they_start():
    """A forward that runs the streamed blocks in another order than they were given (or skips one) still runs each
    with its own weights: a block not prefetched is fetched when it starts."""
    blocks = _model(widths=(8, 8, 8, 8))
    x = torch.randn(2, 8)
    orders = [[3, 1, 2, 0], [0, 0, 2], [2, 3, 1]]
    wants = [_forward(blocks, x, order) for order in orders]
    BlockStreamer(list(blocks), "cpu")
    for _ in range(2):
        for order, want in zip(orders, wants):
            assert torch.equal(_forward(blocks, x, order), want)


def test_streaming_again_copies_only_the_blocks_whose_weights_changed():
    """Stopping and starting again (what a LoRA change does) reuses a block's host buffer when its tensors are still
    the views of it, with in-place edits made between (an FP8 rebuild writes into them); a block whose weight was
    replaced (a fused LoRA sets ``.data``) gets a new host copy, and the forward computes with the new weight."""
    blocks = _model()
    x = torch.randn(3, 8)
    streamer = BlockStreamer([blocks[1], blocks[2]], "cpu")
    _forward(blocks, x)
    buffers = [getattr(block, HOST_COPY) for block in (blocks[1], blocks[2])]
    with torch.no_grad():
        blocks[1][0].up.weight.mul_(0.5)  # in place: the host copy itself
        blocks[2][0].up.weight.data = blocks[2][0].up.weight.data * 0.5  # a new tensor
    streamer.remove()
    assert not any(is_streamed(block) for block in blocks)
    want = _forward(blocks, x)
    BlockStreamer([blocks[1], blocks[2]], "cpu")
    assert getattr(blocks[1], HOST_COPY) is buffers[0] and getattr(blocks[2], HOST_COPY) is not buffers[1]
    assert torch.equal(_forward(blocks, x), want) and torch.equal(_forward(blocks, x), want)


def test_quantized_weights_stream_as_their_inner_tensors(monkeypatch):
    """torchao FP8 weights (a tensor subclass around float8 values and float32 scales) stream as those inner tensors
    and are rebuilt around the slot's views while their block runs: the same output, and between forwards a
    quantized ``Parameter`` over the host copies."""
    from torchao.quantization import quant_api, quantize_

    from aitk_inference.pipelines.runtime.quantize import fp8_config, is_quantized

    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
    monkeypatch.setattr(quant_api, "is_sm_at_least_89", lambda: True)
    blocks = _model(widths=(32, 32, 32)).to(torch.bfloat16)
    for block in blocks:
        quantize_(block[0], fp8_config())
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    want = _forward(blocks, x)
    BlockStreamer([blocks[0], blocks[2]], "cpu")
    for _ in range(2):
        assert torch.equal(_forward(blocks, x), want)
    weight = blocks[2][0].up.weight
    host = getattr(blocks[2], HOST_COPY)
    assert is_quantized(weight) and isinstance(weight, torch.nn.Parameter)
    assert host.data_ptr() <= weight.qdata.data_ptr() < host.data_ptr() + host.numel()


def test_host_memory_the_system_will_not_pin_is_plain_memory_with_a_warning(caplog):
    """Where page-locked memory is refused (Windows and WSL cap it; here: no accelerator to pin for), a streamed block's
    host buffer and an FP8 master weight are plain memory, and the warning says what it costs and what helps."""
    from aitk_inference.pipelines.runtime import host_memory, quantize

    with caplog.at_level("WARNING", logger=host_memory.__name__):
        buffer = host_memory.host_tensor(64, torch.uint8, pin=True, what="the blocks stream more slowly")
        weight = torch.randn(8, 4)
        master = quantize._host_copy(weight, pin=True)
    assert buffer.shape == (64,) and buffer.dtype == torch.uint8 and buffer.device.type == "cpu"
    assert torch.equal(master, weight) and master.device.type == "cpu"
    if not torch.cuda.is_available():
        assert "refused more page-locked (pinned) host memory" in caplog.text and "quantize='fp8'" in caplog.text
        assert "the blocks stream more slowly" in caplog.text
        assert "FP8 master weights stay in plain memory" in caplog.text
        assert not buffer.is_pinned() and master is weight  # a host weight is not copied only to stay unpinned
    assert host_memory.host_tensor((2, 3), torch.bfloat16, pin=False, what="").shape == (2, 3)
    assert quantize._host_copy(weight, pin=False) is weight


def _outputs(result) -> list[np.ndarray]:
    produced = result.audio if result.is_audio else result.images
    return [np.asarray(item, dtype=np.float64) for item in (produced if isinstance(produced, list) else [produced])]


@pytest.mark.parametrize("model_id", one_id_per_family())
def test_every_family_streams_its_denoiser_blocks_under_auto(model_id, tiny_cache, tmp_path, monkeypatch):
    """``offload="auto"`` on a card the weights do not fit, for one id of every family, through the demo (a LoRA and
    the family's own inputs): the denoiser's blocks are found and some stream (on the CPU: the same bookkeeping with
    plain copies), the components diffusers cannot group-offload (ACE-Step's VAE) and a video model's decoders are
    placed whole, and the output is the one of the pipeline placed whole, within float32 rounding; families whose
    pipeline has no CPU offloading of its own (diffusers' modular pipelines) stream too."""
    from aitk_inference import cli
    from aitk_inference import pipelines as pipelines_module
    from aitk_inference.pipelines import base
    from aitk_inference.pipelines.runtime import accelerate

    results, loaded = [], []
    generate, load = base.AITKPipeline.generate, pipelines_module.load_pipeline

    def keep_result(self, *args, **kwargs):
        results.append(generate(self, *args, **kwargs))
        return results[-1]

    def load_with(offload):
        def load_pipeline(*args, **kwargs):
            loaded.append(load(*args, **kwargs, offload=offload))
            return loaded[-1]
        return load_pipeline

    monkeypatch.setattr(base.AITKPipeline, "generate", keep_result)
    monkeypatch.setattr(pipelines_module, "load_pipeline", load_with("none"))
    assert cli.main(["demo", "--model", model_id, "--out", str(tmp_path / "whole.png"), "--quiet"]) == 0
    monkeypatch.setattr(pipelines_module, "load_pipeline", load_with("auto"))
    pretend_the_weights_do_not_fit(monkeypatch)
    assert cli.main(["demo", "--model", model_id, "--out", str(tmp_path / "auto.png"), "--quiet"]) == 0

    pipeline = loaded[-1]
    assert pipeline.offload == "group"
    for denoiser in pipeline.denoisers():
        blocks = accelerate.blocks_in_order(denoiser)
        assert any(is_streamed(block) for _, block in blocks), f"{type(denoiser).__name__}: no block streams"
    assert pipeline.placed_whole == accelerate.components_placed_whole(
        pipeline.pipe, bool(pipeline.spec.video), accelerate.component_bytes(pipeline.pipe), PRETENDED_BUDGET, 0)
    assert "vae" in pipeline.placed_whole or not (pipeline.spec.video and "vae" in pipeline.pipe.components)
    for name in pipeline.placed_whole:
        assert not accelerate.carries_offload_hook(pipeline.pipe.components[name]), name
    whole, auto = _outputs(results[0]), _outputs(results[-1])
    assert len(whole) == len(auto) and all(a.shape == b.shape for a, b in zip(whole, auto))
    for a, b in zip(whole, auto):
        np.testing.assert_allclose(b, a, rtol=0, atol=5e-5)  # measured up to 1.4e-5 (a Qwen-Image edit model)
