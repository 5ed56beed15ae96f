"""ai-toolkit's own preview path on a FULL-SIZE random-weight folder (FLUX.1-dev, Qwen-Image or Wan 2.2 A14B T2V), on
the GPU in bf16: a job folder (config.yaml, the LoRA saved by ai-toolkit's network, samples/*) that `reproduce` then
renders with each of our modes. The same stand-in trainer and compiled sample() as the end-to-end goldens
(tests/goldens/MANIFEST.md section 15). Video previews: the frames ai-toolkit handed to its WEBP writer are kept as
frames_before_webp.npz (key = sample index), so that the comparison can be made before the lossy codec too.

    AITK_DIR=... AITK_DIFFUSERS_SRC=... PYTHONPATH=$AITK_DIFFUSERS_SRC:$AITK_DIR:<optimum-quanto>:<site> \
        python make_fullsize_job.py ARCH BASE_FOLDER JOB_DIR [cuda|cpu] [bf16|fp32] [STEPS] [LORA_STD]
"""
import ast
import os
import shutil
import sys
import time

import aitk_shims

aitk_shims.install()

import torch  # noqa: E402
import yaml  # noqa: E402

from toolkit.config_modules import GenerateImageConfig, ModelConfig, NetworkConfig, SampleConfig  # noqa: E402
from toolkit.lora_special import LoRASpecialNetwork  # noqa: E402
from toolkit.metadata import get_meta_for_safetensors  # noqa: E402

STEP = 10


def compiled_sample():
    path = os.path.join(os.environ["AITK_DIR"], "jobs/process/BaseSDTrainProcess.py")
    cls = next(n for n in ast.parse(open(path).read()).body
               if isinstance(n, ast.ClassDef) and n.name == "BaseSDTrainProcess")
    method = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "sample")
    from toolkit.print import print_acc

    class _Never:
        pass

    namespace = dict(os=os, flush=lambda: None, GenerateImageConfig=GenerateImageConfig, print_acc=print_acc,
                     ClipVisionAdapter=_Never, CustomAdapter=_Never)
    exec(compile(ast.Module(body=[method], type_ignores=[]), path, "exec"), namespace)
    return namespace["sample"]


class Trainer:
    class accelerator:
        is_main_process = True

    adapter_config = adapter = embedding = ema = logger = None

    def __init__(self, sd, sample_config, trigger_word, save_root):
        self.sd, self.sample_config, self.first_sample_config = sd, sample_config, sample_config
        self.trigger_word, self.save_root = trigger_word, save_root

    def post_process_generate_image_config_list(self, configs):
        return configs


LEGACY = ("toolkit.stable_diffusion_model", "StableDiffusion")
EXTENSIONS = "extensions_built_in.diffusion_models."
#: arch -> ai-toolkit's model class, the job's sample section (the prompts use ai-toolkit's prompt flags)
JOBS = {
    "flux": dict(cls=LEGACY, sample=dict(
        sampler="flowmatch", width=1024, height=1024, guidance_scale=3.5, neg="",
        samples=[dict(prompt="[trigger] on a beach"),
                 dict(prompt="a photo of [trigger] --w 768 --h 1024 --seed 7 --cfg 3")])),
    "qwen_image": dict(cls=(EXTENSIONS + "qwen_image.qwen_image", "QwenImageModel"), sample=dict(
        sampler="flowmatch", width=1024, height=1024, guidance_scale=4, neg="blurry",
        samples=[dict(prompt="[trigger] on a beach"),
                 dict(prompt="a photo of [trigger] --w 768 --h 1024 --seed 7 --cfg 3 --n low quality")])),
    "wan22_14b": dict(cls=(EXTENSIONS + "wan22.wan22_14b_model", "Wan2214bModel"), sample=dict(
        sampler="flowmatch", width=832, height=480, guidance_scale=4, neg="blurry", num_frames=33, fps=16,
        samples=[dict(prompt="[trigger] walking on a beach"),
                 dict(prompt="[trigger] in snow --frames 17 --seed 7 --cfg 3")])),
}


def load_class(module_path, class_name):
    from importlib import import_module

    return getattr(import_module(module_path), class_name)


def make_network(sd, process):
    """The network as ai-toolkit's trainer builds it for this model (its target modules, flags from the model config)."""
    net_config = NetworkConfig(**process["network"])
    network_kwargs = dict(net_config.network_kwargs)
    if hasattr(sd, "target_lora_modules"):
        network_kwargs["target_lin_modules"] = sd.target_lora_modules
    mc = sd.model_config
    network = LoRASpecialNetwork(
        text_encoder=sd.text_encoder, unet=sd.get_model_to_train(), lora_dim=net_config.linear, multiplier=1.0,
        alpha=net_config.linear_alpha, train_unet=True, train_text_encoder=False, conv_lora_dim=net_config.conv,
        conv_alpha=net_config.conv_alpha, is_sdxl=mc.is_xl or mc.is_ssd, is_v2=mc.is_v2, is_v3=mc.is_v3,
        is_pixart=mc.is_pixart, is_auraflow=mc.is_auraflow, is_flux=mc.is_flux, is_lumina2=mc.is_lumina2,
        is_ssd=mc.is_ssd, is_vega=mc.is_vega, dropout=net_config.dropout, use_text_encoder_1=mc.use_text_encoder_1,
        use_text_encoder_2=mc.use_text_encoder_2, use_bias=False, is_lorm=False, network_config=net_config,
        network_type=net_config.type, transformer_only=net_config.transformer_only, is_transformer=sd.is_transformer,
        base_model=sd, **network_kwargs,
    )
    network.force_to(sd.device_torch, dtype=torch.float32)
    sd.network = network
    network._update_torch_multiplier()
    network.apply_to(sd.text_encoder, sd.unet, False, True)
    return network


def main(arch, base, job_dir, device="cuda", dtype="bf16", steps=8, lora_std=0.01):
    steps, lora_std = int(steps), float(lora_std)
    job = JOBS[arch]
    name = f"{arch}_fullsize"
    shutil.rmtree(job_dir, ignore_errors=True)
    os.makedirs(job_dir)
    sample = dict(job["sample"], seed=42, walk_seed=True, sample_steps=steps, format="png")
    process = {"type": "sd_trainer", "training_folder": "output", "device": device, "trigger_word": "p3r5on",
               "network": {"type": "lora", "linear": 16, "linear_alpha": 16},
               "save": {"dtype": "bfloat16", "save_every": STEP},
               "train": {"steps": STEP, "dtype": dtype, "train_unet": True, "train_text_encoder": False},
               "model": {"arch": arch, "name_or_path": f"random/{arch}", "quantize": False, "quantize_te": False},
               "sample": sample}
    with open(os.path.join(job_dir, "config.yaml"), "w") as f:
        yaml.safe_dump({"job": "extension", "config": {"name": name, "process": [process]},
                        "meta": {"name": "[name]", "version": "1.0"}}, f, sort_keys=False)
    started = time.perf_counter()
    model_class = load_class(*job["cls"])
    if getattr(model_class, "_wan_vae_path", None):  # Wan 2.2 A14B reads its VAE from a hub repo: the folder's own
        model_class._wan_vae_path = os.path.join(base, "vae")
    sd = model_class(device=device, model_config=ModelConfig(**{**process["model"], "name_or_path": base,
                                                                "dtype": dtype}), dtype=dtype)
    sd.load_model()
    print(f"[aitk] loaded in {time.perf_counter() - started:.1f}s", flush=True)
    network = make_network(sd, process)
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():  # "trained" weights, exact in the bf16 save dtype
        for p in network.parameters():
            p.copy_((torch.randn(p.shape, generator=g) * lora_std).to(torch.bfloat16).float())
    save_path = os.path.join(job_dir, f"{name}_{STEP:09d}.safetensors")
    meta = get_meta_for_safetensors({"name": "[name]", "version": "1.0", "training_info": {"step": STEP, "epoch": 0},
                                     "ss_base_model_version": sd.get_base_model_version(),
                                     "ss_output_name": name}, os.path.basename(save_path))
    network.save_weights(save_path, dtype=torch.bfloat16, metadata=meta)
    raw_frames = {}
    original_save = GenerateImageConfig.save_image

    def save_and_keep(self, image, count=0, max_count=0):
        if isinstance(image, list):  # a video: the frames before the WEBP encoder
            import numpy as np
            raw_frames[str(count)] = np.stack([np.asarray(f.convert("RGB")) for f in image])
        return original_save(self, image, count, max_count)

    GenerateImageConfig.save_image = save_and_keep
    started = time.perf_counter()
    compiled_sample()(Trainer(sd, SampleConfig(**sample), process["trigger_word"], job_dir), step=STEP)
    print(f"[aitk] sampled in {time.perf_counter() - started:.1f}s", flush=True)
    if raw_frames:
        import numpy as np
        np.savez_compressed(os.path.join(job_dir, "frames_before_webp.npz"), **raw_frames)
    shutil.rmtree(os.path.join(job_dir, "samples", ".thumbs"), ignore_errors=True)
    shutil.rmtree(os.path.join(job_dir, "samples", ".tmp"), ignore_errors=True)
    print(sorted(os.listdir(os.path.join(job_dir, "samples"))))


if __name__ == "__main__":
    main(*sys.argv[1:])
