"""The README's demo figures and the report's screenshots, from one real ``make demo``.

    make demo && python scripts/report_screenshots.py

Reads the run's ``reports/eval/metrics.json`` and ``reports/eval/index.html`` (and the training
summary and params.yaml for the schedule), then, all from that one run:

1. writes ``docs/demo_run.json``: the metrics and the settings they came from (the record the
   README's figures are rendered from, committed with them);
2. rewrites the README's demo table and the sentence beside it (between the ``demo-figures``
   markers) from that record;
3. takes the screenshots ``docs/report.png`` (the top of the HTML report) and
   ``docs/report-gallery.png`` (its retrieval gallery) with headless Chromium, each stamped with
   the fingerprint of the metrics it shows (a PNG text chunk).

``--check`` changes nothing and exits 1 when the README or a screenshot does not match
``docs/demo_run.json`` (``tests/test_readme_figures.py`` runs the same check), so the figures and
pictures cannot drift apart. Chromium: Debian's ``chromium`` package (``apt-get install chromium``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- demo-figures:start", "<!-- demo-figures:end -->"
STAMP_KEY = "vlm-distill-metrics"  # PNG text chunk: fingerprint of the metrics a screenshot shows
WIDTH, TOP_HEIGHT, GALLERY_HEIGHT = 900, 1440, 900
MARGIN = "<style>body { padding: 0 14px; }</style>"  # the page has none below its max width


def metrics_fingerprint(metrics: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a metrics dict."""
    text = json.dumps(metrics, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def make_record(metrics: dict[str, Any], params: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """What the README quotes: the metrics of one run and the settings behind them."""
    return {"metrics": metrics, "teacher": params["evaluate"].get("teacher"),
            "recipe": summary.get("recipe"), "epochs": params["train"].get("epochs"),
            "steps": summary.get("steps"), "batch_size": params["train"].get("batch_size"),
            "seed": params["train"].get("seed")}


def _r(values: list[float | None], digits: int = 1) -> str:
    return " / ".join("–" if v is None else f"{v:.{digits}f}" for v in values)


def _millions(n: float | None) -> str:
    if n is None:
        return "–"
    return f"{n / 1e6:.2f} M" if n < 1e6 else f"{n / 1e6:.1f} M"


def _ms(v: float | None) -> str:
    return "–" if v is None else (f"{v:.2f} ms" if v < 1 else f"{v:.1f} ms")


def readme_block(record: dict[str, Any]) -> str:
    """The README's demo table and the sentence beside it, from a record (``make_record``)."""
    m = record["metrics"]
    s, t, a = m["student"], m.get("teacher", {}), m.get("alone", {})
    pct = m.get("pct_of_teacher", {})
    es, et = m["efficiency"]["student"], m["efficiency"].get("teacher", {})
    machine, counts = m.get("machine", {}), m["counts"]

    def recall(d: dict, direction: str) -> list[float | None]:
        return [d.get(f"{direction}_R@{k}") for k in (1, 5, 10)]

    def pcts(direction: str) -> str:
        return " / ".join(f"{pct[f'{direction}_R@{k}']:.0f}" for k in (1, 5, 10))

    teacher = f"teacher (`{record['teacher']}`)"
    params_s = (es.get("params_image"), es.get("params_text"))
    params_t = (et.get("params_image"), et.get("params_text"))
    size_pct = 100 * es["params_total"] / et["params_total"] if et.get("params_total") else None
    rows = [
        f"| metric | student alone | student | {teacher} | student % of teacher |",
        "|---|---:|---:|---:|---:|",
        f"| image→text R@1 / R@5 / R@10 | {_r(recall(a, 'i2t'))} | {_r(recall(s, 'i2t'))} | {_r(recall(t, 'i2t'))} | {pcts('i2t')} |",
        f"| text→image R@1 / R@5 / R@10 | {_r(recall(a, 't2i'))} | {_r(recall(s, 't2i'))} | {_r(recall(t, 't2i'))} | {pcts('t2i')} |",
        f"| RSUM | {_r([a.get('rsum')])} | {_r([s['rsum']])} | {_r([t.get('rsum')])} | {pct['rsum']:.0f} |",
        f"| image→image NDCG@10 | {_r([a.get('i2i_ndcg@10')], 3)} | {_r([s['i2i_ndcg@10']], 3)} | {_r([t.get('i2i_ndcg@10')], 3)} | {pct['i2i_ndcg@10']:.0f} |",
        f"| text→text NDCG@10 | {_r([a.get('t2t_ndcg@10')], 3)} | {_r([s['t2t_ndcg@10']], 3)} | {_r([t.get('t2t_ndcg@10')], 3)} | {pct['t2t_ndcg@10']:.0f} |",
        f"| parameters (image + text) | the student's | {' + '.join(map(_millions, params_s))} | "
        f"{' + '.join(map(_millions, params_t))} | {size_pct:.0f} % |",
        f"| image encode, batch 1 | | {_ms(es.get('image_ms_per_item_b1'))} | {_ms(et.get('image_ms_per_item_b1'))} | |",
        f"| text encode, batch 1 | | {_ms(es.get('text_ms_per_item_b1'))} | {_ms(et.get('text_ms_per_item_b1'))} | |",
    ]
    alone_pct = 100 * a["rsum"] / t["rsum"] if a.get("rsum") and t.get("rsum") else None
    speed = (et["image_ms_per_item_b1"] / es["image_ms_per_item_b1"]
             if et.get("image_ms_per_item_b1") and es.get("image_ms_per_item_b1") else None)
    lead = (f"Measured by `make demo` on this 2-core CPU (`reports/eval/report.md`; recipe "
            f"`{record['recipe']}`, {record['epochs']:g} epochs = {record['steps']} steps of "
            f"{record['batch_size']}, seed {record['seed']}), test split of {counts['n_images']} images "
            f"and {counts['n_texts']} captions, against the `{record['teacher']}` teacher it distils "
            "from; \"student alone\" is the same student, data and schedule without a teacher "
            "(stage `train_alone`):")
    busy = machine.get("load_1min", 0) > machine.get("cpus", 1)
    tail = (f"(Latencies from that run: load average {machine.get('load_1min', float('nan')):.2f} on "
            f"{machine.get('cpus')} CPUs" + ("; the machine was busy, so they are inflated" if busy else "")
            + ".) Distillation takes the student from RSUM "
            f"{a.get('rsum', float('nan')):.1f} alone to {s['rsum']:.1f}: from {alone_pct or float('nan'):.0f} % "
            f"to {pct['rsum']:.0f} % of the teacher's {t.get('rsum', float('nan')):.1f}, with "
            f"{size_pct:.0f} % of its parameters"
            + (f" and an image encoded {speed:.0f} times faster." if speed else "."))
    note = (f"{START}: written by scripts/report_screenshots.py from docs/demo_run.json, "
            "the record of one `make demo`; do not edit by hand -->")
    return "\n".join([note, lead, "", *rows, "", tail, END])


def replace_block(readme: str, block: str) -> str:
    """``readme`` with the text between the markers (markers included) replaced by ``block``."""
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pattern.search(readme):
        raise SystemExit(f"README has no {START} ... {END} block")
    return pattern.sub(lambda _: block, readme, count=1)


def find_chromium() -> str:
    """A Chromium (or Chrome) binary on PATH."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    raise SystemExit("no Chromium on PATH: apt-get install chromium")


def screenshot(page: Path, out: Path, height: int, stamp: str) -> None:
    """A ``WIDTH`` x ``height`` screenshot of the top of ``page``, stamped with ``stamp``."""
    from PIL import Image, PngImagePlugin

    with tempfile.TemporaryDirectory() as tmp:
        shot = Path(tmp) / "shot.png"
        subprocess.run([find_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                        "--hide-scrollbars", "--virtual-time-budget=5000",
                        f"--window-size={WIDTH},{height}", f"--screenshot={shot}", page.resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)
        info = PngImagePlugin.PngInfo()
        info.add_text(STAMP_KEY, stamp)
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.open(shot).convert("RGB").save(out, pnginfo=info, optimize=True)


def gallery_page(html: str) -> str:
    """The report page cut down to its retrieval gallery (same head and styles)."""
    head, _, body = html.partition("<body>")
    start = body.index("<h2>Retrieval gallery</h2>")
    end = body.find("<h2>Notes</h2>")
    return f"{head}<body>\n{body[start:end if end >= 0 else body.index('</body>')]}\n</body></html>\n"


def png_stamp(path: Path) -> str | None:
    """The metrics fingerprint a screenshot was stamped with (None: none)."""
    from PIL import Image

    return Image.open(path).text.get(STAMP_KEY) if path.is_file() else None


def check(readme: Path, record_path: Path, shots: list[Path]) -> list[str]:
    """What does not match the record: the README block, screenshots of other metrics."""
    record = json.loads(record_path.read_text())
    problems = []
    found = re.search(re.escape(START) + r".*?" + re.escape(END), readme.read_text(), re.S)
    if found is None or found.group(0) != readme_block(record):
        problems.append(f"{readme}: the demo figures differ from {record_path}; run "
                        "scripts/report_screenshots.py after `make demo`")
    want = metrics_fingerprint(record["metrics"])
    for shot in shots:
        if png_stamp(shot) != want:
            problems.append(f"{shot}: not a screenshot of the metrics in {record_path}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eval-dir", type=Path, default=Path("reports/eval"))
    parser.add_argument("--train-summary", type=Path, default=Path("models/student/train_summary.json"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--record", type=Path, default=ROOT / "docs/demo_run.json")
    parser.add_argument("--shots", type=Path, nargs=2, default=[ROOT / "docs/report.png",
                                                                 ROOT / "docs/report-gallery.png"])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 on a mismatch")
    args = parser.parse_args()
    if args.check:
        problems = check(args.readme, args.record, args.shots)
        print("\n".join(problems) or "README figures and screenshots match " + str(args.record))
        return 1 if problems else 0
    metrics = json.loads((args.eval_dir / "metrics.json").read_text())
    record = make_record(metrics, yaml.safe_load(args.params.read_text()),
                         json.loads(args.train_summary.read_text()))
    args.record.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    args.readme.write_text(replace_block(args.readme.read_text(), readme_block(record)))
    stamp = metrics_fingerprint(metrics)
    html = (args.eval_dir / "index.html").read_text(encoding="utf-8").replace("</head>", MARGIN + "</head>", 1)
    with tempfile.TemporaryDirectory() as tmp:
        top, gallery = Path(tmp) / "top.html", Path(tmp) / "gallery.html"
        top.write_text(html, encoding="utf-8")
        gallery.write_text(gallery_page(html), encoding="utf-8")
        screenshot(top, args.shots[0], TOP_HEIGHT, stamp)
        screenshot(gallery, args.shots[1], GALLERY_HEIGHT, stamp)
    print(f"wrote {args.record}, the README's demo figures, {args.shots[0]} and {args.shots[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
