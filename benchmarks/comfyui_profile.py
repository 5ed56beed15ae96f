"""Where the eager FLUX.1-dev forward differs between ours and ComfyUI's: the CUDA kernels of one forward of each, by
category (GEMM, attention, other) with the top kernels, same random weights and inputs, one process. GPU only:

    python3 -m aitk_inference.benchmarks.comfyui_profile COMFYUI_DIR      # writes comfyui_profile.json to $OUT or .
"""

import os
import sys


def main(argv=None) -> int:
    import torch

    from ..pipelines.families.pixel_space import unpatchify_pixels
    from .comfyui_reference import comfyui_missing, import_comfy
    from .harness import timed, write_result
    from .models import WORKLOADS, build_transformer, forward_inputs
    from .step_profile import kernel_breakdown

    comfy_dir = (argv or sys.argv[1:] or [os.environ.get("COMFYUI_DIR", "")])[0]
    why = comfyui_missing(comfy_dir)
    if why:
        print(why)
        return 1
    comfy, _ = import_comfy(comfy_dir, "cuda")
    workload = WORKLOADS["full"]["flux"]
    model = build_transformer("flux", "full", "cuda", torch.bfloat16)
    inputs = forward_inputs("flux", model, workload)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}

    def ours(denoiser=model):
        with torch.inference_mode():
            return denoiser(**inputs)

    result["ours_ms"] = round(timed(ours, "cuda", 2, 10) * 1000, 2)
    result["ours"] = kernel_breakdown(ours)
    latents = unpatchify_pixels(inputs["hidden_states"], workload.height, workload.width, 2)
    weights = {name: tensor.to("cpu") for name, tensor in model.state_dict().items()}
    del model, ours
    torch.cuda.empty_cache()
    with torch.inference_mode():
        patcher = comfy.sd.load_diffusion_model_state_dict(weights, model_options={"dtype": torch.bfloat16})
        comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    comfy_inputs = dict(x=latents, t=inputs["timestep"], c_crossattn=inputs["encoder_hidden_states"],
                        y=inputs["pooled_projections"], guidance=inputs["guidance"])

    def theirs():
        with torch.inference_mode():
            return patcher.model.apply_model(**comfy_inputs, transformer_options={"wrappers": patcher.wrappers})

    result["comfyui_ms"] = round(timed(theirs, "cuda", 2, 10) * 1000, 2)
    result["comfyui"] = kernel_breakdown(theirs)
    result["ratio_ours_vs_comfyui"] = round(result["ours_ms"] / result["comfyui_ms"], 3)
    write_result(os.environ.get("OUT", "."), "comfyui_profile", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
