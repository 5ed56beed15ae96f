"""ACE-Step 1.5 against ai-toolkit's own ACE-Step code (goldens in tests/goldens/ace_step; see its MANIFEST section).

The goldens hold a tiny all-in-one file in the ComfyUI layout, what ai-toolkit's ``load_models`` made of it, three
whole previews through its ``get_prompt_embeds`` + ``generate_single_audio`` (prompt texts, encodings, the guided
transformer outputs, final latents, waveform), its schedules, and the LoRA / LoKr files its network saved for this
arch with the outputs it computed. Here the same file loads through our splitter into diffusers' classes.
"""

import json
import os

import numpy as np
import pytest
import torch

from conftest import GOLDENS_DIR, assert_lora_file_reproduces_ai_toolkit, lora_file_modules

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.join(GOLDENS_DIR, "ace_step")
AIO = os.path.join(ROOT, "tiny_ace_step_aio.safetensors")
ATOL = 1e-5  # float32; ai-toolkit runs the two guidance passes one by one, we batch them
LORA_ATOL = 1e-6  # ai-toolkit's own live and merged outputs differ by up to 1.2e-7


def golden(name):
    from safetensors.torch import load_file

    return load_file(os.path.join(ROOT, name))


@pytest.fixture(scope="module")
def report():
    with open(os.path.join(ROOT, "report.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def golden_pipeline(tmp_path_factory):
    """Our family pipeline on the golden AIO file: split, saved as a diffusers folder, loaded the normal way."""
    from aitk_inference.pipelines import load_pipeline
    from aitk_inference.pipelines.families.ace_step import load_aio_pipeline
    from aitk_inference.tiny.tokenizers import qwen_tokenizer

    folder = str(tmp_path_factory.mktemp("ace_golden_pipeline"))
    load_aio_pipeline(AIO, torch.float32, qwen_tokenizer()).save_pretrained(folder)
    return load_pipeline("ace_step_15", base=folder, device="cpu", dtype="fp32")


def test_schedule_matches_ai_toolkit_and_is_what_the_transformer_gets(golden_pipeline, report):
    from aitk_inference.pipelines.families.ace_step import flow_schedule

    for steps, times in report["schedules"].items():
        assert flow_schedule(int(steps)) == times  # bit-exact in float64
    seen = []
    transformer = golden_pipeline.pipe.transformer
    original = transformer.forward

    def spy(**kwargs):
        seen.append((kwargs["timestep"].tolist(), kwargs["timestep_r"].tolist()))
        return original(**kwargs)

    transformer.forward = spy
    try:
        golden_pipeline.generate("<CAPTION>x</CAPTION>", steps=3, guidance=4.0)
    finally:
        transformer.forward = original
    times = torch.tensor(report["schedules"]["3"], dtype=torch.float32).tolist()  # the model dtype, as ai-toolkit
    assert seen == [([t, t], [t, t]) for t in times]  # t and r alike, for the conditional and unconditional pass


def test_structured_prompt_texts_match_ai_toolkit(report):
    """The caption and lyrics texts ai-toolkit tokenized: float BPM from a tag, 120 without; key C and 4/4 whatever the
    tags say; int(duration) seconds; an empty language without the tag."""
    from aitk_inference.pipelines.families.ace_step import parse_tagged_prompt

    for name, generation in report["generations"].items():
        prompt = parse_tagged_prompt(generation["prompt"])
        caption, lyrics = generation["tokenizer_calls"]
        assert prompt.caption_text() == caption["text"], name
        assert prompt.lyrics_text() == lyrics["text"], name
        assert caption["kwargs"] == {"truncation": True, "max_length": 256}
        assert lyrics["kwargs"] == {"truncation": True, "max_length": 2048}


def test_structured_prompt_options_and_bad_values():
    from aitk_inference.pipelines.families.ace_step import AceStepPrompt, parse_tagged_prompt

    plain = parse_tagged_prompt("lofi piano, rain")
    assert plain == AceStepPrompt(caption="lofi piano, rain")
    tagged = parse_tagged_prompt("<CAPTION>rock</CAPTION><BPM>112</BPM><KEYSCALE>A minor</KEYSCALE>", bpm=90,
                                 keyscale="A minor", duration=12.5)
    assert (tagged.bpm, tagged.keyscale, tagged.timesignature, tagged.latent_frames, tagged.timbre_frames) == \
        (90, "A minor", "4/4", 312, 300)
    assert "- bpm: 90.0\n- timesignature: 4/4\n- keyscale: A minor\n- duration: 12 seconds\n" in tagged.caption_text()
    with pytest.raises(ValueError, match="<BPM> must be a number"):
        parse_tagged_prompt("<BPM>fast</BPM>")
    with pytest.raises(ValueError, match="duration.*at least|1..600"):
        parse_tagged_prompt("<DURATION>0.5</DURATION>")


def test_prompt_encoding_matches_ai_toolkit(golden_pipeline, report):
    from aitk_inference.pipelines.families.ace_step import parse_tagged_prompt

    for name in ("cfg", "defaults"):
        gold = golden(f"generation_{name}.safetensors")
        prompt = parse_tagged_prompt(report["generations"][name]["prompt"])
        encoded, mask = golden_pipeline.pipe.encode_structured(prompt, torch.float32)
        torch.testing.assert_close(encoded, gold["enc_h"], rtol=0, atol=ATOL)
        assert torch.equal(mask.float(), gold["enc_m"])


@pytest.mark.parametrize("name", ["cfg", "nocfg", "defaults"])
def test_whole_generation_matches_ai_toolkit(name, golden_pipeline, report):
    """Seeded noise, guidance, Euler steps, the VAE decode and the cut to the duration: the waveform ai-toolkit made."""
    generation, gold = report["generations"][name], golden(f"generation_{name}.safetensors")
    seen = {}
    pipe = golden_pipeline.pipe
    original_denoise = pipe.denoise

    def denoise_spy(*args, **kwargs):
        seen["latents"] = original_denoise(*args, **kwargs)
        return seen["latents"]

    pipe.denoise = denoise_spy
    try:
        result = golden_pipeline.generate(generation["prompt"], steps=generation["steps"],
                                          guidance=generation["guidance"], seed=generation["seed"])
    finally:
        del pipe.denoise
    assert result.images is None and result.sample_rate == 48000
    torch.testing.assert_close(seen["latents"], gold["final_latents"], rtol=0, atol=ATOL)
    assert result.audio.shape == (1, *generation["wav_shape"])
    np.testing.assert_allclose(result.audio[0], gold["wav"].numpy(), rtol=0, atol=ATOL)
    if "dit0_out" in gold:  # the guided pair of the first step: ai-toolkit's conditional, then unconditional pass
        assert [c["uncond"] for c in generation["dit_calls"][:2]] == [False, True]


def test_initial_noise_matches_ai_toolkit(golden_pipeline, report):
    from diffusers.utils.torch_utils import randn_tensor

    gold = golden("generation_cfg.safetensors")
    noise = randn_tensor(tuple(gold["noise"].shape), generator=torch.Generator("cpu").manual_seed(42),
                         dtype=torch.float32)
    assert torch.equal(noise, gold["noise"])


def test_aio_split_names_and_tensors_match_ai_toolkit(golden_pipeline, report):
    """Every tensor ai-toolkit's load_models put in its modules is in ours under diffusers' name, unchanged; the
    audio-code tokenizer parts it skips are skipped."""
    from safetensors.torch import load_file

    from aitk_inference.pipelines.families.ace_step import split_aio

    aio = load_file(AIO)
    parts = split_aio(aio)
    pipe = golden_pipeline.pipe
    ours = {name: getattr(pipe, name).state_dict() for name in parts}
    aitk_count = {"transformer": 0, "condition_encoder": 0, "vae": 0, "text_encoder": 0}
    for aitk_name, aio_key in report["loaded_from"].items():
        module = aitk_name.split(".")[0]
        component = {"model": "condition_encoder" if aitk_name.startswith(("model.encoder.", "model.null_")) else
                     "transformer", "vae": "vae", "text_encoder": "text_encoder"}[module]
        aitk_count[component] += 1
    for component, (config, state_dict) in parts.items():
        loaded = ours[component]
        assert len(state_dict) == aitk_count[component], component
        for key, value in state_dict.items():
            if component == "vae" and key.startswith("encoder."):
                continue  # the toy VAE's encoder does not fit diffusers' class (see families/ace_step.py)
            assert torch.equal(loaded[key], value), (component, key)
    assert not any("tokenizer." in k for k in parts["transformer"][1]) and len(report["aio_keys"]) == \
        len(report["loaded_from"]) + 2


@pytest.mark.parametrize("mode", ["dynamic", "fused"])
@pytest.mark.parametrize("variant", ["lora_r4_a2", "lokr_default"])
def test_ai_toolkit_lora_file_matches_every_module_and_its_outputs(variant, mode, golden_pipeline, report):
    """The file ai-toolkit's network saved for this arch loads with every module matched; at 1.0 and 0.5 it gives
    ai-toolkit's outputs, fused weights equal its merge, and removing it restores the base."""

    from aitk_inference.pipelines.families.ace_step import ace_step_lora_to_diffusers, ace_step_original_to_diffusers

    path = os.path.join(ROOT, variant, f"tiny_ace_{variant}.safetensors")
    outputs, inputs = golden(os.path.join(variant, "outputs.safetensors")), golden("lora_inputs.safetensors")
    assert len(lora_file_modules(path)) == report["loras"][variant]["n_modules"] == 22
    model = golden_pipeline.pipe.transformer

    def forward():
        with torch.no_grad():
            return model(hidden_states=inputs["x"], timestep=inputs["t"], timestep_r=inputs["t"],
                         encoder_hidden_states=inputs["enc_h"], context_latents=inputs["context"], return_dict=False)[0]

    assert_lora_file_reproduces_ai_toolkit(
        model, forward, mode, "ace_step_15", path, outputs,
        lambda: golden(os.path.join(variant, "effective_weights_m1.0.safetensors")), ATOL, LORA_ATOL,
        name_mapper=ace_step_lora_to_diffusers,
        parameter_name=lambda name: ace_step_original_to_diffusers(name.rsplit(".", 1)[0]) + ".weight")


def test_lora_of_another_family_is_refused_with_its_family_named(golden_pipeline, pipes):
    from aitk_inference.pipelines.lora.convert import LoraFormatError, guess_architecture
    from aitk_inference.pipelines.lora.stack import LoraRequest

    flux_keys = {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32),
                 "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4)}
    with pytest.raises(LoraFormatError, match="FLUX.1"):
        golden_pipeline.set_loras([LoraRequest(state_dict=flux_keys, name="flux")])
    assert golden_pipeline.loras.describe() == []
    ace_lora = os.path.join(ROOT, "lora_r4_a2", "tiny_ace_lora_r4_a2.safetensors")
    # its attention names are Anima's (and original Wan's) too: ACE-Step's signature refines them
    with pytest.raises(LoraFormatError, match="ACE-Step 1.5"):
        pipes("flux").set_loras([LoraRequest(path=ace_lora)])
    assert guess_architecture(["diffusion_model.blocks.0.self_attn.q_proj.lora_A.weight"]).startswith("Anima")


@pytest.mark.parametrize("extension,codec", [(".flac", "flac"), (".wav", "pcm_s16le")])
def test_write_audio_is_lossless_16_bit(extension, codec, tmp_path):
    import av

    from aitk_inference.pipelines.media import write_audio

    wave = np.stack([np.sin(np.linspace(0, 60, 960)), -np.cos(np.linspace(0, 30, 960))]).astype(np.float32) * 0.8
    path = write_audio(wave, str(tmp_path / f"a{extension}"), 48000)
    with av.open(path) as container:
        stream = container.streams.audio[0]
        decoded = np.concatenate([f.to_ndarray() for f in container.decode(stream)], axis=-1)
        assert (stream.codec_context.name, stream.rate) == (codec, 48000)
    decoded = decoded.reshape(-1, 2).T if decoded.shape[0] == 1 else decoded  # packed: channels interleaved
    np.testing.assert_allclose(decoded / 32767.0, wave, rtol=0, atol=1 / 32767)
    with pytest.raises(ValueError, match="use .flac or .wav"):
        write_audio(wave, str(tmp_path / "a.mp3"), 48000)
    with pytest.raises(ValueError, match=r"\[channels \(1 or 2\), samples\]"):
        write_audio(np.zeros((3, 10)), str(tmp_path / "b.flac"), 48000)


def test_cli_writes_one_flac_per_item(golden_pipeline, tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    from aitk_inference import cli

    args = SimpleNamespace(prompt="<CAPTION>ambient</CAPTION><DURATION>1</DURATION>", neg="", width=None, height=None,
                           steps=2, guidance=None, seed=5, batch_size=2, trigger=None, ctrl_img=None, quiet=True,
                           lora=None)
    paths = cli.run_generate(golden_pipeline, args, str(tmp_path / "song.png"))
    assert paths == [str(tmp_path / "song_0.flac"), str(tmp_path / "song_1.flac")]
    assert " at 48000 Hz" in capsys.readouterr().out  # the toy VAE makes 100 samples a second


def test_negative_prompt_has_no_effect_and_options_are_checked(golden_pipeline):
    fast = dict(steps=2, guidance=4.0, seed=3)
    plain = golden_pipeline.generate("<CAPTION>jazz</CAPTION>", negative="", **fast).audio
    negative = golden_pipeline.generate("<CAPTION>jazz</CAPTION>", negative="noise", **fast).audio
    assert np.array_equal(plain, negative) and not golden_pipeline.spec.negative_has_effect(4.0)
    longer = golden_pipeline.generate("<CAPTION>jazz</CAPTION>", duration=2.0, lyrics="la la", **fast)
    assert longer.audio.shape[-1] == 2 * plain.shape[-1]
    with pytest.raises(ValueError, match="Unknown generation option.*tempo"):
        golden_pipeline.generate("<CAPTION>jazz</CAPTION>", tempo=3, **fast)
