"""How teacher embeddings are stored: ``float16`` (the default), ``bfloat16`` or ``int8``.

A cache of 10^8 rows at D = 512 is 100 GB per modality in float16. The smaller encodings:

* ``bfloat16``: float32's sign, exponent and top 7 mantissa bits (round to nearest even), kept
  as the raw 16 bits in a ``uint16`` array (Zarr v3 has no bfloat16 type). The same bytes as
  float16, float32's range: for teachers whose outputs are not unit-normalised.
* ``int8``: symmetric per-row quantisation. Row ``x`` is stored as ``codes = round(x / s)`` in
  ``[-127, 127]`` with its scale ``s = max|x| / 127`` beside it (``<name>_scale``, float32, one
  per row, or per view of a row); zero rows have ``s = 0``. Each value is off by at most
  ``s / 2``. ``D + 4`` bytes a row: 0.25 of float32 plus the scale.

Readers never see the codes: :func:`decode` gives float32 rows (float16 stores are read as they
are), and every consumer (training, evaluation, ``neighbors``, ``align``, ITM) reads them through
the store format. Fill values are chosen to be caught, as NaN is for float16: a bfloat16 NaN,
code ``-128`` (never written: the code range is symmetric) and a NaN scale all decode to NaN, so
a row left unwritten, a damaged scale (not finite, or negative) or a stray code is a non-finite
row for every finiteness check the readers and ``distill cache verify`` already run.
"""
from __future__ import annotations

from typing import Literal

import numpy as np

StoreDtype = Literal["float16", "bfloat16", "int8"]
STORE_DTYPES: tuple[str, ...] = ("float16", "bfloat16", "int8")
DEFAULT: StoreDtype = "float16"
INT8_MAX = 127
INT8_FILL = -128
BF16_NAN = 0x7FC0


def store_dtype_of(attrs: dict) -> str:
    """The store dtype a teacher store's attributes record (absent: float16, every store written
    before the attribute existed)."""
    return str(attrs.get("store_dtype", DEFAULT))


def array_dtype(store_dtype: str) -> str:
    """The Zarr dtype of the embedding array itself (the codes)."""
    return {"float16": "float16", "bfloat16": "uint16", "int8": "int8"}[_known(store_dtype)]


def fill_value(store_dtype: str) -> float | int:
    """The embedding array's fill value: one that decodes to NaN."""
    return {"float16": np.nan, "bfloat16": BF16_NAN, "int8": INT8_FILL}[_known(store_dtype)]


def scale_name(name: str) -> str:
    """The per-row scale array of the int8 embedding array ``name``."""
    return f"{name}_scale"


def has_scale(store_dtype: str) -> bool:
    """Whether the store dtype keeps a scale beside its codes (int8)."""
    return _known(store_dtype) == "int8"


def _known(store_dtype: str) -> str:
    if store_dtype not in STORE_DTYPES:
        raise ValueError(f"unknown store dtype {store_dtype!r}; known: {list(STORE_DTYPES)}")
    return store_dtype


def encode(values: np.ndarray, store_dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Float rows ``[..., D]`` -> (codes as stored, scales ``[...]`` float32 or None)."""
    if store_dtype == "float16":
        return values.astype(np.float16), None
    x = np.asarray(values, dtype=np.float32)
    if store_dtype == "bfloat16":
        bits = x.view(np.uint32)
        rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))  # to nearest even
        return (rounded >> np.uint32(16)).astype(np.uint16), None
    _known(store_dtype)
    peak = np.abs(x).max(axis=-1)
    scale = (peak / INT8_MAX).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0)[..., None]
    codes = np.clip(np.rint(x / safe), -INT8_MAX, INT8_MAX).astype(np.int8)
    return codes, scale


def decode(codes: np.ndarray, store_dtype: str, scale: np.ndarray | None = None) -> np.ndarray:
    """Stored codes -> rows: float16 as stored; bfloat16 and int8 as float32. Fill values and
    damaged scales (not finite, negative) decode to NaN (module docstring)."""
    if store_dtype == "float16":
        return codes
    if store_dtype == "bfloat16":
        return (codes.astype(np.uint32) << np.uint32(16)).view(np.float32)
    _known(store_dtype)
    if scale is None:
        raise ValueError("int8 codes need their scales to be decoded")
    scale = np.asarray(scale, dtype=np.float32)
    scale = np.where(np.isfinite(scale) & (scale >= 0), scale, np.float32(np.nan))
    out = codes.astype(np.float32) * scale[..., None]
    out[codes == INT8_FILL] = np.nan
    return out


def int8_row_faults(codes: np.ndarray, scale: np.ndarray, valid: np.ndarray, name: str,
                    start: int = 0) -> list[str]:
    """Codes and scales of valid rows that quantisation cannot have written: a scale that is
    not finite or negative, a fill code (-128), a non-zero row whose largest code is not 127,
    or a zero scale beside non-zero codes. ``valid``: one flag per row; ``start``: first row."""
    rows = len(codes)
    flat = codes.reshape(rows, -1, codes.shape[-1]).astype(np.int16)  # rows, views, D
    sc = np.asarray(scale, dtype=np.float32).reshape(rows, -1)
    peak = np.abs(flat).max(axis=-1)
    checks = (
        ("scales that are not finite or negative", ~(np.isfinite(sc) & (sc >= 0))),
        ("fill codes (-128: never written)", (flat == INT8_FILL).any(axis=-1)),
        ("a positive scale whose largest code is not 127", (sc > 0) & (peak != INT8_MAX)),
        ("a zero scale beside non-zero codes", (sc == 0) & (peak != 0)),
    )
    faults = []
    for what, bad in checks:
        bad_rows = np.flatnonzero(bad.any(axis=1) & valid)
        if bad_rows.size:
            faults.append(f"{name} rows [{start}, {start + rows}): {bad_rows.size} valid rows with "
                          f"{what} (first row {start + int(bad_rows[0])})")
    return faults
