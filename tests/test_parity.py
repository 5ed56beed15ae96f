"""Preview parity with ai-toolkit (issue 4), driven by the golden files that ai-toolkit's own code produced.

The goldens live in ``tests/goldens`` (see its MANIFEST.md): scheduler timesteps/sigmas per family, the initial noise
for seed 42, and LoRA/LoKr files saved by ai-toolkit's network code with the outputs it computed. Each table below maps
registry ids to their golden; an id without one is listed, with the reason, in the table's "no golden yet" mapping, and
``test_every_registry_id_has_a_golden_or_a_reason`` fails for an id in neither, so a new id needs a decision.

Behaviour tests that need no golden file (seeds, trigger words, prompt flags, size flooring, LoRA maths) are at the
end.
"""

import functools
import json
import os
import re

import pytest

from aitk_inference.pipelines.registry import REGISTRY
from conftest import GOLDENS_DIR

# registry id -> schedulers.json entry (ai-toolkit's sample path per family; MANIFEST §1).
SCHEDULER_GOLDEN = {
    "flux": "flux1_dev", "flux_kontext": "flux1_dev", "flex1": "flex1", "flex2": "flex2", "chroma": "chroma",
    "lumina2": "lumina2",
    "qwen_image": "qwen_image", "qwen_image_2512": "qwen_image", "qwen_image_edit": "qwen_image",
    "qwen_image_edit_plus": "qwen_image", "qwen_image_edit_plus_2511": "qwen_image",
    "zimage": "zimage", "zimage_turbo": "zimage", "zimage_deturbo": "zimage", "zimage_l2p": "zimage",
    "wan21_14b": "wan21", "wan21_1b": "wan21", "wan21_i2v_14b": "wan21", "wan21_i2v_14b480p": "wan21",
    "flux2": "flux2", "flux2_diffusers": "flux2", "flux2_klein_4b": "flux2", "flux2_klein_9b": "flux2",
    "cogview4": "cogview4",
    "nucleus_image": "nucleus_image",
    "prx_pixel": "prx_pixel",
    "anima": "anima",
    "sd3": "sd3", "auraflow": "auraflow",
}
NO_SCHEDULER_GOLDEN = {
    **dict.fromkeys(
        ("ace_step_15", "ace_step_15_xl"),
        "ai-toolkit samples ACE-Step with its own loop on linspace(1, 0, N+1)[:-1] shifted by 3.0, no scheduler: "
        "test_ace_step.py compares our schedule with ai-toolkit's compute_timesteps and spies on the transformer"),
    "sd15": "schedulers.json records the flow-matching families only; SD's DDPM config and timesteps are checked in "
            "test_stable_diffusion.py",
    "sdxl": "schedulers.json records the flow-matching families only; SDXL's DDPM config and timesteps are checked in "
            "test_stable_diffusion.py",
    **dict.fromkeys(
        ("sd2", "ssd", "vega", "pixart", "pixart_sigma"),
        "schedulers.json records the flow-matching families only; the DDPM config and timesteps of ai-toolkit's sample "
        "path (goldens/legacy/schedules.json) are compared in test_legacy.py"),
    "omnigen2": "no OmniGen2 entry in schedulers.json; its own Euler with the resolution-dependent shift is checked "
                "against the formula in test_omnigen2.py",
    "wan22_14b_t2v": "schedulers.json's wan21 entry has shift 3.0, Wan 2.2 samples with shift 5.0; checked against "
                     "the formula in test_wan.py",
    "wan22_14b_i2v": "schedulers.json's wan21 entry has shift 3.0, Wan 2.2 samples with shift 5.0; checked against "
                     "the formula in test_wan.py",
    "wan22_5b": "schedulers.json's wan21 entry has shift 3.0, Wan 2.2 samples with shift 5.0; checked against the "
                "formula in test_wan.py",
    "ltx2": "no LTX-2 entry in schedulers.json; the schedule is checked against ai-toolkit's formula in test_ltx2.py",
    "ltx2.3": "no LTX-2 entry in schedulers.json; the schedule is checked against ai-toolkit's formula in test_ltx2.py",
    "ltx2.5": "no LTX-2 entry in schedulers.json; the schedules ai-toolkit's own LTX-2.5 sample path gave (3 sizes and "
              "step counts, tests/goldens/ltx25) are compared in test_ltx2.py test_ltx25_sampling_matches_ai_toolkit",
    "hidream": "no HiDream entry in schedulers.json; ai-toolkit's FlowUniPC schedule is re-derived in test_hidream.py",
    "hidream_e1": "no HiDream entry in schedulers.json; ai-toolkit's FlowUniPC schedule is re-derived in "
                  "test_hidream.py",
    "ernie_image": "ai-toolkit's ERNIE-Image schedule (its own run, with the sigmas the pipeline passes) is in "
                   "goldens/ernie_image/schedules.json, compared in test_ernie_image.py",
    **dict.fromkeys(
        ("krea2", "krea2_turbo", "krea2_o_edit", "krea2_o_edit_turbo"),
        "ai-toolkit samples Krea 2 with its own Euler loop, no scheduler: test_krea2.py compares our schedule with "
        "tests/goldens/krea2 (ai-toolkit's pipeline.timesteps) and spies on the times the transformer receives"),
    **dict.fromkeys(
        ("boogu_image", "boogu_image_edit"),
        "ai-toolkit samples Boogu-Image with its own Euler loop, no scheduler: test_boogu_image.py compares our "
        "schedule with tests/goldens/boogu_image (ai-toolkit's boogu_time_schedule, 4 step counts and sizes) and spies "
        "on the times the transformer receives"),
    "ideogram4": "ai-toolkit samples Ideogram 4 with its own logit-normal sigmas, no scheduler: they are in "
                 "goldens/ideogram4/schedules.json, compared (and the times the transformer receives) in "
                 "test_ideogram4.py",
    "f_lite": "ai-toolkit samples F-Lite with its pipeline's own loop, no scheduler (t = i/N warped by "
              "a t / (1 + (a - 1) t)): test_f_lite.py compares the times the DiT receives at every step with "
              "ai-toolkit's own previews (goldens/f_lite: 2 steps at 64x64, 3 steps at 96x64)",
    "hidream_o1": "ai-toolkit's HiDream-O1 scheduler (get_train_scheduler with the pipeline's set_shift(3.0), 1, 2, 3 "
                  "and 30 steps) is in goldens/hidream_o1/report.json, compared with ours, and with the progress the "
                  "model receives at every step of three previews, in test_hidream_o1.py",
    "minimax_h3": "two schedules (video shift 12, audio remapped onto shift 3) on MiniMaxH3Scheduler, not a FlowMatch "
                  "config; ai-toolkit's sigmas are in goldens/minimax_h3/minimax_h3_schedules.json and every step's "
                  "per-row timesteps in its sampling goldens, compared in test_minimax_h3.py",
    "minimax_h3_ref2va": "as minimax_h3 (the same schedules); the ref2va sampling golden's per-row timesteps are "
                         "compared in test_minimax_h3.py",
    "chroma_radiance": "schedulers.json's chroma entry takes mu from packed latent tokens; ai-toolkit's Radiance "
                       "pipeline takes it from the pixel channel count (3). Its own runs (sigmas passed, mu, the "
                       "scheduler's state; 5 sizes and step counts, tests/goldens/chroma_radiance/report.json) are "
                       "compared in test_chroma_radiance.py test_schedule_matches_ai_toolkit, and the flow times the "
                       "transformer gets in its whole generations",
    "zeta_chroma": "ai-toolkit samples Zeta-Chroma with its own loop and its own two schedules (shifted by the patch "
                   "count, or unshifted at <= 8 steps and guidance <= 1), no scheduler: they are in "
                   "goldens/zeta_chroma/report.json, compared (and the times the transformer receives) in "
                   "test_zeta_chroma.py",
    **dict.fromkeys(
        ("mageflow", "mageflow_edit"),
        "ai-toolkit samples Mage-Flow with its own Euler loop, no scheduler: test_mageflow.py compares our sigmas with "
        "its build_shifted_sigmas (tests/goldens/mageflow, 2, 3 and 25 steps) and spies on the times the transformer "
        "receives"),
}
# Where ai-toolkit's scheduler object samples with another shift than its recorded config states: id -> golden file
# with that object's state (MANIFEST §6).
SCHEDULER_STATE_GOLDEN = {"lumina2": "lumina2_scheduler_state.json",
                          "sd3": "legacy/flowmatch_scheduler_state.json",
                          "auraflow": "legacy/flowmatch_scheduler_state.json"}
# Z-Image's pipeline builds its sigmas with a float32 torch.linspace; allow one float32 rounding there.
FLOAT32_LINSPACE_ATOL = {"zimage": 1e-6}

# registry id -> noise/initial_noise.safetensors key family (MANIFEST §4).
NOISE_GOLDEN = {
    "flux": "flux1", "flex1": "flux1", "flux_kontext": "flux1", "flex2": "flux1", "chroma": "flux1",
    "flux2": "flux2", "flux2_diffusers": "flux2", "flux2_klein_4b": "flux2", "flux2_klein_9b": "flux2",
    "cogview4": "flux1",  # ai-toolkit's CogView4 draw is FLUX.1's unpacked float32 draw (MANIFEST §4)
    "sd3": "flux1",  # SD3's (1, 16, H/8, W/8) draw is FLUX.1's unpacked float32 draw (MANIFEST "legacy")
}
NO_NOISE_GOLDEN = dict.fromkeys(
    ("sd15", "sdxl", "qwen_image", "qwen_image_2512", "qwen_image_edit", "qwen_image_edit_plus",
     "qwen_image_edit_plus_2511", "zimage", "zimage_turbo", "zimage_deturbo", "lumina2", "omnigen2", "wan21_1b",
     "wan21_14b", "wan21_i2v_14b", "wan21_i2v_14b480p", "wan22_14b_t2v", "wan22_14b_i2v", "wan22_5b", "ltx2", "ltx2.3",
     "hidream", "hidream_e1"),
    "noise/initial_noise.safetensors holds ai-toolkit's noise for the FLUX.1-style and FLUX.2 latent layouts only",
)
NO_NOISE_GOLDEN["ltx2.5"] = ("ai-toolkit's seed-42 video and audio noise for LTX-2.5 (its first transformer call, "
                             "tests/goldens/ltx25) is compared in test_ltx2.py test_ltx25_sampling_matches_ai_toolkit")
NO_NOISE_GOLDEN["ernie_image"] = ("ai-toolkit's seed-42 ERNIE-Image draw (float32 and bfloat16) is in "
                                  "goldens/ernie_image/sampling.safetensors, compared in test_ernie_image.py")
NO_NOISE_GOLDEN["nucleus_image"] = (
    "NucleusMoEImagePipeline._unpack_latents takes a patch size, so the packed-to-unpacked check here does not fit; "
    "test_nucleus_image.py compares the seed-42 draw with ai-toolkit's own sample path and with FLUX.1's packed key"
)
NO_NOISE_GOLDEN["prx_pixel"] = (
    "pixel space: ai-toolkit's draw is randn(1, 3, H, W) * 2.0 in float32, a layout initial_noise.safetensors does not "
    "hold; test_prx_pixel.py compares it with ai-toolkit's own generations (goldens/prx_pixel, seed 42, fp32 and bf16)"
)
NO_NOISE_GOLDEN["chroma_radiance"] = (
    "pixel space: ai-toolkit's draw is randn(1, 3, H, W) in the embeddings' dtype, a layout initial_noise.safetensors "
    "does not hold; test_chroma_radiance.py compares it bit for bit with the first transformer input of ai-toolkit's "
    "own seed-42 generation (goldens/chroma_radiance)"
)
NO_NOISE_GOLDEN["zimage_l2p"] = (
    "pixel space: ai-toolkit's draw is ZImagePipeline's randn(1, 3, H, W) in float32, a layout "
    "initial_noise.safetensors does not hold; test_zimage_l2p.py compares it with the first transformer input of "
    "ai-toolkit's own previews (goldens/zimage_l2p, seed 42, 64x64 and 96x64)"
)
NO_NOISE_GOLDEN["f_lite"] = (
    "F-Lite's loop calls no scheduler step to spy on and draws randn(1, 16, H/8, W/8) in the model dtype; "
    "test_f_lite.py compares the first DiT input with ai-toolkit's own previews (goldens/f_lite, seed 42, 64x64 and "
    "96x64)"
)
NO_NOISE_GOLDEN["hidream_o1"] = (
    "pixel space: ai-toolkit's draw is 8.0 * randn(1, 3, H, W) cast to bfloat16 and patchified, a layout "
    "initial_noise.safetensors does not hold; test_hidream_o1.py compares the first model input with ai-toolkit's own "
    "generations (goldens/hidream_o1, seed 42)"
)
NO_NOISE_GOLDEN["anima"] = (
    "Anima draws a 5-D (B, 16, 1, H/8, W/8) latent; tests/test_anima.py compares it bit for bit with ai-toolkit's own "
    "draw (goldens/anima) and with FLUX.1's unpacked float32 draw here, which holds the same numbers"
)
NO_NOISE_GOLDEN.update(dict.fromkeys(
    ("krea2", "krea2_turbo", "krea2_o_edit", "krea2_o_edit_turbo"),
    "Krea 2's own loop calls no scheduler step to spy on; test_krea2.py compares the latents the first transformer call "
    "receives with the draw of ai-toolkit's Krea2Pipeline (tests/goldens/krea2)",
))
NO_NOISE_GOLDEN.update(dict.fromkeys(
    ("boogu_image", "boogu_image_edit"),
    "Boogu-Image's own loop calls no scheduler step to spy on; test_boogu_image.py compares the latents the first "
    "transformer call receives with the seed-42 draw of ai-toolkit's BooguImagePipeline (tests/goldens/boogu_image)",
))
NO_NOISE_GOLDEN["ideogram4"] = ("ai-toolkit's seed-42 Ideogram 4 draw ((1, 128, h/16, w/16) times the first sigma) is "
                                "in goldens/ideogram4/sampling.safetensors, compared in test_ideogram4.py")
NO_NOISE_GOLDEN["minimax_h3"] = (
    "a packed video (1, 24, t, h, w) + audio (1, 2, 32, a) draw after the keyframe noise, a layout "
    "initial_noise.safetensors does not hold; test_minimax_h3.py compares the seed-42 rows with ai-toolkit's own sampler"
)
NO_NOISE_GOLDEN["minimax_h3_ref2va"] = (
    "as minimax_h3, with one noise draw per reference first; test_minimax_h3.py compares the seed-42 rows with "
    "ai-toolkit's own ref2va sampler"
)
NO_NOISE_GOLDEN["zeta_chroma"] = (
    "pixel space: ai-toolkit draws randn(B, patches, 3072) in the model dtype, in patch layout, which "
    "initial_noise.safetensors does not hold; test_zeta_chroma.py compares the seed-42 draw with ai-toolkit's own "
    "generation (goldens/zeta_chroma)"
)
NO_NOISE_GOLDEN.update(dict.fromkeys(
    ("mageflow", "mageflow_edit"),
    "Mage-Flow's own loop calls no scheduler step to spy on and draws a (1, 128, H/16, W/16) latent, a layout "
    "initial_noise.safetensors does not hold; test_mageflow.py compares the seed-42 draw with ai-toolkit's "
    "(tests/goldens/mageflow) and with the latents the first transformer call receives",
))
NO_NOISE_GOLDEN.update(dict.fromkeys(
    ("ace_step_15", "ace_step_15_xl"),
    "audio: a (1, 25 * duration, 64) draw in the model dtype, a layout initial_noise.safetensors does not hold; "
    "test_ace_step.py compares the seed-42 draw with the first transformer input of ai-toolkit's own preview"))
NO_NOISE_GOLDEN.update(dict.fromkeys(
    ("sd2", "ssd", "vega", "auraflow", "pixart", "pixart_sigma"),
    "4-channel SD-VAE latents (PixArt's at its aspect-ratio bin), a layout initial_noise.safetensors does not hold; "
    "ai-toolkit's seed-42 draws (goldens/legacy/initial_noise.safetensors) are compared in test_legacy.py",
))
NOISE_SIZES = [(64, 64), (512, 768)]  # (W, H) as in the golden keys

# ai-toolkit's size floor per family (ai-toolkit.md §2.2; 8 = only GenerateImageConfig's floor).
AITK_DIVISOR = {
    "flux": 16, "flex1": 16, "flux_kontext": 16, "flex2": 16, "chroma": 16, "flux2": 16, "flux2_diffusers": 16,
    "flux2_klein_4b": 16, "flux2_klein_9b": 16, "zimage": 16, "zimage_turbo": 16, "zimage_deturbo": 16, "zimage_l2p": 16,
    "qwen_image": 32,
    "qwen_image_2512": 32, "qwen_image_edit": 32, "qwen_image_edit_plus": 32, "qwen_image_edit_plus_2511": 32,
    "ltx2": 32, "ltx2.3": 32, "ltx2.5": 32, "wan22_5b": 32, "wan21_14b": 16, "wan21_1b": 16, "wan21_i2v_14b": 16,
    "wan21_i2v_14b480p": 16, "wan22_14b_t2v": 16, "wan22_14b_i2v": 16, "sd15": 8, "sdxl": 8, "hidream": 16,
    "omnigen2": 16, "ernie_image": 32, "nucleus_image": 32, "prx_pixel": 16, "anima": 32, "ideogram4": 16,
    # the 16-pixel patch: ai-toolkit's Radiance pipeline floors to 2 only, and off the 16 grid its model leaves the
    # last partial patch out of the patch tokens
    "chroma_radiance": 16,
    "f_lite": 16,
    "minimax_h3": 32, "minimax_h3_ref2va": 32,
    "zeta_chroma": 32,  # ZetaChromaModel.get_bucket_divisibility (patch 32); generate_single_image floors to it
    "hidream_o1": 32,  # HidreamO1Model.get_bucket_divisibility (the 32-pixel patch)
    # Krea2Model.get_bucket_divisibility (VAE 8 x patch 2); generate_single_image floors the sample size to it
    "krea2": 16, "krea2_turbo": 16, "krea2_o_edit": 16, "krea2_o_edit_turbo": 16,
    # BooguImageModel.get_bucket_divisibility (VAE 8 x patch 2); generate_single_image floors the sample size to it
    "boogu_image": 16, "boogu_image_edit": 16,
    # MageFlowModel.get_bucket_divisibility (VAE 16 x patch 1); generate_single_image floors the sample size to it
    "mageflow": 16, "mageflow_edit": 16,
    # audio only: ai-toolkit's sampler never reads the sample size (GenerateImageConfig's floor is all that applies)
    "ace_step_15": 8, "ace_step_15_xl": 8,
    # the legacy StableDiffusion class floors sample sizes to 8 only (GenerateImageConfig)
    "sd2": 8, "ssd": 8, "vega": 8, "pixart": 8, "pixart_sigma": 8,
}
NO_DIVISOR_GOLDEN = {
    **dict.fromkeys(("sd3", "auraflow"), "ai-toolkit floors to 8 only and the pipeline rejects sizes that are not "
                    "multiples of 16, so there is no floor of ai-toolkit's to compare; divisor 16 keeps every size it "
                    "can sample"),
    "lumina2": "ai-toolkit.md §2.2 gives Lumina2's floor as the pipeline default, unverified",
    "hidream_e1": "ai-toolkit.md §2.2 has no HiDream-E1 row",
    "cogview4": "ai-toolkit floors to 8 only and CogView4Pipeline rejects sizes that are not multiples of 16, so there "
                "is no floor of ai-toolkit's to compare; divisor 16 keeps every size it can sample",
}
GOLDEN_TABLES = {  # table name -> (id -> golden, id -> why there is no golden yet)
    "SCHEDULER_GOLDEN": (SCHEDULER_GOLDEN, NO_SCHEDULER_GOLDEN),
    "NOISE_GOLDEN": (NOISE_GOLDEN, NO_NOISE_GOLDEN),
    "AITK_DIVISOR": (AITK_DIVISOR, NO_DIVISOR_GOLDEN),
}


def _ids(table):
    """The ids of ``table`` in registry order."""
    return [model_id for model_id in REGISTRY if model_id in table]


@pytest.mark.parametrize("name", list(GOLDEN_TABLES))
def test_every_registry_id_has_a_golden_or_a_reason(name):
    """A registry id is either compared with a golden or listed, with a reason, as having none yet: never both,
    never neither (a newly registered id fails here until someone decides)."""
    table, no_golden = GOLDEN_TABLES[name]
    neither = [m for m in REGISTRY if m not in table and m not in no_golden]
    both = [m for m in REGISTRY if m in table and m in no_golden]
    unknown = sorted((set(table) | set(no_golden)) - set(REGISTRY))
    assert not neither, f"{name}: add a golden or a 'no golden yet' reason for {neither}"
    assert not both, f"{name}: {both} have a golden and a 'no golden yet' reason; keep one"
    assert not unknown, f"{name}: {unknown} are not registry ids"
    assert all(isinstance(reason, str) and reason.strip() for reason in no_golden.values())


@pytest.fixture(scope="module")
def scheduler_goldens():
    with open(os.path.join(GOLDENS_DIR, "schedulers.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def family_pipeline(load_tiny):
    """``family_pipeline(model_id, dtype="fp32")``: one tiny pipeline per (id, dtype) for this module."""
    cache = {}

    def get(model_id, dtype="fp32"):
        if (model_id, dtype) not in cache:
            cache[(model_id, dtype)] = load_tiny(model_id, dtype=dtype)
        return cache[(model_id, dtype)]

    return get


class _Captured(Exception):
    """Raised by a spy to stop generate() once the value under test has been seen."""


def _control_images(spec, width, height):
    """Grey control images for families that require them; None for the others."""
    import numpy as np

    if not spec.requires_control_image:
        return None
    return [np.full((height, width, 3), 0.5, np.float32)] * spec.control_images[0]


def _spy(obj, name, on_call):
    """Replace ``obj.name`` by a wrapper with the same signature (pipelines inspect it) that calls ``on_call``."""
    original = getattr(obj, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        return on_call(original, *args, **kwargs)

    setattr(obj, name, wrapper)
    return lambda: delattr(obj, name)


# ---------------------------------------------------------------------------------------------------------------- schedulers
def _run_shape(key):
    steps, width, height = map(int, re.match(r"steps(\d+)_w(\d+)_h(\d+)$", key).groups())
    return steps, width, height


def _wiring(model_id):
    """What decides an id's sampling code path: family class, diffusers pipeline, scheduler and tiny builder."""
    spec = REGISTRY[model_id]
    return spec.family, spec.pipeline_class, repr(spec.scheduler), spec.tiny


def _is_wiring_duplicate(model_id, table):
    """True when an earlier id of ``table`` has the same wiring (e.g. ``flex1`` after ``flux``)."""
    earlier = _ids(table)[: _ids(table).index(model_id)]
    return any(_wiring(m) == _wiring(model_id) for m in earlier)


def _runs_to_check(model_id, runs):
    """Only 64x64 for an id whose wiring repeats an earlier id's (same code path; keeps the suite fast); all recorded
    (steps, size) runs for the first id of each golden entry; 64x64 and 512x768 for the other ids."""
    first = next(m for m in _ids(SCHEDULER_GOLDEN) if SCHEDULER_GOLDEN[m] == SCHEDULER_GOLDEN[model_id])
    if _is_wiring_duplicate(model_id, SCHEDULER_GOLDEN):
        limit = 64 * 64
    elif model_id == first:
        return runs
    else:
        limit = 512 * 768
    return {key: run for key, run in runs.items() if _run_shape(key)[1] * _run_shape(key)[2] <= limit}


@pytest.mark.parametrize("model_id", _ids(SCHEDULER_GOLDEN))
def test_scheduler_timesteps_match_ai_toolkit(model_id, scheduler_goldens, family_pipeline):
    """generate() sets the exact timesteps/sigmas ai-toolkit samples with (spy on the real set_timesteps call)."""
    import torch

    golden = scheduler_goldens[SCHEDULER_GOLDEN[model_id]]
    pipeline = family_pipeline(model_id)
    scheduler = pipeline.pipe.scheduler
    seen = {}

    def capture(original, *args, **kwargs):
        original(*args, **kwargs)
        seen.update(kwargs=kwargs, timesteps=scheduler.timesteps.clone(), sigmas=scheduler.sigmas.clone())
        raise _Captured

    undo = _spy(scheduler, "set_timesteps", capture)
    try:
        for key, run in _runs_to_check(model_id, golden["runs"]).items():
            steps, width, height = _run_shape(key)
            seen.clear()
            with pytest.raises(_Captured):
                pipeline.generate(prompt="a photo", width=width, height=height, steps=steps, seed=0,
                                  control_images=_control_images(pipeline.spec, width, height))
            atol = FLOAT32_LINSPACE_ATOL.get(SCHEDULER_GOLDEN[model_id], 0.0)
            if "t_schedule_float32_list" in run:  # FLUX.2: BFL's schedule on a 0..1 scale, N+1 values
                expected_sigmas = torch.tensor(run["t_schedule_float32_list"], dtype=torch.float32)
                expected_timesteps = None
            else:
                expected_sigmas = torch.tensor(run["sigmas"], dtype=torch.float32)
                expected_timesteps = torch.tensor(run["timesteps"], dtype=torch.float32)
            sigmas = seen["sigmas"].to(torch.float32)
            assert sigmas.shape == expected_sigmas.shape, f"{model_id} {key}"
            torch.testing.assert_close(sigmas, expected_sigmas, rtol=0.0, atol=atol, msg=f"{model_id} {key} sigmas")
            if expected_timesteps is not None:
                torch.testing.assert_close(seen["timesteps"].to(torch.float32), expected_timesteps, rtol=0.0,
                                           atol=atol * 1000, msg=f"{model_id} {key} timesteps")
            if "mu" in run and scheduler.config.use_dynamic_shifting:  # a static shift ignores mu
                assert seen["kwargs"]["mu"] == pytest.approx(run["mu"], abs=1e-12), f"{model_id} {key} mu"
    finally:
        undo()


@pytest.mark.parametrize("model_id", [m for m in _ids(SCHEDULER_GOLDEN)
                                      if REGISTRY[m].scheduler is not None and SCHEDULER_GOLDEN[m] != "flux2"])
def test_registry_scheduler_config_matches_ai_toolkit(model_id, scheduler_goldens):
    """The registry restates ai-toolkit's scheduler config (class internals aside). FLUX.2 is left out: ai-toolkit
    builds that scheduler but samples with BFL's schedule (checked by the timesteps test above)."""
    golden = dict(scheduler_goldens[SCHEDULER_GOLDEN[model_id]]["scheduler_config"])
    for key in ("_class_name", "prediction_type"):  # ai-toolkit's subclass name; unused by flow matching
        golden.pop(key, None)
    if model_id in SCHEDULER_STATE_GOLDEN:
        golden["shift"] = _scheduler_state(model_id)["shift"]
    ours = dict(REGISTRY[model_id].scheduler.config)
    assert {k: ours.get(k) for k in golden} == golden


def _scheduler_state(model_id):
    with open(os.path.join(GOLDENS_DIR, SCHEDULER_STATE_GOLDEN[model_id])) as f:
        return json.load(f)["scheduler_state"]


def test_lumina2_sampler_drops_its_configured_shift(scheduler_goldens):
    """ai-toolkit's Lumina2 sampler states shift 6.0 in its config but samples with a shift of 1.0 (MANIFEST §6)."""
    state = _scheduler_state("lumina2")
    assert state["config_shift"] == scheduler_goldens["lumina2"]["scheduler_config"]["shift"] == 6.0
    assert (state["shift"], state["use_dynamic_shifting"]) == (1.0, False)


# ---------------------------------------------------------------------------------------------------------------- noise
def _noise_cases():
    """``flux``: every golden size and dtype; other ids: the non-square size in fp32 (catches a W/H swap), or 64x64
    for an id whose wiring repeats an earlier id's."""
    cases = []
    for model_id in _ids(NOISE_GOLDEN):
        if model_id == "flux":
            cases += [(model_id, dtype, size) for dtype in ("fp32", "bf16", "fp16") for size in NOISE_SIZES]
        else:
            cases.append((model_id, "fp32", (64, 64) if _is_wiring_duplicate(model_id, NOISE_GOLDEN) else (512, 768)))
    return cases


@pytest.mark.parametrize("model_id,dtype,size", _noise_cases())
def test_initial_noise_matches_ai_toolkit(model_id, dtype, size, family_pipeline):
    """The latents the first denoising step receives are ai-toolkit's seed-42 noise (CPU generator, latent dtype)."""
    import torch
    from safetensors.torch import load_file

    golden = load_file(os.path.join(GOLDENS_DIR, "noise", "initial_noise.safetensors"))
    width, height = size
    torch_dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
    key = f"{NOISE_GOLDEN[model_id]}_seed42_w{width}_h{height}_{torch_dtype}"
    pipeline = family_pipeline(model_id, dtype)
    seen = {}

    def capture(original, *args, **kwargs):
        seen["latents"] = (kwargs["sample"] if "sample" in kwargs else args[2]).detach().clone()
        raise _Captured

    undo = _spy(pipeline.pipe.scheduler, "step", capture)
    try:
        with pytest.raises(_Captured):
            pipeline.generate(prompt="a photo", width=width, height=height, steps=2, seed=42,
                              control_images=_control_images(pipeline.spec, width, height))
    finally:
        undo()
    latents = seen["latents"].cpu()
    layout = "packed" if latents.ndim == 3 else "unpacked"  # CogView4 denoises the unpacked (B, 16, H/8, W/8) draw
    expected = golden[f"{key}_{layout}"]
    assert latents.dtype == expected.dtype
    assert torch.equal(latents, expected), f"{model_id} {key}: initial noise differs from ai-toolkit's"
    if NOISE_GOLDEN[model_id] == "flux1" and layout == "packed":
        unpacked = pipeline.pipe._unpack_latents(latents, height, width, pipeline.pipe.vae_scale_factor)
        assert torch.equal(unpacked, golden[f"{key}_unpacked"])


# ---------------------------------------------------------------------------------------------------------------- LoRA files
def _load_inputs(path):
    from safetensors.torch import load_file

    return load_file(path)


def _flux_case():
    from diffusers import FluxTransformer2DModel

    root = os.path.join(GOLDENS_DIR, "lora_flux")
    inputs = _load_inputs(os.path.join(root, "inputs.safetensors"))
    model = FluxTransformer2DModel.from_pretrained(os.path.join(root, "base_transformer")).eval()

    def forward():
        import torch

        with torch.no_grad():
            return model(**inputs, return_dict=False)[0]

    return model, "transformer", forward


def _sdxl_case():
    from diffusers import UNet2DConditionModel

    root = os.path.join(GOLDENS_DIR, "lora_sdxl")
    inputs = _load_inputs(os.path.join(root, "inputs.safetensors"))
    model = UNet2DConditionModel.from_pretrained(os.path.join(root, "base_unet")).eval()

    def forward():
        import torch

        with torch.no_grad():
            return model(inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"],
                         added_cond_kwargs={"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}).sample

    return model, "unet", forward


LORA_GOLDEN_FILES = [
    ("lora_flux", "lora_r4_a2_fp16", "tiny_flux_lora_r4_a2_fp16.safetensors"),
    ("lora_flux", "lora_r4_a2_fp16", "tiny_flux_lora_r4_a2_fp16_fp32.safetensors"),
    ("lora_flux", "lokr_default", "tiny_flux_lokr_default.safetensors"),
    ("lora_sdxl", "lora_r4_a2_fp16", "tiny_sdxl_lora_r4_a2_fp16.safetensors"),
]
LORA_ATOL = 1e-6  # ai-toolkit's live vs merged outputs differ by up to 2e-7 themselves (MANIFEST §2)


@pytest.mark.parametrize("mode", ["dynamic", "fused"])
@pytest.mark.parametrize("case,variant,filename", LORA_GOLDEN_FILES)
def test_lora_file_reproduces_ai_toolkit_outputs(case, variant, filename, mode):
    """Each file ai-toolkit saved gives ai-toolkit's outputs at m=1.0, after an in-place change to 0.5, and from a
    fresh load at 0.5; unloading restores the base output; fused weights equal ai-toolkit's merge_in weights."""
    import torch
    from safetensors.torch import load_file

    from aitk_inference.pipelines.lora.stack import LoraRequest, LoraStack

    variant_dir = os.path.join(GOLDENS_DIR, case, variant)
    golden = load_file(os.path.join(variant_dir, "outputs.safetensors"))
    path = os.path.join(variant_dir, filename)
    build = _flux_case if case == "lora_flux" else _sdxl_case
    # dynamic mode matches ai-toolkit's live network, fused mode its merge_in (what it samples with by default)
    flavour = "live" if mode == "dynamic" else "merged"

    def expected(m):
        return golden.get(f"lora_{flavour}_m{m}", golden[f"lora_live_m{m}"])

    model, component, forward = build()
    base_output = forward()
    torch.testing.assert_close(base_output, golden["base_output"], rtol=0, atol=0)
    stack = LoraStack({component: model}, mode, component, case)
    summary = stack.set([LoraRequest(path=path, strength=1.0)])
    assert summary[0]["modules"] > 0
    torch.testing.assert_close(forward(), expected("1.0"), rtol=0, atol=LORA_ATOL)
    if mode == "fused":
        for name, weight in load_file(os.path.join(variant_dir, "effective_weights_m1.0.safetensors")).items():
            torch.testing.assert_close(model.get_parameter(name), weight, rtol=0, atol=LORA_ATOL, msg=name)

    stack.set([LoraRequest(path=path, strength=0.5)])
    assert stack.stats["adds"] == 1 and stack.stats["rescales"] == 1  # changed in place, not re-applied
    torch.testing.assert_close(forward(), expected("0.5"), rtol=0, atol=LORA_ATOL)
    stack.clear()
    # removing live PEFT adapters is exact; merged patches (fused mode, and LoKr in every mode) round once
    exact = mode == "dynamic" and variant.startswith("lora_")
    torch.testing.assert_close(forward(), base_output, rtol=0, atol=0 if exact else LORA_ATOL)

    model, component, forward = build()
    LoraStack({component: model}, mode, component, case).set([LoraRequest(path=path, strength=0.5)])
    torch.testing.assert_close(forward(), expected("0.5"), rtol=0, atol=LORA_ATOL)


def test_lokr_golden_stores_huge_alpha():
    """Guard for the LoKr case above: ai-toolkit really stored its 1e10 alpha, which a loader must ignore."""
    from safetensors.torch import load_file

    sd = load_file(os.path.join(GOLDENS_DIR, "lora_flux", "lokr_default", "tiny_flux_lokr_default.safetensors"))
    alphas = [float(v) for k, v in sd.items() if k.endswith(".alpha")]
    assert alphas and min(alphas) >= 1e9


# ---------------------------------------------------------------------------------------------------------------- behaviours
def _build(samples, **section):
    from aitk_inference.pipelines.jobs.config import build_samples

    return build_samples({"samples": samples, **section}, section.pop("trigger_word", None))


def test_walk_seed_uses_seed_plus_index():
    samples = _build([{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}], seed=42, walk_seed=True)
    assert [s.seed for s in samples] == [42, 43, 44]
    samples = _build([{"prompt": "a"}, {"prompt": "b", "seed": 7}, {"prompt": "c"}], seed=42, walk_seed=True)
    assert [s.seed for s in samples] == [42, 7, 44]  # walk_seed resets the running seed for each sample


def test_per_sample_seed_persists_without_walk_seed():
    samples = _build([{"prompt": "a"}, {"prompt": "b", "seed": 7}, {"prompt": "c --seed 99"}, {"prompt": "d"}],
                     seed=42, walk_seed=False)
    # the per-sample seed becomes the running seed; a --seed flag only changes its own sample
    assert [s.seed for s in samples] == [42, 7, 99, 7]
    assert [s.seed for s in _build([{"prompt": "a"}, {"prompt": "b"}])] == [0, 0]  # SampleConfig's default seed


def test_trigger_replaced_only_with_a_trigger_word():
    from aitk_inference.pipelines.prompts import inject_trigger

    assert inject_trigger("[trigger] on a beach", "p3r5on") == "p3r5on on a beach"
    assert inject_trigger("[name], [trigger]", "p3r5on") == "p3r5on, p3r5on"
    assert inject_trigger("[trigger] on a beach", None) == "[trigger] on a beach"
    assert inject_trigger("[trigger] on a beach", "") == " on a beach"
    assert _build([{"prompt": "[trigger] x --w 128"}], trigger_word="tok")[0].prompt == "tok x"
    assert _build([{"prompt": "[trigger] x"}])[0].prompt == "[trigger] x"


def test_prompt_flags_parsed_as_ai_toolkit():
    from aitk_inference.pipelines.prompts import parse_prompt_flags

    o = parse_prompt_flags("  a cat, photo --n ugly, blurry --w 768 --h 1024 --seed 7 --cfg 3.5 --steps 12 --m 0.5 "
                           "--frames 33 --fps 24 --ctrl_img /x/c.png --gr 0.7 --n2 dark --unknown 1  ")
    assert o.prompt == "a cat, photo"
    assert (o.negative, o.width, o.height, o.seed, o.guidance, o.steps) == ("ugly, blurry", 768, 1024, 7, 3.5, 12)
    assert (o.network_multiplier, o.num_frames, o.fps, o.ctrl_img, o.guidance_rescale) == (0.5, 33, 24, "/x/c.png", 0.7)
    assert o.unused == {"n2": "dark"}
    aliases = parse_prompt_flags("x --d 3 --l 2 --s 5 --network_multiplier -1 --num_frames 9")
    assert (aliases.seed, aliases.guidance, aliases.steps, aliases.network_multiplier, aliases.num_frames) == (3, 2.0, 5, -1.0, 9)
    assert parse_prompt_flags("x --seed 1 --d 2").seed == 2  # the later flag wins
    assert parse_prompt_flags("well--known --w 64").prompt == "well"  # every "--" starts a flag, as in ai-toolkit
    assert parse_prompt_flags("no flags").overrides() == {}
    with pytest.raises(ValueError, match="--w"):
        parse_prompt_flags("x --w wide")
    # flags override the per-sample and section values
    s = _build([{"prompt": "x --w 200 --steps 3 --m 0.25", "width": 100, "sample_steps": 9, "network_multiplier": 2}],
               width=300, height=90, guidance_scale=5, neg="bad")[0]
    assert (s.width, s.height, s.steps, s.guidance, s.network_multiplier, s.negative) == (200, 88, 3, 5.0, 0.25, "bad")


def test_text_encoder_prompts_match_ai_toolkit():
    """ai-toolkit's GenerateImageConfig on six sample prompts (goldens/prompt_flags.json): ``--n`` reaches the first
    text encoder only, the second keeps the job's ``neg``; ``--p2``/``--n2`` are overwritten; ``--gr`` and the
    section's ``guidance_rescale`` set the rescale."""
    with open(os.path.join(GOLDENS_DIR, "prompt_flags.json")) as f:
        cases = json.load(f)["cases"]
    for case in cases:
        given = case["input"]
        sample = _build([{"prompt": given["prompt"], "neg": given["neg"]}],
                        guidance_rescale=given["guidance_rescale"])[0]
        assert case["prompt_2"] == case["prompt"] == sample.prompt, given  # both encoders get the prompt
        assert (sample.negative, sample.negative_2) == (case["negative_prompt"], case["negative_prompt_2"]), given
        assert sample.guidance_rescale == case["guidance_rescale"], given
    assert any(case["negative_prompt"] != case["negative_prompt_2"] for case in cases)


def test_size_floor_matches_ai_toolkit():
    """GenerateImageConfig floors to 8 (min 64), then the family floors to its divisor (ai-toolkit.md §6.12, §7)."""
    from aitk_inference.pipelines.base import snap_size

    expected = {8: (1000, 696), 16: (992, 688), 32: (992, 672)}
    assert _build([{"prompt": "x", "width": 1000, "height": 700}])[0].width == 1000
    assert _build([{"prompt": "x", "width": 1000, "height": 700}])[0].height == 696
    assert _build([{"prompt": "x", "width": 60, "height": 90}])[0].width == 64
    for model_id in _ids(AITK_DIVISOR):
        divisor = AITK_DIVISOR[model_id]
        assert REGISTRY[model_id].divisor == divisor, f"{model_id}: ai-toolkit floors to {divisor}"
    for model_id, spec in REGISTRY.items():
        assert (snap_size(1000, spec.divisor), snap_size(700, spec.divisor)) == expected[spec.divisor], model_id
    assert snap_size(60, 16) == 64 and snap_size(90, 16) == 80


def test_generate_reports_floored_size(load_tiny):
    pipeline = load_tiny("flux")
    params = pipeline.resolve_params("x", width=1000, height=700)
    assert (params.width, params.height) == (992, 688)


# ---------------------------------------------------------------------------------------------------------------- LoRA maths
@pytest.fixture(scope="module")
def tiny_transformer():
    """The tiny FLUX transformer, fixed inputs and its base output."""
    import torch

    from aitk_inference.tiny.flux import flux_transformer

    model = flux_transformer().eval()
    g = torch.Generator().manual_seed(3)
    inputs = {
        "hidden_states": torch.randn(1, 16, 64, generator=g), "encoder_hidden_states": torch.randn(1, 6, 32, generator=g),
        "pooled_projections": torch.randn(1, 32, generator=g), "timestep": torch.tensor([0.75]),
        "guidance": torch.tensor([3.5]), "txt_ids": torch.zeros(6, 3),
        "img_ids": torch.stack([torch.zeros(16), torch.arange(16) // 4, torch.arange(16) % 4], -1).float(),
    }

    def forward():
        with torch.no_grad():
            return model(**inputs, return_dict=False)[0]

    return model, forward


def _write(tmp_path, name, state_dict, metadata=None):
    from safetensors.torch import save_file

    path = str(tmp_path / f"{name}.safetensors")
    save_file({k: v.contiguous() for k, v in state_dict.items()}, path, metadata=metadata)
    return path


def _expected_delta(layout, sd, name):
    """ai-toolkit's delta for one module, written out per layout (rank 4, alpha 2 where a layout stores alpha)."""
    import torch

    if layout == "peft":  # alpha was forced to rank at training time: scale 1
        return sd[f"transformer.{name}.lora_B.weight"] @ sd[f"transformer.{name}.lora_A.weight"]
    if layout == "kohya":  # alpha / rank = 2 / 4
        key = f"lora_transformer_{name.replace('.', '_')}"
        return 0.5 * sd[f"{key}.lora_up.weight"] @ sd[f"{key}.lora_down.weight"]
    if layout == "down_up_alpha":
        return 0.5 * sd[f"transformer.{name}.lora_up.weight"] @ sd[f"transformer.{name}.lora_down.weight"]
    if layout == "lokr":  # full-rank factors: the stored 1e10 alpha is ignored
        return torch.kron(sd[f"transformer.{name}.lokr_w1"], sd[f"transformer.{name}.lokr_w2"])
    return sd[f"transformer.{name}.diff"]  # full layer: added as is


@pytest.mark.parametrize("layout", ["peft", "kohya", "down_up_alpha", "lokr", "full"])
def test_lora_scale_rules(layout, tiny_transformer, tmp_path):
    """PEFT: scale 1 even when the metadata claims alpha 2 / rank 4; kohya: alpha/rank; full-rank LoKr: the stored
    1e10 alpha is ignored; .diff: added as is."""
    import torch

    from aitk_inference.pipelines.lora.stack import LoraRequest, LoraStack
    from aitk_inference.tiny.loras import lora_targets, make_state_dict

    model, _ = tiny_transformer
    targets = lora_targets(model, limit=4)
    sd = make_state_dict(layout, targets, rank=4, alpha=2.0)
    metadata = {"ss_network_alpha": "2", "ss_network_dim": "4", "lora_alpha": "2"} if layout == "peft" else None
    path = _write(tmp_path, layout, sd, metadata)
    before = {name: module.weight.detach().clone() for name, module in targets}
    stack = LoraStack({"transformer": model}, "fused", "transformer", "flux")
    stack.set([LoraRequest(path=path, strength=1.0)])
    try:
        for name, module in targets:
            torch.testing.assert_close(module.weight.detach() - before[name], _expected_delta(layout, sd, name),
                                       rtol=1e-5, atol=1e-6, msg=name)
    finally:
        stack.clear()


def test_lokr_with_inf_alpha_is_full_scale(tiny_transformer, tmp_path):
    """An fp16 save turns ai-toolkit's 9999999999 alpha into inf; full-rank LoKr must still have scale 1."""
    import torch

    from aitk_inference.pipelines.lora.stack import LoraRequest, LoraStack
    from aitk_inference.tiny.loras import lora_targets, make_state_dict

    model, _ = tiny_transformer
    targets = lora_targets(model, limit=2)
    sd = {k: (torch.tensor(float("inf"), dtype=torch.float16) if k.endswith(".alpha") else v.half())
          for k, v in make_state_dict("lokr", targets).items()}
    name, module = targets[0]
    before = module.weight.detach().clone()
    stack = LoraStack({"transformer": model}, "fused", "transformer", "flux")
    stack.set([LoraRequest(path=_write(tmp_path, "lokr_inf", sd))])
    try:
        expected = torch.kron(sd[f"transformer.{name}.lokr_w1"].float(), sd[f"transformer.{name}.lokr_w2"].float())
        torch.testing.assert_close(module.weight.detach() - before, expected, rtol=1e-5, atol=1e-6)
    finally:
        stack.clear()


def test_diff_bias_added_as_is(tiny_transformer, tmp_path):
    import torch

    from aitk_inference.pipelines.lora.stack import LoraRequest, LoraStack
    from aitk_inference.tiny.loras import lora_targets, make_state_dict

    model, _ = tiny_transformer
    targets = lora_targets(model, limit=2)
    sd = make_state_dict("full", targets)
    name, module = targets[0]
    bias = module.bias.detach().clone()
    stack = LoraStack({"transformer": model}, "dynamic", "transformer", "flux")
    stack.set([LoraRequest(path=_write(tmp_path, "full", sd), strength=0.5)])
    torch.testing.assert_close(module.bias.detach() - bias, 0.5 * sd[f"transformer.{name}.diff_b"], rtol=1e-5, atol=1e-7)
    stack.clear()
    torch.testing.assert_close(module.bias.detach(), bias, rtol=0, atol=1e-7)


@pytest.mark.parametrize("mode", ["dynamic", "fused"])
def test_multiplier_is_linear_and_zero_is_base(mode, tiny_transformer, tmp_path):
    """A patched layer computes W x + m * dW x (linear in m); m = 0 leaves the whole model bit-exact."""
    import torch

    from aitk_inference.pipelines.lora.stack import LoraRequest, LoraStack
    from aitk_inference.tiny.loras import lora_targets, write_lora

    model, forward = tiny_transformer
    targets = lora_targets(model)
    path = write_lora(str(tmp_path / "peft.safetensors"), "peft", targets)
    name, _ = targets[0]
    x = torch.randn(3, model.get_submodule(name).in_features, generator=torch.Generator().manual_seed(5))
    base_output = forward()
    with torch.no_grad():
        base_layer = model.get_submodule(name)(x)
    stack = LoraStack({"transformer": model}, mode, "transformer", "flux")
    stack.set([LoraRequest(path=path, strength=0.0)])
    assert torch.equal(forward(), base_output)
    outputs = {}
    for m in (1.0, 0.5, -1.0, 2.0):
        stack.set([LoraRequest(path=path, strength=m)])
        with torch.no_grad():
            outputs[m] = model.get_submodule(name)(x) - base_layer
    assert outputs[1.0].abs().max() > 1e-2
    for m in (0.5, -1.0, 2.0):
        torch.testing.assert_close(outputs[m], m * outputs[1.0], rtol=1e-5, atol=1e-5)
    stack.clear()
    torch.testing.assert_close(forward(), base_output, rtol=0, atol=0 if mode == "dynamic" else 1e-6)
