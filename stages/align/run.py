"""Stage ``align``: a cross-modal teacher aligned from a vision-only and a text-only teacher's caches.

Locked-image tuning (LiT, Zhai et al. 2022) keeps pretrained towers frozen and trains only light
heads; here the towers' outputs are already cached, so training touches no image, no caption and
no encoder: two projection heads (``linear`` or a small ``mlp``) learn CLIP's symmetric
contrastive loss on the cached features of the train split, with a learned logit scale, stopping
early on the val split. The aligned teacher is then written as an ordinary teacher store
(schema ``teacher-cache.v1``, :mod:`pipeline.stores.teacher`) for every split both caches cover:

    image_emb = normalize(head_v(vision_feat))    text_emb = normalize(head_t(text_feat))

Its teacher fingerprint names both source teachers' fingerprints and the heads' weights
(sha256); its dataset fingerprint is the sources' (they must agree). Writing goes through the
store runner (:mod:`stages.runner`): lock, resume, keep-if-current, Dask or in-process.

The heads are saved beside (``<heads_dir>/<name>/heads.safetensors`` + ``heads.json``, with the
source teachers' params entries), so the registered teacher ``aligned``
(:mod:`pipeline.teachers.aligned`) can run encoders + heads end to end (evaluation times it) and
reproduces the stored embeddings.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline import __version__
from pipeline.config import check_settings, setting
from pipeline.devices import torch_threads
from pipeline.errors import CacheError, ConfigError
from pipeline.fingerprint import fingerprint
from pipeline.paths import portable
from pipeline.progress import note
from pipeline.stores import StoreSpec
from pipeline.stores import teacher as teacher_format
from pipeline.stores.base import (ROW_VALID, Kind, Layout)
from pipeline.stores.encoding import StoreDtype
from pipeline.stores.location import location, store_root
from pipeline.stores.teacher import (encoded_columns, published_attrs,
                                     teacher_store_attrs, unit_rows)
from pipeline.teachers.aligned import (MAX_LOGIT_SCALE, AlignHeads, aligned_fingerprint,
                                       heads_sha256, save_heads, store_fields)
from pipeline.views import ViewSpec
from stages.executors import DaskConfig, ExecutorName, check_executor, open_executor
from stages.lock import output_lock
from stages.runner import StoreJob, Unit, run_store_stage, shard_units

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AlignConfig:
    """Parameters of the ``align`` stage (``params.yaml`` section ``align``)."""

    name: str = "aligned"                  # the aligned teacher: <cache_root>/<name>/<split>.zarr
    vision: str = "effnet"                 # vision-only teacher (a `teachers` key) whose caches are read
    text: str = "minilm"                   # text-only teacher (a `teachers` key; its text side is used)
    cache_root: str = "caches"             # where the sources' stores are, and the output goes
    train_split: str = "train"             # the heads learn on this split
    val_split: str | None = "val"          # early stopping on this split's contrastive loss;
                                           # null (or no cache of it) = train all epochs
    head: Literal["linear", "mlp"] = "linear"  # linear: one matrix per tower; mlp: Linear-GELU-Linear
    embed_dim: int = setting(512, minimum=1)   # width of the aligned embeddings
    hidden_dim: int = setting(1024, minimum=1)  # mlp hidden width
    epochs: int = setting(200, minimum=1)  # passes over the train images (one random caption each)
    batch_size: int = setting(256, minimum=2)  # pairs per contrastive batch
    block_rows: int = setting(32768, minimum=2)  # images read from the caches at a time (bounds
                                            # memory): a split of more is read block by block every
                                            # epoch, the blocks in random order, each one shuffled
    lr: float = setting(1e-3, exclusive_minimum=0)  # AdamW, cosine decay to 0 over the epochs
    weight_decay: float = setting(0.0, minimum=0)
    init_logit_scale: float = setting(1 / 0.07, minimum=1, maximum=MAX_LOGIT_SCALE)  # learned from here
    patience: int = setting(20, minimum=1)  # epochs without a better val loss before stopping
    seed: int = 0                           # head initialisation and batch order
    threads: int | None = setting(1, minimum=1)  # torch threads while the heads train; null = torch's
                                            # default. The matrices are small: one thread is faster
                                            # than two here (BENCHMARKS.md §7), much more so on a busy machine
    heads_dir: str = "models/align"         # heads go to <heads_dir>/<name>/
    rows_per_shard: int = setting(16384, minimum=1)  # rows per Zarr shard of the written stores
    rows_per_chunk: int = setting(256, minimum=1)
    store_dtype: StoreDtype = "float16"     # of the aligned stores: float16 | bfloat16 | int8
    summary_dir: str = "reports/align"      # <summary_dir>/<name>.json: training curve, scale, counts
    executor: ExecutorName = "inprocess"    # inprocess | dask (writing units as Dask tasks)
    dask: DaskConfig = field(default_factory=DaskConfig)

    def __post_init__(self) -> None:
        check_settings(self, "align")
        if self.rows_per_shard % self.rows_per_chunk:
            raise ConfigError(f"align.rows_per_chunk: {self.rows_per_chunk} does not divide "
                              f"align.rows_per_shard ({self.rows_per_shard})")
        if self.vision == self.name or self.text == self.name:
            raise ConfigError(f"align.name: {self.name!r} would overwrite a source teacher's caches")


# ----------------------------------------------------------------------------- heads and loss


def contrastive_loss(image_emb: Tensor, text_emb: Tensor, scale: Tensor) -> Tensor:
    """CLIP's symmetric cross-entropy: pair i is row i of both; mean of image->text and
    text->image."""
    logits = scale * image_emb @ text_emb.T
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


# ----------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class SourcePair:
    """The two source stores of one split, checked to describe the same dataset."""

    split: str
    vision: Path
    text: Path
    dataset_fingerprint: str
    n_images: int
    n_texts: int
    views: ViewSpec = ViewSpec()  # the vision store's views: the aligned store gets the same


def _source_attrs(path: Path, need: Kind, role: str) -> dict[str, Any]:
    return published_attrs(path, need, f"align: {role}")


def source_pairs(cfg: AlignConfig) -> dict[str, SourcePair]:
    """Every split with a store of both source teachers, checked against each other: the same
    dataset (fingerprints), rows and modalities. The train split must be among them."""
    root = location(cfg.cache_root)
    vision_splits = {p.name.removesuffix(".zarr") for p in (root / cfg.vision).glob("*.zarr")}
    text_splits = {p.name.removesuffix(".zarr") for p in (root / cfg.text).glob("*.zarr")}
    if cfg.train_split not in vision_splits & text_splits:
        missing = [str(root / t / f"{cfg.train_split}.zarr") for t, s in
                   ((cfg.vision, vision_splits), (cfg.text, text_splits)) if cfg.train_split not in s]
        raise CacheError(f"align: no cache of the train split at {', '.join(missing)}: run "
                         "`distill teach` for that teacher first (or `dvc repro`)")
    pairs = {}
    for split in sorted(vision_splits & text_splits):
        vpath, tpath = root / cfg.vision / f"{split}.zarr", root / cfg.text / f"{split}.zarr"
        va, ta = _source_attrs(vpath, "image", "vision"), _source_attrs(tpath, "text", "text")
        if va["dataset_fingerprint"] != ta["dataset_fingerprint"]:
            raise CacheError(
                f"align: {vpath} (dataset {va['dataset_fingerprint']}) and {tpath} (dataset "
                f"{ta['dataset_fingerprint']}) were built from different datasets: rebuild both "
                "caches from the same dataset (`distill teach` with the same teach.dataset)")
        if (va["n_images"], va["n_texts"]) != (ta["n_images"], ta["n_texts"]):
            raise CacheError(f"align: {vpath} and {tpath} hold different rows "
                             f"({va['n_images']}/{va['n_texts']} vs {ta['n_images']}/{ta['n_texts']} "
                             "images/texts) although their dataset fingerprints agree: rebuild them")
        pairs[split] = SourcePair(split, vpath, tpath, va["dataset_fingerprint"], va["n_images"],
                                  va["n_texts"], ViewSpec.from_attrs(va))
    return pairs


@dataclass
class PairedFeatures:
    """Cached features of some images: every image with at least one valid caption, and its
    captions (those of image n are ``text_feat[first_caption[n] : first_caption[n] + n_captions[n]]``)."""

    image_feat: Tensor          # [N, Dv] float32, valid images with a valid caption
    text_feat: Tensor           # [M, Dt] float32, their valid captions, grouped by image
    first_caption: Tensor       # [N] int64
    n_captions: Tensor          # [N] int64, >= 1

    @property
    def n_images(self) -> int:
        return len(self.first_caption)


@dataclass
class PairedBlock:
    """Image rows ``[i0, i1)`` of a split and the text rows ``[t0, t1)`` of their captions."""

    i0: int
    i1: int
    t0: int
    t1: int
    n_images: int = 0    # usable: valid, with a valid caption
    n_captions: int = 0  # their valid captions


@dataclass
class PairedStream:
    """One split's paired features, read from both source stores a block of images at a time,
    so memory holds one block whatever the split's size (one block: held across epochs).

    The stores must list captions grouped by image (``text_to_image`` never decreases), as
    ``teach`` writes them: then a block of images and its captions are two row ranges."""

    pair: SourcePair
    blocks: list[PairedBlock]
    image_dim: int
    text_dim: int
    vision: dict[str, Any] = field(default_factory=dict)  # row readers of both stores (_readers)
    text: dict[str, Any] = field(default_factory=dict)
    _held: PairedFeatures | None = None

    @property
    def n_images(self) -> int:
        return sum(b.n_images for b in self.blocks)

    @property
    def n_captions(self) -> int:
        return sum(b.n_captions for b in self.blocks)

    def read(self, b: int) -> PairedFeatures:
        """Block ``b``'s paired features (checked as the store readers check every chunk)."""
        if self._held is not None:
            return self._held
        block = self.blocks[b]
        vision, text = self.vision, self.text
        image_valid = vision["image_status"][block.i0:block.i1] == ROW_VALID
        t2i = text["text_to_image"][block.t0:block.t1].astype(np.int64) - block.i0
        t_ok = (text["text_status"][block.t0:block.t1] == ROW_VALID) & (t2i >= 0)
        t_ok[t_ok] &= image_valid[t2i[t_ok]]
        t_rows = np.flatnonzero(t_ok)  # grouped by image: text_to_image never decreases
        images, first, counts = np.unique(t2i[t_rows], return_index=True, return_counts=True)
        feats = PairedFeatures(
            torch.from_numpy(np.asarray(vision["image_emb"][block.i0:block.i1], np.float32)[images]),
            torch.from_numpy(np.asarray(text["text_emb"][block.t0:block.t1], np.float32)[t_rows]),
            torch.from_numpy(first.astype(np.int64)), torch.from_numpy(counts.astype(np.int64)))
        if len(self.blocks) == 1:
            self._held = feats
        return feats


def _readers(pair: SourcePair) -> tuple[dict[str, Any], dict[str, Any]]:
    """Row readers of the arrays ``align`` reads from the two source stores (decoded embeddings;
    view 0 of a vision store with views)."""
    from pipeline.stores.encoding import store_dtype_of
    from pipeline.stores.rows import RowReader, ViewRows

    out = []
    for path, kind in ((pair.vision, "image"), (pair.text, "text")):
        attrs = published_attrs(path)
        emb = RowReader(path, f"{kind}_emb", stored=store_dtype_of(attrs))
        readers = {f"{kind}_emb": ViewRows(emb, 0) if emb.ndim == 3 else emb}
        for name in ("image_status", "text_status", "text_to_image", "image_id"):
            readers[name] = RowReader(path, name)
        out.append(readers)
    return out[0], out[1]


def paired_features(pair: SourcePair, block_rows: int = 32768) -> PairedStream:
    """Plan one split's blocks of ``block_rows`` images from both stores, in one pass over their
    row arrays (bounded memory): the stores must order their rows alike; the usable images and
    captions of each block are counted."""
    from pipeline.stores.rows import paired_blocks

    vision, text = _readers(pair)
    for name in ("image_id", "text_to_image"):
        for start, (a, b) in paired_blocks(vision[name], text[name]):
            if not np.array_equal(a, b):
                raise CacheError(f"align: {pair.vision} and {pair.text} order their rows differently "
                                 f"({name} differs from row {start}); rebuild them")
    bounds = list(range(0, pair.n_images, block_rows)) + [pair.n_images]
    starts = _caption_starts(pair, text["text_to_image"], np.asarray(bounds))
    blocks = []
    for i0, i1, t0, t1 in zip(bounds[:-1], bounds[1:], starts[:-1], starts[1:]):
        block = PairedBlock(int(i0), int(i1), int(t0), int(t1))
        image_valid = vision["image_status"][i0:i1] == ROW_VALID
        t2i = text["text_to_image"][t0:t1].astype(np.int64) - i0
        t_ok = (text["text_status"][t0:t1] == ROW_VALID) & (t2i >= 0)
        t_ok[t_ok] &= image_valid[t2i[t_ok]]
        block.n_images, block.n_captions = len(np.unique(t2i[t_ok])), int(t_ok.sum())
        blocks.append(block)
    dims = (vision["image_emb"].shape[-1], text["text_emb"].shape[-1])
    return PairedStream(pair, blocks, int(dims[0]), int(dims[1]), vision, text)


def _caption_starts(pair: SourcePair, text_to_image: Any, bounds: np.ndarray) -> np.ndarray:
    """For each image row in ``bounds``, the first text row of a caption of that image or a later
    one (``n_texts`` when none): one pass over ``text_to_image``, which must never decrease."""
    from pipeline.stores.rows import paired_blocks

    starts = np.full(len(bounds), pair.n_texts, dtype=np.int64)
    last = -1
    for start, (t2i,) in paired_blocks(text_to_image):
        t2i = t2i.astype(np.int64)
        steps = np.diff(np.concatenate([[last], t2i]))
        if (steps < 0).any():
            row = start + int(np.flatnonzero(steps < 0)[0])
            raise CacheError(f"align: {pair.text}: captions are not grouped by image (text_to_image "
                             f"decreases at text row {row}); align reads stores as `distill teach` "
                             "writes them: rebuild the caches with it")
        todo = (starts == pair.n_texts) & (bounds <= t2i[-1]) if len(t2i) else np.zeros(len(bounds), bool)
        starts[todo] = start + np.searchsorted(t2i, bounds[todo], side="left")
        last = int(t2i[-1]) if len(t2i) else last
    return starts


# ----------------------------------------------------------------------------- training


def _epoch_pairs(data: PairedFeatures, gen: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """(image indices, caption indices): every image once, in random order with one random
    caption when ``gen`` is given, else in order with its first caption (validation)."""
    if gen is None:
        return torch.arange(data.n_images), data.first_caption.clone()
    order = torch.randperm(data.n_images, generator=gen)
    # float32 draws scaled in float64: floor(u * count) never reaches count
    pick = (torch.rand(data.n_images, generator=gen).double() * data.n_captions[order]).long()
    return order, data.first_caption[order] + pick


def _batches(n: int, batch_size: int) -> list[slice]:
    """Slices of ``batch_size``; a last batch of fewer than 2 pairs is dropped (no negatives)."""
    return [slice(s, min(s + batch_size, n)) for s in range(0, n, batch_size) if min(batch_size, n - s) >= 2]


def epoch_batches(data: PairedStream, batch_size: int,
                  gen: torch.Generator | None) -> Iterator[tuple[Tensor, Tensor]]:
    """(image features, caption features) of each batch of one epoch: the batches
    :func:`_batches` cuts from every usable image with one caption (:func:`_epoch_pairs`).
    With ``gen``, the blocks come in random order and each block's images shuffled; a batch may
    span two blocks. Without, in row order with first captions (validation). One block: the
    pairs of a shuffle of the whole split."""
    order = list(range(len(data.blocks)))
    if gen is not None and len(order) > 1:
        order = torch.randperm(len(order), generator=gen).tolist()
    img = cap = None  # pairs not yet in a batch (fewer than batch_size)
    for b in order:
        if data.blocks[b].n_images == 0:
            continue
        feats = data.read(b)
        imgs, caps = _epoch_pairs(feats, gen)
        block_img, block_cap = feats.image_feat[imgs], feats.text_feat[caps]
        if img is not None and len(img):
            block_img, block_cap = torch.cat([img, block_img]), torch.cat([cap, block_cap])
        full = len(block_img) // batch_size * batch_size
        for s in range(0, full, batch_size):
            yield block_img[s:s + batch_size], block_cap[s:s + batch_size]
        img, cap = block_img[full:], block_cap[full:]
    if img is not None and len(img) >= 2:  # a last batch of fewer than 2 pairs is dropped
        yield img, cap


@torch.no_grad()
def val_loss(heads: AlignHeads, data: PairedStream, batch_size: int) -> float:
    """Mean contrastive loss over fixed batches of the val pairs (first caption of each image)."""
    losses = [contrastive_loss(heads.image(img), heads.caption(cap), heads.logit_scale()).item()
              for img, cap in epoch_batches(data, batch_size, None)]
    return float(np.mean(losses)) if losses else float("nan")


def train_heads(cfg: AlignConfig, train: PairedStream, val: PairedStream | None,
                progress: bool | None = None) -> tuple[AlignHeads, dict[str, Any]]:
    """Train the heads on cached features; return the heads (best val epoch) and the history."""
    with torch_threads(cfg.threads):
        return _train_heads(cfg, train, val, progress)


def _train_heads(cfg: AlignConfig, train: PairedStream, val: PairedStream | None,
                 progress: bool | None) -> tuple[AlignHeads, dict[str, Any]]:
    torch.manual_seed(cfg.seed)
    heads = AlignHeads(train.image_dim, train.text_dim, cfg.embed_dim, cfg.head,
                       cfg.hidden_dim, cfg.init_logit_scale)
    n_batches = len(_batches(train.n_images, cfg.batch_size))
    if not n_batches:
        raise CacheError(f"align: the train split has {train.n_images} usable image-caption "
                         "pair(s); at least 2 are needed for a contrastive loss")
    opt = torch.optim.AdamW(heads.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * n_batches)
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict[str, float]] = []
    best = (math.inf, -1, None)
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
        total = 0.0
        for img, cap in epoch_batches(train, cfg.batch_size, gen):
            loss = contrastive_loss(heads.image(img), heads.caption(cap), heads.logit_scale())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        row = {"epoch": epoch, "train_loss": total / n_batches,
               "logit_scale": heads.logit_scale().item()}
        if val is not None:
            row["val_loss"] = val_loss(heads, val, cfg.batch_size)
            if row["val_loss"] < best[0]:
                best = (row["val_loss"], epoch, {k: v.clone() for k, v in heads.state_dict().items()})
        history.append(row)
        if epoch % 20 == 0 or epoch == cfg.epochs - 1:
            note(f"align {cfg.name}: epoch {epoch + 1}/{cfg.epochs} train loss {row['train_loss']:.4f}"
                 + (f", val loss {row['val_loss']:.4f}" if "val_loss" in row else ""), progress)
        if val is not None and epoch - best[1] >= cfg.patience:
            break
    if best[2] is not None:
        heads.load_state_dict(best[2])
    info = {"epochs_run": len(history), "best_epoch": best[1] if best[2] is not None else len(history) - 1,
            "best_val_loss": None if best[2] is None else best[0],
            "logit_scale": heads.logit_scale().item(), "seconds": round(time.perf_counter() - t0, 3),
            "train_pairs": {"images": train.n_images, "captions": train.n_captions},
            "val_pairs": None if val is None else {"images": val.n_images, "captions": val.n_captions},
            "history": history}
    return heads.eval(), info


# ----------------------------------------------------------------------------- writing stores


@dataclass(frozen=True)
class AlignWork:
    """The computation of one unit: rows of a source store through one head (pure, picklable)."""

    sources: dict[str, tuple[str, str]]     # split -> (vision store, text store)
    heads_args: dict[str, Any]
    heads_state: dict[str, np.ndarray]
    store_dtype: str = "float16"

    def _heads(self) -> AlignHeads:
        heads = AlignHeads(**self.heads_args)
        heads.load_state_dict({k: torch.from_numpy(v) for k, v in self.heads_state.items()})
        return heads.eval()

    def compute(self, unit: Unit) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        vision_path, text_path = self.sources[unit.split]
        kind = unit.part
        arrays = unit_rows(vision_path if kind == "image" else text_path, kind, unit.start, unit.stop)
        status = arrays[f"{kind}_status"]
        feat = torch.from_numpy(arrays[f"{kind}_emb"].astype(np.float32))
        valid = torch.from_numpy(status == ROW_VALID)
        heads = self._heads()
        with torch.no_grad():  # every view of a [n, V, D] store goes through the same head
            flat = torch.nan_to_num(feat).reshape(-1, feat.shape[-1])
            emb = (heads.image if kind == "image" else heads.caption)(flat)
            emb = emb.reshape(*feat.shape[:-1], emb.shape[-1])
        emb[~valid] = 0.0  # invalid rows hold zeros, as `teach` writes them
        values = emb.numpy()  # ids, status, views as they are
        arrays.update(encoded_columns(f"{kind}_emb", values.astype(np.float16) if self.store_dtype
                                      == "float16" else values, self.store_dtype))
        return arrays, {"forward_calls": 0}


def plan_align(cfg: AlignConfig, pairs: dict[str, SourcePair], heads: AlignHeads,
               spec: dict[str, Any]) -> StoreJob:
    """The write job: one teacher store per split, image units then text units."""
    layout = Layout(cfg.rows_per_shard, cfg.rows_per_chunk)
    teacher_fp = spec["teacher"]
    stores, units = {}, []
    for split, pair in pairs.items():
        attrs = teacher_store_attrs(teacher_fp, pair.dataset_fingerprint, split,
                                    frozenset({"image", "text"}), cfg.embed_dim, spec["logit_scale"],
                                    pair.n_images, pair.n_texts, layout, views=pair.views,
                                    store_dtype=cfg.store_dtype,
                                    compute={"device": "cpu", "torch": torch.__version__, "autocast": "none"},
                                    on_bad_image="skip")
        stores[f"{split}.zarr"] = StoreSpec(teacher_format.FORMAT, attrs, dict(
            n_images=pair.n_images, n_texts=pair.n_texts, embed_dim=cfg.embed_dim,
            modalities=frozenset({"image", "text"}), layout=layout))
        units += shard_units(split, "image", pair.n_images, cfg.rows_per_shard)
        units += shard_units(split, "text", pair.n_texts, cfg.rows_per_shard)
    run_fp = fingerprint({"teacher": teacher_fp, "layout": [cfg.rows_per_shard, cfg.rows_per_chunk],
                          "datasets": {s: p.dataset_fingerprint for s, p in pairs.items()},
                          "package": __version__, "store_dtype": cfg.store_dtype})
    work = AlignWork({s: (str(p.vision.resolve()), str(p.text.resolve())) for s, p in pairs.items()},
                     heads.args, {k: v.detach().numpy().copy() for k, v in heads.state_dict().items()},
                     cfg.store_dtype)
    return StoreJob(f"align {cfg.name}", store_root(cfg.cache_root) / cfg.name, run_fp, stores,
                    units, work)


def run_align(cfg: AlignConfig, entries: dict[str, Any] | None = None,
              progress: bool | None = None) -> dict[str, Any]:
    """Train the heads on the source caches, save them, and write the aligned teacher's stores.

    ``entries``: the source teachers' params entries ({"vision": TeacherEntry, "text": ...}),
    recorded with the heads so the ``aligned`` teacher can rebuild its encoders; no encoder is
    built or run here. Returns the run summary (also written to ``<summary_dir>/<name>.json``).
    """
    t0 = time.perf_counter()
    check_executor(cfg.executor, cfg.dask, "align")
    out = location(cfg.cache_root) / cfg.name
    # one lock over training, the heads and the stores: a concurrent run on this output is
    # refused before it trains (the store runner takes the same lock again)
    with output_lock(out, f"`distill align {cfg.name}`"):
        pairs = source_pairs(cfg)
        train = paired_features(pairs[cfg.train_split], cfg.block_rows)
        val = None
        if cfg.val_split is not None and cfg.val_split != cfg.train_split:
            if cfg.val_split in pairs:
                val = paired_features(pairs[cfg.val_split], cfg.block_rows)
            else:
                log.warning("align: no caches of the val split %r; training all %d epochs", cfg.val_split, cfg.epochs)
        note(f"align {cfg.name}: {train.n_images} train images, {train.n_captions} captions "
             f"({cfg.vision} + {cfg.text}, {cfg.head} heads)", progress)
        heads, info = train_heads(cfg, train, val, progress)
        vision_attrs = _source_attrs(pairs[cfg.train_split].vision, "image", "vision")
        text_attrs = _source_attrs(pairs[cfg.train_split].text, "text", "text")
        weights = heads_sha256(heads)
        teacher_fp = aligned_fingerprint(vision_attrs["teacher"], text_attrs["teacher_fingerprint"],
                                         vision_attrs["teacher_fingerprint"], weights, heads.args,
                                         cfg.embed_dim, info["logit_scale"])
        spec = {"heads_args": heads.args, "weights_sha256": weights, "logit_scale": info["logit_scale"],
                "teacher": teacher_fp, "teacher_fingerprint": fingerprint(teacher_fp),
                "vision": {"name": cfg.vision, "teacher_fingerprint": vision_attrs["teacher_fingerprint"],
                           "store_dtype": vision_attrs["teacher"].get("store_dtype", "float16"),
                           "store_fields": store_fields(vision_attrs["teacher"]),
                           "entry": _entry(entries, "vision")},
                "text": {"name": cfg.text, "teacher_fingerprint": text_attrs["teacher_fingerprint"],
                         "store_dtype": text_attrs["teacher"].get("store_dtype", "float16"),
                         "store_fields": store_fields(text_attrs["teacher"]),
                         "entry": _entry(entries, "text")},
                "config": {k: v for k, v in asdict(cfg).items() if k not in ("executor", "dask")}}
        save_heads(Path(cfg.heads_dir) / cfg.name, heads, spec)
        with open_executor(cfg.executor, cfg.dask, "align") as executor:
            job, result = run_store_stage(out, f"`distill align {cfg.name}`",
                                          lambda: plan_align(cfg, pairs, heads, spec), executor, progress)
        summary = {"teacher": cfg.name, "teacher_fingerprint": spec["teacher_fingerprint"],
                   "sources": {"vision": cfg.vision, "text": cfg.text}, "splits": sorted(pairs),
                   "up_to_date": result.up_to_date, **result.counters(), "forward_calls": 0,
                   **{k: v for k, v in info.items() if k != "history"},
                   "seconds": round(time.perf_counter() - t0, 3)}
        summary_dir = Path(cfg.summary_dir)
        summary_dir.mkdir(parents=True, exist_ok=True)
        (summary_dir / f"{cfg.name}.json").write_text(
            json.dumps(portable(summary | {"history": info["history"]}), indent=2, sort_keys=True) + "\n")
        return summary


def _entry(entries: dict[str, Any] | None, role: str) -> dict[str, Any] | None:
    entry = (entries or {}).get(role)
    return None if entry is None else {"teacher": entry.teacher, "kwargs": dict(entry.kwargs)}
