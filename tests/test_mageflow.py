"""Mage-Flow against ai-toolkit's own Mage-Flow code (goldens in tests/goldens/mageflow, MANIFEST "mageflow"), on the
tiny random-weight pipelines (CPU, float32).

ai-toolkit samples Mage-Flow with its own transformer, MageVAE, Qwen3-VL prompt encoder and Euler loop; the goldens are
their outputs on weights drawn by name (``tiny.mageflow.fill_by_name``, the same draw for both), and on the tiny text
encoder exported from our builder, so each test below runs our code on the same weights and inputs and compares."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import GOLDENS_DIR

pytestmark = pytest.mark.usefixtures("one_thread")

GOLDEN_DIR = os.path.join(GOLDENS_DIR, "mageflow")
ATOL = 1e-5
#: MageVAE's window attention runs in SDPA here and in explicit matmuls in ai-toolkit: float32 rounding apart
VAE_ATOL = 1e-5
#: a whole preview: float32 rounding of one forward (up to ~4e-6 here: the same weights give results that differ in the
#: last bits depending on where the loaded tensors sit in memory) goes through guidance 4 and two Euler steps
PREVIEW_ATOL = 5e-5


@pytest.fixture(scope="module")
def golden():
    with open(os.path.join(GOLDEN_DIR, "mageflow_aitk.json")) as f:
        meta = json.load(f)
    tensors = load_file(os.path.join(GOLDEN_DIR, "mageflow_aitk.safetensors"))
    tensors.update(load_file(os.path.join(GOLDEN_DIR, "mageflow_aitk_previews.safetensors")))
    return meta, tensors


def check(actual, expected, atol=ATOL):
    """Equal to ``atol``; the largest difference seen is printed (``pytest -s``) for the parity report."""
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=0)
    print(f"max |ours - ai-toolkit| = {(actual.float() - expected.float()).abs().max().item():.3g}")


def control(name):
    from PIL import Image

    with Image.open(os.path.join(GOLDEN_DIR, name)) as image:
        return image.convert("RGB")


def test_tiny_weights_are_the_ones_the_goldens_ran(pipes, golden):
    """The goldens ran ai-toolkit's modules with ``fill_by_name`` weights on these configs; the tiny builder must give
    the same (pinned by the transformer's weight sum and the configs)."""
    from aitk_inference.tiny.mageflow import TRANSFORMER_CONFIG, VAE_CONFIG

    meta, _ = golden
    pipe = pipes("mageflow").pipe
    total = sum(p.double().sum() for p in pipe.transformer.state_dict().values())
    assert float(total) == pytest.approx(meta["transformer_weight_sum"], abs=1e-9)
    assert {**TRANSFORMER_CONFIG, "axes_dim": list(TRANSFORMER_CONFIG["axes_dim"]), "checkpoint": False} == \
        meta["transformer_config"]
    assert VAE_CONFIG == meta["vae_config"]


# ------------------------------------------------------------------------------------------------------- schedule
def test_schedule_matches_ai_toolkit(golden):
    from aitk_inference.pipelines.families.mageflow import mageflow_sigmas

    for steps, sigmas in golden[0]["sigmas"].items():
        assert mageflow_sigmas(int(steps), 6.0) == sigmas, steps


def test_initial_noise_matches_ai_toolkit(golden):
    """Seed 42 at 1024x1024: ai-toolkit's float32 (1, 128, 64, 64) draw (its first two channels are stored)."""
    from aitk_inference.pipelines.families.mageflow import initial_noise

    noise = initial_noise(128, 1024, 1024, torch.Generator().manual_seed(42), "cpu")
    check(noise[0, :2], golden[1]["noise_seed42_128x1024x1024"], atol=0)


def test_transformer_gets_ai_toolkits_sigmas_and_the_seeded_noise(pipes, golden):
    """What the transformer really receives: each sigma twice (CFG at guidance 4), in order, and the seed-42 noise."""
    from aitk_inference.pipelines.families.mageflow import initial_noise

    pipe = pipes("mageflow").pipe
    seen = []
    forward = pipe.transformer.forward

    def spy(hidden_states, encoder_hidden_states, timestep, img_shapes, **kwargs):
        seen.append((timestep.item(), hidden_states.clone()))
        return forward(hidden_states, encoder_hidden_states, timestep, img_shapes, **kwargs)

    pipe.transformer.forward = spy
    try:
        pipes("mageflow").generate("a fox", width=64, height=64, steps=3, guidance=4.0, seed=42)
    finally:
        del pipe.transformer.forward
    sigmas = golden[0]["sigmas"]["3"]
    assert [t for t, _ in seen] == pytest.approx([s for s in sigmas[:-1] for _ in range(2)], abs=0)
    noise = initial_noise(16, 64, 64, torch.Generator().manual_seed(42), "cpu")
    check(seen[0][1][0], noise[0].reshape(16, -1).T, atol=0)


# ------------------------------------------------------------------------------------------------------- modules
def test_forward_matches_ai_toolkits_predict_velocity(pipes, golden):
    _, tensors = golden
    pipe = pipes("mageflow").pipe
    with torch.inference_mode():
        check(pipe.velocity(tensors["fwd_latents"], 0.7, tensors["fwd_text"], []), tensors["fwd_velocity"])
        references = [tensors["fwd_ref_0"], tensors["fwd_ref_1"]]
        check(pipe.velocity(tensors["fwd_latents"], 0.7, tensors["fwd_text"], references),
              tensors["fwd_velocity_edit"])


def test_vae_matches_ai_toolkits_magevae(pipes, golden):
    """Posterior mean, a posterior sample (ai-toolkit: the global RNG seeded 7; ours: a generator seeded 7), decode
    (latent 4x5 in 2x2 windows: tiled and edge-padded)."""
    _, tensors = golden
    vae = pipes("mageflow").pipe.vae
    with torch.inference_mode():
        check(vae.encode(tensors["vae_pixels"], sample=False), tensors["vae_mean"], VAE_ATOL)
        check(vae.encode(tensors["vae_pixels"], generator=torch.Generator().manual_seed(7)),
              tensors["vae_sample_seed7"], VAE_ATOL)
        check(vae.decode(tensors["vae_mean"]), tensors["vae_decoded"], VAE_ATOL)


def test_prompt_features_match_ai_toolkit(pipes, golden):
    from aitk_inference.pipelines.families.krea2 import to_unit_tensor
    from aitk_inference.pipelines.families.mageflow import vlm_image

    meta, tensors = golden
    prompts = meta["prompts"]
    with torch.inference_mode():
        pipe = pipes("mageflow").pipe
        check(pipe.encode_prompt(prompts["prompt"], False), tensors["prompt_t2i"])
        check(pipe.encode_prompt(prompts["negative"], False), tensors["prompt_t2i_negative"])
        pipe = pipes("mageflow_edit").pipe
        check(pipe.encode_prompt(prompts["edit"], True), tensors["prompt_edit_text_only"])
        images = [vlm_image(to_unit_tensor(control(n)), torch.float32) for n in ("ctrl_a.png", "ctrl_b.png")]
        check(pipe.encode_prompt(prompts["edit"], True, images), tensors["prompt_edit_images"])


def test_reference_latents_match_ai_toolkit(pipes, golden):
    """Each control image at the 64x48 target's area, own aspect (56x40 -> 48x64... rounded to /16), posterior drawn
    from a generator seeded 42 in order."""
    from aitk_inference.pipelines.families.krea2 import to_unit_tensor

    _, tensors = golden
    pipe = pipes("mageflow_edit").pipe
    images = [to_unit_tensor(control(n)) for n in ("ctrl_a.png", "ctrl_b.png")]
    with torch.inference_mode():
        latents = pipe.encode_references(images, 64, 48, torch.Generator().manual_seed(42))
    for i, latent in enumerate(latents):
        check(latent, tensors[f"ref_latent_{i}_h64_w48_seed42"], VAE_ATOL)


# ------------------------------------------------------------------------------------------------------- previews
@pytest.mark.parametrize("name", ["t2i_g4", "t2i_g1", "t2i_g4_renorm", "edit_g4"])
def test_whole_preview_matches_ai_toolkit(name, pipes, golden):
    """ai-toolkit's generate_single_image (2 steps) end to end: the latents it decodes and its 8-bit pixels. The edit
    preview has two control images (its reference posterior drawn from the seeded device RNG)."""
    meta, tensors = golden
    run = meta["previews"][name]
    model_id = "mageflow_edit" if run["control_images"] else "mageflow"
    pipeline = pipes(model_id)
    decoded = []
    decode = pipeline.pipe.vae.decode

    def spy(latents):
        decoded.append(latents.clone())
        return decode(latents)

    pipeline.pipe.vae.decode = spy
    try:
        result = pipeline.generate(run["prompt"], negative=run["negative"], width=run["width"], height=run["height"],
                                   steps=run["steps"], guidance=run["guidance"], seed=run["seed"],
                                   control_images=[control(n) for n in run["control_images"]] or None,
                                   **run["model_kwargs"])
    finally:
        del pipeline.pipe.vae.decode
    check(decoded[0], tensors[f"preview_{name}_latents"], PREVIEW_ATOL)
    pixels = np.asarray(result.to_pil()[0]).astype(np.int16)  # written as 8 bits
    expected = tensors[f"preview_{name}_pixels"].numpy().astype(np.int16)
    difference = np.abs(pixels - expected)
    print(f"pixels: {int((difference > 0).sum())} of {difference.size} differ, by at most {difference.max()}")
    assert difference.max() <= 1


def test_renormalization_changes_the_guided_velocity_only():
    from aitk_inference.pipelines.families.mageflow import guided_velocity

    generator = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 1, 16, 4, 4, generator=generator)
    plain = guided_velocity(cond, uncond, 4.0, False)
    torch.testing.assert_close(plain, uncond + 4.0 * (cond - uncond))
    renormed = guided_velocity(cond, uncond, 4.0, True)
    torch.testing.assert_close(renormed.norm(dim=1), cond.norm(dim=1), atol=1e-4, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------- LoRA
AITK_MERGED = ("transformer_blocks.1.attn.to_q.weight", "transformer_blocks.0.img_mod.1.weight")


@pytest.mark.parametrize("variant", ["lora_r4", "lokr"])
@pytest.mark.parametrize("mode", ["dynamic", "fused"])
def test_lora_saved_by_ai_toolkit_reproduces_its_outputs(variant, mode, pipes, golden):
    """ai-toolkit's own network + save code (diffusion_model. + the transformer's names, 28 modules; LoKr too): every
    module matches, and inactive / m1.0 / m0.5 / the merged weights are ai-toolkit's (edit forward with references)."""
    meta, tensors = golden
    outputs = load_file(os.path.join(GOLDEN_DIR, f"mageflow_{variant}_outputs.safetensors"))
    path = os.path.join(GOLDEN_DIR, f"mageflow_{variant}.safetensors")
    pipeline = pipes("mageflow", lora_mode=mode)
    pipe = pipeline.pipe
    references = [tensors["fwd_ref_0"], tensors["fwd_ref_1"]]

    def velocity():
        with torch.inference_mode():
            return pipe.velocity(tensors["fwd_latents"], 0.7, tensors["fwd_text"], references)

    check(velocity(), outputs["inactive"])
    for strength in (1.0, 0.5):
        summary = pipeline.set_loras([(path, strength)])
        assert summary[0]["modules"] == meta["lora"][variant]["modules"] == 28
        check(velocity(), outputs[f"live_m{strength}"])
        if mode == "fused" and strength == 1.0:
            weights = dict(pipe.transformer.named_parameters())
            for name in AITK_MERGED:
                check(weights[name].detach(), outputs[f"merged_{name}"])
    pipeline.set_loras([])
    check(velocity(), outputs["inactive"])


def test_loras_of_other_families_are_refused_with_their_name(pipes):
    """Mage-Flow's LoRA keys are Qwen-Image's block names (they cannot be told apart by name); a Qwen-Image LoRA's
    deeper blocks do not exist here, a FLUX.1 LoRA matches nothing: both refused, the family named."""
    from aitk_inference.pipelines.lora.convert import LoraFormatError, guess_architecture
    from aitk_inference.pipelines.lora.stack import LoraRequest

    assert guess_architecture(load_file(os.path.join(GOLDEN_DIR, "mageflow_lora_r4.safetensors"))) == "Qwen-Image"
    pipeline = pipes("mageflow")

    def lora(key, fan_in, fan_out):
        return {f"{key}.lora_A.weight": torch.zeros(4, fan_in), f"{key}.lora_B.weight": torch.zeros(fan_out, 4)}

    qwen = {**lora("transformer.transformer_blocks.0.img_mlp.net.2", 128, 32),
            **lora("transformer.transformer_blocks.40.img_mlp.net.2", 128, 32)}
    with pytest.raises(LoraFormatError, match="Qwen-Image"):
        pipeline.set_loras([LoraRequest(state_dict=qwen, name="qwen")])
    flux = lora("transformer.single_transformer_blocks.0.attn.to_q", 32, 32)
    with pytest.raises(LoraFormatError, match="FLUX.1"):
        pipeline.set_loras([LoraRequest(state_dict=flux, name="flux")])


# ------------------------------------------------------------------------------------------------------- options
def test_options_are_checked_and_the_edit_id_needs_a_reference(pipes):
    pipeline = pipes("mageflow")
    with pytest.raises(ValueError, match="cfg_renormalization"):
        pipeline.generate("x", width=64, height=64, steps=1, cfg_renormalization="yes")
    with pytest.raises(ValueError, match="static_shift"):
        pipeline.generate("x", width=64, height=64, steps=1, static_shift=-1)
    with pytest.raises(ValueError, match="Unknown generation option"):
        pipeline.generate("x", width=64, height=64, steps=1, kv_cache=True)
    with pytest.raises(ValueError, match="takes no control image"):
        pipeline.generate("x", width=64, height=64, steps=1, control_images=[np.zeros((16, 16, 3))])
    with pytest.raises(ValueError, match="needs 1 control image"):
        pipes("mageflow_edit").generate("x", width=64, height=64, steps=1)
    with pytest.raises(ValueError, match="vae_sample_posterior"):
        pipes("mageflow_edit").generate("x", width=64, height=64, steps=1, control_images=[np.zeros((16, 16, 3))],
                                        vae_sample_posterior="no")
    with pytest.raises(ValueError, match="Unknown generation option"):  # no references, no posterior to sample
        pipeline.generate("x", width=64, height=64, steps=1, vae_sample_posterior=False)


def test_static_shift_option_changes_the_image(pipes):
    pipeline = pipes("mageflow")
    fast = dict(width=64, height=64, steps=2, seed=3, guidance=1.0)
    assert np.abs(pipeline.generate("a fox", static_shift=3.0, **fast).images
                  - pipeline.generate("a fox", **fast).images).max() > 0


def test_jobs_map_to_the_ids_and_pass_their_model_kwargs(pipes):
    from aitk_inference.pipelines.jobs.config import model_id_for_job

    assert model_id_for_job({"arch": "mageflow", "name_or_path": "microsoft/Mage-Flow-Base"}) == "mageflow"
    assert model_id_for_job({"arch": "mageflow_edit", "name_or_path": "microsoft/Mage-Flow-Edit-Base"}) == "mageflow_edit"
    model = {"arch": "mageflow", "model_kwargs": {"cfg_renormalization": True, "static_shift": 5.0,
                                                  "vae_sample_posterior": True}}
    assert pipes("mageflow").job_options(model) == {"cfg_renormalization": True, "static_shift": 5.0}
    assert pipes("mageflow_edit").job_options({**model, "arch": "mageflow_edit"}) == {
        "cfg_renormalization": True, "static_shift": 5.0, "vae_sample_posterior": True}
    assert pipes("mageflow").job_options({"arch": "mageflow"}) == {}


def test_server_request_with_reference_images_runs_the_edit_id(pipes, tmp_path):
    """A /v1 request for the edit id with ``ctrl_img_1``, ``ctrl_img_2`` (base64) and an ai-toolkit LoRA: mapped to the
    library and generated on the tiny model with both references."""
    import base64
    import io

    from PIL import Image

    from aitk_inference.server.mapping import build_job
    from aitk_inference.server.schemas import InferenceInput
    from aitk_inference.server.settings import Settings

    (tmp_path / "m.safetensors").write_bytes(open(os.path.join(GOLDEN_DIR, "mageflow_lora_r4.safetensors"), "rb").read())

    def encoded(name):
        buffer = io.BytesIO()
        control(name).save(buffer, "PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    body = InferenceInput(model="mageflow_edit", loras=[{"path": "m.safetensors"}],
                          prompts=[{"prompt": "make it blue", "width": 64, "height": 64, "sample_steps": 1, "seed": 1,
                                    "ctrl_img_1": encoded("ctrl_a.png"), "ctrl_img_2": encoded("ctrl_b.png")}])
    job = build_job("t", body, Settings.from_env({"WORKFLOWS_BASE_PATH": str(tmp_path)}))
    assert len(job.controls[0]) == 2
    pipeline = pipes("mageflow_edit")
    pipeline.set_loras([(job.loras[0].path, job.loras[0].strength)])
    try:
        result = pipeline.generate(control_images=job.controls[0], **job.prompts[0])
    finally:
        pipeline.set_loras([])
    assert result.images.shape == (1, 64, 64, 3) and result.loras[0]["modules"] == 28


def test_vae_loads_the_repos_bare_checkpoint_layout(pipes, golden, tmp_path):
    """The Mage-Flow repos ship ``vae/diffusion_pytorch_model.safetensors`` alone, with the decoder's training-time
    teacher encoder in it: ``from_checkpoint`` drops those tensors and refuses a file that lacks any of ours."""
    from safetensors.torch import save_file

    from aitk_inference.pipelines.families.mageflow_vae import MageVAE
    from aitk_inference.tiny.mageflow import VAE_CONFIG

    _, tensors = golden
    state = {k: v.contiguous() for k, v in pipes("mageflow").pipe.vae.state_dict().items()}
    teacher = {"pipeline.y_embedder.encoder.conv_in.weight": torch.zeros(2, 3, 1, 1),
               "pipeline.y_embedder.bottleneck.proj.weight": torch.zeros(2, 2)}
    save_file({**state, **teacher}, str(tmp_path / "vae.safetensors"))
    vae = MageVAE.from_checkpoint(str(tmp_path / "vae.safetensors"), **VAE_CONFIG)
    with torch.inference_mode():
        check(vae.decode(tensors["vae_mean"]), tensors["vae_decoded"], VAE_ATOL)
    del state["pipeline.final_layer.linear.weight"]
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match="lacks 1 tensors"):
        MageVAE.from_checkpoint(str(tmp_path / "partial.safetensors"), **VAE_CONFIG)
