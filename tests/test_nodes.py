"""The ComfyUI node pack, imported the way ComfyUI imports it, run on tiny FLUX / FLUX Kontext models (CPU)."""

import importlib.util
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def import_pack(folder_name: str):
    """Import the repo root as ComfyUI's loader does: a module named after the folder path, from its __init__.py."""
    name = os.path.join("/comfy/custom_nodes", folder_name).replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "__init__.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pack():
    return import_pack("aitk.inference-pack")


@pytest.fixture(scope="module")
def core(pack):
    pack.NODE_CLASS_MAPPINGS  # the lazy attribute imports the nodes package
    return sys.modules[pack.__name__ + ".nodes.core"]


@pytest.fixture(scope="module")
def cache(core):
    return sys.modules[core.__name__.rsplit(".", 2)[0] + ".pipelines.runtime.cache"]


@pytest.fixture(scope="module")
def loras(core, tiny_dir, tmp_path_factory):
    """Two FLUX LoRAs (PEFT and kohya layouts), plus one whose keys are Z-Image's (the wrong family for FLUX)."""
    import torch
    from safetensors.torch import save_file

    from aitk_inference.tiny.loras import lora_targets, write_lora

    folder = tmp_path_factory.mktemp("loras")
    pipeline = core.load("flux", tiny_dir("flux"), "fp32", "none", "cpu").get_pipeline()
    assert not pipeline.loras.describe()  # module names are read before any LoRA wraps them
    targets = lora_targets(pipeline.pipe.transformer, limit=8)
    out = {
        "a": write_lora(str(folder / "flux_a.safetensors"), "peft", targets, seed=1),
        "b": write_lora(str(folder / "flux_b.safetensors"), "kohya", targets, seed=2),
    }
    zimage = {"diffusion_model.layers.0.attention.to_q.lora_A.weight": torch.randn(4, 32),
              "diffusion_model.layers.0.attention.to_q.lora_B.weight": torch.randn(32, 4)}
    out["zimage"] = str(folder / "zimage_lora.safetensors")
    save_file(zimage, out["zimage"])
    return out


@pytest.fixture
def fake_comfy(monkeypatch):
    """Stand-ins for the three ComfyUI functions the nodes call (progress bar, interrupt flag, free_memory)."""
    comfy = types.ModuleType("comfy")
    utils = types.ModuleType("comfy.utils")
    mm = types.ModuleType("comfy.model_management")
    state = types.SimpleNamespace(updates=[], interrupt_after=None, checks=0, freed=[])

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            state.updates.append((value, total))

    class InterruptProcessingException(Exception):
        pass

    def throw_exception_if_processing_interrupted():
        state.checks += 1
        if state.interrupt_after is not None and state.checks >= state.interrupt_after:
            raise InterruptProcessingException()

    utils.ProgressBar = ProgressBar
    mm.InterruptProcessingException = InterruptProcessingException
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    mm.free_memory = lambda memory_required, device, keep_loaded=(): state.freed.append(memory_required)
    mm.get_free_memory = lambda device=None: 1 << 40
    mm.get_torch_device = lambda: "cpu"
    comfy.utils, comfy.model_management = utils, mm
    for name, module in (("comfy", comfy), ("comfy.utils", utils), ("comfy.model_management", mm)):
        monkeypatch.setitem(sys.modules, name, module)
    state.mm = mm
    return state


def run_graph(core, tiny_dir, lora_specs=(), model="flux", progress=None, **sample_kwargs):
    """Load -> Apply LoRA (xN) -> Sample through the nodes' shared functions."""
    handle = core.load(model, tiny_dir(model), "fp32", "none", "cpu")
    for path, strength in lora_specs:
        handle = core.apply_lora(handle, path, strength, "none")
    kwargs = dict(prompt="a photo of [trigger]", negative="", trigger_word="sks", width=64, height=64, steps=1,
                  guidance=4.0, seed=7, batch_size=1)
    kwargs.update(sample_kwargs)
    return handle, core.sample(handle, progress=progress, **kwargs)


# ------------------------------------------------------------------------------------------------ import and schema
def test_import_is_light_and_classic_without_comfy_api():
    code = (
        "import sys, importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('/x/custom_nodes/aitk', {os.path.join(ROOT, '__init__.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules[spec.name] = m; spec.loader.exec_module(m)\n"
        "print(sorted(m.NODE_CLASS_MAPPINGS), hasattr(m, 'comfy_entrypoint'),"
        " [k for k in ('torch', 'diffusers', 'transformers') if k in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "['AITKApplyLoRA', 'AITKJobPreviews', 'AITKLoadPipeline', 'AITKSample', 'AITKTrainingJob'] False []"


def test_schemas(pack):
    from aitk_inference.pipelines.registry import REGISTRY

    mappings, names = pack.NODE_CLASS_MAPPINGS, pack.NODE_DISPLAY_NAME_MAPPINGS
    assert names == {"AITKLoadPipeline": "Load AITK Pipeline", "AITKApplyLoRA": "Apply AITK LoRA",
                     "AITKSample": "AITK Sample", "AITKTrainingJob": "AITK Training Job",
                     "AITKJobPreviews": "AITK Job Previews"}
    expected = {
        # attention, quantize and the file inputs came later: optional, so that older saved workflows still load
        "AITKLoadPipeline": (["model", "base", "dtype", "offload", "device", "lora_mode", "compile"],
                             ["attention", "quantize", "base_file", "text_encoder_file", "text_encoder_2_file",
                              "vae_file"], ("AITK_PIPELINE",)),
        "AITKApplyLoRA": (["pipeline", "lora", "strength", "transformer"], [], ("AITK_PIPELINE",)),
        "AITKSample": (["pipeline", "prompt", "negative", "trigger_word", "width", "height", "steps", "guidance", "seed",
                        "batch_size"], ["control_image", "control_image_2", "control_image_3", "num_frames", "fps",
                                       "vae_tiling", "options"],
                       ("IMAGE", "INT", "INT", "INT", "FLOAT", "AUDIO")),
        "AITKTrainingJob": (["job_folder", "base", "dtype", "device"], [], ("AITK_JOB", "STRING")),
        "AITKJobPreviews": (["job", "checkpoints", "strengths"], ["prompts"], ("IMAGE",)),
    }
    for node_id, (required, optional, returns) in expected.items():
        cls = mappings[node_id]
        types_ = cls.INPUT_TYPES()
        assert list(types_["required"]) == required
        assert list(types_.get("optional", {})) == optional
        assert cls.RETURN_TYPES == returns and len(cls.RETURN_NAMES) == len(returns)
        assert cls.CATEGORY == "AITK Inference"
        assert callable(getattr(cls(), cls.FUNCTION))
        for name, (kind, options) in {**types_["required"], **types_.get("optional", {})}.items():
            assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
    load = mappings["AITKLoadPipeline"].INPUT_TYPES()["required"]
    assert load["model"][0] == list(REGISTRY) and load["base"][0] == "STRING"
    assert load["offload"][0] == ["none", "model", "sequential", "group", "auto"] and load["dtype"][0][0] == "auto"
    apply = mappings["AITKApplyLoRA"].INPUT_TYPES()["required"]
    assert apply["pipeline"][0] == "AITK_PIPELINE" and isinstance(apply["lora"][0], list)
    assert (apply["strength"][1]["min"], apply["strength"][1]["max"]) == (-2.0, 2.0)
    assert apply["transformer"][0] == ["none", "high", "low", "uncond"]
    sample = mappings["AITKSample"].INPUT_TYPES()
    assert sample["required"]["seed"][1]["control_after_generate"] is True
    assert sample["required"]["width"][1]["step"] == 8 and sample["required"]["prompt"][1]["multiline"]
    assert all(sample["optional"][f"control_image{s}"][0] == "IMAGE" for s in ("", "_2", "_3"))
    assert mappings["AITKSample"].RETURN_NAMES == ("image", "width", "height", "seed", "fps", "audio")


# ------------------------------------------------------------------------------------------------ graphs on tiny models
def test_graph_cache_strength_and_chaining(core, cache, tiny_dir, loras):
    handle, first = run_graph(core, tiny_dir, [(loras["a"], 1.0)], width=72)
    assert first.images.shape == (1, 64, 64, 3) and first.images.dtype.is_floating_point
    assert str(first.images.dtype) == "torch.float32" and first.images.device.type == "cpu"
    assert 0.0 <= float(first.images.min()) and float(first.images.max()) <= 1.0
    assert (first.width, first.height, first.seed) == (64, 64, 7)  # 72 floored to FLUX's divisor 16
    assert first.ui() == {"aitk_effective": [{"width": 64, "height": 64, "seed": "7"}]}
    loads = cache.stats["loads"]

    # Running the same graph again reloads nothing and gives the same image.
    _, again = run_graph(core, tiny_dir, [(loras["a"], 1.0)], width=72)
    assert cache.stats["loads"] == loads
    assert np.array_equal(again.images.numpy(), first.images.numpy())

    # A strength change re-applies in place: no reload, a different image, and back to 1.0 gives the first image.
    _, weaker = run_graph(core, tiny_dir, [(loras["a"], 0.3)], width=72)
    _, back = run_graph(core, tiny_dir, [(loras["a"], 1.0)], width=72)
    assert cache.stats["loads"] == loads
    assert not np.allclose(weaker.images.numpy(), first.images.numpy())
    assert np.allclose(back.images.numpy(), first.images.numpy(), atol=1e-5)

    # Apply returns a new handle and never modifies its input; chaining stacks LoRAs in order.
    stacked = core.apply_lora(handle, loras["b"], -0.5, "none")
    assert handle.loras == ((loras["a"], 1.0, None),)
    assert stacked.loras == ((loras["a"], 1.0, None), (loras["b"], -0.5, None))
    two = core.sample(stacked, "x", width=64, height=64, steps=1, seed=7, batch_size=2, progress=None)
    assert two.images.shape == (2, 64, 64, 3) and cache.stats["loads"] == loads
    assert [entry["name"] for entry in handle.get_pipeline().loras.describe()] == ["flux_a.safetensors",
                                                                                 "flux_b.safetensors"]


def test_interrupt_leaves_pipeline_usable(core, tiny_dir, loras, fake_comfy):
    handle, before = run_graph(core, tiny_dir, [(loras["a"], 0.7)], steps=3)
    assert fake_comfy.updates == [(1, 3), (2, 3), (3, 3)]  # ComfyUI's bar ticks once per denoising step
    lora_state = handle.get_pipeline().loras.describe()

    fake_comfy.checks, fake_comfy.interrupt_after = 0, 2  # ComfyUI's Cancel lands during step 2
    with pytest.raises(fake_comfy.mm.InterruptProcessingException):
        run_graph(core, tiny_dir, [(loras["a"], 0.7)], steps=3)
    assert fake_comfy.checks == 2

    fake_comfy.interrupt_after = None
    assert handle.get_pipeline().loras.describe() == lora_state
    _, after = run_graph(core, tiny_dir, [(loras["a"], 0.7)], steps=3)
    assert np.array_equal(after.images.numpy(), before.images.numpy())


def test_free_memory_evicts_the_cache(core, cache, tiny_dir, fake_comfy):
    handle = core.load("flux", tiny_dir("flux"), "fp32", "none", "auto")  # installs the hook; auto -> ComfyUI's cpu
    assert handle.options.device == "cpu" and cache.cached_keys()
    fake_comfy.mm.free_memory(1e9, types.SimpleNamespace(type="cpu"))  # ComfyUI making room on the CPU: keep ours
    assert cache.cached_keys()
    fake_comfy.mm.free_memory(1e30, types.SimpleNamespace(type="cpu"))  # unload_all_models() / POST /free
    assert not cache.cached_keys() and fake_comfy.freed == [1e9, 1e30]
    loads = cache.stats["loads"]
    core.sample(handle, "x", width=64, height=64, steps=1, progress=None)  # a cached handle reloads transparently
    assert cache.stats["loads"] == loads + 1


def test_kontext_control_image(core, tiny_dir):
    import torch

    with pytest.raises(ValueError, match="control_image"):
        run_graph(core, tiny_dir, model="flux_kontext")
    control = torch.rand(1, 80, 96, 3)
    _, out = run_graph(core, tiny_dir, model="flux_kontext", control_image=control)
    assert out.images.shape == (1, 64, 64, 3) and out.images.dtype == torch.float32
    with pytest.raises(ValueError, match="single image"):
        run_graph(core, tiny_dir, model="flux_kontext", control_image=torch.rand(2, 64, 64, 3))


def test_bad_inputs_say_what_to_fix(core, tiny_dir, loras):
    with pytest.raises(ValueError, match="Valid ids are: flux"):
        core.load("flux3", "", "fp32", "none", "cpu")
    with pytest.raises(ValueError, match="models/diffusers"):
        core.load("flux", "no/such/folder/here", "fp32", "none", "cpu")
    handle = core.load("flux", tiny_dir("flux"), "fp32", "none", "cpu")
    with pytest.raises(ValueError, match="Z-Image.*trained on"):
        core.apply_lora(handle, loras["zimage"], 1.0, "none")
    with pytest.raises(ValueError, match="models/loras"):
        core.apply_lora(handle, "missing_lora.safetensors", 1.0, "none")
    with pytest.raises(ValueError, match="outside -2.0..2.0"):
        core.apply_lora(handle, loras["a"], 2.5, "none")
    with pytest.raises(ValueError, match="single transformer"):
        core.apply_lora(handle, loras["a"], 1.0, "high")
    with pytest.raises(ValueError, match="num_frames"):
        core.sample(handle, "x", width=64, height=64, steps=1, num_frames=9, progress=None)
    assert core.lora_fingerprint("missing_lora.safetensors") == ""


def test_sample_options_reach_the_model_and_bad_ones_are_named(core, tiny_dir):
    handle, default = run_graph(core, tiny_dir, model="krea2", steps=2)
    _, pinned = run_graph(core, tiny_dir, model="krea2", steps=2, options='{"schedule_mu": 1.15}')
    _, again = run_graph(core, tiny_dir, model="krea2", steps=2, options=' {"schedule_mu": 1.15} ')
    library = handle.get_pipeline().generate("a photo of sks", width=64, height=64, steps=2, guidance=4.0, seed=7,
                                             schedule_mu=1.15)
    assert not default.images.equal(pinned.images)
    assert pinned.images.equal(again.images)
    assert np.array_equal(pinned.images.numpy(), library.images)
    assert library.metadata()["options"] == {"schedule_mu": 1.15}
    for text, message in (("{schedule_mu: 1}", "options must be a JSON object"),
                          ("[1, 2]", "JSON object of name: value pairs, got list"),
                          ('{"width": 128}', "must not repeat the node's own inputs \\(width\\)"),
                          ('{"kv_cache": true}', "Unknown generation option.*krea2.*takes schedule_mu"),
                          ('{"schedule_mu": "high"}', "schedule_mu` must be a number")):
        with pytest.raises(ValueError, match=message):
            run_graph(core, tiny_dir, model="krea2", options=text)
    with pytest.raises(ValueError, match="flux.*it takes none"):
        run_graph(core, tiny_dir, options='{"schedule_mu": 1.0}')


# ------------------------------------------------------------------------------------------------ example workflows
def test_example_workflows_match_schema(pack):
    from aitk_inference.pipelines.registry import REGISTRY

    workflows = importlib.import_module(pack.__name__ + ".nodes.workflows")
    schema = importlib.import_module(pack.__name__ + ".nodes.schema")
    folder = os.path.join(ROOT, "example_workflows")
    expected = workflows.all_workflows()
    assert set(expected) >= {f"{model_id}.json" for model_id in REGISTRY}
    cards = {name[:-len(".json")] + ".jpg" for name in expected}  # each example's Browse Templates thumbnail
    assert sorted(os.listdir(folder)) == sorted([*expected, *cards]), \
        "regenerate: python -m aitk_inference.nodes.workflows"
    for name in cards:
        with Image.open(os.path.join(folder, name)) as card:
            assert card.format == "JPEG" and card.size == (workflows.THUMBNAIL_SIZE,) * 2
    widget_counts = {spec.node_id: len(spec.widget_names()) for spec in schema.NODES}
    widget_counts.update(workflows.CORE_WIDGET_COUNTS)
    for name, workflow in expected.items():
        with open(os.path.join(folder, name)) as f:
            on_disk = json.load(f)
        assert on_disk == workflow, f"{name} is stale: python -m aitk_inference.nodes.workflows"
        nodes = {node["id"]: node for node in on_disk["nodes"]}
        for node in nodes.values():
            assert len(node["widgets_values"]) == widget_counts[node["type"]], (name, node["type"])
        for link_id, src, src_slot, dst, dst_slot, kind in on_disk["links"]:
            assert nodes[src]["outputs"][src_slot]["type"] == kind and link_id in nodes[src]["outputs"][src_slot]["links"]
            assert nodes[dst]["inputs"][dst_slot]["link"] == link_id
        types_ = [node["type"] for node in on_disk["nodes"]]
        if name == workflows.JOB_GRID_NAME:
            assert {"AITKTrainingJob", "AITKJobPreviews", "SaveImage"} <= set(types_)
        else:
            assert {"AITKLoadPipeline", "AITKApplyLoRA", "AITKSample"} <= set(types_)


def test_video_models_give_frames_fps_and_audio(core, tiny_dir):
    _, ltx = run_graph(core, tiny_dir, model="ltx2", width=64, height=64, steps=2, num_frames=9, fps=12)
    frames, _, _, _, fps, audio = ltx.result()
    assert frames.shape == (9, 64, 64, 3) and fps == 12.0
    assert audio["waveform"].ndim == 3 and audio["waveform"].isfinite().all() and audio["waveform"].abs().sum() > 0
    assert audio["sample_rate"] > 0
    with pytest.raises(ValueError, match="at least 2 steps"):
        run_graph(core, tiny_dir, model="ltx2", width=64, height=64, steps=1, num_frames=9)
    _, wan = run_graph(core, tiny_dir, model="wan21_1b", width=64, height=64, steps=1, num_frames=5, fps=10)
    frames, _, _, _, fps, audio = wan.result()
    assert frames.shape == (5, 64, 64, 3) and fps == 10.0
    # a silent model gets silence as long as the clip, so Create Video -> Save Video works for every video model
    assert audio["waveform"].shape == (1, 1, round(5 / 10 * core.SILENCE_RATE)) and not audio["waveform"].any()


def test_audio_only_models_give_their_audio_and_a_placeholder_image(core, tiny_dir):
    _, ace = run_graph(core, tiny_dir, model="ace_step_15", prompt="<CAPTION>lofi</CAPTION><DURATION>2</DURATION>",
                       steps=2, batch_size=2)
    images, _, _, _, fps, audio = ace.result()
    assert images.shape == (2, core.AUDIO_PLACEHOLDER_SIDE, core.AUDIO_PLACEHOLDER_SIDE, 3) and not images.any()
    assert audio["sample_rate"] == 48000 and audio["waveform"].shape[:2] == (2, 2) and fps == 0.0
    assert audio["waveform"].isfinite().all() and audio["waveform"].abs().sum() > 0


def test_load_options_select_lora_mode_and_compile(core, tiny_dir):
    fused = core.load("flux", tiny_dir("flux"), "fp32", "none", "cpu", lora_mode="fused")
    default = core.load("flux", tiny_dir("flux"), "fp32", "none", "cpu")
    assert fused.get_pipeline().lora_mode == "fused" and default.get_pipeline().lora_mode == "dynamic"
    assert fused.get_pipeline() is not default.get_pipeline()  # a different cache entry, not a mutated one
    with pytest.raises(ValueError, match="lora_mode 'merged' is not one of model default, dynamic, fused"):
        core.load("flux", tiny_dir("flux"), "fp32", "none", "cpu", lora_mode="merged")
    with pytest.raises(ValueError, match="compile 'max' is not one of none, regional"):
        core.load("flux", tiny_dir("flux"), "fp32", "none", "cpu", compile="max")


def test_load_node_says_what_to_do_when_the_base_cannot_be_downloaded(core, monkeypatch, tmp_path):
    """An empty base (the model's hub repo) that is not in the hub cache, with no network: the node raises one
    ValueError (what ComfyUI shows in its error dialog) naming the repo and the download line."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"flux: black-forest-labs/FLUX.1-dev is not \(fully\) downloaded .* "
                                         r"`huggingface-cli download black-forest-labs/FLUX.1-dev`"):
        core.load("flux", "", "fp32", "none", "cpu").get_pipeline()


def test_load_options_select_attention_and_quantize(pack, core, tiny_dir):
    from aitk_inference.pipelines.runtime.options import ATTENTION_KERNELS

    optional = pack.NODE_CLASS_MAPPINGS["AITKLoadPipeline"].INPUT_TYPES()["optional"]
    assert optional["attention"][0] == list(ATTENTION_KERNELS) and optional["attention"][1]["default"] == "sdpa"
    assert optional["quantize"][0] == ["none", "fp8"] and optional["quantize"][1]["default"] == "none"
    assert "Ada/Hopper" in optional["quantize"][1]["tooltip"] and "sdpa" in optional["attention"][1]["tooltip"]

    math = core.load("flux", tiny_dir("flux"), "fp32", "none", "cpu", attention="sdpa_math")
    assert (math.options.attention, math.options.quantize) == ("sdpa_math", "none")
    assert math.get_pipeline().attention == "sdpa_math"
    # a workflow saved without the two inputs gets the defaults (ComfyUI passes no value for an unset optional input)
    old = core.load(model="flux", base=tiny_dir("flux"), dtype="fp32", offload="none", device="cpu",
                    lora_mode="model default", compile="none")
    assert (old.options.attention, old.options.quantize) == ("sdpa", "none")
    assert old.get_pipeline().attention == "sdpa"
    assert old.get_pipeline() is not math.get_pipeline()  # a different cache entry, not a mutated one

    with pytest.raises(ValueError, match="FP8 needs a CUDA GPU.*not 'cpu'"):
        core.load("flux", tiny_dir("flux"), "fp32", "none", "cpu", quantize="fp8")
    with pytest.raises(ValueError, match="quantize 'int8' is not one of none, fp8"):
        core.load("flux", tiny_dir("flux"), "fp32", "none", "cpu", quantize="int8")
    with pytest.raises(ValueError, match="attention 'fast' is not one of sdpa, sdpa_cudnn"):
        core.load("flux", tiny_dir("flux"), "fp32", "none", "cpu", attention="fast")
