"""Finding a dataset's image files and reporting those that are missing."""

from __future__ import annotations

import os
from collections.abc import Sequence

__all__ = ["IMAGE_SUFFIXES", "index_images", "missing_files_error"]

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
