"""Finding a dataset's image files and reporting those that are missing."""

from __future__ import annotations

import os
from collections.abc import Sequence

__all__ = ["IMAGE_SUFFIXES", "index_images", "missing_files_error", "resolve_images"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def index_images(root: str | os.PathLike) -> dict[str, str]:
    """``{file stem: path}`` for every image under ``root`` (first found wins)."""
    files: dict[str, str] = {}
    for dirpath, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            stem, ext = os.path.splitext(name)
            if ext.lower() in IMAGE_SUFFIXES:
                files.setdefault(stem, os.path.join(dirpath, name))
    return files


def missing_files_error(missing: Sequence[str], listed_in: str, where: str) -> FileNotFoundError:
    """One error for every image listed in ``listed_in`` but absent: the first few and the count."""
    return FileNotFoundError(
        f"{len(missing)} image(s) listed in {listed_in} are missing under {where}, "
        f"e.g. {list(missing)[:5]}"
    )


def resolve_images(ids: Sequence[str], sources: Sequence[str], root: str) -> list[str]:
    """The image file of each listed id (a file stem) under ``root``. An id listed twice, or
    listed but absent, is one error naming the files that list it (``sources``, per row)."""
    seen: set[str] = set()
    twice = sorted({i for i in ids if i in seen or seen.add(i)})
    if twice:
        raise ValueError(f"{len(twice)} image id(s) listed twice in "
                         f"{', '.join(sorted(set(sources)))}, e.g. {twice[:5]}")
    files = index_images(root)
    missing = [(i, s) for i, s in zip(ids, sources, strict=True) if i not in files]
    if missing:
        raise missing_files_error([i for i, _ in missing],
                                  ", ".join(sorted({s for _, s in missing})), root)
    return [files[i] for i in ids]
