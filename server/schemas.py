"""Request and response models. Field names are the reference implementation's, so its clients work unchanged;
:mod:`.mapping` is the one place they are mapped onto the library's parameter names."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from ..pipelines.lora import STRENGTH_RANGE

#: length caps of the free-text fields, in characters (a prompt is far shorter than any text encoder's window)
MAX_PROMPT_CHARS = 10_000
MAX_NAME_CHARS = 1_000
MAX_URL_CHARS = 4_096
#: most generation options one request may set (no model takes more than a few)
MAX_OPTIONS = 16

TaskStatus = Literal["in_queue", "in_progress", "succeeded", "failed", "canceled"]
FINISHED = ("succeeded", "failed", "canceled")


# ---------------------------------------------------------------------------------------------------------------- request
class RequestModel(BaseModel):
    """Request bodies: an unknown field is an error (a typo such as ``sample_step`` must not silently run with the
    default), and NaN/Infinity are not numbers."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class LoraItem(RequestModel):
    path: str = Field(..., max_length=MAX_URL_CHARS, description="File relative to WORKFLOWS_BASE_PATH, or an http(s) URL of a .safetensors file.")
    transformer: Optional[Literal["low", "high", "uncond"]] = Field(
        None, description="MoE models only: the expert this LoRA is for (low/high). Ideogram 4 only: uncond, a LoRA "
                          "for the unconditional CFG pass only (ai-toolkit's unconditional LoRA).")
    network_multiplier: Optional[float] = Field(None, ge=STRENGTH_RANGE[0], le=STRENGTH_RANGE[1], description="LoRA strength (library: strength), default 1.0.")


class PromptItem(RequestModel):
    prompt: str = Field(..., max_length=MAX_PROMPT_CHARS)
    trigger_word: Optional[str] = Field(None, max_length=MAX_NAME_CHARS, description="Overrides the request's trigger_word for this prompt.")
    width: Optional[int] = Field(None, ge=64, le=4096)
    height: Optional[int] = Field(None, ge=64, le=4096)
    guidance_scale: Optional[float] = Field(None, ge=0.0, le=20.0, description="Library: guidance.")
    sample_steps: Optional[int] = Field(None, ge=1, le=150, description="Library: steps.")
    neg: Optional[str] = Field(None, max_length=MAX_PROMPT_CHARS, description="Negative prompt (library: negative).")
    seed: Optional[int] = Field(None, ge=-1, le=2**63 - 1, description="-1 draws a random seed; the result reports it.")
    sampler: Optional[str] = Field(None, max_length=MAX_NAME_CHARS, description="Accepted for compatibility and ignored: each model samples with "
                                                     "the scheduler ai-toolkit uses for it.")
    num_frames: Optional[int] = Field(None, ge=1, le=1000)
    fps: Optional[int] = Field(None, ge=1, le=120)
    resolution: Optional[Literal["Default", "High"]] = Field(None, description="Accepted for compatibility and ignored.")
    ctrl_img: Optional[str] = Field(None, description="Control image: base64 (optionally a data: URL) or an http(s) URL.")
    ctrl_img_1: Optional[str] = None
    ctrl_img_2: Optional[str] = None
    ctrl_img_3: Optional[str] = None


class InferenceInput(RequestModel):
    model: str = Field(..., max_length=MAX_NAME_CHARS, description="A model id from GET /v1/models.")
    loras: list[LoraItem] = Field(..., description="At least one LoRA; several are stacked.")
    hf_token: Optional[str] = Field(None, max_length=MAX_NAME_CHARS, description="Used for this request's URL-LoRA downloads only (never stored).")
    trigger_word: Optional[str] = Field(None, max_length=MAX_NAME_CHARS, description="Replaces [trigger] in the prompts.")
    prompts: list[PromptItem] = Field(..., min_length=1, max_length=64)
    kv_cache: Optional[bool] = Field(None, description="Passed to families that take it.")
    match_target_res: Optional[bool] = Field(None, description="Passed to families that take it.")
    options: Optional[dict[str, Union[StrictBool, StrictInt, float, str, None]]] = Field(
        None, max_length=MAX_OPTIONS, description="This server's extension: the model's own generation options (its "
        "docs page lists them; the CLI's --option), e.g. {\"schedule_mu\": 0.8}; a name the model does not take fails "
        "the request with the ones it takes.")
    output_format: Literal["png", "jpeg", "webp"] = Field(
        "png", description="Image format; PNG carries the generation parameters in a 'parameters' text chunk. Video "
        "models write MP4 (H.264, with the audio track when the model makes one), or animated WEBP for 'webp'.")


# ---------------------------------------------------------------------------------------------------------------- responses
class ErrorBody(BaseModel):
    code: str
    message: str
    details: Optional[dict] = None


class ErrorDetail(BaseModel):
    error: ErrorBody


class ErrorResponse(BaseModel):
    detail: ErrorDetail


class InferenceResponse(BaseModel):
    request_id: str
    status: Literal["queued"] = "queued"
    status_url: str
    result_url: str
    created_at: str
    queue_position: Optional[int] = None


class InferenceStatusResponse(BaseModel):
    request_id: str
    status: TaskStatus
    created_at: str
    started_at: Optional[str] = None
    finished_at: Optional[str] = None
    error: Optional[str] = None
    queue_position: Optional[int] = Field(None, description="1 = runs next; null unless in_queue.")
    step: Optional[int] = Field(None, description="Denoising steps done, over all prompts of the request.")
    total_steps: Optional[int] = None
    attempts: int = Field(0, description="How many times the request was started: above 1 when a server restart "
                                         "(crash or shutdown) queued it again (at most AITK_MAX_ATTEMPTS).")


class ImageOutput(BaseModel):
    index: int
    format: str
    width: int
    height: int
    file_path: str
    url: str
    seed: int


class VideoOutput(ImageOutput):
    num_frames: int
    fps: int


class AudioOutput(BaseModel):
    index: int
    format: str
    file_path: str
    url: str
    seed: int
    sample_rate: int


class Outputs(BaseModel):
    images: list[ImageOutput] = []
    videos: list[VideoOutput] = []
    audios: list[AudioOutput] = Field([], description="Audio-only models (ACE-Step): one 16-bit FLAC per output.")


class InferenceResultResponse(BaseModel):
    request_id: str
    status: TaskStatus
    outputs: Optional[Outputs] = None
    error: Optional[str] = None
    created_at: str
    finished_at: Optional[str] = None
    metadata: Optional[dict] = None


class RequestList(BaseModel):
    requests: list[InferenceStatusResponse]
    total: int
    limit: int
    offset: int


class ModelInfo(BaseModel):
    id: str
    base_model: str
    resolution_divisor: int
    default_steps: int
    default_guidance_scale: float
    requires_control_image: bool
    is_video_model: bool
    default_num_frames: Optional[int] = None
    default_fps: Optional[int] = None
    base_override: Optional[str] = Field(None, description="The base checkpoint set with --base / AITK_BASES.")


class ModelList(BaseModel):
    models: list[ModelInfo]


class Health(BaseModel):
    status: Literal["healthy"] = "healthy"
