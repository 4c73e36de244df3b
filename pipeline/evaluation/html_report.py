"""The HTML report of ``evaluate``: one self-contained page (``reports/eval/index.html``) that a
person opens in a browser, with every picture embedded, so it works offline and can be mailed.

It shows the metrics tables, the Recall@K curves of student and teacher, the training curves from
``train_log.csv`` (loss, each loss term, balancer weights and learned scalars), and a gallery of
retrievals: for sample test captions the top images of the student and of the teacher, for sample
test images their top captions, the true match marked. Plots are drawn with matplotlib; nothing is
fetched from the network. A small inline script checks, once the page has loaded, that every
embedded image decoded, and says so on the page (``data-images-loaded`` / ``data-images-broken``
on ``<body>``).
"""
from __future__ import annotations

import base64
import csv
import html
import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import PIL.Image

from pipeline.evaluation.efficiency import busy_note
from pipeline.evaluation.report import efficiency_rows, fmt, quality_rows
from pipeline.evaluation.scoring import Gallery
from pipeline.paths import portable_text, project_path

if TYPE_CHECKING:
    from pipeline.evaluation.config import EvalConfig

THUMB_PX = 112  # longest side of a gallery thumbnail

_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1180px; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5em 0; } td, th { padding: 3px 10px; }
th { background: #f3f3f3; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafafa; }
.note { color: #555; font-size: .92em; } .warn { background: #fff3cd; padding: .6em 1em; }
figure { margin: 1em 0; } figure img { max-width: 100%; }
.query { margin: 1.2em 0; padding: .6em; border: 1px solid #e3e3e3; border-radius: 6px; }
.row { display: flex; gap: 8px; align-items: flex-start; flex-wrap: wrap; margin: .3em 0; }
.row .who { width: 5.5em; font-weight: 600; padding-top: 2em; }
.hit { text-align: center; font-size: .8em; width: 120px; }
.hit img { width: 112px; height: 112px; object-fit: contain; border: 3px solid #ddd; background: #fff; }
.hit.true img { border-color: #2a9d2a; } .hit.true { color: #2a7a2a; font-weight: 600; }
ol.captions li.true { color: #2a7a2a; font-weight: 600; }
.imgq { display: flex; gap: 16px; } .imgq > img { width: 140px; height: 140px; object-fit: contain; }
"""

# Runs after every image has loaded or failed: counts them, and flags any that did not decode.
_CHECK_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (im) { return !(im.complete && im.naturalWidth > 0); });
  document.body.dataset.imagesLoaded = String(imgs.length - broken.length);
  document.body.dataset.imagesBroken = String(broken.length);
  if (broken.length) {
    var p = document.createElement('p'); p.className = 'warn';
    p.textContent = broken.length + ' of ' + imgs.length + ' pictures in this report did not load.';
    document.body.insertBefore(p, document.body.firstChild);
  }
});
"""


# ----------------------------------------------------------------------------- pictures


def png_data_uri(image: PIL.Image.Image) -> str:
    """``data:image/png;base64,...`` of ``image``."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def thumbnail(image: PIL.Image.Image, px: int = THUMB_PX) -> PIL.Image.Image:
    """A copy of ``image`` whose longest side is at most ``px`` (aspect kept)."""
    thumb = image.convert("RGB")
    thumb.thumbnail((px, px))
    return thumb


def _figure_uri(draw: Callable[[Any], None], size: tuple[float, float]) -> str:
    """Draw with matplotlib's object API (no global pyplot state) and embed as PNG."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=110, layout="constrained")
    draw(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def recall_figure(curves: dict[str, dict[str, np.ndarray]]) -> str | None:
    """Recall@K against K, one panel per direction, one line per model."""
    if not any(curves.values()):
        return None

    def draw(fig) -> None:
        axes = fig.subplots(1, 2, sharey=True)
        for ax, (direction, title) in zip(axes, (("i2t", "image → text"), ("t2i", "text → image"))):
            for model, by_dir in curves.items():
                curve = by_dir.get(direction)
                if curve is not None and len(curve):
                    ax.plot(np.arange(1, len(curve) + 1), curve,
                            label="student alone" if model == "alone" else model,
                            linestyle={"student": "-", "alone": ":"}.get(model, "--"))
            ax.set(title=title, xlabel="K", xscale="log", ylim=(0, 100))
            ax.grid(alpha=.3)
        axes[0].set_ylabel("Recall@K (%)")
        axes[0].legend()
    return _figure_uri(draw, (9, 3.4))


def read_train_log(path: Path) -> dict[str, np.ndarray]:
    """Numeric columns of ``train_log.csv`` (empty cells become NaN); {} when absent."""
    if not path.is_file():
        return {}
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}

    def num(v: str | None) -> float:
        try:
            return float(v) if v not in (None, "") else math.nan
        except ValueError:
            return math.nan
    return {col: np.array([num(r.get(col)) for r in rows]) for col in rows[0]}


def training_figure(log: dict[str, np.ndarray]) -> str | None:
    """Loss and each loss term against step; balancer weights and learned scalars beside them."""
    if "step" not in log or "loss" not in log:
        return None
    step = log["step"]
    terms = ["loss"] + sorted(c for c in log if c.startswith("loss_"))
    extras = sorted(c for c in log if c.startswith(("w_", "lambda_")))

    def draw(fig) -> None:
        axes = fig.subplots(1, 2 if extras else 1, squeeze=False)[0]
        for col in terms:
            axes[0].plot(step, log[col], label=col, linewidth=2 if col == "loss" else 1)
        axes[0].set(title="training loss and its terms", xlabel="step")
        axes[0].grid(alpha=.3)
        axes[0].legend(fontsize=7)
        if extras:
            for col in extras:
                axes[1].plot(step, log[col], label=col)
            axes[1].set(title="balancer weights and learned λ", xlabel="step")
            axes[1].grid(alpha=.3)
            axes[1].legend(fontsize=7)
    return _figure_uri(draw, (9, 3.4))


# ----------------------------------------------------------------------------- page


def _e(text: Any) -> str:
    return html.escape(str(text))


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(
        f"<td>{_e(c)}</td>" if i == 0 else f"<td class=num>{_e(c)}</td>" for i, c in enumerate(row))
        + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _quality_html(metrics: dict[str, Any]) -> str:
    header, rows = quality_rows(metrics)
    why = "".join(f"<p class=note>{_e(key)} has no value (–): {_e(text)}.</p>"
                  for key, text in metrics.get("unavailable", {}).items())
    return _table(header, rows) + why


def _efficiency_html(metrics: dict[str, Any], cfg: EvalConfig) -> str:
    eff = metrics["efficiency"]
    student, teacher = eff.get("student", {}), eff.get("teacher", {})
    rows = [[title, fmt(student.get(key), 3 if "_ms_" in key else 1),
             fmt(teacher.get(key), 3 if "_ms_" in key else 1)]
            for key, title in efficiency_rows(cfg.latency_batch_sizes)
            if key in student or key in teacher]
    return _table(["", "student", "teacher"], rows)


def _hit(uri: str, caption: str, true: bool) -> str:
    cls = "hit true" if true else "hit"
    mark = "✓ " if true else ""
    return f'<div class="{cls}"><img src="{uri}" alt="{_e(caption)}"><br>{mark}{_e(caption)}</div>'


def _gallery_html(gallery: Gallery, thumbs: dict[str, str]) -> str:
    parts = ["<h3>Captions → images</h3>",
             "<p class=note>Each caption's top images; the caption's own image has a green frame.</p>"]
    for q in gallery.caption_queries:
        parts.append(f'<div class="query"><div>“{_e(q["caption"])}”</div>')
        for model in ("student", "teacher"):
            if model in q:
                hits = "".join(_hit(thumbs[i], f"{sim:.3f}", hit) for i, sim, hit in q[model])
                parts.append(f'<div class="row"><div class="who">{model}</div>{hits}</div>')
        parts.append("</div>")
    parts += ["<h3>Images → captions</h3>",
              "<p class=note>Each image's top captions; its own captions are green and ticked.</p>"]
    for q in gallery.image_queries:
        lists = []
        for model in ("student", "teacher"):
            if model in q:
                items = "".join(f'<li class="{"true" if hit else ""}">{"✓ " if hit else ""}'
                                f'{_e(c)} <span class=note>({sim:.3f})</span></li>'
                                for c, sim, hit in q[model])
                lists.append(f"<div><b>{model}</b><ol class=captions>{items}</ol></div>")
        parts.append(f'<div class="query imgq"><img src="{thumbs[q["image_id"]]}" '
                     f'alt="{_e(q["image_id"])}"><div><div class=note>{_e(q["image_id"])}</div>'
                     f'{"".join(lists)}</div></div>')
    return "\n".join(parts)


def write_html_report(path: Path, cfg: EvalConfig, metrics: dict[str, Any],
                      curves: dict[str, dict[str, np.ndarray]], gallery: Gallery,
                      images: dict[str, PIL.Image.Image], notes: list[str], device: str) -> None:
    """Write the self-contained HTML report; ``images`` maps every gallery sample id to its image."""
    thumbs = {sid: png_data_uri(thumbnail(im)) for sid, im in images.items()}
    counts, machine = metrics["counts"], metrics.get("machine", {})
    busy = busy_note(machine) if machine else None
    recall_uri = recall_figure(curves)
    train_uri = training_figure(read_train_log(Path(cfg.student_dir) / "train_log.csv"))
    figure = lambda uri, alt: f'<figure><img src="{uri}" alt="{alt}"></figure>' if uri else (  # noqa: E731
        f"<p class=note>No {alt.lower()} to show.</p>")
    body = [
        "<h1>Evaluation report</h1>",
        f"<p>Test split <code>{_e(project_path(cfg.dataset))}</code>: {fmt(counts.get('n_images'))} images and "
        f"{fmt(counts.get('n_texts'))} captions scored ({counts['n_images_excluded']} images and "
        f"{counts['n_texts_excluded']} captions excluded for both models). Student "
        f"<code>{_e(project_path(cfg.student_dir))}</code>; teacher scored from its cache "
        f"<code>{_e(project_path(cfg.teacher_cache) if cfg.teacher_cache else None)}</code>"
        + (f"; student alone (the same student trained without a teacher) "
           f"<code>{_e(project_path(cfg.alone_dir))}</code>" if cfg.alone_dir else "") + ".</p>",
        "<h2>Retrieval quality</h2>", _quality_html(metrics),
        "<p class=note>Recall@K in percent; image→text counts a hit when any of the image's captions "
        "is in the top K. MedR (median rank of the first match) is lower-is-better: its last column "
        "is the student's MedR as a multiple of the teacher's. Ties in similarity are broken by the lower row. The Markdown report "
        "beside this page has the full definitions.</p>",
        figure(recall_uri, "Recall@K curves"),
        "<h2>Training</h2>", figure(train_uri, "Training curves"),
        "<h2>Efficiency</h2>", _efficiency_html(metrics, cfg),
        f"<p class=note>Device <code>{_e(device)}</code>, {fmt(machine.get('torch_threads'))} torch "
        f"threads of {fmt(machine.get('cpus'))} CPUs; load average while timing "
        f"{fmt(machine.get('load_1min'))} (1 min).</p>",
        *([f"<p class=warn>{_e(busy)}</p>"] if busy else []),
        "<h2>Retrieval gallery</h2>", _gallery_html(gallery, thumbs),
    ]
    notes = [n for n in notes if n != busy]  # shown beside the timings already
    if notes:
        body += ["<h2>Notes</h2>", "<ul>" + "".join(f"<li>{_e(portable_text(n))}</li>" for n in notes) + "</ul>"]
    page = ("<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
            "<meta name=viewport content='width=device-width, initial-scale=1'>"
            f"<title>Evaluation report</title><style>{_STYLE}</style>"
            f"<script>{_CHECK_SCRIPT}</script></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
