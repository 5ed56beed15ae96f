"""End-to-end goldens: tiny ai-toolkit jobs whose previews ai-toolkit's OWN sample path made, re-rendered by
``reproduce`` and compared preview by preview (video: frame by frame). See goldens/MANIFEST.md, section
"End-to-end jobs", for how each job was made and how to regenerate it.

Each job folder under ``goldens/e2e/<id>/`` is what ai-toolkit leaves: ``config.yaml``, the LoRA its network saved,
``samples/`` with its previews; plus ``base.json``, the hash of the tiny base ai-toolkit loaded. That base is the
project's own tiny model of the id, rebuilt here by the tiny builder and checked against the hash.
"""

import hashlib
import json
import os

import numpy as np
import pytest

from aitk_inference.pipelines.registry import REGISTRY

from conftest import GOLDENS_DIR

pytestmark = pytest.mark.usefixtures("one_thread")

E2E_DIR = os.path.join(GOLDENS_DIR, "e2e")
#: 8-bit levels a reproduced preview may differ from ai-toolkit's, per pixel (video: per frame, before the codec)
LEVELS = 1
#: video previews are lossy animated WEBP (quality 80, as ai-toolkit writes them); ours are encoded the same way, and a
#: one-level difference before encoding can come out larger after it (PARITY.md, "End-to-end jobs": measured 4)
WEBP_LEVELS = 4
#: LTX-2.x / MiniMax-H3 previews are H.264 MP4 at CRF 23 (ours written the same way), compared decoded by PSNR: on the
#: tiny models' noise-like frames the codec itself is 16 dB from its input, and libx264's automatic threads make
#: ai-toolkit's own file vary under CPU load: two encodes of the SAME frames measured 27.9-33.2 dB apart (max 87
#: levels), frames one level apart 26.6-28.9 dB, unrelated previews 18 dB (PARITY.md, "End-to-end jobs"). The exact
#: check is before the codec: frames within LEVELS, the 16-bit audio samples within one step
MP4_MIN_PSNR = 24.0
#: the decoded AAC tracks: identical 16-bit input decodes identically; one-step differences measured >= 55 dB
MP4_AUDIO_MIN_SNR = 40.0

#: id -> job folder under goldens/e2e
E2E_GOLDEN = {model_id: model_id for model_id in (
    "flux", "flex1", "flux_kontext", "flex2", "sd15", "sdxl", "qwen_image", "qwen_image_2512", "zimage",
    "zimage_turbo", "zimage_deturbo", "lumina2", "wan21_1b", "wan21_14b", "wan21_i2v_14b", "wan21_i2v_14b480p",
    "wan22_14b_t2v", "wan22_14b_i2v", "wan22_5b", "cogview4", "ernie_image", "prx_pixel", "f_lite")}
# the legacy archs: ssd / vega jobs use the legacy flags that work in ai-toolkit (is_xl with is_ssd / is_vega: arch
# sdxl), pixart_sigma arch pixart with is_pixart_sigma (arch pixart_sigma fails to load there)
E2E_GOLDEN.update({model_id: model_id for model_id in ("sd2", "ssd", "vega", "pixart", "pixart_sigma", "sd3", "auraflow")})
# the families added alongside the end-to-end jobs
E2E_GOLDEN.update({model_id: model_id for model_id in (
    "anima", "krea2", "krea2_turbo", "krea2_o_edit", "krea2_o_edit_turbo", "ideogram4", "ltx2.5")})
#: LTX-2.x ids: ai-toolkit perturbs STG block 28, which the 2-block tiny transformer lacks (its STG pass perturbs
#: nothing); ours maps 28 onto the tiny depth (block 1). Given ai-toolkit's list, as test_ltx2.py does (on the real
#: 48-block models the mapping is the identity)
STG_BLOCKS_AS_AI_TOOLKIT = ("ltx2.5",)

FLUX2_REASON = ("not made: ai-toolkit builds its own BFL-layout Flux2 transformer at the released sizes "
                "(get_flux2_params) and loads a single BFL-format file, so a tiny diffusers folder cannot stand in")
LTX2_REASON = ("not made: ai-toolkit's LTX2Model builds torchaudio transforms for its audio when it loads, and "
               "torchaudio is not installed where the goldens are made")
QWEN_EDIT_REASON = ("not made: ai-toolkit's QwenImageModel loads a Qwen2VLProcessor for the edit models, which under "
                    "transformers 5 needs a video processor and with it torchvision: the CPU machine the goldens are "
                    "made on has none (the only wheels at hand are CUDA builds that do not load with CPU torch)")
NO_E2E_GOLDEN_YET = {
    **dict.fromkeys(
        ("ace_step_15", "ace_step_15_xl"),
        "not made: ai-toolkit writes an audio preview with torchaudio.save (its first channel only), which is not "
        "installed here, and reproduce compares images; tests/test_ace_step.py compares three whole previews of "
        "ai-toolkit's get_prompt_embeds + generate_single_audio (final latents and waveform) on the same tiny weights"),
    "qwen_image_edit": QWEN_EDIT_REASON,
    "qwen_image_edit_plus": QWEN_EDIT_REASON,
    "qwen_image_edit_plus_2511": QWEN_EDIT_REASON,
    "omnigen2": "not made: ai-toolkit's OmniGen2Model loads a CLIPProcessor (image processor and tokenizer) from "
                "the checkpoint's processor/ folder, which our tiny OmniGen2 folder leaves empty",
    "flux2": FLUX2_REASON,
    "flux2_diffusers": "no ai-toolkit arch maps to it (our diffusers-layout variant of flux2), so no job can name it",
    "flux2_klein_4b": FLUX2_REASON,
    "flux2_klein_9b": FLUX2_REASON,
    "chroma": "not made: ai-toolkit's ChromaModel loads its own transformer from a single original-format .safetensors "
              "file and the text encoder and VAE from the hub repo ostris/Flex.1-alpha, not from a diffusers folder "
              "like our tiny model",
    "chroma_radiance": "not made: ai-toolkit's ChromaRadianceModel loads its transformer from a single original-format "
                       ".safetensors file and T5 from the hub repo ostris/Flex.1-alpha (no local path), so no job can "
                       "name our tiny folder; its preview path (BaseModel.generate_images on the same tiny weights: "
                       "noise, schedule, CFG with the negative, final pixels and PNG) is compared in "
                       "tests/test_chroma_radiance.py",
    "ltx2": LTX2_REASON,
    "ltx2.3": LTX2_REASON,
    "hidream": "not made: ai-toolkit's HiDream pipeline renders every preview at the area (128 * vae_scale_factor)^2, "
               "aspect ratio kept, which on the tiny model is 4056 image tokens, beyond the tiny transformer's max_seq "
               "(16); needs a tiny HiDream sized for it",
    "hidream_e1": "not made yet: HidreamE1Model shares the HiDream preview code (see hidream)",
    "nucleus_image": "not made: ai-toolkit's NucleusImageModel loads a Qwen3-VL processor that under transformers 5 "
                     "needs a video processor and with it torchvision (its sample path is covered by "
                     "goldens/nucleus_image)",
    "hidream_o1": "not made: ai-toolkit's HidreamO1Model loads AutoProcessor from the checkpoint, a Qwen3VLProcessor "
                  "that under transformers 5 needs a video processor and with it torchvision (not installed where the "
                  "goldens are made); three whole previews of its generate_images (AutoTokenizer standing in for the "
                  "text-only templating) are in goldens/hidream_o1, compared in test_hidream_o1.py",
    **dict.fromkeys(
        ("boogu_image", "boogu_image_edit"),
        "not made: ai-toolkit's BooguImageModel loads its processor with AutoProcessor, which for Qwen3-VL under "
        "transformers 5 needs a video processor and with it torchvision (not on the CPU machine the goldens are made "
        "on), and the edit model imports torchvision itself; its preview loop (BooguImagePipeline.__call__, whole "
        "previews as latents and uint8 images) runs on the same tiny weights in tests/test_boogu_image.py"),
    **dict.fromkeys(
        ("minimax_h3", "minimax_h3_ref2va"),
        "not made: reproduce now reads, writes and compares its MP4 + audio previews (as the ltx2.5 job), but "
        "ai-toolkit's transformer cannot hold the tiny model's weights: the tiny diffusers transformer's block AdaLN "
        "projection has a bias (up to 0.25), which ai-toolkit's original MiniMaxH3Transformer lacks, and its pruned "
        "variant (which has one) replaces the timestep MLP by a lookup table; a job needs a tiny model with that bias "
        "zero (a new tiny kit version). Besides, MinimaxH3Model builds MiniMaxH3TransformerParams() and "
        "MiniMaxH3VideoVAE() at the released sizes, MiniMaxH3AudioVAE() hard-codes them (DacEncoder d_model 64 / "
        "d_latent 2048, AttnProjection(2048, 32), BigVGANDecoder()) and loads one original-named, weight-norm-folded "
        "file, and its tokenizer and processor come from the hub repo MiniMaxAI/MiniMax-H3 only. A job needs those "
        "constructors answered with the tiny sizes and the tiny diffusers transformer, VAEs and Qwen3-VL renamed to "
        "ai-toolkit's names (goldens/minimax_h3_comfy did so for all but the audio VAE, on weights of its own); "
        "tests/test_minimax_h3.py compares its MiniMaxH3Pipeline runs (t2va, fl2va, ref2va: final video and audio "
        "latents) on tiny weights"),
    "zeta_chroma": "not made: ai-toolkit's ZetaChromaModel.load_model always builds ZImageDCT at the released widths "
                   "(3840 wide, 30 layers), so a job cannot load a tiny checkpoint without patching its code; "
                   "tests/test_zeta_chroma.py compares five whole previews of its BaseModel.generate_images (pixels "
                   "and PNG) on tiny weights instead",
    "zimage_l2p": "not made: ai-toolkit's L2P transformer class takes __init__(*args, **kwargs), so its "
                  "from_pretrained drops a saved config and builds the released 3840-wide model, and its single-file "
                  "path builds that size too: a tiny job cannot load. test_zimage_l2p.py compares three whole seed-42 "
                  "previews of ai-toolkit's generate_images (pixels and 8-bit PNG) on components set as its "
                  "load_model sets them",
    **dict.fromkeys(
        ("mageflow", "mageflow_edit"),
        "not made: ai-toolkit's MageFlowModel subclasses BaseModel, which imports torchvision (absent on the CPU "
        "machine the goldens are made on), so BaseSDTrainProcess.sample cannot run it; tests/test_mageflow.py runs its "
        "generate_single_image and MageFlowPipeline (whole 2-step previews: decoded latents and 8-bit pixels, t2i, "
        "renorm and edit with two references) on the same tiny weights instead"),
}


def test_every_registry_id_has_an_e2e_golden_or_a_reason():
    """An id has an end-to-end job or a reason why not: never both, never neither (a new id fails here)."""
    neither = [m for m in REGISTRY if m not in E2E_GOLDEN and m not in NO_E2E_GOLDEN_YET]
    both = [m for m in REGISTRY if m in E2E_GOLDEN and m in NO_E2E_GOLDEN_YET]
    unknown = sorted((set(E2E_GOLDEN) | set(NO_E2E_GOLDEN_YET)) - set(REGISTRY))
    assert not neither, f"add an end-to-end golden job or a 'no end-to-end golden yet' reason for {neither}"
    assert not both, f"{both} have an end-to-end golden and a 'no golden yet' reason; keep one"
    assert not unknown, f"{unknown} are not registry ids"
    assert all(isinstance(reason, str) and reason.strip() for reason in NO_E2E_GOLDEN_YET.values())
    for model_id, folder in E2E_GOLDEN.items():
        assert os.path.isfile(os.path.join(E2E_DIR, folder, "config.yaml")), f"{model_id}: no job folder {folder!r}"


def weights_sha256(folder: str) -> str:
    """sha256 over every tensor (file, name, dtype, shape, bytes) of a model folder's safetensors, LoRAs excluded
    (the recipe ai-toolkit's side recorded in base.json; config files are left out: diffusers writes its version)."""
    import torch
    from safetensors.torch import load_file

    digest = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(folder)):
        dirs[:] = sorted(d for d in dirs if d != "loras")
        for name in sorted(f for f in files if f.endswith(".safetensors")):
            rel = os.path.relpath(os.path.join(root, name), folder)
            for key, tensor in sorted(load_file(os.path.join(root, name)).items()):
                digest.update(f"{rel}:{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("model_id", list(E2E_GOLDEN))
def test_reproduce_matches_ai_toolkit_previews(model_id, tiny_dir, tmp_path, monkeypatch):
    from aitk_inference.pipelines.jobs.config import find_previews, read_job
    from aitk_inference.pipelines.jobs.reproduce import reproduce_job

    job = os.path.join(E2E_DIR, E2E_GOLDEN[model_id])
    with open(os.path.join(job, "base.json")) as f:
        recorded = json.load(f)
    base = tiny_dir(recorded["tiny_model"])
    assert weights_sha256(base) == recorded["weights_sha256"], (
        f"the tiny {recorded['tiny_model']} model is no longer the base ai-toolkit sampled; regenerate the job "
        "(goldens/MANIFEST.md)")
    assert read_job(job).model_id == model_id  # the job's model section maps to this id

    import aitk_inference.pipelines.media as media

    encoded = {}  # our video frames (and audio) as they go into the WEBP / MP4 encoder, by output file
    write_webp, write_ai_toolkit_mp4 = media.write_webp, media.write_ai_toolkit_mp4

    def keep_frames(frames, path, fps):
        encoded[os.path.basename(path)] = media._frames_uint8(frames), None
        return write_webp(frames, path, fps)

    def keep_frames_and_audio(frames, path, fps, audio=None, sample_rate=None):
        encoded[os.path.basename(path)] = media._frames_uint8(frames), audio
        return write_ai_toolkit_mp4(frames, path, fps, audio, sample_rate)

    monkeypatch.setattr(media, "write_webp", keep_frames)
    monkeypatch.setattr(media, "write_ai_toolkit_mp4", keep_frames_and_audio)
    if model_id in STG_BLOCKS_AS_AI_TOOLKIT:
        from aitk_inference.pipelines.families.ltx2 import LTX2FamilyPipeline

        monkeypatch.setattr(LTX2FamilyPipeline, "guidance_kwargs", lambda self: dict(self.spec.options.guidance))
    report = reproduce_job(job, base=base, out_dir=str(tmp_path), device="cpu", dtype="fp32")
    previews = find_previews(job)
    assert len(previews) == len(report.samples) >= 2
    for row in report.samples:
        where = f"{model_id} sample {row.index}"
        container = os.path.splitext(row.file)[1][1:]  # one frame: a still image preview (png)
        assert row.compare is not None, f"{where}: no preview of the same size to compare"
        assert row.preview.endswith(f".{container}"), f"{where}: ai-toolkit wrote {row.preview}, ours {row.file}"
        if container == "png":
            assert row.compare.max_abs <= LEVELS, f"{where}: {row.compare.max_abs} levels from ai-toolkit's preview"
            continue
        assert len(row.frame_compare) > 1, f"{where}: a video preview of one frame"
        if container == "webp":
            assert row.compare.max_abs <= WEBP_LEVELS and all(d.max_abs <= WEBP_LEVELS for d in row.frame_compare), (
                f"{where}: {row.compare.max_abs} levels from ai-toolkit's preview")
        else:
            assert row.compare.psnr >= MP4_MIN_PSNR, f"{where}: {row.compare.psnr:.1f} dB from ai-toolkit's preview"
        with np.load(os.path.join(job, f"frames_before_{container}.npz")) as theirs:
            before = {key: theirs[key] for key in theirs.files if key.split("_")[0] == str(row.index)}
        ours, audio = encoded[os.path.basename(row.file)]
        assert ours.shape == before[str(row.index)].shape, where
        assert np.abs(ours.astype(np.int16) - before[str(row.index)].astype(np.int16)).max() <= LEVELS, (
            f"{where}: frames before encoding differ from ai-toolkit's by more than {LEVELS} level")
        if f"{row.index}_audio" in before:  # the 16-bit samples ai-toolkit's encode_video fed the AAC encoder
            samples = (np.clip(audio, -1.0, 1.0) * 32767.0).astype(np.int16)
            assert samples.shape == before[f"{row.index}_audio"].shape, where
            assert np.abs(samples.astype(np.int32) - before[f"{row.index}_audio"]).max() <= 1, (
                f"{where}: audio before encoding differs from ai-toolkit's by more than one 16-bit step")
            assert row.audio_compare is not None and row.audio_compare.snr >= MP4_AUDIO_MIN_SNR, (
                f"{where}: decoded audio {row.audio_compare}")
