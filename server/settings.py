"""Server settings: environment variables with the reference implementation's names, overridden by CLI flags.

Precedence, for every setting: CLI flag (``serve --host/--port/--base``) > environment variable > default.
For base overrides the two maps are merged per model id, the CLI's entry winning.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from ..pipelines.registry import get_spec
from ..pipelines.runtime.options import LoadOptionError, LoadOptions
from .downloads import FetchPolicy

GIB = 1024**3
MIB = 1024**2
#: load option -> the environment variable that sets it (``base`` comes per model from ``AITK_BASES``/``--base``)
LOAD_OPTION_ENV = {
    "device": "DEVICE",
    "dtype": "AITK_DTYPE",
    "offload": "OFFLOAD_MODE",
    "lora_mode": "AITK_LORA_MODE",
    "compile": "AITK_COMPILE",
    "attention": "AITK_ATTENTION",
    "quantize": "AITK_QUANTIZE",
}


def parse_bases(items: Sequence[str], source: str) -> dict[str, str]:
    """Parse ``ID=PATH`` items into ``{model_id: path}``; ``source`` names where they came from in errors."""
    bases = {}
    for item in items:
        model_id, sep, path = item.strip().partition("=")
        model_id, path = model_id.strip(), path.strip()
        if not sep or not model_id or not path:
            raise ValueError(f"Bad base override {item!r} in {source}: use ID=PATH, e.g. flux=/models/FLUX.1-dev.")
        get_spec(model_id)  # raises a ValueError listing the valid ids
        bases[model_id] = os.path.expanduser(path)
    return bases


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def load_options_from_env(env: Mapping[str, str]) -> LoadOptions:
    """The load options the ``LOAD_OPTION_ENV`` variables set (case-insensitive); a bad value raises a ValueError
    that names the variable."""
    values = {option: (env.get(name) or "").strip().lower() for option, name in LOAD_OPTION_ENV.items()}
    try:
        return LoadOptions(**values)
    except LoadOptionError as e:
        settings = " with ".join(f"{LOAD_OPTION_ENV[option]}={value!r}" for option, value in e.options.items())
        if e.choices:
            raise ValueError(f"{settings} is not valid; use one of {', '.join(e.choices)}.") from None
        raise ValueError(f"{settings}: {e}") from None


def _number(env: Mapping[str, str], name: str, default, kind=int, minimum=1):
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a valid {kind.__name__}.") from None
    if value < minimum:
        raise ValueError(f"{name}={raw!r} must be at least {minimum}.")
    return value


@dataclass(frozen=True)
class Settings:
    """Everything the server reads at start.

    Args:
        host (str, defaults to 127.0.0.1): bind address (``HOST``); loopback unless you open it on purpose.
        port (int, defaults to 8000): ``PORT``.
        base_url (str, *optional*): public URL used in ``status_url``/``result_url`` (``BASE_URL``); defaults to
            ``http://{host}:{port}``.
        load (LoadOptions, defaults to ``LoadOptions()``): the load options of every model, from ``DEVICE`` (cuda,
            cuda:1, cpu, mps; defaults to CUDA when available), ``AITK_DTYPE`` (auto, fp32, bf16, fp16),
            ``OFFLOAD_MODE`` (none, model, sequential, group, auto), ``AITK_LORA_MODE`` (dynamic, fused; defaults to
            each model's registry setting), ``AITK_COMPILE`` (none, regional, full: torch.compile the denoiser once per
            loaded pipeline; strength changes and LoRA switches never recompile), ``AITK_ATTENTION`` (a key of
            ``pipelines.runtime.options.ATTENTION_KERNELS``; sdpa is diffusers' default, the others force one
            kernel) and ``AITK_QUANTIZE`` (none, fp8: FP8 denoiser weights on a CUDA GPU with compute capability
            8.9+, torchao; with ``AITK_LORA_MODE=fused`` LoRAs are merged before quantizing (the fast mode),
            otherwise they run as live adapters; ``OFFLOAD_MODE`` none or auto, which places the FP8 weights whole
            when they fit, else keeps as many blocks on the GPU as fit and streams the rest). ``bases`` sets ``base``
            per model.
        vae_tiling (bool, defaults to False): ``AITK_VAE_TILING`` (1/true): decode in tiles, far less memory for large
            videos at some speed.
        workflows_base_path (str, defaults to /app/ai-toolkit/lora_weights): ``WORKFLOWS_BASE_PATH``; local
            ``loras[].path`` values are relative to it and may not leave it.
        output_base_path (str, defaults to /tmp/inference_output): ``OUTPUT_BASE_PATH``; outputs and the task
            database (``tasks.sqlite3``).
        hf_token (str, *optional*): ``HF_TOKEN``, sent with URL-LoRA downloads from ``token_hosts`` when a request
            brings none.
        inference_timeout (float, defaults to 3600): ``INFERENCE_TIMEOUT`` in seconds per task, checked between steps.
        lora_download_cache_dir (str, defaults to /tmp/lora_cache): ``LORA_DOWNLOAD_CACHE_DIR``.
        bases (dict, *optional*): ``{model_id: path}`` base checkpoint overrides (``AITK_BASES`` / ``--base``).
        api_key (str, *optional*): ``AITK_API_KEY``; when set, ``/v1`` routes need the header ``X-API-Key``.
        cors_origins (tuple, defaults to none): ``AITK_CORS_ORIGINS`` (comma-separated); CORS is off when empty.
        lora_max_bytes (int, defaults to 2 GiB): ``AITK_LORA_MAX_BYTES``, the size cap of a URL LoRA.
        max_loras (int, defaults to 4): ``AITK_MAX_LORAS``, LoRAs per transformer in one request.
        control_image_max_bytes (int, defaults to 20 MiB): ``AITK_CONTROL_IMAGE_MAX_BYTES`` (decoded size).
        control_image_max_pixels (int, defaults to 4096*4096): ``AITK_CONTROL_IMAGE_MAX_PIXELS``.
        token_hosts (tuple, defaults to huggingface.co, hf.co): ``AITK_TOKEN_HOSTS``, hosts (and their
            subdomains) an HF token may be sent to.
        fetch_allowlist (tuple, defaults to none): ``AITK_FETCH_ALLOWLIST`` (comma-separated host names, IP addresses
            or networks): internal places URL LoRAs and control images may be fetched from; everything else must
            resolve to public addresses only.
        download_timeout (float, defaults to 900): ``AITK_DOWNLOAD_TIMEOUT``, total seconds one download may take.
        max_body_bytes (int, defaults to 32 MiB): ``AITK_MAX_BODY_BYTES``, the largest request body accepted (413
            above it); room for one control image at the default ``control_image_max_bytes`` in base64.
        max_attempts (int, defaults to 3): ``AITK_MAX_ATTEMPTS``, how many times a request may be started: one left
            queued or running by a crash or a shutdown is queued again at the next start until it has been started
            this often (so a request that crashes the server cannot do it forever).
        output_max_age (float, defaults to 7 days): ``AITK_OUTPUT_MAX_AGE`` in seconds; output files of requests
            finished longer ago are deleted (0 keeps them forever).
        output_max_bytes (int, defaults to 0): ``AITK_OUTPUT_MAX_BYTES``; when the kept output files add up to more,
            the oldest requests' files are deleted first (0: no size cap).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    base_url: str | None = None
    load: LoadOptions = field(default_factory=LoadOptions)
    vae_tiling: bool = False
    workflows_base_path: str = "/app/ai-toolkit/lora_weights"
    output_base_path: str = "/tmp/inference_output"
    hf_token: str | None = None
    inference_timeout: float = 3600.0
    lora_download_cache_dir: str = "/tmp/lora_cache"
    bases: dict = field(default_factory=dict)
    api_key: str | None = None
    cors_origins: tuple = ()
    lora_max_bytes: int = 2 * GIB
    max_loras: int = 4
    control_image_max_bytes: int = 20 * MIB
    control_image_max_pixels: int = 4096 * 4096
    token_hosts: tuple = ("huggingface.co", "hf.co")
    fetch_allowlist: tuple = ()
    download_timeout: float = 900.0
    max_body_bytes: int = 32 * MIB
    max_attempts: int = 3
    output_max_age: float = 7 * 24 * 3600.0
    output_max_bytes: int = 0

    def __post_init__(self):
        self.fetch_policy  # noqa: B018 - a bad AITK_FETCH_ALLOWLIST entry fails at start, not at the first download

    def load_options(self, model_id: str) -> LoadOptions:
        """The load options of ``model_id``: ``load`` with the model's base override."""
        return dataclasses.replace(self.load, base=self.bases.get(model_id))

    @property
    def fetch_policy(self) -> FetchPolicy:
        return FetchPolicy.from_entries(self.fetch_allowlist, self.download_timeout)

    @property
    def public_url(self) -> str:
        return (self.base_url or f"http://{self.host}:{self.port}").rstrip("/")

    @property
    def inputs_path(self) -> str:
        """Where queued requests' inline control images wait (as PNG) until the request finishes."""
        return os.path.join(self.output_base_path, "inputs")

    @property
    def database_path(self) -> str:
        return os.path.join(self.output_base_path, "tasks.sqlite3")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, host: str | None = None, port: int | None = None,
                 bases: Sequence[str] | None = None) -> "Settings":
        """Read the environment, then apply the CLI values that are not None (CLI > env > default)."""
        env = os.environ if env is None else env
        merged_bases = parse_bases(_split(env.get("AITK_BASES", "")), "AITK_BASES")
        merged_bases.update(parse_bases(bases or [], "--base"))
        defaults = cls()
        return cls(
            host=host or env.get("HOST") or defaults.host,
            port=port if port is not None else _number(env, "PORT", defaults.port, minimum=0),
            base_url=env.get("BASE_URL") or None,
            load=load_options_from_env(env),
            vae_tiling=(env.get("AITK_VAE_TILING") or "").lower() in ("1", "true", "yes", "on"),
            workflows_base_path=os.path.abspath(os.path.expanduser(env.get("WORKFLOWS_BASE_PATH") or defaults.workflows_base_path)),
            output_base_path=os.path.abspath(os.path.expanduser(env.get("OUTPUT_BASE_PATH") or defaults.output_base_path)),
            hf_token=env.get("HF_TOKEN") or None,
            inference_timeout=_number(env, "INFERENCE_TIMEOUT", defaults.inference_timeout, kind=float, minimum=0.001),
            lora_download_cache_dir=os.path.abspath(os.path.expanduser(
                env.get("LORA_DOWNLOAD_CACHE_DIR") or defaults.lora_download_cache_dir)),
            bases=merged_bases,
            api_key=env.get("AITK_API_KEY") or None,
            cors_origins=tuple(_split(env.get("AITK_CORS_ORIGINS", ""))),
            lora_max_bytes=_number(env, "AITK_LORA_MAX_BYTES", defaults.lora_max_bytes),
            max_loras=_number(env, "AITK_MAX_LORAS", defaults.max_loras),
            control_image_max_bytes=_number(env, "AITK_CONTROL_IMAGE_MAX_BYTES", defaults.control_image_max_bytes),
            control_image_max_pixels=_number(env, "AITK_CONTROL_IMAGE_MAX_PIXELS", defaults.control_image_max_pixels),
            token_hosts=tuple(h.lower() for h in _split(env.get("AITK_TOKEN_HOSTS", ""))) or defaults.token_hosts,
            fetch_allowlist=tuple(_split(env.get("AITK_FETCH_ALLOWLIST", ""))),
            download_timeout=_number(env, "AITK_DOWNLOAD_TIMEOUT", defaults.download_timeout, kind=float, minimum=0.001),
            max_body_bytes=_number(env, "AITK_MAX_BODY_BYTES", defaults.max_body_bytes),
            max_attempts=_number(env, "AITK_MAX_ATTEMPTS", defaults.max_attempts),
            output_max_age=_number(env, "AITK_OUTPUT_MAX_AGE", defaults.output_max_age, kind=float, minimum=0),
            output_max_bytes=_number(env, "AITK_OUTPUT_MAX_BYTES", defaults.output_max_bytes, minimum=0),
        )
