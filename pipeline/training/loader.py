"""Training data: shards streamed through a shuffle buffer and joined to teacher-cache rows.

Samples are matched to cache rows by their stable ids (``shard/key`` for images,
``shard/key#c`` for captions), never by position, so a reordered stream still meets the right
teacher targets. Every random choice (shard order, shuffle buffer, caption, augmentation) is
derived from ``(seed, epoch, ...)`` rather than a global RNG: the stream of an epoch is a pure
function of the seed (and of ``num_workers``, which splits the shards), so a run resumes
exactly from ``(epoch, position)``.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import PIL.Image
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.manifest import Manifest
from pipeline.data.handlers import make_handler
from pipeline.data.shards import RandomAccess, iter_samples
from pipeline.errors import CacheError, PipelineError
from pipeline.training.targets import TeacherTargets
from pipeline.views import pick_view


def derive_seed(*parts: Any) -> int:
    """A 64-bit seed that depends only on ``parts`` (stable across processes and runs)."""
    digest = hashlib.sha256(json.dumps(parts, default=str).encode()).digest()
    return int.from_bytes(digest[:8], "little")


@dataclass
class TrainItem:
    """One (image, caption) pair with the cache rows holding its teacher targets."""

    sample_id: str
    image_row: int
    text_row: int
    caption: str
    pixels: Tensor
    view: int = 0          # the stored view the pixels replay (train.views: sample), else 0


@dataclass
class SkipEvent:
    """A sample left out of training, reported through the stream so workers lose no counts."""

    sample_id: str
    reason: str




@dataclass(frozen=True)
class LoaderState:
    """Where the stream stands: elements of epoch ``epoch`` consumed so far."""

    epoch: int = 0
    position: int = 0


@dataclass
class ViewReplay:
    """``train.views: sample``: each sample's view of an epoch, replayed from its stored box and
    flip (:mod:`pipeline.views`) through the student's own resize and normalisation."""

    views: int                     # V of the store
    image_view: Any                # [N_images, V, 5] view parameters (a RowReader: read per row)
    replay: Callable[[PIL.Image.Image, Any], Tensor]  # the student transform's ``replay``

    def pixels(self, image: PIL.Image.Image, row: int, view: int) -> Tensor:
        return self.replay(image, self.image_view[row][view])


class DistillStream(IterableDataset):
    """One epoch of joined training samples (workers split the shards between them)."""

    def __init__(self, manifest: Manifest, targets: TeacherTargets,
                 transform: Callable[[PIL.Image.Image, random.Random], Tensor], *, seed: int,
                 epoch: int, shuffle_buffer: int, on_bad_image: str, rank: int = 0,
                 world_size: int = 1, replay: ViewReplay | None = None) -> None:
        super().__init__()
        self.manifest, self.transform, self.replay = manifest, transform, replay
        self.seed, self.epoch, self.shuffle_buffer = seed, epoch, shuffle_buffer
        self.on_bad_image = on_bad_image
        self.rank, self.world_size = rank, world_size  # training processes (torchrun) split shards
        # Only lookups go to workers (ids are read there shard by shard); embeddings stay in
        # the main process.
        self.image_rows, self.text_rows = targets.image_rows, targets.text_rows
        self.image_valid, self.text_valid = targets.image_valid, targets.text_valid

    def shard_order(self) -> list[str]:
        """Shard names in this epoch's seeded order."""
        names = [s.name for s in self.manifest.shards]
        random.Random(derive_seed(self.seed, "shards", self.epoch)).shuffle(names)
        return names

    def _join(self, sample: Any) -> TrainItem | SkipEvent:
        """Attach cache rows, pick this epoch's caption among the valid ones, make pixels.

        Pixels are made before the shuffle buffer so it holds student-sized tensors rather than
        full-size decoded images (1000 x 3 x 64 x 64 float32 = 49 MB).
        """
        sid = sample.sample_id
        row = self.image_rows.get(sid)
        if row is None:
            raise CacheError(f"sample {sid} has no row in the teacher cache although the dataset "
                             "fingerprints match; the cache is damaged: rebuild it with `distill teach`")
        if sample.image is None:
            return SkipEvent(sid, f"image could not be decoded ({sample.error})")
        if not self.image_valid[row]:
            return SkipEvent(sid, "teacher cache marks the image row invalid")
        captions = [(self.text_rows[f"{sid}#{c}"], text) for c, text in enumerate(sample.captions)]
        captions = [(r, text) for r, text in captions if self.text_valid[r]]
        if not captions:
            return SkipEvent(sid, "no caption with a valid teacher cache row")
        rng = random.Random(derive_seed(self.seed, "sample", self.epoch, sid))
        text_row, caption = captions[rng.randrange(len(captions))]
        if self.replay is not None:  # the student sees exactly the view its target was made from
            view = pick_view(self.seed, self.epoch, sid, self.replay.views)
            pixels = self.replay.pixels(sample.image, row, view)
            return TrainItem(sid, row, text_row, caption, pixels, view)
        return TrainItem(sid, row, text_row, caption, self.transform(sample.image, rng))

    def _joined(self, shards: Sequence[str]) -> Iterator[TrainItem | SkipEvent]:
        handler = make_handler(self.on_bad_image)  # type: ignore[arg-type]
        for shard in shards:
            for sample in iter_samples(self.manifest, shards=[shard], handler=handler):
                yield self._join(sample)

    def reader_slot(self) -> tuple[int, int]:
        """(this reader's index, number of readers): every DataLoader worker of every rank reads
        its own shards, ``shard_order()[index::readers]``; one process, no workers: ``(0, 1)``."""
        info = get_worker_info()
        wid, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        return self.rank * n_workers + wid, self.world_size * n_workers

    def __iter__(self) -> Iterator[TrainItem | SkipEvent]:
        slot, readers = self.reader_slot()
        # The single-process seeds stay as they were (slot = worker id when world_size is 1).
        rng = random.Random(derive_seed(self.seed, "buffer", self.epoch, slot))
        buffer: list[TrainItem] = []
        for element in self._joined(self.shard_order()[slot::readers]):
            if isinstance(element, SkipEvent):
                yield element
            elif len(buffer) < self.shuffle_buffer:
                buffer.append(element)
            else:
                slot = rng.randrange(len(buffer))
                yield buffer[slot]
                buffer[slot] = element
        rng.shuffle(buffer)
        yield from buffer


class PlannedStream(DistillStream):
    """One epoch of joined samples in a precomputed order of image rows (hard-negative batches).

    Samples are read by id with :class:`RandomAccess` instead of streamed. Worker ``w`` of ``n``
    reads ``order[w::n]``; the DataLoader takes one element from each worker in turn, so the
    merged stream is ``order`` itself (skip events keep their slot).
    """

    def __init__(self, manifest: Manifest, targets: TeacherTargets,
                 transform: Callable[[PIL.Image.Image, random.Random], Tensor], order: np.ndarray,
                 *, seed: int, epoch: int, on_bad_image: str, replay: ViewReplay | None = None) -> None:
        super().__init__(manifest, targets, transform, seed=seed, epoch=epoch, shuffle_buffer=0,
                         on_bad_image=on_bad_image, replay=replay)
        self.order = np.asarray(order)
        self.row_index = targets.row_index  # row -> sample id, read from the store on demand

    def __iter__(self) -> Iterator[TrainItem | SkipEvent]:
        info = get_worker_info()
        wid, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        reader = RandomAccess(self.manifest, make_handler(self.on_bad_image))  # type: ignore[arg-type]
        try:
            for row in self.order[wid::n_workers]:
                yield self._join(reader.read(self.row_index.image_id(int(row))))
        finally:
            reader.close()


def _as_is(element: Any) -> Any:
    """Collate function for ``batch_size=None``: pass stream elements through untouched."""
    return element


def iter_batches(make_dataset: Callable[[int], IterableDataset], batch_size: int,
                 num_workers: int, state: LoaderState
                 ) -> Iterator[tuple[list[TrainItem], LoaderState, list[SkipEvent]]]:
    """Endless full batches, epoch after epoch, starting at ``state``.

    Yields ``(items, state_after, skips)``; ``skips`` are the skip events met since the previous
    batch. Each epoch's last partial batch is dropped (a batch never mixes epochs, so an image
    never meets itself as a negative). Resuming re-reads the epoch and drops ``position`` elements:
    the merged stream is deterministic for a given ``num_workers``, so this is exact.
    """
    epoch, drop = state.epoch, state.position
    skips: list[SkipEvent] = []
    while True:
        loader = DataLoader(make_dataset(epoch), batch_size=None, num_workers=num_workers,
                            collate_fn=_as_is)
        position, produced, items = 0, 0, []
        for element in loader:
            position += 1
            if position <= drop:
                continue
            if isinstance(element, SkipEvent):
                skips.append(element)
                continue
            items.append(element)
            if len(items) == batch_size:
                yield items, LoaderState(epoch, position), skips
                items, skips, produced = [], [], produced + 1
        if produced == 0 and drop == 0:
            raise PipelineError(f"epoch {epoch} yielded no full batch of {batch_size}: the split has "
                                "fewer usable samples than batch_size; lower train.batch_size")
        epoch, drop = epoch + 1, 0


def collate(items: Sequence[TrainItem]) -> dict[str, Any]:
    """Stack a batch: pixels, cache rows and captions (tokenised later by the student)."""
    return {"pixels": torch.stack([it.pixels for it in items]),
            "image_rows": torch.tensor([it.image_row for it in items], dtype=torch.long),
            "text_rows": torch.tensor([it.text_row for it in items], dtype=torch.long),
            "views": torch.tensor([it.view for it in items], dtype=torch.long),
            "captions": [it.caption for it in items]}
