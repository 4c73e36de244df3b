"""Stage 3 end to end: real shards, a real tiny student checkpoint and a real Zarr teacher cache."""
from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.manifest import load_manifest
from pipeline.data.handlers import SkipCounter
from pipeline.data.shards import iter_samples
from pipeline.evaluation.config import EvalConfig
from pipeline.evaluation.efficiency import parameters_used
from pipeline.stores.teacher import TeacherCache
from pipeline.students import create_student, load_student, save_checkpoint
from stages.evaluate.run import evaluate
from stages.teach.run import TeachConfig, run_teach
from tests.conftest import TINY_CLIP_CFG

CORRUPT_TEST_SAMPLE = 10_003  # make_dataset numbers test samples from 10000
KS = (1, 5, 10)


def brute_recall(image_emb: np.ndarray, text_emb: np.ndarray, t2i: list[int], k: int
                 ) -> tuple[float, float]:
    """(i2t, t2i) Recall@k in percent by sorting every list in float64 (ties: lower index)."""
    sims = image_emb.astype(np.float64) @ text_emb.astype(np.float64).T
    i2t_hits = []
    for i in range(len(image_emb)):
        order = sorted(range(len(text_emb)), key=lambda j: (-sims[i, j], j))[:k]
        i2t_hits.append(any(t2i[j] == i for j in order))
    t2i_hits = []
    for j in range(len(text_emb)):
        order = sorted(range(len(image_emb)), key=lambda i: (-sims[i, j], i))[:k]
        t2i_hits.append(t2i[j] in order)
    return 100.0 * np.mean(i2t_hits), 100.0 * np.mean(t2i_hits)


def tiny_student():
    return create_student("open_clip_tiny", embed_dim=24, image_size=32, patch_size=8,
                          vision_width=32, vision_layers=2, vision_heads=2, context_length=16,
                          text_width=32, text_heads=2, text_layers=1)


@pytest.fixture
def eval_setup(make_dataset, tiny_teacher, tmp_path: Path) -> EvalConfig:
    """Test split of 12 samples (one undecodable), a tiny student checkpoint, a teacher cache."""
    root = make_dataset(n_train=1, n_test=12, per_shard=5, corrupt={CORRUPT_TEST_SAMPLE})
    run_teach(TeachConfig(dataset=str(root), splits=("test",), out_root=str(tmp_path / "caches"),
                          batch_size=4, rows_per_shard=8, rows_per_chunk=4,
                          summary_dir=str(tmp_path / "reports/teach")),
              "tiny", tiny_teacher, progress=False)
    torch.manual_seed(1)  # a different model from the teacher, so the two score differently
    student = tiny_student()
    save_checkpoint(tmp_path / "student/student.safetensors", student, {}, student.spec())
    _write_train_log(tmp_path / "student/train_log.csv")
    out = tmp_path / "eval"
    return EvalConfig(
        dataset=str(root / "test"), student_dir=str(tmp_path / "student"),
        teacher_cache=str(tmp_path / "caches/tiny/test.zarr"), teacher="open_clip",
        teacher_kwargs={"model_cfg": TINY_CLIP_CFG, "pretrained": None}, ks=KS, curve_max_k=12,
        latency_batch_sizes=(1, 4), latency_warmup=1, latency_repeats=2,
        metrics_path=str(out / "metrics.json"), plots_dir=str(out / "plots"),
        report_path=str(out / "report.md"), html_path=str(out / "index.html"),
        gallery_captions=3, gallery_images=2, gallery_top=5,
        teacher_efficiency_cache=str(tmp_path / ".cache/teacher_efficiency"),
    )


def _write_train_log(path: Path) -> None:
    """A train_log.csv as train writes it: loss, terms, a balancer weight and a learned scalar."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "epoch", "loss", "loss_contrastive", "loss_epmvg", "w_contrastive",
                    "lambda_sard_relational", "lr", "logit_scale", "samples_per_s"])
        for step in range(1, 11):
            w.writerow([step, 0, 3 / step, 2 / step, 1 / step, 1.0, 0.5 + step / 100, 1e-3, 14.3, 100])


def _valid_cache_rows(cache: TeacherCache) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Valid image rows, valid text rows (of valid images) and their remapped text_to_image."""
    images = np.flatnonzero(cache.image_valid)
    texts = np.flatnonzero(cache.text_valid & cache.image_valid[cache.text_to_image])
    position = {int(r): p for p, r in enumerate(images)}
    return images, texts, [position[int(cache.text_to_image[j])] for j in texts]


def _student_embeddings(cfg: EvalConfig) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Student embeddings one sample at a time, decodable samples only (an independent path)."""
    student = load_student(Path(cfg.student_dir))
    image_emb, text_emb, t2i = [], [], []
    with torch.inference_mode():
        for sample in iter_samples(load_manifest(cfg.dataset), handler=SkipCounter()):
            if sample.image is None:
                continue
            image_emb.append(student.encode_image(student.preprocess(sample.image)[None])[0].numpy())
            for caption in sample.captions:
                text_emb.append(student.encode_text(student.tokenize([caption]))[0].numpy())
                t2i.append(len(image_emb) - 1)
    return np.stack(image_emb), np.stack(text_emb), t2i


def test_evaluate_end_to_end(eval_setup: EvalConfig):
    cfg = eval_setup
    result = evaluate(cfg, progress=False)
    written = json.loads(Path(cfg.metrics_path).read_text())
    assert written == result

    quality = [f"{d}_R@{k}" for d in ("i2t", "t2i") for k in KS] + [
        "rsum", "i2t_MedR", "t2i_MedR", "i2i_ndcg@10", "t2t_ndcg@10"]
    for model in ("student", "teacher"):
        assert set(quality) <= set(written[model]), model
    medr = {"i2t_MedR", "t2i_MedR"}  # lower is better: a multiple of the teacher's, not a percentage
    assert set(written["pct_of_teacher"]) == set(quality) - medr
    assert set(written["times_teacher"]) == medr
    for key in quality:
        ratio = written["student"][key] / written["teacher"][key]
        if key in medr:
            assert written["times_teacher"][key] == pytest.approx(ratio)
        else:
            assert written["pct_of_teacher"][key] == pytest.approx(100 * ratio)
    report = Path(cfg.report_path).read_text()
    assert f"{written['times_teacher']['i2t_MedR']:.2f}× teacher's (lower is better)" in report
    counts = written["counts"]
    assert (counts["n_images"], counts["n_texts"]) == (11, 22)
    assert (counts["n_images_excluded"], counts["n_texts_excluded"]) == (1, 2)

    # Teacher recall from the cache arrays, recomputed by brute force.
    cache = TeacherCache.open(cfg.teacher_cache)
    images, texts, t2i = _valid_cache_rows(cache)
    assert not cache.image_valid.all()  # the undecodable sample is marked invalid in the cache
    for k in KS:
        want = brute_recall(cache.image_emb[images], cache.text_emb[texts], t2i, k)
        got = (written["teacher"][f"i2t_R@{k}"], written["teacher"][f"t2i_R@{k}"])
        assert got == pytest.approx(want)
    # Student recall from embeddings computed sample by sample.
    image_emb, text_emb, t2i = _student_embeddings(cfg)
    for k in KS:
        want = brute_recall(image_emb, text_emb, t2i, k)
        assert (written["student"][f"i2t_R@{k}"], written["student"][f"t2i_R@{k}"]) == pytest.approx(want)

    eff = written["efficiency"]
    for model in ("student", "teacher"):
        assert eff[model]["params_total"] > 0
        for key in ("image_ms_per_item_b1", "image_ms_per_item_b4", "text_ms_per_item_b4",
                    "peak_rss_mb", "baseline_rss_mb"):
            assert eff[model][key] > 0, (model, key)
        assert eff[model]["peak_rss_mb"] >= eff[model]["baseline_rss_mb"]
    for model in ("student", "teacher"):
        towers = eff[model]["params_image"] + eff[model]["params_text"]
        assert 0 < towers <= eff[model]["params_total"]
    assert written["student"] != written["teacher"]
    machine = written["machine"]
    assert machine["torch_threads"] == torch.get_num_threads() and machine["cpus"] >= 1
    assert machine["load_1min"] >= 0
    _check_plots(cfg, written)
    _check_report(cfg)
    _check_html(cfg, image_emb, text_emb, t2i)


def _check_plots(cfg: EvalConfig, written: dict) -> None:
    with open(Path(cfg.plots_dir) / "recall_at_k.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * cfg.curve_max_k
    curve = {(r["model"], r["direction"], int(r["k"])): float(r["recall"]) for r in rows}
    for model in ("student", "teacher"):
        for direction in ("i2t", "t2i"):
            for k in KS:
                assert curve[model, direction, k] == pytest.approx(
                    written[model][f"{direction}_R@{k}"], abs=1e-3)
    with open(Path(cfg.plots_dir) / "recall_at_k_wide.csv", newline="") as f:
        wide = list(csv.DictReader(f))
    assert len(wide) == cfg.curve_max_k
    assert float(wide[0]["teacher_t2i"]) == pytest.approx(curve["teacher", "t2i", 1], abs=1e-3)


def _check_report(cfg: EvalConfig) -> None:
    report = Path(cfg.report_path).read_text()
    for heading in ("## Retrieval quality", "## Efficiency", "## Qualitative examples",
                    "## Relevance definitions"):
        assert heading in report
    assert "| i2t_R@1 |" in report and "rel = 2 if d is another caption" in report
    assert report.count("(cos ") == 3 * cfg.n_examples  # top-3 captions for each example image
    assert "VmHWM" in report and "load average while timing" in report


def _check_html(cfg: EvalConfig, image_emb: np.ndarray, text_emb: np.ndarray, t2i: list[int]) -> None:
    """The HTML report is self-contained, and its gallery shows the student's true top-5."""
    page = Path(cfg.html_path).read_text(encoding="utf-8")
    sources = re.findall(r'<img src="([^"]*)"', page)
    assert sources and all(src.startswith("data:image/png;base64,") for src in sources)
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched from a network
    for alt in ("Recall@K curves", "Training curves"):
        assert f'alt="{alt}"' in page
    # Caption queries: evenly spaced captions 0, 10, 21 of 22; each shows 5 images per model.
    queries = np.unique(np.linspace(0, len(t2i) - 1, cfg.gallery_captions).round().astype(int))
    assert page.count('<div class="query">') == len(queries)
    assert page.count('<div class="hit') == 2 * cfg.gallery_top * len(queries)
    student_true = 0
    for j in queries:
        sims = image_emb.astype(np.float64) @ text_emb[j].astype(np.float64)
        top = sorted(range(len(image_emb)), key=lambda i: (-sims[i], i))[:cfg.gallery_top]
        student_true += t2i[j] in top
    teacher_true = page.count('class="hit true"') - student_true
    assert 0 <= teacher_true <= len(queries)
    assert page.count('<div class="query imgq">') == cfg.gallery_images


def find_chromium() -> str | None:
    """A Chromium (or Chrome) binary on PATH, if any."""
    names = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
    return next((path for path in map(shutil.which, names) if path), None)


def rendered_body(page: Path) -> str:
    """The <body> tag of ``page`` after a real headless Chromium loaded it and ran its scripts."""
    proc = subprocess.run([find_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                           "--virtual-time-budget=5000", "--dump-dom", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return re.search(r"<body[^>]*>", proc.stdout).group(0)


@pytest.mark.skipif(find_chromium() is None, reason="needs Chromium (apt-get install chromium)")
def test_html_report_renders_in_chromium(eval_setup: EvalConfig, tmp_path: Path):
    cfg = replace(eval_setup, measure_memory=False)
    evaluate(cfg, progress=False)
    page = Path(cfg.html_path)
    n_images = len(re.findall(r"<img ", page.read_text(encoding="utf-8")))
    # 2 plots, 3 captions x 2 models x top-5, 2 image queries
    assert n_images == 2 + 3 * 2 * cfg.gallery_top + 2
    body = rendered_body(page)
    assert f'data-images-loaded="{n_images}"' in body and 'data-images-broken="0"' in body
    # The same page with one picture's bytes damaged: the browser reports it as broken.
    text = page.read_text(encoding="utf-8")
    damaged = tmp_path / "damaged.html"
    damaged.write_text(text.replace("data:image/png;base64,iVBOR", "data:image/png;base64,AAAA", 1),
                       encoding="utf-8")
    body = rendered_body(damaged)
    assert f'data-images-loaded="{n_images - 1}"' in body and 'data-images-broken="1"' in body


def test_student_only_and_unbuildable_teacher(eval_setup: EvalConfig):
    cfg = replace(eval_setup, teacher_cache=None, teacher="no_such_teacher", teacher_kwargs={},
                  measure_memory=False, n_examples=1)
    result = evaluate(cfg, progress=False)
    assert "teacher" not in result and "pct_of_teacher" not in result
    assert set(result["efficiency"]) == {"student"}
    page = Path(cfg.html_path).read_text(encoding="utf-8")  # student-only gallery
    assert page.count('<div class="hit') == cfg.gallery_top * cfg.gallery_captions
    # Without a cache only the undecodable image (and its two captions) is excluded.
    assert (result["counts"]["n_images_excluded"], result["counts"]["n_texts_excluded"]) == (1, 2)
    report = Path(cfg.report_path).read_text()
    assert "could not be constructed" in report and "no_such_teacher" in report


def test_a_second_evaluation_of_one_output_is_refused(eval_setup: EvalConfig):
    import sys

    from stages.lock import LockError

    cfg = replace(eval_setup, teacher=None, measure_memory=False)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from stages.lock import output_lock\n"
         "with output_lock(sys.argv[1], '`distill evaluate`'):\n    print('locked', flush=True); time.sleep(600)",
         cfg.metrics_path], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LockError, match=f"pid {holder.pid}"):
            evaluate(cfg, progress=False)
        assert not Path(cfg.metrics_path).exists() and not Path(cfg.report_path).exists()
    finally:
        holder.kill()
        holder.wait()
    before = torch.get_num_threads()
    metrics = evaluate(replace(cfg, threads=1), progress=False)  # the holder died: lock taken over
    assert metrics["machine"]["torch_threads"] == 1 and torch.get_num_threads() == before
    assert "1 torch threads" in Path(cfg.report_path).read_text()


def quiet_machine(monkeypatch, load: float = 0.5) -> None:
    """The load average the evaluation sees (this shared machine's own varies with other work)."""
    monkeypatch.setattr("os.getloadavg", lambda: (load, load, load))


def test_teacher_efficiency_is_measured_once_per_teacher_machine_and_settings(eval_setup: EvalConfig,
                                                                               monkeypatch):
    """A second evaluation reuses the teacher's figures (the same floats: not timed again) and says
    so; other timing settings or another teacher are measured anew. The student is always timed."""
    from pipeline.evaluation.kept_efficiency import teacher_efficiency_key
    from pipeline.teachers import create_teacher

    quiet_machine(monkeypatch)
    cfg = replace(eval_setup, measure_memory=False, n_examples=1)
    kept = Path(cfg.teacher_efficiency_cache)
    first = evaluate(cfg, progress=False)
    assert len(list(kept.glob("*.json"))) == 1
    assert "were reused" not in Path(cfg.report_path).read_text()
    second = evaluate(cfg, progress=False)
    assert second["efficiency"]["teacher"] == first["efficiency"]["teacher"]
    assert second["efficiency"]["student"] != first["efficiency"]["student"]  # timed again
    report = " ".join(Path(cfg.report_path).read_text().split())
    assert "the teacher's efficiency figures (parameters, latency, memory) were reused from its measurement of" in report
    assert "reused from its measurement" in Path(cfg.html_path).read_text()
    evaluate(replace(cfg, latency_repeats=cfg.latency_repeats + 1), progress=False)
    assert len(list(kept.glob("*.json"))) == 2
    teachers = [create_teacher("open_clip", model_cfg=TINY_CLIP_CFG, pretrained=None, seed=s) for s in (0, 0, 1)]
    keys = [teacher_efficiency_key(t, cfg, "cpu", ["a cat"]) for t in teachers]
    assert keys[0] == keys[1] and keys[0] != keys[2]
    assert keys[0] != teacher_efficiency_key(teachers[0], cfg, "cpu", ["a dog"])


def test_teacher_efficiency_of_a_busy_machine_is_not_kept(eval_setup: EvalConfig, monkeypatch):
    quiet_machine(monkeypatch, load=9.0)  # more runnable work than CPUs: inflated timings
    cfg = replace(eval_setup, teacher_efficiency_cache=str(Path(eval_setup.teacher_efficiency_cache) / "busy"),
                  measure_memory=False, n_examples=1)
    evaluate(cfg, progress=False)
    assert not list(Path(cfg.teacher_efficiency_cache).glob("*.json"))
    assert "the timings are inflated" in Path(cfg.report_path).read_text()


def test_reports_name_paths_relative_to_the_project(eval_setup: EvalConfig, tmp_path: Path, monkeypatch):
    """Run from the project root with absolute paths inside it: no report names the machine's
    folders; a path outside the project stays absolute."""
    quiet_machine(monkeypatch)
    monkeypatch.chdir(tmp_path)
    cfg = replace(eval_setup, measure_memory=False, n_examples=1)
    evaluate(cfg, progress=False)
    evaluate(cfg, progress=False)  # the second reuses the teacher's figures: a note naming a file
    for path in (cfg.metrics_path, cfg.report_path, cfg.html_path):
        assert str(tmp_path) not in Path(path).read_text(encoding="utf-8"), path
    report = Path(cfg.report_path).read_text()
    assert "Test split `data/test`" in report and "Student `student`" in report
    assert "cache `caches/tiny/test.zarr`" in report and "(.cache/teacher_efficiency/" in report
    from pipeline.paths import portable, project_path

    assert project_path("/elsewhere/data") == "/elsewhere/data"
    assert project_path(tmp_path / "a" / ".." / "b") == "b" and project_path("../x") == str(tmp_path.parent / "x")
    assert portable({str(tmp_path / "k"): [str(tmp_path / "v"), "/elsewhere", 3]}) == {"k": ["v", "/elsewhere", 3]}


def test_student_alone_is_scored_beside_the_student(eval_setup: EvalConfig, tmp_path: Path):
    """evaluate.alone_dir: a second checkpoint scored on the same rows, as it scores on its own."""
    torch.manual_seed(2)
    alone = tiny_student()
    save_checkpoint(tmp_path / "alone/student.safetensors", alone, {}, alone.spec())
    cfg = replace(eval_setup, alone_dir=str(tmp_path / "alone"), teacher=None, measure_memory=False,
                  n_examples=1)
    both = evaluate(cfg, progress=False)
    header = "| metric | student | student alone | teacher | student % of teacher |"
    report = Path(cfg.report_path).read_text()
    assert header in report and "student alone" in Path(cfg.html_path).read_text()
    assert f"| rsum | {both['student']['rsum']:.2f} | {both['alone']['rsum']:.2f} |" in report
    assert "alone_i2t" in Path(cfg.plots_dir, "recall_at_k_wide.csv").read_text().splitlines()[0]
    on_its_own = evaluate(replace(cfg, student_dir=cfg.alone_dir, alone_dir=None), progress=False)
    assert both["alone"] == on_its_own["student"] and both["alone"] != both["student"]


def test_parameters_used_matches_the_student_tower_split():
    student = tiny_student()
    pixels = torch.zeros(2, 3, 32, 32)
    towers = student.tower_parameters()
    assert parameters_used(student, lambda: student.encode_image(pixels)) == towers["image"]
    assert parameters_used(student, lambda: student.encode_text(student.tokenize(["a cat"]))) == towers["text"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_evaluate_on_cuda_matches_cpu(eval_setup: EvalConfig):
    cpu = evaluate(replace(eval_setup, teacher=None, measure_memory=False), progress=False)
    gpu = evaluate(replace(eval_setup, device="cuda"), progress=False)
    assert gpu["teacher"] == cpu["teacher"]  # scored from the same cache arrays
    for key, value in cpu["student"].items():
        assert gpu["student"][key] == pytest.approx(value, abs=1e-6), key
    assert gpu["efficiency"]["student"]["cuda_peak_mb"] > 0
    assert gpu["efficiency"]["teacher"]["image_ms_per_item_b4"] > 0


def test_ndcg_without_relevant_items_says_why(eval_setup: EvalConfig):
    from pipeline.evaluation.report import _quality_table
    from pipeline.evaluation.scoring import score_embeddings

    rng = np.random.default_rng(0)
    image_emb, text_emb = rng.standard_normal((6, 8)), rng.standard_normal((6, 8))
    one_caption = np.arange(6)  # one caption per image, no labels: no query has a relevant item
    scores = score_embeddings(image_emb, text_emb, one_caption, [None] * 6, eval_setup)
    assert set(scores.unavailable) == {"i2i_ndcg@10", "t2t_ndcg@10"}
    assert "no labels" in scores.unavailable["i2i_ndcg@10"]
    assert "one caption" in scores.unavailable["t2t_ndcg@10"]
    assert not np.isfinite(scores.metrics["i2i_ndcg@10"])
    table = "\n".join(_quality_table({"student": scores.metrics, "unavailable": scores.unavailable}))
    assert "i2i_ndcg@10 has no value (–): no test image has a relevant other image" in table
    # two captions per image: text->text has relevant items; two images sharing a label: i2i too
    labelled = score_embeddings(image_emb, np.vstack([text_emb, text_emb]), np.tile(one_caption, 2),
                                ["a", "a", None, None, None, None], eval_setup)
    assert labelled.unavailable == {} and np.isfinite(labelled.metrics["t2t_ndcg@10"])
