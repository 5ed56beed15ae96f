"""One file per model family: an :class:`~aitk_inference.pipelines.base.AITKPipeline` subclass that says only what
the family does differently (how it loads, how its parameters map onto its diffusers pipeline, its LoRA names).
Registry entries name their class here (``ModelSpec.family``); a family module is imported only when one of its
ids is loaded."""
