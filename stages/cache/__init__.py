"""``distill cache info|verify PATH``: inspect and check a cache store."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from stages.common import console, print_json, reported_errors

out = Console(soft_wrap=True)  # stdout, long fingerprints unwrapped

app = typer.Typer(help="Inspect and verify Zarr cache stores.", no_args_is_help=True)
PathArg = Annotated[Path, typer.Argument(help="A store, e.g. caches/demo_clip/train.zarr.")]


@app.command("info")
def info(path: PathArg,
         as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False) -> None:
    """Arrays, shapes, dtypes, fingerprints, size on disk, valid/invalid row counts."""
    from pipeline.stores.inspect import cache_info  # imported here: --help stays light

    with reported_errors():
        data = cache_info(path)
    if as_json:
        print_json(data)
        return
    table = Table(title=str(path))
    for col in ("array", "shape", "dtype", "shard", "chunk"):
        table.add_column(col)
    for name, a in data["arrays"].items():
        table.add_row(name, str(a["shape"]), a["dtype"], str(a["shards"]), str(a["chunks"]))
    out.print(table)
    attrs = data["attrs"]
    for key in ("schema", "schema_version", "split", "teacher_fingerprint", "dataset_fingerprint",
                "source_teacher_fingerprint", "logit_scale", "created", "complete"):
        if key in attrs:
            out.print(f"{key}: {attrs[key]}", highlight=False)
    if "views" in data:  # teacher stores: embeddings per image (view 0 = the plain image)
        params = attrs.get("view_params") or {}
        extra = (f" (crop scale {params['scale']}, ratio {[round(r, 3) for r in params['ratio']]}, "
                 f"flip {params['flip']})") if params else ""
        out.print(f"views: {data['views']}{extra}", highlight=False)
    for kind in ("image", "text"):
        if f"{kind}_rows" in data:
            out.print(f"{kind} rows: {data[f'{kind}_rows']}", highlight=False)
    out.print(f"size on disk: {data['bytes_on_disk'] / 2**20:.2f} MiB in {data['files']} files")


@app.command("verify")
def verify(path: PathArg,
           quick: Annotated[bool, typer.Option(help="Only schema, layout, shard files and row status (skip reading every chunk).")] = False,
           dataset: Annotated[Optional[Path], typer.Option(
               help="The dataset the store must be built from: its root (as teach.dataset names it; "
                    "the store's split is picked) or one split folder (with manifest.json).")] = None) -> None:
    """Check schema, fingerprints, shard files, checksums of every chunk, rows and finiteness; exit 1 on any fault."""
    from pipeline.data.manifest import load_manifest
    from pipeline.stores.inspect import made_by, split_folder, store_attrs, verify_cache

    expect = None
    if dataset is not None:
        with reported_errors():
            dataset = split_folder(dataset, store_attrs(path))
            expect = load_manifest(dataset).fingerprint
        console.print(f"dataset: {dataset}", highlight=False, soft_wrap=True)
    report = verify_cache(path, deep=not quick, expect_dataset=expect)
    attrs = report.attrs
    for key in ("schema", "split", "teacher_fingerprint", "source_teacher_fingerprint", "dataset_fingerprint"):
        if key in attrs:
            console.print(f"{key}: {attrs[key]}", highlight=False, soft_wrap=True)
    for fault in report.faults:
        console.print(f"[red]FAULT[/] {escape(fault)}", highlight=False, soft_wrap=True)
    if report.ok:
        console.print(f"[green]OK[/] {path}: checked {', '.join(report.checked)}", highlight=False,
                      soft_wrap=True)
        return
    if report.only_mismatched:
        console.print(f"[bold red]not this dataset's store[/]: {path} is sound, but `{made_by(attrs)}` "
                      f"made it from split {attrs.get('split')!r} of another dataset or split than "
                      f"{dataset}; check it against the dataset it was made from (the root, or its "
                      f"{attrs.get('split')!r} folder).", highlight=False, soft_wrap=True)
        raise typer.Exit(code=1)
    console.print(f"[bold red]{len(report.faults)} fault(s)[/] in {path}: rebuild it with the stage "
                  f"that made it (`{made_by(attrs)}`, or `dvc repro`), or restore it with "
                  "`dvc checkout`/`dvc pull`.", highlight=False, soft_wrap=True)
    raise typer.Exit(code=1)
