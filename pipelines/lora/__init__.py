"""LoRA files as ai-toolkit writes them: ``convert`` turns every layout into per-module patches for the model's own
module names; ``stack`` applies a set of them to a loaded pipeline (live adapters or merged weights) and changes it
without reloading the base model."""
