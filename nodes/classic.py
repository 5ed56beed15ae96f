"""Classic-API (``NODE_CLASS_MAPPINGS``) front end, for ComfyUI versions without ``comfy_api``; see ``v3.py``."""

from __future__ import annotations

from . import core
from .schema import APPLY, CATEGORY, JOB_PREVIEWS, LOAD, SAMPLE, TRAINING_JOB, Field, NodeSpec


def _input(field: Field) -> tuple:
    options = field.widget_options()
    if field.type == "COMBO":
        return field.options(), options
    return field.type, options


def input_types(spec: NodeSpec) -> dict:
    """``INPUT_TYPES`` of a node spec: required, then optional inputs, in the spec's order."""
    out = {"required": {}}
    for field in spec.inputs:
        out.setdefault("optional" if field.optional else "required", {})[field.name] = _input(field)
    return out


class _ClassicNode:
    SPEC: NodeSpec
    CATEGORY = CATEGORY
    FUNCTION = "run"

    def __init_subclass__(cls):
        cls.RETURN_TYPES = tuple(o.type for o in cls.SPEC.outputs)
        cls.RETURN_NAMES = tuple(o.name for o in cls.SPEC.outputs)
        cls.OUTPUT_TOOLTIPS = tuple(o.tooltip for o in cls.SPEC.outputs)
        cls.DESCRIPTION = cls.SPEC.description

    @classmethod
    def INPUT_TYPES(cls):
        return input_types(cls.SPEC)


class AITKLoadPipeline(_ClassicNode):
    SPEC = LOAD

    @classmethod
    def VALIDATE_INPUTS(cls, base_file=None, text_encoder_file=None, text_encoder_2_file=None, vae_file=None):
        return core.load_input_problem(base_file, text_encoder_file=text_encoder_file,
                                       text_encoder_2_file=text_encoder_2_file, vae_file=vae_file)

    def run(self, **inputs):
        return (core.load(**inputs),)


class AITKApplyLoRA(_ClassicNode):
    SPEC = APPLY

    @classmethod
    def VALIDATE_INPUTS(cls, lora):
        return core.lora_input_problem(lora)

    @classmethod
    def IS_CHANGED(cls, lora, **kwargs):
        return core.lora_fingerprint(lora)

    def run(self, pipeline, lora, strength, transformer):
        return (core.apply_lora(pipeline, lora, strength, transformer),)


class AITKSample(_ClassicNode):
    SPEC = SAMPLE

    def run(self, pipeline, **inputs):
        out = core.sample(pipeline, **inputs)
        return {"ui": out.ui(), "result": out.result()}


class AITKTrainingJob(_ClassicNode):
    SPEC = TRAINING_JOB

    @classmethod
    def IS_CHANGED(cls, job_folder, **kwargs):
        return core.job_fingerprint(job_folder)

    def run(self, **inputs):
        return core.training_job(**inputs)


class AITKJobPreviews(_ClassicNode):
    SPEC = JOB_PREVIEWS

    def run(self, job, **inputs):
        return (core.job_previews(job, **inputs),)


NODE_CLASS_MAPPINGS = {cls.SPEC.node_id: cls for cls in (AITKLoadPipeline, AITKApplyLoRA, AITKSample,
                                                         AITKTrainingJob, AITKJobPreviews)}
NODE_DISPLAY_NAME_MAPPINGS = {cls.SPEC.node_id: cls.SPEC.display_name for cls in NODE_CLASS_MAPPINGS.values()}
