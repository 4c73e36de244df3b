"""Build the shipped grounding demo ``demo/emoji_scenes/`` from the shipped emoji ``demo/emoji/``.

    python scripts/build_emoji_scenes.py --emoji demo/emoji --out demo/emoji_scenes

Scene ``i`` (``pipeline.grounding.scenes.build_scene``) depends only on the emoji images, ``i``
and ``--seed``; tar members carry fixed metadata, so reruns give byte-identical shards.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from pipeline.data.writing import write_manifest, write_shards  # noqa: E402
from pipeline.grounding.scenes import build_scene, load_pool  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--emoji", type=Path, default=Path("demo/emoji"), help="emoji dataset directory")
    parser.add_argument("--out", type=Path, default=Path("demo/emoji_scenes"), help="output dataset directory")
    parser.add_argument("--scenes", type=int, default=1000, help="number of scenes")
    parser.add_argument("--seed", type=int, default=0, help="seed of every scene's random stream")
    parser.add_argument("--shard-size", type=int, default=400, help="scenes per shard")
    args = parser.parse_args(argv)
    pool = load_pool(str(args.emoji))
    for old in args.out.glob("scenes-*.tar"):
        old.unlink()  # a smaller rebuild must not leave stale shards behind
    types: Counter[str] = Counter()

    def samples():
        for i in range(args.scenes):
            scene = build_scene(pool, i, args.seed)
            types.update(scene.types)
            yield scene.sample(f"scene{i:06d}")

    paths = write_shards(samples(), args.out, "scenes", args.shard_size)
    manifest = write_manifest(args.out)
    print(f"{manifest.n_images} scenes, {manifest.n_texts} expressions ({dict(sorted(types.items()))}), "
          f"{len(paths)} shards in {args.out} ({manifest.fingerprint})")


if __name__ == "__main__":
    main()
