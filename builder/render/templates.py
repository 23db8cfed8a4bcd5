"""Find the Jinja2 templates: in the wheel (builder/templates/) or the source tree."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent.parent  # builder/


def template_dirs() -> list[str]:
    """Folders holding dockerfiles/, compose/ and targets/, installed copy first."""
    candidates = [_PACKAGE / "templates", _PACKAGE.parent]
    found = [str(p) for p in candidates if all((p / d).is_dir() for d in ("dockerfiles", "compose", "targets"))]
    if not found:
        raise FileNotFoundError(f"builder's templates are missing (looked in {', '.join(map(str, candidates))})")
    return found
