"""Emoji scenes: the demo's grounding data, built deterministically from the shipped emoji.

A scene is a square canvas of one pastel colour with 2-5 emoji pasted at random positions and
sizes, never overlapping. Each expression names one pasted emoji:

* ``name``: "the dog" — the emoji appears once in the scene;
* ``size``: "the larger dog" / "the smaller dog" — the emoji appears twice, at clearly
  different sizes (ratio >= 1.4);
* ``position``: "the dog on the left" / "at the top" — twins at least ``MIN_GAP`` px apart
  along that axis;
* ``relation``: "the dog left of the pizza" — exactly one twin lies on that side of a unique
  emoji (by centre).

Half of the scenes (with 3+ emoji) hold such a twin pair, and each twin gets one expression of a
type drawn among those that single it out; up to two unique emoji get a ``name`` expression. A
box is the tight box (alpha > 0) of the pasted emoji, in pixel ``xywh``. Everything is drawn from
``random.Random(f"{seed}:{index}")``, so scene ``index`` is the same on every machine and run.
"""
from __future__ import annotations

import io
import random
from dataclasses import dataclass
from typing import Any

from PIL import Image

CANVAS = 96
MIN_SIZE, MAX_SIZE = 16, 36
SIZE_RATIO = 1.4  # twins' size ratio, so "larger"/"smaller" is visible
MIN_GAP = 12  # px between twins' centres for "on the left"/"at the top"
MARGIN = 2  # px kept free between pasted emoji

# (shard key in demo/emoji, name used in expressions): distinct shapes with one-word names
POOL = (
    ("1f415", "dog"), ("1f408", "cat"), ("1f416", "pig"), ("1f404", "cow"),
    ("1f407", "rabbit"), ("1f427", "penguin"), ("1f41f", "fish"), ("1f419", "octopus"),
    ("1f40c", "snail"), ("1f98b", "butterfly"), ("1f34c", "banana"), ("1f353", "strawberry"),
    ("1f349", "watermelon"), ("1f955", "carrot"), ("1f36a", "cookie"), ("1f33b", "sunflower"),
    ("1f680", "rocket"), ("1f68c", "bus"), ("1f6b2", "bicycle"), ("2602-fe0f", "umbrella"),
    ("1f388", "balloon"), ("1f3b8", "guitar"), ("1f511", "key"), ("1f514", "bell"),
)


@dataclass(frozen=True)
class Placed:
    """One pasted emoji: its name and tight pixel box ``(x, y, w, h)``."""

    name: str
    box: tuple[int, int, int, int]

    @property
    def centre(self) -> tuple[float, float]:
        x, y, w, h = self.box
        return x + w / 2, y + h / 2

    @property
    def area(self) -> int:
        return self.box[2] * self.box[3]


@dataclass(frozen=True)
class Scene:
    """A built scene: the image, its background colour, what was pasted and the expressions."""

    image: Image.Image
    background: tuple[int, int, int]
    objects: tuple[Placed, ...]
    expressions: tuple[str, ...]
    targets: tuple[int, ...]  # index into ``objects`` of each expression's referent
    types: tuple[str, ...]  # name | size | position | relation

    def sample(self, key: str) -> dict[str, Any]:
        """The scene as a WebDataset sample: PNG + json (``expressions``, ``boxes``, ``types``)."""
        buf = io.BytesIO()
        self.image.save(buf, format="PNG", optimize=True)
        return {"__key__": key, "png": buf.getvalue(), "json": {
            "expressions": list(self.expressions),
            "boxes": [list(self.objects[t].box) for t in self.targets],
            "types": list(self.types),
            "objects": [{"name": o.name, "box": list(o.box)} for o in self.objects],
        }}


def _pastel(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randint(200, 250) for _ in range(3))  # type: ignore[return-value]


def _sizes(rng: random.Random, n: int, twins: bool) -> list[int]:
    sizes = [rng.randint(MIN_SIZE, MAX_SIZE) for _ in range(n)]
    if twins:  # objects 0 and 1 are the twins, 0 the larger
        sizes[0] = rng.randint(int(MIN_SIZE * SIZE_RATIO) + 1, MAX_SIZE)
        sizes[1] = rng.randint(MIN_SIZE, int(sizes[0] / SIZE_RATIO))
    return sizes


def _place(rng: random.Random, sizes: list[int]) -> list[tuple[int, int]] | None:
    """Top-left corners of non-overlapping squares of ``sizes``, or None if they did not fit."""
    placed: list[tuple[int, int, int]] = []
    for s in sizes:
        for _ in range(200):
            x, y = rng.randint(0, CANVAS - s), rng.randint(0, CANVAS - s)
            if all(x + s + MARGIN <= px or px + ps + MARGIN <= x or
                   y + s + MARGIN <= py or py + ps + MARGIN <= y for px, py, ps in placed):
                placed.append((x, y, s))
                break
        else:
            return None
    return [(x, y) for x, y, _ in placed]


def _paste(canvas: Image.Image, emoji: Image.Image, size: int, at: tuple[int, int]
           ) -> tuple[int, int, int, int]:
    """Alpha-composite ``emoji`` resized to ``size`` at ``at``; return its tight pixel box."""
    sprite = emoji.resize((size, size), Image.Resampling.LANCZOS)
    canvas.alpha_composite(sprite, at)
    x0, y0, x1, y1 = sprite.getchannel("A").getbbox()
    return at[0] + x0, at[1] + y0, x1 - x0, y1 - y0


def _twin_options(big: Placed, small: Placed, uniques: list[Placed]) -> list[list[tuple[str, str, str]]]:
    """Per twin (big, small): the (type, expression for big, expression for small) options."""
    name = big.name
    options = [("size", f"the larger {name}", f"the smaller {name}")]
    (bx, by), (sx, sy) = big.centre, small.centre
    if abs(bx - sx) >= MIN_GAP:
        left, right = ("big", "small") if bx < sx else ("small", "big")
        words = {left: "on the left", right: "on the right"}
        options.append(("position", f"the {name} {words['big']}", f"the {name} {words['small']}"))
    if abs(by - sy) >= MIN_GAP:
        top, bottom = ("big", "small") if by < sy else ("small", "big")
        words = {top: "at the top", bottom: "at the bottom"}
        options.append(("position", f"the {name} {words['big']}", f"the {name} {words['small']}"))
    for u in uniques:
        ux, uy = u.centre
        if min(bx, sx) < ux < max(bx, sx):
            big_side = "left of" if bx < ux else "right of"
            small_side = "right of" if big_side == "left of" else "left of"
            options.append(("relation", f"the {name} {big_side} the {u.name}",
                            f"the {name} {small_side} the {u.name}"))
        if min(by, sy) < uy < max(by, sy):
            big_side = "above" if by < uy else "below"
            small_side = "below" if big_side == "above" else "above"
            options.append(("relation", f"the {name} {big_side} the {u.name}",
                            f"the {name} {small_side} the {u.name}"))
    return options  # type: ignore[return-value]


def _expressions(rng: random.Random, objects: list[Placed], twins: bool
                 ) -> tuple[list[str], list[int], list[str]]:
    exprs, targets, types = [], [], []
    first_unique = 2 if twins else 0
    uniques = list(range(first_unique, len(objects)))
    if twins:
        options = _twin_options(objects[0], objects[1], [objects[i] for i in uniques])
        for twin in (0, 1):  # each twin draws its own type, so a scene mixes them
            kind, for_big, for_small = rng.choice(options)
            exprs.append(for_big if twin == 0 else for_small)
            targets.append(twin)
            types.append(kind)
    for i in rng.sample(uniques, min(2, len(uniques))):
        exprs.append(f"the {objects[i].name}")
        targets.append(i)
        types.append("name")
    return exprs, targets, types


def build_scene(emoji: dict[str, Image.Image], index: int, seed: int = 0) -> Scene:
    """Scene ``index``: deterministic given the emoji images (RGBA, by name), ``index`` and ``seed``."""
    rng = random.Random(f"{seed}:{index}")
    names = sorted(emoji)
    while True:  # a draw whose emoji do not fit is redrawn from the same stream
        n = rng.randint(2, 5)
        twins = n >= 3 and rng.random() < 0.5
        chosen = rng.sample(names, n - 1 if twins else n)
        kinds = [chosen[0], *chosen] if twins else chosen
        sizes = _sizes(rng, n, twins)
        corners = _place(rng, sizes)
        if corners is not None:
            break
    background = _pastel(rng)
    canvas = Image.new("RGBA", (CANVAS, CANVAS), (*background, 255))
    objects = [Placed(k, _paste(canvas, emoji[k], s, at)) for k, s, at in zip(kinds, sizes, corners)]
    exprs, targets, types = _expressions(rng, objects, twins)
    return Scene(canvas.convert("RGB"), background, tuple(objects), tuple(exprs), tuple(targets),
                 tuple(types))


def load_pool(emoji_dir: str) -> dict[str, Image.Image]:
    """The pool's emoji images (RGBA) by expression name, read from the shipped emoji shards."""
    from pipeline.data.manifest import load_manifest
    from pipeline.data.shards import iter_raw

    wanted = dict(POOL)
    manifest = load_manifest(emoji_dir, verify=True)
    found: dict[str, Image.Image] = {}
    for info in manifest.shards:
        for key, files in iter_raw(manifest.root / info.name):
            if key in wanted:
                found[wanted[key]] = Image.open(io.BytesIO(files["png"])).convert("RGBA")
    missing = sorted(set(wanted) - {k for k, v in wanted.items() if v in found})
    if missing:
        raise ValueError(f"{emoji_dir}: emoji {missing} of the scene pool not found")
    return found
