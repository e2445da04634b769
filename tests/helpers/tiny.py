"""The tiny preset's local paths for tests that call loaders directly (entry points build it themselves)."""

from distar import sources, tiny_preset


def tiny(source: str) -> str:
    """`tiny:NAME` → its local path, building the tiny root first."""
    tiny_preset.materialize()
    return str(sources.tiny_path(source))
