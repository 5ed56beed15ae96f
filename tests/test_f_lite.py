"""F-Lite against ai-toolkit's own F-Lite code (goldens in tests/goldens/f_lite; see its MANIFEST section).

ai-toolkit's ``FLiteModel`` loaded the project's tiny F-Lite model (it has the released checkpoint's folder layout) with
its vendored DiT and ran its preview path; the goldens hold its prompt embeddings, four whole previews, the DiT's
forward on fixed inputs and the LoRA / LoKr files its network saved with the outputs it computed. Here the same tiny
model runs through our ``FLiteDiT`` and ``FLitePipeline``.
"""

import hashlib
import json
import os

import numpy as np
import pytest
import torch

from conftest import GOLDENS_DIR, assert_lora_file_reproduces_ai_toolkit, lora_file_modules

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.join(GOLDENS_DIR, "f_lite")
ATOL = 1e-5  # float32
#: 8-bit levels the image may differ from ai-toolkit's: equal on the CPU that made the golden, one level apart where
#: the float32 kernels round differently (seen on an AVX2-only CPU, latents within ATOL)
LEVELS = 1
LORA_ATOL = 5e-6  # float32 rounding on outputs up to about 4 (ai-toolkit's own live and merged differ by 1.4e-6)


def golden(name="generation.safetensors"):
    from safetensors.torch import load_file

    return load_file(os.path.join(ROOT, name))


@pytest.fixture(scope="module")
def report():
    with open(os.path.join(ROOT, "report.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def pipeline(pipes):
    return pipes("f_lite")


def test_the_tiny_model_is_the_one_the_goldens_were_made_on(tiny_dir, report):
    """tiny/f_lite.py's DiT weights, byte for byte; if the builder changes, the goldens must be made again."""
    path = os.path.join(tiny_dir("f_lite"), "dit_model", "diffusion_pytorch_model.safetensors")
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == report["tiny_dit_sha256"]


def test_parameter_names_are_ai_toolkits(pipeline, report):
    """Every parameter and buffer of ai-toolkit's DiT (the checkpoint's keys), same names."""
    dit = pipeline.pipe.dit_model
    assert sorted(name for name, _ in dit.named_parameters()) == report["parameter_names"]
    assert sorted(dit.state_dict()) == report["state_dict_names"]


def test_dit_forward_matches_ai_toolkit(pipeline):
    """Batch of 2, a non-square 8x12 latent, two timesteps, 7 text tokens (residual values, dynamic temperature and
    rotary on)."""
    data = golden()
    inputs = {k[len("forward_"):]: v for k, v in data.items() if k.startswith("forward_") and k != "forward_output"}
    with torch.no_grad():
        output = pipeline.pipe.dit_model(**inputs)
    torch.testing.assert_close(output, data["forward_output"], rtol=0, atol=ATOL)


def test_prompt_encoding_matches_ai_toolkit(pipeline, report):
    """T5 hidden state -8 through the final layer norm, 512 tokens; the empty negative is encoded too."""
    data = golden()
    for name, text in (("prompt", report["prompt"]), ("negative", report["negative"]), ("empty", "")):
        with torch.no_grad():
            embeds = pipeline.pipe.encode_prompt([text], torch.float32)
        torch.testing.assert_close(embeds, data[f"{name}_embeds"], rtol=0, atol=ATOL, msg=name)


# golden key -> (width, height, steps, guidance): CFG; non-square with 3 steps; CFG still runs at exactly 1; below 1
# only the conditional pass
GENERATIONS = {"w64_h64_steps2_g4.0": (64, 64, 2, 4.0), "w96_h64_steps3_g4.0": (96, 64, 3, 4.0),
               "w64_h64_steps2_g1.0": (64, 64, 2, 1.0), "w64_h64_steps2_g0.5": (64, 64, 2, 0.5)}


@pytest.mark.parametrize("key", list(GENERATIONS))
def test_whole_preview_matches_ai_toolkit(key, pipeline, report):
    """Seed 42 through generate(): the initial noise, the warped times and the batch the DiT gets at every step, the
    latents handed to the VAE and the 8-bit image (the VAE in channels-last layout, as F-Lite's pipeline puts it)
    equal ai-toolkit's generate_images."""
    data = golden()
    width, height, steps, guidance = GENERATIONS[key]
    dit, vae = pipeline.pipe.dit_model, pipeline.pipe.vae
    calls, decoded = [], {}
    forward, decode = dit.forward, vae.decode

    def dit_spy(x, context, timesteps):
        calls.append({"x": x.clone(), "t": timesteps.clone()})
        return forward(x, context, timesteps)

    def vae_spy(z, *args, **kwargs):
        decoded["latents"] = z.clone()
        return decode(z, *args, **kwargs)

    dit.forward, vae.decode = dit_spy, vae_spy
    try:
        result = pipeline.generate(report["prompt"], negative=report["negative"], width=width, height=height,
                                   steps=steps, guidance=guidance, seed=42)
    finally:
        del dit.forward, vae.decode
    assert [len(c["x"]) for c in calls] == report["generations"][key]["batch_per_call"]
    assert torch.equal(torch.stack([c["t"] for c in calls]), data[f"{key}_timesteps_fed"])
    assert torch.equal(calls[0]["x"][:1], data[f"{key}_initial_noise"])
    torch.testing.assert_close(decoded["latents"], data[f"{key}_final_latents"], rtol=0, atol=ATOL)
    image = np.asarray(result.to_pil()[0]).astype(np.int16)
    assert np.abs(image - data[f"{key}_image_uint8"].numpy()).max() <= LEVELS


@pytest.mark.parametrize("mode", ["dynamic", "fused"])
@pytest.mark.parametrize("variant", ["lora_r4_a2", "lokr_default"])
def test_ai_toolkit_lora_file_matches_every_module_and_its_outputs(variant, mode, report, tiny_dir):
    """The file ai-toolkit's network saved for this arch (the Linears of the blocks) loads with every module matched;
    at 1.0 and 0.5 it gives ai-toolkit's outputs, fused weights equal its merge, removing it restores the base."""

    from aitk_inference.pipelines.families.f_lite import FLiteDiT

    path = os.path.join(ROOT, variant, f"tiny_flite_{variant}.safetensors")
    outputs, inputs = golden(os.path.join(variant, "outputs.safetensors")), golden("lora_inputs.safetensors")
    assert len(lora_file_modules(path)) == report["lora"][variant]["n_modules"] == 16
    model = FLiteDiT.from_pretrained(tiny_dir("f_lite"), subfolder="dit_model").eval()

    def forward():
        with torch.no_grad():
            return model(**inputs)

    assert_lora_file_reproduces_ai_toolkit(
        model, forward, mode, "f_lite", path, outputs,
        lambda: golden(os.path.join(variant, "effective_weights_m1.0.safetensors")), ATOL, LORA_ATOL,
        component="dit_model")


def test_lora_of_another_family_is_refused_with_its_family_named(pipes):
    from aitk_inference.pipelines.lora.convert import LoraFormatError
    from aitk_inference.pipelines.lora.stack import LoraRequest

    flux_keys = {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32),
                 "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4)}
    pipe = pipes("f_lite")
    with pytest.raises(LoraFormatError, match="none of its 1 modules exist in model 'f_lite'.*FLUX.1"):
        pipe.set_loras([LoraRequest(state_dict=flux_keys, name="flux")])
    f_lite_lora = os.path.join(ROOT, "lora_r4_a2", "tiny_flite_lora_r4_a2.safetensors")
    with pytest.raises(LoraFormatError, match="F-Lite"):
        pipes("flux").set_loras([LoraRequest(path=f_lite_lora)])
    assert pipe.loras.describe() == []
