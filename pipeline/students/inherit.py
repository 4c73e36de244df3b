"""Students that start where their teacher left off: weight inheritance (TinyCLIP's manual
inheritance, arXiv 2309.12314).

A student of the teacher's family is built with fewer layers, and from the teacher's towers it
copies the stem / embeddings, the chosen blocks and the final norms, heads and projections,
bit for bit. The teacher is built once to read its weights; no teacher forward runs.

=====================  ========================  ============================================
teacher                student                   inherited
=====================  ========================  ============================================
``open_clip`` (ViT)    ``open_clip``, fewer      patch/token embeddings, the chosen vision and
                       blocks per tower          text blocks, final norms, projections, scale
``aligned``            ``timm_hf``               the vision teacher's tower (below), the text
                                                 teacher's encoder (below), both aligned heads
                                                 as the projections, the logit scale
``efficientnet_lite``  ``timm_hf`` image tower   stem, chosen blocks, head conv (when the last
``timm_vision``                                  block fits it); EfficientNet-Lite as timm's
                                                 ``tf_efficientnet_lite*`` (the same function)
``hf_text``            ``timm_hf`` text tower    embeddings, the chosen layers (BERT family)
=====================  ========================  ============================================

Layer lists select teacher blocks by index (None keeps every block); a list that does not fit
the teacher is an error naming it. What was inherited is recorded in the student's spec.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from pipeline.errors import PipelineError
from pipeline.fingerprint import fingerprint
from pipeline.registry import Registry
from pipeline.students.base import Student, create_student
from pipeline.students.open_clip_student import deep_merge
from pipeline.students.towers import MINILM, check_layers, keep_image_blocks
from pipeline.students.weights import fit_faults, describe_faults, load_checked

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Plan:
    """A student architecture derived from a teacher, and how to fill it from the teacher."""

    student: str                                   # STUDENTS name
    kwargs: dict[str, Any]                         # its factory kwargs (the spec)
    copy: Callable[[Student], list[str]]           # copies weights in, returns what it copied
    layers: dict[str, list[int] | None] = field(default_factory=dict)


Rule = Callable[[Any, Sequence[int] | None, Sequence[int] | None, dict[str, Any]], Plan]
RULES: Registry[Plan] = Registry("teacher to inherit from")


def inherit(teacher: Any, teacher_name: str, image_layers: Sequence[int] | None,
            text_layers: Sequence[int] | None, overrides: dict[str, Any],
            student_name: str | None = None, weights: str = "teacher") -> Student:
    """A student built from ``teacher`` (its params entry named ``teacher_name``) with the chosen
    layers, its weights copied from the teacher's; ``overrides``: student kwargs to apply
    (``train.student_kwargs``); ``student_name``: the family the caller expects (refused when the
    teacher makes another); ``weights``: ``teacher`` (inherit), or ``random`` (the same
    architecture with random weights: what inheritance adds, measured against it). The
    student's spec records what it inherited."""
    plan = RULES.get(teacher.name)(teacher, image_layers, text_layers, overrides)
    if weights == "random":
        return _random_twin(plan, teacher, teacher_name)
    if student_name is not None and student_name != plan.student:
        raise PipelineError(f"train.student is {student_name!r}, but a student inheriting from "
                            f"{teacher_name!r} ({teacher.name} teacher) is built as {plan.student}: "
                            f"set train.student: {plan.student}")
    student = create_student(plan.student, **plan.kwargs)
    copied = plan.copy(student)
    student.init_record = {
        "from_teacher": teacher_name, "teacher": teacher.name,
        "teacher_fingerprint": fingerprint(teacher.fingerprint()),
        "image_layers": plan.layers.get("image"), "text_layers": plan.layers.get("text"),
        "inherited": copied}
    return student


def _random_twin(plan: Plan, teacher: Any, teacher_name: str) -> Student:
    """The planned architecture with random weights (a local text model's tokenizer kept)."""
    kwargs = dict(plan.kwargs)
    if plan.student == "timm_hf" and kwargs.get("text_model") is not None:
        kwargs["text_random_init"] = True
    student = create_student(plan.student, **kwargs)
    student.init_record = {"architecture_of": teacher_name, "teacher": teacher.name,
                           "teacher_fingerprint": fingerprint(teacher.fingerprint()),
                           "image_layers": plan.layers.get("image"),
                           "text_layers": plan.layers.get("text"), "inherited": []}
    return student


# ------------------------------------------------------------------ open_clip: ViT and text blocks

_BLOCK = re.compile(r"^(?P<tower>.*transformer\.resblocks)\.(?P<i>\d+)\.(?P<rest>.*)$")


def _remap_blocks(keys: Sequence[str], layers: dict[str, list[int]]) -> dict[str, str]:
    """Student key -> teacher key: block ``i`` of a tower comes from block ``layers[tower][i]``."""
    out = {}
    for key in keys:
        m = _BLOCK.match(key)
        if m and m["tower"] in layers:
            out[key] = f"{m['tower']}.{layers[m['tower']][int(m['i'])]}.{m['rest']}"
        else:
            out[key] = key
    return out


def copy_mapped(target: nn.Module, source: dict[str, Tensor], mapping: dict[str, str],
                where: str) -> None:
    """Load ``target`` with ``source[mapping[key]]`` for every key (all must exist and fit)."""
    missing = sorted(k for k, t in mapping.items() if t not in source)
    if missing:
        raise PipelineError(f"{where}: the teacher has no weights for {missing[:5]}")
    load_checked(target, {k: source[t].detach().clone() for k, t in mapping.items()}, where,
                 "the student")


@RULES.register("open_clip")
def plan_open_clip(teacher: Any, image_layers: Sequence[int] | None,
                   text_layers: Sequence[int] | None, overrides: dict[str, Any]) -> Plan:
    """An open_clip student of the teacher's architecture with the chosen ViT and text blocks."""
    net = teacher.net
    visual_blocks = getattr(getattr(net.visual, "transformer", None), "resblocks", None)
    text_root = "text.transformer.resblocks" if hasattr(net, "text") else "transformer.resblocks"
    text_blocks = (net.text if hasattr(net, "text") else net).transformer.resblocks
    cfg: dict[str, Any] = {"vision_cfg": {}, "text_cfg": {}}
    layers: dict[str, list[int]] = {}
    if image_layers is not None:
        if visual_blocks is None:
            raise PipelineError(f"init.image_layers: the teacher's image tower "
                                f"({type(net.visual).__name__}) has no ViT blocks to choose; "
                                "leave init.image_layers unset to inherit the whole tower")
        layers["visual.transformer.resblocks"] = check_layers(image_layers, len(visual_blocks),
                                                              "init.image_layers")
        cfg["vision_cfg"]["layers"] = len(image_layers)
    if text_layers is not None:
        layers[text_root] = check_layers(text_layers, len(text_blocks), "init.text_layers")
        cfg["text_cfg"]["layers"] = len(text_layers)
    if teacher._model_cfg is not None:
        kwargs = {"model": None, "model_cfg": deep_merge(deep_merge(teacher._model_cfg, cfg),
                                                         overrides.get("model_cfg"))}
    else:
        kwargs = {"model": teacher._model, "model_cfg": deep_merge(cfg, overrides.get("model_cfg"))}
    kwargs |= {k: v for k, v in overrides.items() if k not in ("model", "model_cfg")}

    def copy(student: Student) -> list[str]:
        keys = list(student.model.state_dict())
        copy_mapped(student.model, net.state_dict(), _remap_blocks(keys, layers),
                    f"init from open_clip teacher {teacher._model}")
        return ["image tower", "text tower", "projections", "logit_scale"]

    return Plan("open_clip", kwargs, copy, {"image": layers.get("visual.transformer.resblocks"),
                                            "text": layers.get(text_root)})


# ------------------------------------------------------- timm image towers, BERT-family text towers

def _timm_name(vision: Any) -> tuple[str, dict[str, Any]]:
    """The timm model (and kwargs) computing what an image teacher computes."""
    if vision.name == "timm_vision":
        return vision._model, dict(vision._model_kwargs)
    if vision.name == "efficientnet_lite":  # lite0..4: the same layers as timm's TF ports
        return "tf_" + vision._variant.replace("-", "_"), {}
    raise PipelineError(f"no timm image tower for teacher {vision.name!r}; image towers are "
                        "inherited from timm_vision and efficientnet_lite teachers")


def teacher_timm_state(vision: Any, timm_model: str, kwargs: dict[str, Any]) -> dict[str, Tensor]:
    """The image teacher's weights in the layout of timm's ``timm_model`` (classifier dropped)."""
    import timm

    target = timm.create_model(timm_model, pretrained=False, num_classes=0, **kwargs)
    own = target.state_dict()
    if vision.name == "timm_vision":
        state = {k: v for k, v in vision.net.state_dict().items() if k in own}
    else:  # EfficientNet-Lite (lukemelas layout): the same tensors in the same order
        source = [(k, v) for k, v in vision.net.state_dict().items() if not k.startswith("_fc.")]
        if len(source) != len(own) or any(v.shape != t.shape for (_, v), t in zip(source, own.values())):
            raise PipelineError(f"{vision._variant}: its weights do not line up with timm's "
                                f"{timm_model}; image inheritance needs the same architecture")
        state = {k: v for k, (_, v) in zip(own, source)}
    faults = fit_faults(target, state)
    if any(faults.values()):
        raise PipelineError(f"image teacher {vision.name}: {describe_faults(faults)}")
    return state


def _image_norm(vision: Any) -> dict[str, Any]:
    """The student's pixel normalisation: the image teacher's."""
    if vision.name == "efficientnet_lite":
        return {"image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD, "interpolation": "bilinear"}
    cfg = getattr(vision.net, "pretrained_cfg", {}) or {}
    return {"image_mean": tuple(cfg.get("mean", IMAGENET_MEAN)), "image_std": tuple(cfg.get("std", IMAGENET_STD)),
            "interpolation": cfg.get("interpolation", "bicubic")}


def image_plan(vision: Any, layers: Sequence[int] | None) -> tuple[dict[str, Any], Callable[[Student], None]]:
    """timm_hf kwargs of an image tower like ``vision``'s, and a copier filling it."""
    timm_model, timm_kwargs = _timm_name(vision)
    size = getattr(vision.net, "input_image_size", None) or vision.net.pretrained_cfg.get("input_size", (3, 224))[-1]
    kwargs = {"timm_model": timm_model, "timm_kwargs": timm_kwargs, "image_size": int(size),
              **_image_norm(vision)}

    def copy(student: Student) -> None:
        import timm

        full = timm.create_model(timm_model, pretrained=False, num_classes=0, **timm_kwargs)
        full.load_state_dict(teacher_timm_state(vision, timm_model, timm_kwargs))
        if layers is not None:
            keep_image_blocks(full, layers, "init.image_layers")
        load_checked(student.vision, full.state_dict(), f"init from {vision.name}", "the student")

    if layers is not None:
        kwargs["image_blocks"] = list(layers)
    return kwargs, copy


def text_plan(text: Any, layers: Sequence[int] | None) -> tuple[dict[str, Any], Callable[[Student], None]]:
    """timm_hf kwargs of a text tower like the ``hf_text`` teacher ``text``'s, and a copier."""
    source = text.encoder.state_dict()
    total = text.encoder.config.num_hidden_layers
    chosen = None if layers is None else check_layers(layers, total, "init.text_layers")
    kwargs = {"text_model": MINILM if text._model == MINILM else text._source,
              "text_pooling": text.pooling,
              "context_length": min(64, text.max_length)}  # captions, not documents

    def copy(student: Student) -> None:
        mapping = {}
        for key in student.text.state_dict():
            m = re.match(r"^encoder\.layer\.(\d+)\.(.*)$", key)
            mapping[key] = f"encoder.layer.{chosen[int(m[1])]}.{m[2]}" if m and chosen else key
        copy_mapped(student.text, source, mapping, f"init from {text.name}")

    if chosen is not None:
        kwargs["text_blocks"] = chosen
    return kwargs, copy


@RULES.register("aligned")
def plan_aligned(teacher: Any, image_layers: Sequence[int] | None,
                 text_layers: Sequence[int] | None, overrides: dict[str, Any]) -> Plan:
    """A timm_hf student: the vision teacher's tower, the text teacher's encoder, the aligned
    heads as projections (on L2-normalised features, as the heads were trained)."""
    image_kwargs, copy_image = image_plan(teacher.vision, image_layers)
    text_kwargs, copy_text = text_plan(teacher.text, text_layers)
    heads = teacher.heads
    linear = heads.args["head"] == "linear"
    kwargs = {**image_kwargs, **text_kwargs, "embed_dim": heads.args["embed_dim"],
              "proj_bias": True, "normalize_features": True,
              "init_temperature": 1.0 / float(teacher.logit_scale), **overrides}

    def copy(student: Student) -> list[str]:
        copy_image(student)
        copy_text(student)
        copied = ["image tower", "text tower", "logit_scale"]
        if linear:
            for proj, head, name in ((student.image_proj, heads.vision, "image head"),
                                     (student.text_proj, heads.text, "text head")):
                if proj.weight.shape == head.weight.shape:
                    load_checked(proj, head.state_dict(), f"init from aligned {name}", "the student")
                    copied.append(name)
        with torch.no_grad():
            student.logit_scale.fill_(float(torch.log(torch.tensor(float(teacher.logit_scale)))))
        return copied

    return Plan("timm_hf", kwargs, copy, {"image": image_kwargs.get("image_blocks"),
                                          "text": text_kwargs.get("text_blocks")})


def _one_tower(tower: str) -> Rule:
    def plan(teacher: Any, image_layers: Sequence[int] | None, text_layers: Sequence[int] | None,
             overrides: dict[str, Any]) -> Plan:
        if tower == "image":
            own, copy_own = image_plan(teacher, image_layers)
        else:
            own, copy_own = text_plan(teacher, text_layers)

        def copy(student: Student) -> list[str]:
            copy_own(student)
            return [f"{tower} tower"]

        layers = {"image": own.get("image_blocks"), "text": own.get("text_blocks")}
        return Plan("timm_hf", {**own, **overrides}, copy, layers)

    plan.__doc__ = f"A timm_hf student whose {tower} tower is the teacher's (the other one from train.student_kwargs)."
    return plan


RULES.register("efficientnet_lite")(_one_tower("image"))
RULES.register("timm_vision")(_one_tower("image"))
RULES.register("hf_text")(_one_tower("text"))
