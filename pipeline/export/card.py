"""``MODEL_CARD.md`` of an exported student: its architecture and size, where its first weights
came from and what it was distilled from (teacher and dataset fingerprints, recipe), its
evaluation figures and latencies, the checks of the exported forms, and how to load each form."""
from __future__ import annotations

from typing import Any

_QUALITY = (("image→text R@1 / R@5 / R@10", ("i2t_R@1", "i2t_R@5", "i2t_R@10")),
            ("text→image R@1 / R@5 / R@10", ("t2i_R@1", "t2i_R@5", "t2i_R@10")),
            ("RSUM", ("rsum",)), ("image→image NDCG@10", ("i2i_ndcg@10",)),
            ("text→text NDCG@10", ("t2t_ndcg@10",)))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return "–" if value is None else str(value)


def _init_lines(spec: dict[str, Any]) -> list[str]:
    init = spec.get("init") or {}
    if init.get("from_teacher"):
        layers = ", ".join(f"{kind} layers {init.get(f'{kind}_layers') or 'all'}" for kind in ("image", "text"))
        return [f"- **Initialised from** teacher `{init['from_teacher']}` ({init['teacher']}, fingerprint "
                f"`{init['teacher_fingerprint']}`) by weight inheritance: {layers}; inherited: "
                f"{', '.join(init.get('inherited', []))}."]
    if init.get("pretrained") or init.get("pretrained_file"):
        return [f"- **Initialised from** `{init.get('pretrained') or init.get('pretrained_file')}`."]
    return ["- **Initialised** from random weights."]


def _metrics_lines(metrics: dict[str, Any] | None) -> list[str]:
    if not metrics or "student" not in metrics:
        return ["No evaluation was given (`export.metrics_path`); run `distill evaluate`."]
    student, teacher = metrics["student"], metrics.get("teacher", {})
    pct = metrics.get("pct_of_teacher", {})
    lines = ["| metric | student | teacher | student % of teacher |", "|---|---:|---:|---:|"]
    for label, keys in _QUALITY:
        if not any(k in student for k in keys):
            continue
        row = [" / ".join(_fmt(d.get(k)) for k in keys) for d in (student, teacher)]
        row.append(" / ".join(_fmt(pct.get(k)) for k in keys))
        lines.append(f"| {label} | {' | '.join(row)} |")
    eff = (metrics.get("efficiency") or {}).get("student", {})
    timing = [f"{k}: {_fmt(v)}" for k, v in sorted(eff.items()) if "ms" in k or "mb" in k]
    if timing:
        machine = metrics.get("machine", {})
        lines += ["", f"Efficiency ({machine.get('cpus', '?')} CPUs, {machine.get('torch_threads', '?')} "
                  f"torch threads): " + "; ".join(timing) + "."]
    return lines


def card_title(spec: dict[str, Any], summary: dict[str, Any] | None) -> str:
    """The card's default title: the student family, the teacher it inherited from and the
    recipe, e.g. ``timm_hf student, inherited from aligned, recipe best``."""
    parts = [f"{spec['student']} student"]
    if (spec.get("init") or {}).get("from_teacher"):
        parts.append(f"inherited from {spec['init']['from_teacher']}")
    if (summary or {}).get("recipe"):
        parts.append(f"recipe {summary['recipe']}")
    return ", ".join(parts)


def model_card(name: str, spec: dict[str, Any], summary: dict[str, Any] | None,
               metrics: dict[str, Any] | None, exported: dict[str, Any]) -> str:
    """The card's Markdown. ``summary``: the training run's ``train_summary.json``;
    ``metrics``: the evaluation's ``metrics.json``; ``exported``: what each form wrote and its
    checks."""
    params = (summary or {}).get("tower_parameters") or {}
    lines = [f"# {name}", "", "A dual-encoder image-text student distilled offline from cached teacher "
             "outputs (vlm-distill).", "", "## Model", "",
             f"- **Architecture**: `{spec['student']}` with `{spec.get('kwargs')}`; embedding width "
             f"{spec['embed_dim']}, images {spec['image_size']} px.",
             f"- **Parameters**: image tower {params.get('image', '?'):,}, text tower "
             f"{params.get('text', '?'):,}." if params else "- **Parameters**: see `train_summary.json`.",
             *_init_lines(spec)]
    if summary:
        lines += [f"- **Distilled from** teacher caches {', '.join(f'`{p}` (`{fp}`)' for p, fp in summary.get('caches', {}).items())} "
                  f"of dataset `{summary.get('dataset_fingerprint')}`, recipe `{summary.get('recipe')}` "
                  f"(losses {', '.join(t['name'] for t in summary.get('losses', []))}), "
                  f"{summary.get('steps')} steps, {summary.get('teacher_forward_calls', 0)} teacher forward passes."]
    lines += ["", "## Evaluation", "", *_metrics_lines(metrics), "", "## Exported forms", ""]
    if "open_clip" in exported:
        oc = exported["open_clip"]
        lines += [f"- **open_clip** (`{oc['dir']}`), largest difference to the trained model "
                  f"{_fmt(oc.get('max_difference'))}:", "", "```python", "import open_clip",
                  f"model, _, preprocess = open_clip.create_model_and_transforms('local-dir:{oc['dir']}')",
                  f"tokenizer = open_clip.get_tokenizer('local-dir:{oc['dir']}')", "```"]
        if oc.get("builtin"):
            lines += ["", f"  or `open_clip.create_model_and_transforms('{oc['builtin']}', "
                      f"pretrained='{oc['dir']}/open_clip_model.safetensors')`."]
        lines.append("")
    elif "open_clip_skipped" in exported:
        lines += [f"- open_clip: not written ({exported['open_clip_skipped']}).", ""]
    if "onnx" in exported:
        ox = exported["onnx"]
        lines += [f"- **ONNX** (`{ox['dir']}`: `image_encoder.onnx`, `text_encoder.onnx`, "
                  f"`preprocess.json`; dynamic batch; largest difference to the trained model "
                  f"{', '.join(f'{k} {_fmt(v)}' for k, v in ox.get('max_difference', {}).items())}):",
                  "", "```python", "import onnxruntime as ort",
                  f"image = ort.InferenceSession('{ox['dir']}/image_encoder.onnx')",
                  f"text = ort.InferenceSession('{ox['dir']}/text_encoder.onnx')",
                  "emb = image.run(None, {'pixels': pixels})[0]   # pixels as preprocess.json says",
                  "emb = text.run(None, {'tokens': tokens})[0]    # int64 token ids, preprocess.json['text']",
                  "```", ""]
    return "\n".join(lines) + "\n"
