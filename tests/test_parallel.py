"""Context parallelism (the ``parallel`` load option): its checks, and one generation shared by two gloo processes on
the CPU through diffusers' Ulysses attention, equal to the one-process generation, with LoRAs and strength changes.

Ring attention cannot run here: diffusers' ring needs the softmax's log-sum-exp from the kernel, which its native
(sdpa) backend does not return (``Native attention does not support return_lse=True``); the CUDA kernels that do are
covered by tests/test_gpu.py.
"""

import json
import os
import socket

import numpy as np
import pytest

from aitk_inference.pipelines.registry import REGISTRY, get_spec
from aitk_inference.pipelines.runtime.options import LoadOptionError, LoadOptions, parse_parallel

PROMPT = "a tiny photo of a cat"
CALL = {"width": 64, "height": 64, "steps": 2, "seed": 7}
#: float32 on one CPU: sharded attention changes only the summation order of the softmax's rows
ATOL = 1e-5
#: bfloat16 on two GPUs (images in 0..1): a bound of about 5 levels of 255, not yet measured (no two-GPU machine lent)
GPU_ATOL = 0.02


# ---------------------------------------------------------------------------------------------------------------- checks
def test_parse_parallel():
    assert parse_parallel("none") == {}
    assert parse_parallel("ulysses=2") == {"ulysses": 2}
    assert parse_parallel("ring=2,ulysses=4") == {"ulysses": 4, "ring": 2}
    assert parse_parallel("ulysses=2,ring=1") == {"ulysses": 2}
    for bad in ("ulysses", "ulysses=two", "tensor=2", "ulysses=2,ulysses=2", "ulysses=1", "ring=0"):
        with pytest.raises(LoadOptionError, match="parallel="):
            parse_parallel(bad)


def test_parallel_option_checks(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert LoadOptions(parallel="ring=2,ulysses=2", attention="sdpa_flash").parallel == "ulysses=2,ring=2"
    with pytest.raises(LoadOptionError, match="cannot run ring .* use attention sdpa_cudnn, sdpa_flash, flash_attn, sage"):
        LoadOptions(parallel="ring=2")
    with pytest.raises(LoadOptionError, match="cannot run ulysses"):
        LoadOptions(parallel="ulysses=2", attention="sdpa_math")
    with pytest.raises(LoadOptionError, match="needs offload='none'"):
        LoadOptions(parallel="ulysses=2", offload="group")
    for model_id in ("sdxl", "ltx2"):
        with pytest.raises(LoadOptionError, match=f"{model_id} cannot be sharded over processes"):
            LoadOptions(parallel="ulysses=2", device="cpu").resolve(get_spec(model_id))
    with pytest.raises(LoadOptionError, match="qwen_image shards with ulysses only, not ring"):
        LoadOptions(parallel="ring=2", attention="sdpa_flash", device="cpu").resolve(get_spec("qwen_image"))
    with pytest.raises(LoadOptionError, match="has 1; start it with torchrun --nproc-per-node 2"):
        LoadOptions(parallel="ulysses=2", device="cpu").resolve(get_spec("flux"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert LoadOptions(parallel="ulysses=2", device="cuda", dtype="fp32").resolve(get_spec("flux")).device == "cuda:1"
    with pytest.raises(LoadOptionError, match="'cuda:0' is not this process's GPU"):
        LoadOptions(parallel="ulysses=2", device="cuda:0", dtype="fp32").resolve(get_spec("flux"))
    key = LoadOptions(parallel="ulysses=2", device="cpu").cache_key("flux")
    assert key != LoadOptions(device="cpu").cache_key("flux")


def test_context_parallel_ids_have_a_plan(tiny_dir):
    """Every id the registry lets shard has denoisers (every expert) whose diffusers class carries a plan."""
    import diffusers

    ids = [model_id for model_id, spec in REGISTRY.items() if spec.context_parallel]
    assert {"flux", "flex2", "flux_kontext", "flux2", "qwen_image", "wan21_14b", "wan22_14b_t2v"} <= set(ids)
    assert not {"ltx2", "sdxl"} & set(ids)
    for model_id in ids:
        spec = REGISTRY[model_id]
        with open(os.path.join(tiny_dir(model_id), "model_index.json")) as f:
            index = json.load(f)
        for component in spec.experts.components if spec.experts else ("transformer",):
            denoiser_class = getattr(diffusers, index[component][1])
            assert denoiser_class._cp_plan, (model_id, component)


# ---------------------------------------------------------------------------------------------------------------- two ranks
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: the pipelines each rank renders: name -> load options (FP8 fused on FP8 GPUs only)
MODES = {"dynamic": {"lora_mode": "dynamic"}, "fused": {"lora_mode": "fused"},
         "fp8_fused": {"lora_mode": "fused", "quantize": "fp8"}}


def _render(pipeline, lora: str) -> dict:
    """The images of: the LoRA at 1.0, the same LoRA at 0.5 (a strength change), and no LoRA; and the image tokens
    the first block sees (half of them on each of two ranks)."""
    tokens = []
    block = pipeline.pipe.transformer.transformer_blocks[0]
    handle = block.register_forward_pre_hook(lambda _, args, kwargs: tokens.append(kwargs["hidden_states"].shape[1]),
                                             with_kwargs=True)
    images = {}
    for strength in (1.0, 0.5):
        pipeline.set_loras([(lora, strength)])
        images[f"lora_{strength}"] = pipeline.generate(PROMPT, **CALL).images
    pipeline.set_loras([])
    images["no_lora"] = pipeline.generate(PROMPT, **CALL).images
    handle.remove()
    images["block_tokens"] = np.array(sorted(set(tokens)))
    return images


def _extra(model_id: str, call: dict, run: dict, device: str, parallel: str = "none"):
    """The image of ``model_id`` (its tiny pipeline, no LoRA) with ``call``'s differences from ``CALL``."""
    from aitk_inference.pipelines import load_pipeline
    from aitk_inference.tiny import tiny_model_dir

    pipeline = load_pipeline(model_id, base=tiny_model_dir(model_id), device=device, dtype=run["dtype"],
                             attention=run["attention"], parallel=parallel)
    return pipeline.generate(PROMPT, **{**CALL, **call}).images


def _rank_main(rank: int, port: int, run: dict) -> None:
    """One process of a two-process run, started as torchrun starts it (its environment)."""
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    from aitk_inference import cli
    from aitk_inference.pipelines import load_pipeline

    arrays = {}
    for mode in run["modes"]:
        pipeline = load_pipeline("flux", base=run["folder"], device=run["device"], dtype=run["dtype"],
                                 attention=run["attention"], parallel=run["parallel"], **MODES[mode])
        arrays.update({f"{mode}_{name}": image for name, image in _render(pipeline, run["lora"]).items()})
    arrays["drawn_seed"] = np.array(pipeline.generate(PROMPT, **{**CALL, "seed": -1, "steps": 1}).seed)
    for name, (model_id, call) in run["extra"].items():
        arrays[name] = _extra(model_id, call, run, run["device"], run["parallel"])
    np.savez(os.path.join(run["out"], f"rank{rank}.npz"), **arrays)
    # the CLI: only rank 0 writes its file; it leaves the process group
    assert cli.main(["generate", "--model", "flux", "--base", run["folder"], "--device", run["device"], "--dtype",
                     run["dtype"], "--attention", run["attention"], "--parallel", run["parallel"], "--lora",
                     f"{run['lora']}:0.8", "--prompt", PROMPT, "--width", "64", "--height", "64", "--steps", "2",
                     "--seed", "-1", "--quiet", "--out", os.path.join(run["out"], f"cli_rank{rank}.png")]) == 0
    assert not torch.distributed.is_initialized()


@pytest.fixture(scope="module")
def flux_lora(tiny_dir, tmp_path_factory):
    """A LoRA on every block Linear of the tiny FLUX and on ``proj_out``, the Linear whose output the
    context-parallel plan gathers (PEFT wraps it in dynamic mode)."""
    from aitk_inference.pipelines import load_pipeline
    from aitk_inference.tiny.loras import lora_targets, write_lora

    pipeline = load_pipeline("flux", base=tiny_dir("flux"), device="cpu", dtype="fp32")
    denoiser = pipeline.pipe.transformer
    path = str(tmp_path_factory.mktemp("cp_lora") / "lora.safetensors")
    write_lora(path, "peft", lora_targets(denoiser) + [("proj_out", denoiser.proj_out)], seed=3)
    return path


def _two_ranks_against_one(run: dict, atol: float) -> dict:
    """Run ``run`` on two ranks while this process renders the same on one; check that both ranks got the same
    images, each within ``atol`` of the one-process images, that each rank's blocks saw half the image tokens, that
    a drawn seed was drawn once and that only rank 0 wrote the CLI's image. Returns the largest differences."""
    import torch.multiprocessing as mp

    from aitk_inference.pipelines import load_pipeline

    context, port = mp.get_context("spawn"), _free_port()
    ranks = [context.Process(target=_rank_main, args=(rank, port, run)) for rank in range(2)]
    for process in ranks:
        process.start()
    reference = {}  # one process, while the two ranks run
    for mode in run["modes"]:
        device = "cuda:0" if run["device"] == "cuda" else run["device"]
        pipeline = load_pipeline("flux", base=run["folder"], device=device, dtype=run["dtype"],
                                 attention=run["attention"], **MODES[mode])
        reference.update({f"{mode}_{name}": image for name, image in _render(pipeline, run["lora"]).items()})
    for name, (model_id, call) in run["extra"].items():
        reference[name] = _extra(model_id, call, run, device)
    for process in ranks:
        process.join(timeout=240)
        assert process.exitcode == 0, f"rank exited with {process.exitcode}"

    assert sorted(os.listdir(run["out"])) == ["cli_rank0.png", "rank0.npz", "rank1.npz"]  # rank 1 wrote no image
    rank0, rank1 = np.load(os.path.join(run["out"], "rank0.npz")), np.load(os.path.join(run["out"], "rank1.npz"))
    assert int(rank0["drawn_seed"]) == int(rank1["drawn_seed"])
    differences = {}
    for name, image in reference.items():
        if name.endswith("block_tokens"):
            assert rank0[name].tolist() == rank1[name].tolist() == [image[0] // 2], (name, image, rank0[name])
            continue
        np.testing.assert_array_equal(rank0[name], rank1[name])
        differences[name] = float(np.abs(rank0[name] - image).max())
    print(f"{run['parallel']} ({run['device']}, {run['dtype']}, {run['attention']}) vs one process, largest "
          "difference:", differences)
    assert max(differences.values()) <= atol, differences
    for mode in run["modes"]:  # the LoRA and its strength change act
        assert np.abs(reference[f"{mode}_lora_1.0"] - reference[f"{mode}_no_lora"]).max() > 0.01
        assert np.abs(reference[f"{mode}_lora_1.0"] - reference[f"{mode}_lora_0.5"]).max() > 0.01
    return differences


def _cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count()


def test_two_ranks_equal_one(tiny_dir, flux_lora, tmp_path):
    """FLUX with LoRAs; Qwen-Image, whose text tokens (a count that follows the prompt) Ulysses shards unevenly."""
    tiny_dir("qwen_image")
    _two_ranks_against_one({"folder": tiny_dir("flux"), "lora": flux_lora, "out": str(tmp_path), "device": "cpu",
                            "dtype": "fp32", "attention": "sdpa", "parallel": "ulysses=2",
                            "modes": ("dynamic", "fused"), "extra": {"qwen_image": ("qwen_image", {})}}, ATOL)


@pytest.mark.skipif(_cuda_device_count() < 2, reason="needs two CUDA GPUs (one process each)")
@pytest.mark.parametrize("parallel,attention", [("ulysses=2", "sdpa"), ("ring=2", "sdpa_cudnn"),
                                                ("ring=2", "sdpa_flash")])
def test_two_gpus_equal_one(tiny_dir, flux_lora, tmp_path, parallel, attention):
    """The same on two GPUs over NCCL in bfloat16, with Ulysses and with ring attention (which needs a kernel that
    returns the log-sum-exp); with FP8 fused LoRAs where the GPU has FP8; Ulysses also at a size whose 25 image tokens
    shard unevenly (NCCL gathers uneven shards, gloo cannot)."""
    from aitk_inference.pipelines.runtime.quantize import fp8_unavailable

    modes = ("dynamic", "fused") + (() if fp8_unavailable("cuda") else ("fp8_fused",))
    _two_ranks_against_one({"folder": tiny_dir("flux"), "lora": flux_lora, "out": str(tmp_path), "device": "cuda",
                            "dtype": "bf16", "attention": attention, "parallel": parallel, "modes": modes,
                            "extra": {"uneven": ("flux", {"width": 80, "height": 80})} if parallel == "ulysses=2" else {}},
                           GPU_ATOL)
