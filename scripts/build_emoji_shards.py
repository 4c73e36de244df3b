"""Build the shipped demo dataset ``demo/emoji/`` from the ``emoji-datasource-google`` npm package.

    cd /tmp && npm pack emoji-datasource-google && tar xzf emoji-datasource-google-*.tgz
    python scripts/build_emoji_shards.py /tmp/package --out demo/emoji

Every emoji with a Google image becomes one sample: the 64 px PNG bytes as shipped, and a json with
2-3 captions built from its Unicode name, short names and category, its subcategory as ``label``,
its ``category`` and ``unified`` code point(s). Samples are sorted by the package's ``sort_order``
and tar members carry fixed metadata, so reruns on the same package give byte-identical shards.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from pipeline.data.writing import write_manifest, write_shards  # noqa: E402

IMAGE_DIR = Path("img/google/64")


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def captions_for(entry: dict[str, Any]) -> list[str]:
    """2-3 distinct captions: plain name, a descriptive sentence, the short names."""
    name = entry["name"].lower()
    category = entry["category"].lower()
    subcategory = entry["subcategory"].replace("-", " ")
    shorts = ", ".join(s.replace("_", " ") for s in entry["short_names"])
    candidates = [
        name,
        f"{_article(name)} {name} emoji, from {category}: {subcategory}",
        f"{shorts} ({subcategory})",
    ]
    return list(dict.fromkeys(candidates))  # drop repeats, keep order


def emoji_samples(package: Path) -> list[dict[str, Any]]:
    """One WebDataset sample dict per emoji with a Google image, in ``sort_order``."""
    entries = json.loads((package / "emoji.json").read_text(encoding="utf-8"))
    entries = sorted((e for e in entries if e.get("has_img_google")),
                     key=lambda e: (e["sort_order"], e["unified"]))
    samples = []
    for e in entries:
        key = Path(e["image"]).stem  # e.g. "1f600" or "0023-fe0f-20e3": no dots, unique
        samples.append({
            "__key__": key,
            "png": (package / IMAGE_DIR / e["image"]).read_bytes(),
            "json": {"captions": captions_for(e), "label": e["subcategory"],
                     "category": e["category"], "unified": e["unified"]},
        })
    return samples


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", type=Path, help="unpacked emoji-datasource-google package directory")
    parser.add_argument("--out", type=Path, default=Path("demo/emoji"), help="output dataset directory")
    parser.add_argument("--shard-size", type=int, default=400, help="samples per shard")
    args = parser.parse_args(argv)
    version = json.loads((args.package / "package.json").read_text())["version"]
    for old in args.out.glob("emoji-*.tar"):
        old.unlink()  # a smaller rebuild must not leave stale shards behind
    paths = write_shards(emoji_samples(args.package), args.out, "emoji", args.shard_size)
    manifest = write_manifest(args.out)
    print(f"emoji-datasource-google {version}: {manifest.n_images} images, {manifest.n_texts} captions, "
          f"{len(paths)} shards in {args.out} ({manifest.fingerprint})")


if __name__ == "__main__":
    main()
