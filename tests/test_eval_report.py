"""`d2v eval report`: the page's tables, bold and comparisons by hand, and the real CLI end to end."""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from d2v_train.eval.report import load_results, render_markdown, section_of, write_report
from schemas.evaluation import CheckpointRef, CurvePoint, DataRef, EvalResult
from tests.helpers import run_d2v

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _speech(label: str, url: str, step: int | None, wer: float, cer: float) -> EvalResult:
    return EvalResult(
        task="speech-ctc", label=label, metrics={"wer": wer, "cer": cer}, baseline={"wer": 1.0, "cer": 0.83},
        checkpoint=CheckpointRef(url=url, step=step, model="speech dim=64 layers=2", parameters=123_456),
        data=DataRef(url="file:///data/ls-ctc", train_split="train", eval_split="dev", train_samples=400,
                     eval_samples=50),
        steps=200, seed=1, hyperparameters={"lr": 5e-4, "batch_size": 8, "mask_prob": 0.65},
        curve=[CurvePoint(step=s, loss=200.0 / (1 + s) + (40 if label == "random" else 0), lr=5e-4)
               for s in range(0, 201, 20)],
        elapsed_s=73.4)


def _image_probe() -> EvalResult:
    return EvalResult(
        task="image-probe", label="step 1000", metrics={"top1": 0.4213, "top5": 0.8102},
        baseline={"top1": 0.1, "top5": 0.5},
        checkpoint=CheckpointRef(url="s3://runs/vision/checkpoints/step_00001000", step=1000,
                                 model="vision dim=64 layers=2", parameters=98_765),
        data=DataRef(url="s3://data/cifar", train_split="train", eval_split="test", train_samples=5000,
                     eval_samples=1000),
        steps=0, world_size=2, hyperparameters={"weight_decay": 0.0}, elapsed_s=12.0)


@pytest.fixture
def results() -> list[EvalResult]:
    # The random run first and the pre-trained one second: the report must not assume an order.
    return [_speech("random", "random", None, wer=0.971, cer=0.702),
            _speech("pre-trained", "s3://runs/speech/checkpoints/step_00004000", 4000, wer=0.412, cer=0.151),
            _image_probe()]


@pytest.fixture
def result_files(results, tmp_path) -> list[str]:
    paths = []
    for i, result in enumerate(results):
        path = tmp_path / f"result{i}.json"
        path.write_text(result.model_dump_json(indent=2))
        paths.append(str(path))
    return paths


def _tables(markdown: str) -> list[list[str]]:
    """Each Markdown table's rows (header and separator included), in page order."""
    tables, current = [], []
    for line in markdown.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables + ([current] if current else [])


def _cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip("|").split(" | ")]


def test_markdown_has_one_table_per_task_with_the_lower_error_rate_in_bold(results):
    markdown = render_markdown(results, "Tiny models", {"speech-ctc": ["speech-ctc-metrics.png"]})
    assert markdown.startswith("# Tiny models\n")
    speech, image = _tables(markdown)
    assert markdown.index("## speech-ctc") < markdown.index("## image-probe")

    header = _cells(speech[0])
    rows = [dict(zip(header, _cells(row))) for row in speech[2:]]
    assert [r["label"] for r in rows] == ["random", "pre-trained"]  # input order
    assert rows[0]["WER"] == "97.10%" and rows[1]["WER"] == "**41.20%**"
    assert rows[0]["CER"] == "70.20%" and rows[1]["CER"] == "**15.10%**"
    assert rows[1]["checkpoint"] == "`s3://runs/speech/checkpoints/step_00004000` @ step 4,000"
    assert rows[0]["baseline WER"] == "100.00%"
    assert rows[1]["data (train → eval samples)"] == "train (400) → dev (50)"
    assert rows[1]["elapsed"] == "1m 13s"

    image_rows = [dict(zip(_cells(image[0]), _cells(row))) for row in image[2:]]
    assert [r["label"] for r in image_rows] == ["step 1000"]
    assert image_rows[0]["top-1"] == "42.13%"  # a single row has nothing to beat: no bold
    assert "WER" not in _cells(image[0]) and "top-1" not in header


def test_comparison_line_has_the_sign_and_numbers_of_the_best_against_the_rest(results):
    markdown = render_markdown(results, "t", {})
    speech = markdown[markdown.index("## speech-ctc"): markdown.index("## image-probe")]
    assert "pre-trained vs random: WER 41.20% vs 97.10% (-55.90 points)" in speech
    assert "pre-trained vs trivial baseline: WER 41.20% vs 100.00% (-58.80 points)" in speech
    image = markdown[markdown.index("## image-probe"):]
    assert "step 1000 vs trivial baseline: top-1 42.13% vs 10.00% (+32.13 points)" in image


def test_higher_is_better_for_accuracies_and_each_run_says_how_it_was_made():
    low, high = _image_probe(), _image_probe()
    low.label, low.metrics = "small", {"top1": 0.30, "top5": 0.90}
    markdown = render_markdown([low, high], "t", {"image-probe": ["image-probe-metrics.png", "image-probe-loss.png"]})
    (table,) = _tables(markdown)
    assert _cells(table[2])[4:6] == ["30.00%", "**90.00%**"]
    assert _cells(table[3])[4:6] == ["**42.13%**", "81.02%"]
    assert "step 1000 vs small: top-1 42.13% vs 30.00% (+12.13 points)" in markdown
    assert "![image-probe: loss](image-probe-loss.png)" in markdown
    assert "**small**: 0 steps on world size 2, seed 0" in markdown and "weight_decay=0.0" in markdown


def test_text_results_of_different_glue_tasks_get_separate_sections_and_headlines():
    cola, sst2 = _image_probe(), _image_probe()
    for result, glue, metrics in ((cola, "CoLA", {"accuracy": 0.69, "mcc": 0.12}), (sst2, "SST-2", {"accuracy": 0.8})):
        result.task, result.metrics, result.baseline = "text-cls", metrics, {"accuracy": 0.5, "mcc": 0.0}
        result.hyperparameters = {"glue_task": glue}
    assert section_of(cola) == "text-cls (CoLA)"
    markdown = render_markdown([cola, sst2], "t", {})
    assert len(_tables(markdown)) == 2
    assert "step 1000 vs trivial baseline: MCC×100 12.00 vs 0.00 (+12.00 points)" in markdown


def test_report_through_the_cli_writes_the_page_its_plots_and_the_results(result_files, results, tmp_path):
    out = tmp_path / "report"
    done = run_d2v("eval", "report", *result_files, "--out", str(out), "--title", "Speech and vision", timeout=60)
    assert done.stdout.strip() == f"wrote {out}/report.md"
    markdown = (out / "report.md").read_text()
    assert markdown.startswith("# Speech and vision\n")
    assert [EvalResult.model_validate(r) for r in json.loads((out / "results.json").read_text())] == results

    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert sorted(images) == ["image-probe-metrics.png", "speech-ctc-loss.png", "speech-ctc-metrics.png"]
    assert sorted(p.name for p in out.glob("*.png")) == sorted(images)
    for name in images:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
        assert 300 <= width <= 3000 and 200 <= height <= 2000


def test_any_fsspec_url_works_for_inputs_and_output(results):
    import fsspec

    memory = fsspec.filesystem("memory")
    urls = []
    for i, result in enumerate(results[:2]):
        memory.pipe_file(f"/eval-report-test/in/{i}.json", result.model_dump_json().encode())
        urls.append(f"memory://eval-report-test/in/{i}.json")
    assert load_results(urls) == results[:2]
    try:
        where = write_report(urls, "memory://eval-report-test/out", title="t")
        assert where == "memory://eval-report-test/out/report.md"
        written = {p.rsplit("/", 1)[1] for p in memory.ls("/eval-report-test/out", detail=False)}
        assert written == {"report.md", "results.json", "speech-ctc-metrics.png", "speech-ctc-loss.png"}
    finally:
        memory.rm("/eval-report-test", recursive=True)


def test_a_broken_or_missing_result_file_is_a_usage_error_naming_it(result_files, tmp_path):
    broken = tmp_path / "broken.json"
    data = json.loads(Path(result_files[0]).read_text())
    del data["metrics"]
    broken.write_text(json.dumps(data))
    done = run_d2v("eval", "report", result_files[1], str(broken), "--out", str(tmp_path / "r"), check=False,
                   timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and str(broken) in done.stderr and "metrics" in done.stderr
    assert not (tmp_path / "r").exists()

    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    for bad, problem in ((tmp_path / "missing.json", "no such result file"), (garbage, "not an evaluation result")):
        with pytest.raises(ValueError, match=re.escape(f"{bad}: {problem}")):
            load_results([result_files[0], str(bad)])


def _budgeted(label: str, budget: str, seconds: float, seed: int, cer: float) -> EvalResult:
    from schemas.evaluation import LabelledSubset

    result = _speech(label, "random" if label == "random" else "runs/ls/checkpoints/step-00001000",
                     None if label == "random" else 1000, wer=1.0, cer=cer)
    result.seed = seed
    result.data.labelled = LabelledSubset(budget=budget, samples=int(seconds // 3), seconds=seconds, speakers=4)
    return result


def test_the_curve_states_the_gain_per_budget_with_mean_and_spread_over_seeds():
    from d2v_train.eval import curve

    results = [_budgeted("random", "1m", 60, s, v) for s, v in enumerate((0.80, 0.84))]
    results += [_budgeted("step 1000", "1m", 60, s, v) for s, v in enumerate((0.40, 0.44))]
    results += [_budgeted("random", "all", 600, s, v) for s, v in enumerate((0.50, 0.60))]
    results += [_budgeted("step 1000", "all", 600, s, v) for s, v in enumerate((0.52, 0.56))]
    points = curve.points(results, "cer")
    first = next(p for p in points if p.label == "step 1000" and p.budget == "1m")
    assert first.mean == pytest.approx(0.42) and first.spread == pytest.approx(0.0283, abs=1e-4)
    assert first.amount == 1.0  # minutes of labelled audio
    assert curve.budgets_in_order(points) == ["1m", "all"]
    small, large = curve.gain_sentences(points, "cer", "dev")
    assert small == ("pre-training (step 1000) cuts dev CER from 82.00% to 42.00% with 1.0 min of labels, 0.51x; "
                     "mean of 2 seeds")
    assert large.startswith("pre-training (step 1000) cuts dev CER from 55.00% to 54.00% with all 10.0 min of labels")
    assert large.endswith("(inside the seeds spread: not a clear difference)")
    stuck = [_budgeted(label, "1m", 60, 0, 1.0) for label in ("random", "step 1000")]
    assert curve.gain_sentences(curve.points(stuck, "cer"), "cer", "dev") == [
        "pre-training (step 1000) leaves dev CER at 100.00% with 1.0 min of labels, as random init does; mean of 1 seed"]
    page = curve.render_markdown(results, "cer", "Curve", "curve.png")
    assert page.splitlines()[2] == f"**{small[0].upper()}{small[1:]}.**"
    assert "| step 1000 | 42.00% ± 2.83% (n=2) | 54.00% ± 2.83% (n=2) |" in page
    assert curve.plot_curve(results, "cer")[:8] == PNG_SIGNATURE


def test_one_line_summary_of_a_result():
    from d2v_train.eval.report import one_line

    line = one_line(_budgeted("step 1000", "10m", 598.5, 2, 0.25))
    assert line == ("speech-ctc step 1000: WER 100.00%, CER 25.00% (trivial baseline WER 100.00%) on dev (50 scored) | "
                    "budget 10m: 199 labelled samples of train, 10.0 min, 4 speakers | 200 updates, seed 2, 1m 13s")
    assert "\n" not in one_line(_image_probe()) and "5,000 labelled samples of train (all)" in one_line(_image_probe())
