"""The CLI starts at once: --help, list and cache info/verify import no model library, and the
component names `distill list` prints without importing the implementations are those the real
registries hold."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline.catalog import CATALOG, REGISTRIES, names, resolve
from tests.test_teach import random_cache

# Libraries a light command must not load: each costs seconds and hundreds of MB at start-up.
HEAVY = ("torch", "torchvision", "open_clip", "transformers", "timm", "dvc", "sentence_transformers",
         "safetensors.torch", "matplotlib")

# Runs the typer app in a fresh interpreter, then prints which heavy modules got imported.
PROBE = """
import json, sys
from stages.cli import app
try:
    app(sys.argv[1:], standalone_mode=False)
except SystemExit:
    pass
heavy = {heavy!r}
print("\\nIMPORTED=" + json.dumps(sorted(m for m in heavy if m in sys.modules)))
"""


def imported_heavy(*args: str) -> tuple[list[str], str]:
    """Heavy modules imported by ``distill ARGS`` in a fresh interpreter, and its output."""
    proc = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *args],
                          capture_output=True, text=True, timeout=120)
    marker = proc.stdout.rsplit("IMPORTED=", 1)
    assert len(marker) == 2, proc.stdout + proc.stderr
    return json.loads(marker[1]), proc.stdout + proc.stderr


@pytest.mark.parametrize("args", [["--help"], ["list"], ["teach", "--help"], ["train", "--help"],
                                  ["evaluate", "--help"], ["cache", "--help"]])
def test_light_commands_import_no_model_library(args):
    heavy, output = imported_heavy(*args)
    assert heavy == [], output
    if args == ["list"]:
        assert "open_clip_tiny" in output and "contrastive" in output


def test_cache_info_and_verify_import_no_model_library(tiny_store):
    from stages.neighbors.run import NeighborsConfig, run_neighbors

    root = tiny_store.parent.parent
    run_neighbors(NeighborsConfig(teacher="tiny", k=3, cache_root=str(root), out_root=str(root / "nn")),
                  "tiny", progress=False)
    neighbours = root / "nn/tiny/train.zarr"
    for store in (tiny_store, neighbours):
        for args in (["cache", "info", str(store)], ["cache", "verify", str(store)]):
            heavy, output = imported_heavy(*args)
            assert heavy == [], output
            assert "train" in output and "FAULT" not in output


@pytest.mark.parametrize("kind", sorted(CATALOG))
def test_catalog_matches_the_registries(kind):
    registry = resolve(REGISTRIES[kind])
    assert names(kind) == registry.names(), f"pipeline/catalog.py is out of step with the {kind} registry"
    for name, target in CATALOG[kind].items():
        assert resolve(target) is registry.get(name), f"{kind} {name!r}: {target} is not its factory"


@pytest.fixture
def tiny_store(tmp_path):
    """A small complete teacher store."""
    return random_cache(tmp_path / "caches/tiny/train.zarr", n_img=6, captions=2, dim=8)
