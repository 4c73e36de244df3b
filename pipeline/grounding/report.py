"""The grounding report: pictures of true and predicted boxes, and the Markdown summary."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw
from torch import Tensor

from pipeline.grounding.boxes import box_iou, cxcywh_to_xyxy
from pipeline.grounding.data import GroundingSplit

TRUE_COLOUR, PRED_COLOUR = (0, 170, 0), (220, 0, 0)
SCALE_TO = 384  # px of the longer side of a drawn scene


def pick_examples(split: GroundingSplit, pred: Tensor, n: int) -> list[int]:
    """``n`` expression rows spread over the types: the first of each type in turn, in row order."""
    by_type: dict[str, list[int]] = {}
    for i, t in enumerate(split.types):
        by_type.setdefault(t, []).append(i)
    queues = [rows for _, rows in sorted(by_type.items())]
    picked: list[int] = []
    depth = 0
    while len(picked) < n and any(depth < len(q) for q in queues):
        picked += [q[depth] for q in queues if depth < len(q)][: n - len(picked)]
        depth += 1
    return picked


def _pixel_xyxy(box: Tensor, width: int, height: int, scale: float) -> list[float]:
    x0, y0, x1, y1 = cxcywh_to_xyxy(box).tolist()
    return [x0 * width * scale, y0 * height * scale, x1 * width * scale, y1 * height * scale]


def draw_example(split: GroundingSplit, pred: Tensor, row: int) -> Image.Image:
    """The scene of expression ``row`` enlarged, true box green, predicted box red."""
    image = split.images[int(split.image_index[row])]
    scale = SCALE_TO / max(image.size)
    canvas = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(canvas)
    draw.rectangle(_pixel_xyxy(split.boxes[row], image.width, image.height, scale), outline=TRUE_COLOUR, width=3)
    draw.rectangle(_pixel_xyxy(pred[row], image.width, image.height, scale), outline=PRED_COLOUR, width=3)
    return canvas


def draw_examples(split: GroundingSplit, pred: Tensor, rows: list[int], out_dir: Path) -> list[Path]:
    """``out_dir/example_<i>.png`` for each row; older example files are removed first."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("example_*.png"):
        old.unlink()
    paths = []
    for i, row in enumerate(rows):
        path = out_dir / f"example_{i}.png"
        draw_example(split, pred, row).save(path)
        paths.append(path)
    return paths


def _f(x: Any, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def write_report(path: Path, metrics: dict[str, Any], figures: list[Path], rows: list[int],
                 split: GroundingSplit, pred: Tensor, batch_sizes: tuple[int, ...]) -> None:
    """Markdown: overall and per-type Acc@0.5 / mean IoU, size and latency, the pictures."""
    eff = metrics["efficiency"]
    lines = ["# Grounding evaluation", "",
             f"Test split `{metrics['dataset']}`: {metrics['n']} expressions; student "
             f"`{metrics['student']['student']}` on {metrics['device']}.", "",
             "| expressions | n | Acc@0.5 | mean IoU |", "|---|---:|---:|---:|",
             f"| all | {metrics['n']} | {_f(metrics['acc_at_0_5'])} | {_f(metrics['mean_iou'])} |"]
    lines += [f"| {t} | {m['n']} | {_f(m['acc_at_0_5'])} | {_f(m['mean_iou'])} |"
              for t, m in metrics["by_type"].items()]
    lines += ["", "| parameters (image / text / fusion+head / total) | " +
              " | ".join(f"latency b{b} (ms per pair)" for b in batch_sizes) + " |",
              "|---|" + "---:|" * len(batch_sizes),
              f"| {eff['params_image']:,} / {eff['params_text']:,} / {eff['params_fusion']:,} / "
              f"{eff['params_total']:,} | " + " | ".join(_f(eff[f'ms_per_pair_b{b}'], 2) for b in batch_sizes) + " |",
              "", "## Examples", "", "Green: true box; red: predicted box.", ""]
    iou = box_iou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(split.boxes))
    for fig, row in zip(figures, rows):
        rel = os.path.relpath(fig, path.parent)
        lines += [f"![{split.expressions[row]}]({rel})", "",
                  f"*\"{split.expressions[row]}\"* ({split.types[row]}, `{split.text_ids[row]}`): "
                  f"IoU {float(iou[row]):.2f}", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
