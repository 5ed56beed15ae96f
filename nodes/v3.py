"""V3 front end (``comfy_api.latest``): schema classes built from ``schema.py`` that delegate to ``core``.

Imported only inside a ComfyUI that has ``comfy_api`` (see ``nodes/__init__.py``).
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import core
from .schema import (APPLY, CATEGORY, JOB_PREVIEWS, JOB_TYPE, LOAD, PIPELINE_TYPE, SAMPLE, TRAINING_JOB, Field,
                     NodeSpec)

PipelineType = io.Custom(PIPELINE_TYPE)
JobType = io.Custom(JOB_TYPE)

_IO_TYPES = {"COMBO": io.Combo, "STRING": io.String, "INT": io.Int, "FLOAT": io.Float, "BOOLEAN": io.Boolean,
             "IMAGE": io.Image, "AUDIO": io.Audio,
             PIPELINE_TYPE: PipelineType, JOB_TYPE: JobType}


def _input(field: Field):
    kwargs = {"optional": field.optional, **field.widget_options()}
    if field.type == "COMBO":
        kwargs["options"] = field.options()
    return _IO_TYPES[field.type].Input(field.name, **kwargs)


def _schema(spec: NodeSpec) -> io.Schema:
    return io.Schema(
        node_id=spec.node_id,
        display_name=spec.display_name,
        category=CATEGORY,
        description=spec.description,
        inputs=[_input(field) for field in spec.inputs],
        outputs=[_IO_TYPES[o.type].Output(display_name=o.name, tooltip=o.tooltip) for o in spec.outputs],
    )


class AITKLoadPipeline(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema(LOAD)

    @classmethod
    def validate_inputs(cls, base_file=None, text_encoder_file=None, text_encoder_2_file=None,
                        vae_file=None) -> bool | str:
        return core.load_input_problem(base_file, text_encoder_file=text_encoder_file,
                                       text_encoder_2_file=text_encoder_2_file, vae_file=vae_file)

    @classmethod
    def execute(cls, **inputs) -> io.NodeOutput:
        return io.NodeOutput(core.load(**inputs))


class AITKApplyLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema(APPLY)

    @classmethod
    def validate_inputs(cls, lora) -> bool | str:
        return core.lora_input_problem(lora)

    @classmethod
    def fingerprint_inputs(cls, lora, **kwargs) -> str:
        return core.lora_fingerprint(lora)

    @classmethod
    def execute(cls, pipeline, lora, strength, transformer) -> io.NodeOutput:
        return io.NodeOutput(core.apply_lora(pipeline, lora, strength, transformer))


class AITKSample(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema(SAMPLE)

    @classmethod
    def execute(cls, pipeline, **inputs) -> io.NodeOutput:
        out = core.sample(pipeline, **inputs)
        return io.NodeOutput(*out.result(), ui=out.ui())


class AITKTrainingJob(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema(TRAINING_JOB)

    @classmethod
    def fingerprint_inputs(cls, job_folder, **kwargs) -> str:
        return core.job_fingerprint(job_folder)

    @classmethod
    def execute(cls, **inputs) -> io.NodeOutput:
        return io.NodeOutput(*core.training_job(**inputs))


class AITKJobPreviews(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema(JOB_PREVIEWS)

    @classmethod
    def execute(cls, job, **inputs) -> io.NodeOutput:
        return io.NodeOutput(core.job_previews(job, **inputs))


class AITKExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [AITKLoadPipeline, AITKApplyLoRA, AITKSample, AITKTrainingJob, AITKJobPreviews]


async def comfy_entrypoint() -> AITKExtension:
    return AITKExtension()
