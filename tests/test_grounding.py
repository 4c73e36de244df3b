"""Visual grounding: boxes, losses, Acc@0.5, the scene builder, annotation readers, train/evaluate."""
from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou as tv_box_iou
from torchvision.ops import generalized_box_iou as tv_giou

from pipeline.data.manifest import load_manifest
from pipeline.data.shards import iter_raw
from pipeline.data.writing import write_manifest, write_shards
from pipeline.errors import CacheError, PipelineError
from pipeline.grounding.boxes import (accuracy_at, box_iou, generalized_iou, xywh_to_xyxy,
                                      xyxy_to_cxcywh)
from pipeline.grounding.data import load_split
from pipeline.grounding.losses import GROUNDING_LOSSES, GroundTargets
from pipeline.grounding.model import GroundOutput
from pipeline.grounding.scenes import POOL, build_scene
from pipeline.losses.base import LossTerm
from stages.ground.evaluate import score
from stages.prepare.run import PrepareConfig, prepare
from tests.conftest import write_scene_shards

REPO = Path(__file__).resolve().parent.parent


def _cxcywh(xyxy: list[list[float]]) -> torch.Tensor:
    return xyxy_to_cxcywh(torch.tensor(xyxy, dtype=torch.float64))


# ----------------------------------------------------------------------------- boxes and losses


def test_iou_and_giou_match_torchvision_on_random_boxes():
    g = torch.Generator().manual_seed(0)
    a0, b0 = torch.rand(50, 2, generator=g, dtype=torch.float64), torch.rand(50, 2, generator=g, dtype=torch.float64)
    a = torch.cat([a0, a0 + torch.rand(50, 2, generator=g, dtype=torch.float64)], 1)
    b = torch.cat([b0, b0 + torch.rand(50, 2, generator=g, dtype=torch.float64)], 1)
    assert torch.allclose(box_iou(a, b), tv_box_iou(a, b).diagonal())
    assert torch.allclose(generalized_iou(a, b), tv_giou(a, b).diagonal())
    assert (generalized_iou(a, b) < 0).any()  # disjoint pairs are covered


def test_giou_hand_worked_example():
    # A = [0,0,2,2], B = [1,1,3,3]: intersection 1, union 7, hull 9 -> GIoU = 1/7 - 2/9 = -5/63
    a, b = torch.tensor([[0.0, 0, 2, 2]]), torch.tensor([[1.0, 1, 3, 3]])
    assert box_iou(a, b).item() == pytest.approx(1 / 7)
    assert generalized_iou(a, b).item() == pytest.approx(-5 / 63)


def test_box_losses_on_hand_worked_boxes():
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    true = torch.tensor([[0.6, 0.5, 0.2, 0.4]])
    out = GroundOutput(pred, torch.zeros(1, 4), torch.zeros(1, 4))
    l1 = GROUNDING_LOSSES.create("box_l1", student_dim=4, teacher_dims={})
    assert l1(out, GroundTargets(true)).item() == pytest.approx(0.1 + 0.2)
    # xyxy: pred [0.4,0.4,0.6,0.6], true [0.5,0.3,0.7,0.7]: inter 0.1*0.2=0.02,
    # union 0.04+0.08-0.02=0.10, hull [0.4,0.3,0.7,0.7] = 0.12 -> GIoU = 0.2 - 0.02/0.12
    giou = GROUNDING_LOSSES.create("box_giou", student_dim=4, teacher_dims={})
    assert giou(out, GroundTargets(true)).item() == pytest.approx(1 - (0.2 - 0.02 / 0.12), abs=1e-6)


def test_epmvg_grounding_weights_image_and_text_cosines():
    loss = GROUNDING_LOSSES.create("epmvg_grounding", student_dim=3, teacher_dims={"image": 3, "text": 3})
    # equal widths: the default projection (auto) compares the tokens as they are
    assert all(isinstance(head, torch.nn.Identity) for head in loss.inner.proj.values())
    t_img, t_txt = torch.tensor([[1.0, 0, 0]]), torch.tensor([[0.0, 1, 0]])
    # visual token equal to the teacher image embedding (cos 1), text token opposite (cos -1)
    out = GroundOutput(torch.zeros(1, 4), t_img * 3, -t_txt)
    assert loss.requires == {"image_emb", "text_emb"}
    assert loss(out, GroundTargets(torch.zeros(1, 4), t_img, t_txt)).item() == pytest.approx(1.5 * 0 + 2 * 2)
    # orthogonal visual token: 1.5 * (1 - 0)
    out = GroundOutput(torch.zeros(1, 4), t_txt, t_txt)
    assert loss(out, GroundTargets(torch.zeros(1, 4), t_img, t_txt)).item() == pytest.approx(1.5)


def test_acc_at_0_5_and_mean_iou_on_hand_made_boxes():
    true = _cxcywh([[0, 0, 2, 2], [0, 0, 2, 2], [0, 0, 2, 1], [0, 0, 1, 1]])
    pred = _cxcywh([[0, 0, 2, 2],    # IoU 1
                    [1, 0, 3, 2],    # IoU 2/6 = 1/3: miss
                    [0, 0, 1, 1],    # IoU exactly 0.5: a hit
                    [2, 2, 3, 3]])   # disjoint: 0
    metrics = score(pred, true, ["a", "a", "b", "b"])
    assert metrics["acc_at_0_5"] == pytest.approx(0.5)
    assert metrics["mean_iou"] == pytest.approx((1 + 1 / 3 + 0.5 + 0) / 4)
    assert metrics["by_type"]["a"] == {"acc_at_0_5": 0.5, "mean_iou": pytest.approx(2 / 3), "n": 2}
    assert metrics["by_type"]["b"]["acc_at_0_5"] == pytest.approx(0.5)
    assert accuracy_at(torch.tensor([0.49, 0.5, 0.51])) == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------- scenes


def test_scene_builder_is_deterministic_and_boxes_hold_the_emoji(emoji_pool):
    for index in range(12):
        scene = build_scene(emoji_pool, index)
        again = build_scene(emoji_pool, index)
        assert scene.sample("k") == again.sample("k")
        pixels = np.asarray(scene.image).astype(int)
        changed = np.abs(pixels - np.array(scene.background)).sum(-1) > 0
        inside = np.zeros_like(changed)
        for obj in scene.objects:
            x, y, w, h = obj.box
            inside[y:y + h, x:x + w] = True
            # the emoji fills a good part of its box, and its visible pixels reach the box's
            # edges (within 2 px: the faintest anti-aliased edge pixels can round to the background)
            region = changed[y:y + h, x:x + w]
            assert region.mean() > 0.25, (index, obj)
            rows, cols = np.flatnonzero(region.any(1)), np.flatnonzero(region.any(0))
            assert rows[0] <= 2 and rows[-1] >= h - 3 and cols[0] <= 2 and cols[-1] >= w - 3, (index, obj)
        assert not (changed & ~inside).any(), f"scene {index}: emoji pixels outside every box"
        assert 2 <= len(scene.objects) <= 5
    assert build_scene(emoji_pool, 0).sample("k") != build_scene(emoji_pool, 1).sample("k")


def test_scene_expressions_single_out_their_object(emoji_pool):
    seen = set()
    for index in range(60):
        scene = build_scene(emoji_pool, index)
        names = [o.name for o in scene.objects]
        for expr, target, kind in zip(scene.expressions, scene.targets, scene.types):
            seen.add(kind)
            obj = scene.objects[target]
            assert obj.name in expr
            if kind == "name":
                assert names.count(obj.name) == 1
            else:  # a twin: the other copy of the name is told apart by size, position or relation
                assert names.count(obj.name) == 2
                other = next(o for i, o in enumerate(scene.objects) if o.name == obj.name and i != target)
                if "larger" in expr:
                    assert obj.area > other.area
                if "on the left" in expr:
                    assert obj.centre[0] < other.centre[0]
                if " left of the " in expr:
                    anchor = next(o for o in scene.objects if expr.endswith(f"the {o.name}"))
                    assert obj.centre[0] < anchor.centre[0] < other.centre[0]
    assert seen == {"name", "size", "position", "relation"}


def test_shipped_scenes_are_the_builders_output(emoji_pool):
    manifest = load_manifest(REPO / "demo" / "emoji_scenes", verify=True)
    first = manifest.root / manifest.shards[0].name
    for i, (key, files) in zip(range(8), iter_raw(first)):
        built = build_scene(emoji_pool, i).sample(f"scene{i:06d}")
        assert key == built["__key__"] and files["png"] == built["png"]
        assert json.loads(files["json"]) == built["json"]
    assert len(POOL) == len({name for _, name in POOL})


# ----------------------------------------------------------------------------- annotation readers


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (120, 30, 200)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("box, message", [([50, 10, 20, 20], "outside the 64x48 image"),
                                          ([5, 5, 0, 10], "zero or negative area"),
                                          ([5, 5, "a", 2], "not four numbers")])
def test_wds_bad_box_is_refused_naming_shard_and_key(tmp_path, box, message):
    samples = [{"__key__": "good", "png": _png(64, 48), "json": {"expressions": ["a"], "box": [1, 2, 10, 10]}},
               {"__key__": "bad1", "png": _png(64, 48), "json": {"expressions": ["b", "c"], "box": box}}]
    write_shards(samples, tmp_path / "src", "g", 10)
    cfg = PrepareConfig(source="grounding_wds", src=str(tmp_path / "src"), out=str(tmp_path / "out"))
    with pytest.raises(PipelineError, match=rf"shard g-000000.tar, key 'bad1'.*{message}"):
        prepare(cfg)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_wds_source_prepares_boxes_per_expression(tmp_path, emoji_pool):
    write_scene_shards(tmp_path / "src", emoji_pool, 30)
    summary = prepare(PrepareConfig(source="grounding_wds", src=str(tmp_path / "src"), out=str(tmp_path / "ds"),
                                    test_percent=30, val_percent=0))
    train = load_split(tmp_path / "ds" / "train")
    test = load_split(tmp_path / "ds" / "test")
    assert len(train.images) + len(test.images) == 30 == summary["n_images"]
    assert len(train) == load_manifest(tmp_path / "ds" / "train").n_texts  # expression j = text row j
    scene = build_scene(emoji_pool, int(train.image_ids[0].split("scene")[1]))
    assert train.expressions[: len(scene.expressions)] == list(scene.expressions)
    assert train.pixel_boxes[0].tolist() == list(scene.objects[scene.targets[0]].box)
    x, y, w, h = scene.objects[scene.targets[0]].box
    assert train.boxes[0].tolist() == pytest.approx([(x + w / 2) / 96, (y + h / 2) / 96, w / 96, h / 96])


def _refcoco(tmp_path: Path, bbox: list[float]) -> PrepareConfig:
    images = tmp_path / "images" / "train2014"
    images.mkdir(parents=True)
    (images / "COCO_train2014_000000000001.jpg").write_bytes(_png(64, 48))
    (images / "COCO_train2014_000000000002.jpg").write_bytes(_png(40, 40))
    instances = {"images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "width": 64, "height": 48},
                            {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "width": 40, "height": 40}],
                 "annotations": [{"id": 11, "image_id": 1, "bbox": [4.5, 6.0, 20.0, 30.0], "category_id": 1},
                                 {"id": 12, "image_id": 2, "bbox": bbox, "category_id": 2}],
                 "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "dog"}]}
    refs = [{"ref_id": 7, "ann_id": 11, "image_id": 1, "split": "train", "category_id": 1,
             "sentences": [{"raw": "The man", "sent": "the man"}, {"raw": "Left guy", "sent": "left guy"}]},
            {"ref_id": 8, "ann_id": 12, "image_id": 2, "split": "testB", "category_id": 2,
             "sentences": [{"raw": "dog", "sent": "dog"}]}]
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    with (tmp_path / "refs(unc).p").open("wb") as f:
        pickle.dump(refs, f, protocol=2)
    return PrepareConfig(source="refcoco", src=str(tmp_path / "images"), out=str(tmp_path / "ds"),
                         annotations_file=str(tmp_path / "instances.json"), split_file=str(tmp_path / "refs(unc).p"))


def test_refcoco_refs_and_instances_are_prepared_by_their_split(tmp_path):
    prepare(_refcoco(tmp_path, [10.0, 10.0, 20.0, 25.0]))
    train, test = load_split(tmp_path / "ds" / "train"), load_split(tmp_path / "ds" / "test")
    assert train.expressions == ["the man", "left guy"] and test.expressions == ["dog"]
    assert train.pixel_boxes.tolist() == [[4.5, 6.0, 20.0, 30.0]] * 2
    assert test.types == ["testB"] and train.types == ["train", "train"]
    assert test.image_ids == ["test-000000.tar/ref8"]


@pytest.mark.parametrize("bbox", [[30.0, 10.0, 20.0, 10.0], [10.0, 10.0, 5.0, 0.0]])
def test_refcoco_bad_box_is_refused_naming_file_and_ref(tmp_path, bbox):
    cfg = _refcoco(tmp_path, bbox)
    with pytest.raises(PipelineError, match=r"refs\(unc\)\.p: refs\[1\] ref_id 8 \(ann_id 12\): box"):
        prepare(cfg)


def test_refs_pickle_naming_a_class_is_refused(tmp_path):
    cfg = _refcoco(tmp_path, [1.0, 1.0, 5.0, 5.0])
    Path(cfg.split_file).write_bytes(pickle.dumps([{"ref_id": 1, "x": Path("a")}]))
    with pytest.raises(PipelineError, match="only plain data"):
        prepare(cfg)


def test_prepared_shard_with_a_bad_box_is_refused_on_read(tmp_path):
    samples = [{"__key__": "s1", "png": _png(32, 32), "json": {"captions": ["x"], "boxes": [[0, 0, 40, 8]]}}]
    write_shards(samples, tmp_path / "train", "train", 10)
    write_manifest(tmp_path / "train")
    with pytest.raises(PipelineError, match=r"train-000000.tar, key 's1', expression 0: box .* outside"):
        load_split(tmp_path / "train")


# ----------------------------------------------------------------------------- train and evaluate

TINY_GROUNDER = {"image_size": 32, "patch_size": 8, "vision_width": 32, "text_width": 32, "fusion_width": 32,
                 "fusion_layers": 1, "heads": 2, "vocab_size": 256}


@pytest.fixture
def scenes_dataset(tmp_path, emoji_pool) -> Path:
    write_scene_shards(tmp_path / "src", emoji_pool, 24)
    prepare(PrepareConfig(source="grounding_wds", src=str(tmp_path / "src"), out=str(tmp_path / "ds"),
                          test_percent=30, val_percent=0))
    return tmp_path / "ds"


def _shuffled_cache(path: Path, split_dir: Path, dim: int = 6, fingerprint: str | None = None) -> tuple[Path, dict]:
    """A teacher cache of ``split_dir`` whose rows are in reversed order; returns the embedding
    of every id, to check the join goes by id."""
    from pipeline.stores.teacher import write_cache_from_arrays

    split = load_split(split_dir)
    rng = np.random.default_rng(0)
    img = rng.normal(size=(len(split.image_ids), dim)).astype(np.float32)
    txt = rng.normal(size=(len(split.text_ids), dim)).astype(np.float32)
    img_order, txt_order = np.arange(len(img))[::-1], np.arange(len(txt))[::-1]
    image_ids = np.array(split.image_ids)[img_order]
    position = {sid: i for i, sid in enumerate(image_ids)}
    write_cache_from_arrays(
        path, image_ids=image_ids, text_ids=np.array(split.text_ids)[txt_order],
        text_to_image=np.array([position[split.image_ids[int(split.image_index[j])]] for j in txt_order]),
        teacher={"teacher": "random"}, dataset_fingerprint=fingerprint or load_manifest(split_dir).fingerprint,
        split="train", logit_scale=10.0, image_emb=img[img_order], text_emb=txt[txt_order])
    by_id = {**dict(zip(split.image_ids, img.astype(np.float16).astype(np.float32))),
             **dict(zip(split.text_ids, txt.astype(np.float16).astype(np.float32)))}
    return path, by_id


def test_teacher_targets_are_joined_by_id(scenes_dataset, tmp_path):
    from stages.ground.train import GroundTrainConfig, teacher_targets

    cache, by_id = _shuffled_cache(tmp_path / "c.zarr", scenes_dataset / "train")
    split = load_split(scenes_dataset / "train")
    cfg = GroundTrainConfig(cache=str(cache))
    out = teacher_targets(cfg, split, frozenset({"image_emb", "text_emb"}),
                          load_manifest(scenes_dataset / "train").fingerprint)
    for j in (0, len(split) - 1):
        assert np.array_equal(out["text"][j].numpy(), by_id[split.text_ids[j]])
        assert np.array_equal(out["image"][j].numpy(), by_id[split.image_ids[int(split.image_index[j])]])
    assert teacher_targets(cfg, split, frozenset(), "unused") == {}  # no distillation: no cache read


def test_cache_of_another_dataset_is_refused(scenes_dataset, tmp_path):
    from stages.ground.train import GroundTrainConfig, train_grounding

    other = "sha256:" + "0" * 64
    cache, _ = _shuffled_cache(tmp_path / "c.zarr", scenes_dataset / "train", fingerprint=other)
    cfg = GroundTrainConfig(student_kwargs=TINY_GROUNDER, dataset=str(scenes_dataset), cache=str(cache),
                            losses=(LossTerm("box_l1"), LossTerm("epmvg_grounding")),
                            out_dir=str(tmp_path / "m"), batch_size=8, epochs=1, device="cpu")
    with pytest.raises(CacheError, match=other):
        train_grounding(cfg, progress=False)
    assert not (tmp_path / "m").exists()


def test_train_with_distillation_then_evaluate_writes_report_with_pictures(scenes_dataset, tmp_path):
    from stages.ground.evaluate import GroundEvalConfig, evaluate_grounding
    from stages.ground.train import GroundTrainConfig, train_grounding

    cache, _ = _shuffled_cache(tmp_path / "c.zarr", scenes_dataset / "train")
    cfg = GroundTrainConfig(student_kwargs=TINY_GROUNDER, dataset=str(scenes_dataset), cache=str(cache),
                            losses=(LossTerm("box_l1", 5.0), LossTerm("box_giou", 2.0),
                                    LossTerm("epmvg_grounding")),
                            out_dir=str(tmp_path / "m"), batch_size=8, epochs=2, log_every=1, device="cpu")
    summary = train_grounding(cfg, progress=False)
    assert summary["teacher_forward_calls"] == 0 and summary["teacher_fields"] == ["image", "text"]
    log = (tmp_path / "m" / "train_log.csv").read_text().splitlines()
    assert log[0].split(",")[:6] == ["step", "epoch", "loss", "loss_box_l1", "loss_box_giou", "loss_epmvg_grounding"]
    assert len(log) == 1 + summary["steps"]
    reports = tmp_path / "r"
    metrics = evaluate_grounding(GroundEvalConfig(
        dataset=str(scenes_dataset / "test"), student_dir=str(tmp_path / "m"), latency_batch_sizes=(1, 4),
        latency_repeats=1, latency_warmup=0, n_examples=3, metrics_path=str(reports / "metrics.json"),
        figures_dir=str(reports / "fig"), report_path=str(reports / "report.md")))
    test = load_split(scenes_dataset / "test")
    assert metrics["n"] == len(test) and sum(m["n"] for m in metrics["by_type"].values()) == len(test)
    assert 0.0 <= metrics["acc_at_0_5"] <= 1.0 and metrics["efficiency"]["params_total"] > 0
    report = (reports / "report.md").read_text()
    assert report.count("](fig/example_") == 3
    picture = Image.open(reports / "fig" / "example_0.png").convert("RGB")
    assert picture.size == (384, 384)
    colours = {c for _, c in picture.getcolors(1 << 16)}
    assert (0, 170, 0) in colours and (220, 0, 0) in colours  # true and predicted boxes drawn


def test_cli_lists_grounding_components_and_refuses_an_unknown_recipe(tmp_path):
    from typer.testing import CliRunner

    from stages.cli import app

    listed = CliRunner().invoke(app, ["list"])
    assert "grounding students: transvg_tiny" in listed.output
    assert "grounding losses: box_giou, box_l1, epmvg_grounding" in listed.output
    params = tmp_path / "params.yaml"
    params.write_text("grounding:\n  train: {recipe: nope}\n  recipes: {none: {losses: [{name: box_l1}]}}\n")
    result = CliRunner().invoke(app, ["ground", "train", "-p", str(params)])
    assert result.exit_code == 1 and "unknown recipe 'nope'; known: none" in result.output
