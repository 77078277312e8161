"""Generated files kept in the repo: write them when they changed, and say which are stale."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

REGENERATE = "run `kubeloop manifests generate`"


def write(root: Path, files: dict[Path, str], orphans: Iterable[Path] = ()) -> list[Path]:
    """Write files (relative to root) whose content differs and remove orphans; return what was touched."""
    touched: list[Path] = []
    for relative, text in files.items():
        path = root / relative
        if path.is_file() and path.read_text() == text:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        touched.append(path)
    for relative in orphans:
        (root / relative).unlink()
        touched.append(root / relative)
    return touched


def stale(root: Path, files: dict[Path, str], orphans: Iterable[Path] = (), source: str = "its source") -> list[str]:
    """One message per missing, stale or orphaned file; empty when the repo matches what would be generated."""
    problems: list[str] = []
    for relative, text in files.items():
        path = root / relative
        if not path.is_file():
            problems.append(f"{relative.as_posix()} is missing: {REGENERATE}")
        elif path.read_text() != text:
            problems.append(f"{relative.as_posix()} is stale: {REGENERATE}")
    problems.extend(f"{p.as_posix()} is not generated from {source}: {REGENERATE} to remove it" for p in orphans)
    return problems
