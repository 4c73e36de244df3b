"""Paths as reports, metrics and summaries print them: relative to the project root.

A report shared with a team, or a summary committed beside ``dvc.lock``, must not name the
directories of the machine it ran on. Stages run in the project root (the folder holding
``dvc.yaml`` and ``params.yaml``; ``dvc repro`` runs them there), so a path inside it is written
relative to it (``data/emoji/test``), and only a path outside it stays absolute (where it is
written, it is meant to be found on that machine). URLs and ``pipe:`` commands pass unchanged.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# Sources that are not paths on this machine (remote shards, commands).
_NOT_A_PATH = ("pipe:", "http://", "https://", "s3://", "gs://", "gcs://", "az://", "memory://", "file://")


def project_path(path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> str:
    """``path`` relative to ``root`` (the working directory by default) when inside it, else
    absolute; normalised (no ``./`` or ``..`` parts), with ``/`` separators."""
    text = os.fspath(path)
    if text.startswith(_NOT_A_PATH):
        return text
    base = os.path.abspath(os.fspath(root) if root is not None else os.getcwd())
    full = os.path.abspath(os.path.join(base, text))
    for candidate_base, candidate in ((base, full), (os.path.realpath(base), os.path.realpath(full))):
        if candidate == candidate_base:
            return "."
        if candidate.startswith(candidate_base.rstrip(os.sep) + os.sep):
            return Path(os.path.relpath(candidate, candidate_base)).as_posix()
    return full


def portable(value: Any, root: str | os.PathLike[str] | None = None) -> Any:
    """A summary (nested dicts and lists) with every absolute path inside ``root`` (the working
    directory by default), as a value or a key, made relative to it; everything else unchanged."""
    if isinstance(value, dict):
        return {portable(k, root): portable(v, root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v, root) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        return project_path(value, root)
    return value


def portable_text(text: str, root: str | os.PathLike[str] | None = None) -> str:
    """``text`` (a note, an error message) with the root's own prefix removed from the paths in it."""
    base = os.path.abspath(os.fspath(root) if root is not None else os.getcwd())
    for prefix in sorted({base, os.path.realpath(base)}, key=len, reverse=True):
        text = text.replace(prefix.rstrip(os.sep) + os.sep, "")
    return text
