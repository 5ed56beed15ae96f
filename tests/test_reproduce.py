"""``reproduce``: re-render an ai-toolkit job folder that the test writes (config.yaml, LoRA files, samples/)."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = """\
job: extension
config:
  name: job
  process:
    - type: sd_trainer
      training_folder: output
      trigger_word: p3r5on
      network: {{type: lora, linear: 4, linear_alpha: 4}}
      save: {{dtype: float16, save_every: 100}}
      train: {{steps: 300, dtype: bf16}}
      model:
        name_or_path: {base}
        arch: flux
      sample:
        sampler: flowmatch
        width: 64
        height: 64
        seed: 42
        walk_seed: true
        guidance_scale: 4
        sample_steps: 2
        samples:
          - prompt: "[trigger] on a beach"
          - prompt: "a photo of [trigger] --w 100 --h 80 --steps 3"
            seed: 7
          - prompt: "[trigger] in snow --seed 5 --cfg 3.5"
            width: 60
meta:
  name: "[name]"
  version: "1.0"
"""

# (index) -> what ai-toolkit's rules give for the config above
EXPECTED = {
    0: {"prompt": "p3r5on on a beach", "seed": 42, "width": 64, "height": 64, "steps": 2, "guidance": 4.0},
    1: {"prompt": "a photo of p3r5on", "seed": 7, "width": 96, "height": 80, "steps": 3, "guidance": 4.0},
    2: {"prompt": "p3r5on in snow", "seed": 5, "width": 64, "height": 64, "steps": 2, "guidance": 3.5},
}


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory, tiny_dir):
    """A job folder as ai-toolkit leaves it: config.yaml with a RELATIVE name_or_path, three LoRA saves."""
    from aitk_inference.tiny.flux import flux_transformer
    from aitk_inference.tiny.loras import lora_targets, write_lora

    root = tmp_path_factory.mktemp("aitk_output")
    job = root / "job"
    job.mkdir()
    base = os.path.relpath(tiny_dir("flux"), job)
    (job / "config.yaml").write_text(CONFIG.format(base=base))
    targets = lora_targets(flux_transformer())
    for filename, step, seed in (("job_000000100.safetensors", 100, 1), ("job_000000200.safetensors", 200, 2),
                                 ("job.safetensors", 300, 3)):
        write_lora(str(job / filename), "peft", targets, seed=seed,
                   metadata={"training_info": f'{{"step": {step}, "epoch": 1}}'})
    # a touched older file must not win: the newest LoRA is decided by name
    os.utime(job / "job_000000100.safetensors", (4e9, 4e9))
    return job


def _rows(report):
    return {row.index: row for row in report.samples}


def test_reproduce_job_folder(job_dir, tmp_path, tiny_dir):
    from PIL import Image

    from aitk_inference.pipelines.jobs.reproduce import reproduce_job

    # 1. No samples/ yet: renders, names like ai-toolkit, picks the final LoRA, applies ai-toolkit's sample rules
    report = reproduce_job(str(job_dir), out_dir=str(tmp_path / "first"), device="cpu", dtype="fp32")
    assert report.model == "flux"
    assert os.path.basename(report.lora) == "job.safetensors" and report.step == 300
    assert "name_or_path: ../" in (job_dir / "config.yaml").read_text()  # relative to the job folder
    assert os.path.samefile(report.base, tiny_dir("flux"))
    assert report.lora_mode == "fused"  # one shared multiplier: merged, as ai-toolkit samples
    rows = _rows(report)
    assert sorted(rows) == [0, 1, 2]
    for index, expected in EXPECTED.items():
        row = rows[index]
        assert os.path.basename(row.file) == f"job__000000300_{index}.png"
        assert {k: getattr(row, k) for k in expected} == expected
        assert row.compare is None
        with Image.open(row.file) as im:
            assert im.size == (expected["width"], expected["height"])
    assert report.sheet is None

    # 2. ai-toolkit's samples/: index 0 is our own render (exact), index 1 is off by known amounts (as a JPEG-free
    #    PNG so the numbers are exact), index 2 only exists for another step; an older duplicate of index 0 loses.
    samples = job_dir / "samples"
    samples.mkdir()
    ours0 = np.asarray(Image.open(rows[0].file).convert("RGB"))
    Image.fromarray(ours0).save(samples / "1700000000000__000000300_0.png")
    Image.fromarray(255 - ours0).save(samples / "1600000000000__000000300_0.png")
    ours1 = np.asarray(Image.open(rows[1].file).convert("RGB")).astype(np.int16)
    shifted = ours1.copy()
    shifted[:, : shifted.shape[1] // 2] += np.where(ours1[:, : shifted.shape[1] // 2] > 127, -6, 6)
    Image.fromarray(shifted.astype(np.uint8)).save(samples / "1700000000001__000000300_1.png")
    Image.fromarray(ours0).save(samples / "1700000000002__000000200_2.jpg")

    report = reproduce_job(str(job_dir / "config.yaml"), out_dir=str(tmp_path / "second"), device="cpu", dtype="fp32")
    rows = _rows(report)
    exact = rows[0].compare
    assert rows[0].preview.endswith("1700000000000__000000300_0.png")
    assert exact.max_abs == 0 and exact.mean_abs == 0.0 and exact.psnr == float("inf")
    off = rows[1].compare
    assert off.max_abs == 6 and off.mean_abs == pytest.approx(3.0, abs=0.01)
    assert off.psnr == pytest.approx(10 * np.log10(255**2 / 18.0), abs=0.05)
    assert rows[2].compare is None and rows[2].preview is None
    sheet = report.sheet
    assert os.path.basename(sheet) == "job__000000300_sheet.png"
    with Image.open(sheet) as im:
        # two compared rows, three panels each (theirs, ours, diff)
        assert im.width >= 3 * 96 and im.height >= 64 + 80


def test_reproduce_cli_with_overrides(job_dir, tmp_path, tiny_dir, capsys):
    """``python -m aitk_inference reproduce`` with --lora (a step file) and --base (absolute) overrides."""
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "aitk_inference", "reproduce", str(job_dir), "--lora",
           str(job_dir / "job_000000100.safetensors"), "--base", tiny_dir("flux"), "--out", str(out),
           "--device", "cpu", "--dtype", "fp32", "--attention", "sdpa_math"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("flux from ") and "job_000000100.safetensors (step 100, fused)" in lines[0]
    assert any("job__000000100_0.png: 64x64 seed 42 steps 2 guidance 4.0" in line for line in lines), proc.stdout
    assert any("job__000000100_1.png: 96x80 seed 7 steps 3" in line for line in lines), proc.stdout
    assert sorted(os.listdir(out)) == [f"job__000000100_{i}.png" for i in range(3)]
    assert not any("PSNR" in line for line in lines)  # ai-toolkit's samples (if any) are for other steps
    # a refusal needs no process of its own (a new one pays about 4 s importing torch and diffusers first)
    from aitk_inference.cli import main

    capsys.readouterr()
    status = main([*cmd[3:5], "--grid", "--compile", "regional"])
    assert status != 0 and "apply to a plain reproduce, not to --grid" in capsys.readouterr().err


def test_job_parsing_rules(tmp_path):
    from aitk_inference.pipelines.jobs.config import (find_previews, lora_step_from_name, model_id_for_job, newest_lora,
                                                      resolve_job_path)

    for name in ("job_000000100.safetensors", "job_000000200.safetensors", "other.safetensors"):
        (tmp_path / name).write_bytes(b"")
    assert os.path.basename(newest_lora(str(tmp_path), "job")) == "job_000000200.safetensors"
    (tmp_path / "job.safetensors").write_bytes(b"")
    assert os.path.basename(newest_lora(str(tmp_path), "job")) == "job.safetensors"
    assert os.path.basename(newest_lora(str(tmp_path), "renamed")) == "job.safetensors"
    assert lora_step_from_name("x/job_000000250.safetensors") == 250
    assert lora_step_from_name("job_000000250_high_noise.safetensors") == 250
    assert lora_step_from_name("job.safetensors") is None

    from aitk_inference.pipelines.jobs.config import with_expert_sibling

    wan = tmp_path / "wan"
    wan.mkdir()
    for name in ("w_000000100_high_noise", "w_000000100_low_noise", "w_000000300_high_noise", "w_000000300_low_noise"):
        (wan / f"{name}.safetensors").write_bytes(b"")
    newest = newest_lora(str(wan), "w")
    assert os.path.basename(newest).startswith("w_000000300_")
    assert [os.path.basename(p) for p in with_expert_sibling(newest)] == [
        "w_000000300_high_noise.safetensors", "w_000000300_low_noise.safetensors"]
    assert with_expert_sibling(str(tmp_path / "job.safetensors")) == [str(tmp_path / "job.safetensors")]

    assert model_id_for_job({"arch": "flux", "name_or_path": "black-forest-labs/FLUX.1-dev"}) == "flux"
    assert model_id_for_job({"arch": "flux:bf16", "name_or_path": "ostris/Flex.1-alpha"}) == "flex1"
    assert model_id_for_job({"is_flux": True}) == "flux"
    assert model_id_for_job({"arch": "zimage", "name_or_path": "Tongyi-MAI/Z-Image-Turbo"}) == "zimage_turbo"
    with pytest.raises(ValueError, match="model.arch 'no_such_arch'"):
        model_id_for_job({"arch": "no_such_arch"})

    (tmp_path / "models" / "base").mkdir(parents=True)
    assert resolve_job_path("models/base", str(tmp_path)) == str(tmp_path / "models" / "base")
    assert resolve_job_path("org/repo", str(tmp_path)) == "org/repo"  # a hub id stays as it is

    samples = tmp_path / "samples"
    samples.mkdir()
    for name in ("1700__000000100_0.jpg", "1800__000000100_0.jpg", "1700__000000100_12.webp", "notes.txt",
                 "1700_000000100_0.jpg", "1700__000000100_3.mp4", "1700__000000100_5.wav"):
        (samples / name).write_bytes(b"")
    found = find_previews(str(tmp_path))
    assert sorted(found) == [(100, 0), (100, 3), (100, 5), (100, 12)]
    assert found[(100, 5)].endswith("1700__000000100_5.wav")  # an audio model's (ACE-Step) preview
    assert found[(100, 0)].endswith("1800__000000100_0.jpg")
    assert found[(100, 3)].endswith("1700__000000100_3.mp4")  # LTX-2.x / MiniMax-H3 video previews


def mp4_layout(path: str) -> dict:
    """What an MP4's streams are made with: libx264's own record of its settings (the options string it writes into
    the stream) and the video and audio stream parameters."""
    import re

    import av

    with open(path, "rb") as f:
        x264_options = re.search(rb"options: ([ -~]+)", f.read()).group(1).decode()
    with av.open(path) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        return {"x264": x264_options, "video": (video.codec_context.name, video.format.name, video.width,
                                                  video.height, video.average_rate, video.frames),
                "audio": (audio.codec_context.name, audio.sample_rate, audio.layout.name, audio.frames)}


def decoded_audio(path: str):
    """An MP4's audio track decoded to float32 ``[channels, samples]`` (whole 1024-sample AAC frames)."""
    import av

    with av.open(path) as container:
        return np.concatenate([frame.to_ndarray() for frame in container.decode(audio=0)], axis=1)


def snr_db(ours, theirs) -> float:
    return float(10 * np.log10(np.mean(theirs.astype(np.float64) ** 2) / np.mean((ours - theirs) ** 2.0)))


def test_mp4_preview_writer_as_ai_toolkits(tmp_path):
    """ai-toolkit's MP4 previews (LTX-2.x, MiniMax-H3) come from diffusers' encode_video. reproduce's copy
    (``write_mp4(..., crf=None)``) given the same frames and waveform writes encode_video's file
    (goldens/MANIFEST.md section 15: mp4_preview/encode_video.mp4, its file of these inputs): the same libx264
    settings (CRF 23) and streams, video that decodes alike (not byte for byte: libx264's output varies with the CPU
    load, PARITY.md "End-to-end jobs"), and the audio track starting with the video, as encode_video's does."""
    from conftest import GOLDENS_DIR

    from aitk_inference.pipelines.jobs.reproduce import compare_images, read_frames
    from aitk_inference.pipelines.media import write_mp4

    rng = np.random.default_rng(3)
    ramp = np.linspace(0, 200, 48)[None, None, :, None] + np.linspace(0, 40, 32)[None, :, None, None]
    frames = np.clip(ramp + rng.normal(0, 12, (9, 32, 48, 3)) + np.arange(9)[:, None, None, None] * 4, 0,
                     255).astype(np.uint8)
    seconds = np.arange(2400) / 24000
    audio = (np.stack([0.4 * np.sin(2 * np.pi * 440 * seconds), 0.3 * np.sin(2 * np.pi * 660 * seconds)])
             + rng.standard_normal((2, 2400)) * 0.01).astype(np.float32)
    theirs = os.path.join(GOLDENS_DIR, "mp4_preview", "encode_video.mp4")
    ours = write_mp4(frames, str(tmp_path / "ours.mp4"), 24, audio=audio, sample_rate=24000, crf=None)
    assert mp4_layout(ours) == mp4_layout(theirs), "not ai-toolkit's MP4 (or PyAV's encoders changed: regenerate)"
    assert "crf=23.0" in mp4_layout(ours)["x264"]
    decoded = np.stack(read_frames(ours))
    assert compare_images(decoded, np.stack(read_frames(theirs))).psnr > 30
    # AAC decodes whole 1024-sample frames (3 here); encode_video feeds it 16-bit samples, we float: 40 dB apart at
    # least, while a track 1024 samples late (the priming delay counted as sound) is about 0 dB from it
    our_track, their_track = decoded_audio(ours), decoded_audio(theirs)
    assert our_track.shape == their_track.shape == (2, 3072)
    assert snr_db(our_track, their_track) > 40
    assert snr_db(our_track[:, 1024:2400], audio[:, 1024:2400]) > 15
    # the users' writer: CRF 18, closer to the frames than ai-toolkit's 23
    users = np.stack(read_frames(write_mp4(frames, str(tmp_path / "users.mp4"), 24)))
    assert np.abs(users.astype(int) - frames).mean() < np.abs(decoded.astype(int) - frames).mean()


def test_video_preview_formats():
    """The families whose ai-toolkit previews are MP4 with audio (their own save function); the rest animated WEBP."""
    from aitk_inference.pipelines.registry import REGISTRY, VideoSpec

    mp4 = {m for m, spec in REGISTRY.items() if spec.video and spec.video.preview_format == "mp4"}
    assert mp4 == {"ltx2", "ltx2.3", "ltx2.5", "minimax_h3", "minimax_h3_ref2va"}
    with pytest.raises(ValueError, match="preview_format 'gif'"):
        VideoSpec(num_frames=9, fps=24, frame_step=8, preview_format="gif")


def test_bad_job_folders(tmp_path):
    from aitk_inference.pipelines.jobs.reproduce import reproduce_job

    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        reproduce_job(str(tmp_path))
    (tmp_path / "config.yaml").write_text("just: text\n")
    with pytest.raises(ValueError, match="not an ai-toolkit job config"):
        reproduce_job(str(tmp_path))
    (tmp_path / "config.yaml").write_text(textwrap.dedent("""\
        config:
          name: job
          process:
            - type: sd_trainer
              model: {arch: flux, name_or_path: black-forest-labs/FLUX.1-dev}
              sample: {samples: [{prompt: x}]}
        """))
    with pytest.raises(FileNotFoundError, match="No LoRA"):
        reproduce_job(str(tmp_path))


SDXL_CONFIG = """\
job: extension
config:
  name: xl
  process:
    - type: sd_trainer
      trigger_word: p3r5on
      model: {{name_or_path: {base}, arch: sdxl}}
      sample:
        width: 64
        height: 64
        seed: 3
        guidance_scale: 6
        sample_steps: 2
        neg: cartoon
        guidance_rescale: 0.5
        samples:
          - prompt: "[trigger] dog --n blurry, ugly"
          - prompt: "[trigger] dog --gr 0 --n2 dark"
"""


def test_reproduce_sdxl_second_encoder_negative(tmp_path, tiny_dir, load_tiny):
    """SDXL previews: ``--n`` replaces the first encoder's negative only, the second keeps the job's ``neg``; the
    section's ``guidance_rescale`` applies unless ``--gr`` overrides it; ``--n2`` has no effect (ai-toolkit overwrites
    it). Each reproduced image equals a direct render with those values."""
    from PIL import Image

    from aitk_inference.pipelines.jobs.reproduce import reproduce_job
    from aitk_inference.tiny.loras import kohya_targets, write_kohya_lora

    pipeline = load_tiny("sdxl", lora_mode="fused")
    job = tmp_path / "xl"
    job.mkdir()
    (job / "config.yaml").write_text(SDXL_CONFIG.format(base=tiny_dir("sdxl")))
    lora = write_kohya_lora(str(job / "xl.safetensors"), kohya_targets(pipeline.pipe), seed=1)
    report = reproduce_job(str(job), out_dir=str(tmp_path / "out"), device="cpu", dtype="fp32")
    pipeline.set_loras([(lora, 1.0)])
    call = dict(prompt="p3r5on dog", width=64, height=64, steps=2, guidance=6.0, seed=3, negative_2="cartoon")
    expected = {0: dict(negative="blurry, ugly", guidance_rescale=0.5), 1: dict(negative="cartoon", guidance_rescale=0.0)}
    for row in report.samples:
        with Image.open(row.file) as im:
            ours = np.asarray(im.convert("RGB"))
        direct = pipeline.generate(**call, **expected[row.index]).to_pil()[0]
        np.testing.assert_array_equal(ours, np.asarray(direct.convert("RGB")))
    with_first_negative_for_both = pipeline.generate(**{**call, "negative_2": None}, **expected[0]).to_pil()[0]
    with Image.open(_rows(report)[0].file) as im:
        assert not np.array_equal(np.asarray(im.convert("RGB")), np.asarray(with_first_negative_for_both))


def test_reproduce_audio_job_writes_flac(tmp_path, tiny_dir):
    """An ACE-Step job without previews of its own: its tagged sample prompts render as FLAC (our lossless stand-in for
    ai-toolkit's default MP3) of the first channel, as ai-toolkit saves an audio preview, named like its previews.
    (test_e2e_goldens.py compares a job's WAV previews.)"""
    import av
    import torch

    from aitk_inference.pipelines.jobs.reproduce import reproduce_job
    from aitk_inference.tiny.ace_step import original_targets
    from aitk_inference.tiny.loras import make_state_dict, save_lora
    from diffusers import AceStepTransformer1DModel

    job = tmp_path / "song"
    job.mkdir()
    config = textwrap.dedent(f"""\
        job: extension
        config:
          name: song
          process:
            - type: sd_trainer
              network: {{type: lora, linear: 4, linear_alpha: 4}}
              model: {{name_or_path: {tiny_dir("ace_step_15")}, arch: ace_step_15}}
              sample:
                seed: 42
                walk_seed: true
                guidance_scale: 4
                sample_steps: 2
                samples:
                  - prompt: "<CAPTION>my style song</CAPTION><BPM>112</BPM><DURATION>2</DURATION><LANGUAGE>en</LANGUAGE>"
                  - prompt: "<CAPTION>my style song</CAPTION><DURATION>1</DURATION>"
        """)
    (job / "config.yaml").write_text(config)
    transformer = AceStepTransformer1DModel.from_pretrained(tiny_dir("ace_step_15"), subfolder="transformer")
    with torch.no_grad():
        state_dict = make_state_dict("peft_diffusion_model", original_targets(transformer))
    save_lora(str(job / "song.safetensors"), state_dict, {"training_info": '{"step": 100, "epoch": 1}'})
    report = reproduce_job(str(job), out_dir=str(tmp_path / "out"), device="cpu", dtype="fp32")
    rows = _rows(report)
    assert report.model == "ace_step_15" and sorted(rows) == [0, 1] and report.sheet is None
    for index, seconds in ((0, 2), (1, 1)):
        row = rows[index]
        assert os.path.basename(row.file) == f"song__000000100_{index}.flac" and row.seed == 42 + index
        assert row.compare is None and row.preview is None
        with av.open(row.file) as container:
            stream = container.streams.audio[0]
            assert (stream.rate, stream.channels) == (48000, 1)
            assert sum(f.samples for f in container.decode(stream)) == seconds * 25 * 4  # the toy VAE: 4x
