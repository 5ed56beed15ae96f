"""ai-toolkit job folders: read a job's config.yaml, checkpoints and sample previews, and render its previews again."""
