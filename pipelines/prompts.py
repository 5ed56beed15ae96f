"""ai-toolkit's sample-prompt handling: trigger words and sd-scripts style ``--flag value`` options.

A job's sample prompt such as ``"[trigger] holding a sign --w 768 --h 1024 --seed 7"`` is turned into the text that is
encoded and the per-sample overrides, exactly as ai-toolkit's ``GenerateImageConfig._process_prompt_string`` does:

* the whole prompt is stripped and split on EVERY ``--`` (so ``well--known`` also starts a flag, as in ai-toolkit);
* the prompt is the text before the first ``--``;
* each later piece is ``<flag> <value>``: the flag is the piece up to its first space, the value the rest, stripped;
* a later flag wins over an earlier one; flags ai-toolkit does not know are ignored, as there.

Pure string handling: no torch, no diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import apply_trigger

# flag -> (field of PromptOptions, converter). Aliases map onto the same field, as in ai-toolkit.
_FLAGS = {
    "n": ("negative", str),
    "w": ("width", int),
    "h": ("height", int),
    "d": ("seed", int),
    "seed": ("seed", int),
    "l": ("guidance", float),
    "cfg": ("guidance", float),
    "s": ("steps", int),
    "steps": ("steps", int),
    "m": ("network_multiplier", float),
    "network_multiplier": ("network_multiplier", float),
    "frames": ("num_frames", int),
    "num_frames": ("num_frames", int),
    "fps": ("fps", int),
    "ctrl_img": ("ctrl_img", str),
    "ctrl_idx": ("ctrl_idx", int),
    "gr": ("guidance_rescale", float),
}

# Flags ai-toolkit parses that change nothing in its previews of the families we run; kept in ``PromptOptions.unused``
# so that a caller can say they were ignored. ``--p2``/``--n2`` are parsed there and then overwritten by the
# constructor's own defaults (the second SDXL encoder always gets the prompt and the job's ``neg``); the others are
# adapter and refiner knobs.
_UNUSED_FLAGS = ("p2", "n2", "a", "ref", "ev", "extra_values")


@dataclass(frozen=True)
class PromptOptions:
    """A sample prompt split into its text and its ``--flag`` overrides (None = flag absent).

    Args:
        prompt (str): the text before the first ``--``, stripped.
        negative (str, *optional*): ``--n``.
        width, height (int, *optional*): ``--w``, ``--h``.
        seed (int, *optional*): ``--seed`` / ``--d``.
        guidance (float, *optional*): ``--cfg`` / ``--l``.
        steps (int, *optional*): ``--steps`` / ``--s``.
        network_multiplier (float, *optional*): ``--m`` / ``--network_multiplier``.
        num_frames, fps (int, *optional*): ``--frames`` / ``--num_frames``, ``--fps``.
        ctrl_img (str, *optional*): ``--ctrl_img`` (a path).
        ctrl_idx (int, *optional*): ``--ctrl_idx``.
        guidance_rescale (float, *optional*): ``--gr`` (SDXL's previews only).
        unused (dict[str, str]): flags ai-toolkit knows but that have no effect on its previews (``--p2``, ``--n2``...).
    """

    prompt: str
    negative: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    guidance: float | None = None
    steps: int | None = None
    network_multiplier: float | None = None
    num_frames: int | None = None
    fps: int | None = None
    ctrl_img: str | None = None
    ctrl_idx: int | None = None
    guidance_rescale: float | None = None
    unused: dict = field(default_factory=dict)

    def overrides(self) -> dict:
        """The flags that were given, by field name (``prompt`` and ``unused`` excluded)."""
        return {name: getattr(self, name) for name, _ in set(_FLAGS.values()) if getattr(self, name) is not None}


def parse_prompt_flags(text: str) -> PromptOptions:
    """Split an ai-toolkit sample prompt into its text and its ``--flag value`` overrides.

    Args:
        text (str): the prompt as written in the job config (after trigger replacement).

    Returns:
        PromptOptions: the prompt text and every recognised flag.

    Raises:
        ValueError: a numeric flag whose value is not a number (ai-toolkit would crash on it too).
    """
    if not isinstance(text, str):
        raise ValueError(f"A sample prompt must be a string, got {type(text).__name__}: {text!r}.")
    pieces = text.strip().split("--")
    values: dict = {}
    unused: dict = {}
    for piece in pieces[1:]:
        flag = piece.split(" ")[0].strip()
        content = piece[len(flag):].strip()
        if flag in _FLAGS:
            name, convert = _FLAGS[flag]
            try:
                values[name] = convert(content)
            except ValueError:
                raise ValueError(
                    f"Prompt flag --{flag} needs a{'n integer' if convert is int else ' number'}, got {content!r} "
                    f"in prompt {text!r}. Fix the flag's value in the job's sample prompts."
                ) from None
        elif flag in _UNUSED_FLAGS:
            unused[flag] = content
    return PromptOptions(prompt=pieces[0].strip(), unused=unused, **values)


def inject_trigger(prompt: str, trigger_word: str | None) -> str:
    """ai-toolkit's sample-time trigger handling: ``[trigger]``/``[name]`` become the trigger word.

    A job without ``trigger_word`` (None) leaves the literal ``[trigger]`` in the prompt; an explicit empty trigger
    word removes the tokens, as ai-toolkit's ``inject_trigger_into_prompt`` does.
    """
    if trigger_word == "":
        return prompt.replace("[trigger]", "").replace("[name]", "")
    return apply_trigger(prompt, trigger_word)


__all__ = ["PromptOptions", "parse_prompt_flags", "inject_trigger"]
