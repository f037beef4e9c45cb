"""The pipeline's stages, in order. Each module has a config dataclass and one ``run(ctx)`` entry."""
