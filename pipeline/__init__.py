"""Offline distillation of vision-language teachers into small dual-encoder students.

The package is importable without side effects; the stage commands live in ``stages/``.
"""

__version__ = "0.1.0"
