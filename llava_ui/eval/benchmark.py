"""The model card's evaluation (LLaVA-Interleave-Bench), runnable against any answering function.

The model comes in as `answer(messages, image_paths) -> str`: `messages` are the turns so far
(`{"role": "user" | "assistant", "content": ...}`, `<image>` markers kept as in the data), `image_paths`
the sample's images (absolute), matching the markers in order across the whole conversation. The caller
renders the prompt and decodes greedily with at most EVAL_MAX_NEW_TOKENS new tokens. (The reference's
model_vqa.py renders each marker as the image followed by a "\n" token, and starts every later turn with a
fresh system block placed right after the previous answer's generated ids, stop token included.)
"""

import argparse
import json
import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tqdm import tqdm

from llava_ui.config import IMAGE_MODES
from llava_ui.errors import UserError
from llava_ui.eval.scoring import benchmark_scores, category_scores, score_rows

SPLITS = ("multi_image_in_domain", "multi_image_out_domain", "multi_view_in_domain")
EVAL_MAX_NEW_TOKENS = 1024
DEFAULT_MODEL_ID = "llava-next-interleave-qwen-0.5b"

ANSWERS_FILE = "result.jsonl"
RUN_SETTINGS_FILE = "eval_run.json"
DATASET_SCORES_FILE = "eval_dataset.json"
DATASET_DETAILS_FILE = "eval_dataset_details.json"
CATEGORY_SCORES_FILE = "eval_cat.json"

# LLaVA-NeXT-Interleave blog, 0.5B model: (average, {benchmark: score}). The averages are not the mean of
# the listed scores (in-domain lists 8 of 9 categories: 44.9; out-domain: 27.8), so compare them loosely.
PUBLISHED_0_5B = {
    "multi_image_in_domain": (43.9, {
        "Spot the Difference": 34.3, "Image Edit": 21.6, "Visual Story Telling": 29.7, "Text-rich VQA": 63.9,
        "Multi-image VQA": 54.8, "Puzzle": 35.4, "Q-Bench": 52.0, "NLVR2": 67.8,
    }),
    "multi_image_out_domain": (33.1, {
        "Mantis-Eval": 45.6, "BLINK": 39.2, "MMMU-mv": 28.6, "MathVerse-mv": 13.3, "SciVerse-mv": 12.2,
    }),
    "multi_view_in_domain": (53.0, {}),
}


@dataclass(frozen=True)
class BenchSample:
    sample_id: object
    dataset: str
    question_type: str
    image_paths: tuple[str, ...]
    turns: tuple[tuple[str, str], ...]  # (question, ground-truth answer)

    @property
    def key(self) -> tuple[str, str]:
        return self.dataset, str(self.sample_id)


@dataclass
class EvaluationSummary:
    split: str
    dataset_scores: dict  # as eval_dataset.json: {dataset: {metric: 0..1}}
    category_scores: dict  # as eval_cat.json: {reference category: 0..1}
    benchmark_scores: dict  # {published label: 0..1}
    overall: float | None  # unweighted mean of benchmark_scores, as lmms-eval's overall score
    samples_selected: int
    samples_answered: int
    samples_already_done: int
    samples_skipped: int  # images missing


def _row_key(row: dict) -> tuple[str, str]:
    return row["dataset"], str(row["sample_id"])


def load_samples(data_dir: str, split: str) -> list[BenchSample]:
    """The split's samples in file order, image paths made absolute, one (question, answer) pair per turn."""
    path = os.path.join(data_dir, f"{split}.json")
    try:
        with open(path, encoding="utf-8") as file:
            entries = json.load(file)
    except FileNotFoundError:
        raise UserError(f"{path} not found: --data must be the LLaVA-NeXT-Interleave-Bench folder") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON: {error}") from None
    samples, seen = [], set()
    for index, entry in enumerate(entries):
        try:
            conversation = entry["conversations"]
            sample = BenchSample(
                sample_id=entry["sample_id"],
                dataset=entry["metadata"]["dataset"],
                question_type=entry["metadata"]["question_type"],
                image_paths=tuple(os.path.abspath(os.path.join(data_dir, image)) for image in entry["image"]),
                turns=tuple((conversation[i]["value"], conversation[i + 1]["value"])
                            for i in range(0, len(conversation) - 1, 2)),
            )
        except (KeyError, TypeError, IndexError) as error:
            raise UserError(f"{path}: sample #{index} is malformed ({error!r})") from None
        if sample.key in seen:
            # Resuming tells samples apart by (dataset, sample_id).
            print(f"sample {sample.sample_id} ({sample.dataset}) appears twice in {path}; the repeat is ignored",
                  file=sys.stderr)
            continue
        seen.add(sample.key)
        samples.append(sample)
    return samples


def _read_rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as file:
        for line in file:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # the line a killed run was writing
    return rows


def _write_json(path: str, content) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as file:
        json.dump(content, file, indent=4)
    os.replace(path + ".tmp", path)


def _keep_finished_answers(answers_path: str, samples: list[BenchSample]) -> set:
    """Drop the answers of partly answered samples from the answers file; return the finished samples' keys."""
    rows = _read_rows(answers_path)
    turns_expected = {sample.key: len(sample.turns) for sample in samples}
    turns_answered = Counter(_row_key(row) for row in rows)
    finished = {key for key, count in turns_answered.items() if turns_expected.get(key) == count}
    kept = [row for row in rows if _row_key(row) in finished or _row_key(row) not in turns_expected]
    with open(answers_path + ".tmp", "w", encoding="utf-8") as file:
        file.writelines(json.dumps(row) + "\n" for row in kept)
    os.replace(answers_path + ".tmp", answers_path)
    return finished


def _check_run_settings(out_dir: str, settings: dict) -> None:
    """Answers from another split, model or image mode must not be mixed into this run's scores."""
    path = os.path.join(out_dir, RUN_SETTINGS_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as file:
            previous = json.load(file)
        if previous != settings:
            raise UserError(f"{out_dir} holds answers of another run ({previous}, now {settings}); "
                                  "choose a new --out folder or the same settings")
    else:
        _write_json(path, settings)


def answer_sample(sample: BenchSample, answer, model_id: str):
    """Ask `answer` turn by turn; yield one answer row per turn."""
    messages = []
    for question, truth in sample.turns:
        messages.append({"role": "user", "content": question})
        prediction = answer([dict(message) for message in messages], list(sample.image_paths))
        if not isinstance(prediction, str):
            raise TypeError(f"answer() must return a str, got {type(prediction).__name__}")
        # Later turns see the model's own answers, not the ground truth: the reference's model_vqa.py
        # appends its generated ids to the prompt before the next question.
        messages.append({"role": "assistant", "content": prediction})
        yield {
            "dataset": sample.dataset,
            "sample_id": sample.sample_id,
            "prompt": question,
            "pred_response": prediction,
            "gt_response": truth,
            "model_id": model_id,
            "question_type": sample.question_type,
        }


def _answer_samples(todo: list[BenchSample], answer, model_id: str, parallel: int):
    """(sample, its answer rows, or None when an image is missing) for each sample, in order; `parallel` samples
    in the making at once (one at a time, the rows come as each turn is answered). An error stops the run (the samples not started are dropped)."""

    def rows(sample, whole=True):
        missing = [path for path in sample.image_paths if not os.path.isfile(path)]
        for path in missing:
            tqdm.write(f"sample {sample.sample_id} ({sample.dataset}) skipped: image not found: {path}",
                       file=sys.stderr)
        if missing:
            return None
        answers = answer_sample(sample, answer, model_id)
        return list(answers) if whole else answers

    if parallel <= 1:  # one at a time: each answer is on disk before the next question is asked
        for sample in todo:
            yield sample, rows(sample, whole=False)
        return
    with ThreadPoolExecutor(parallel, thread_name_prefix="eval") as pool:
        futures = [pool.submit(rows, sample) for sample in todo]
        try:
            for sample, future in zip(todo, futures):
                yield sample, future.result()
        finally:
            for future in futures:
                future.cancel()  # (those running finish their sample; nothing is written after an error)


def format_report(summary: EvaluationSummary) -> str:
    """Per-dataset and per-benchmark tables (scores x100) next to the published 0.5B numbers."""
    published_average, published = PUBLISHED_0_5B[summary.split]
    lines = [
        f"LLaVA-Interleave-Bench {summary.split}: {summary.samples_selected} samples, "
        f"{summary.samples_answered} answered now, {summary.samples_already_done} answered before, "
        f"{summary.samples_skipped} skipped (images missing)",
        "",
        f"{'dataset':<34}{'metric':<12}{'score':>7}",
    ]
    for dataset, score in summary.dataset_scores.items():
        metric, value = next(iter(score.items()))
        lines.append(f"{dataset:<34}{metric:<12}{100 * value:>7.1f}")

    def cell(value):
        return f"{value:>7.1f}" if value is not None else f"{'-':>7}"

    lines += ["", f"{'benchmark':<34}{'score':>7}{'published 0.5B':>17}"]
    for label in list(published) + [label for label in summary.benchmark_scores if label not in published]:
        ours = summary.benchmark_scores.get(label)
        lines.append(f"{label:<34}{cell(None if ours is None else 100 * ours)}{cell(published.get(label)):>17}")
    overall = None if summary.overall is None else 100 * summary.overall
    lines.append(f"{'average':<34}{cell(overall)}{cell(published_average):>17}")
    return "\n".join(lines)


def _score_and_write(out_dir: str, split: str, rows: list[dict]) -> tuple[dict, dict, dict]:
    dataset_scores, details = score_rows(rows, warn=lambda message: print(message, file=sys.stderr))
    categories = category_scores(dataset_scores)
    _write_json(os.path.join(out_dir, DATASET_SCORES_FILE), dataset_scores)
    _write_json(os.path.join(out_dir, DATASET_DETAILS_FILE), details)
    _write_json(os.path.join(out_dir, CATEGORY_SCORES_FILE), categories)
    return dataset_scores, categories, benchmark_scores(split, dataset_scores, categories)


def run_evaluation(data_dir: str, split: str, out_dir: str, answer, *, limit: int | None = None,
                   model_id: str = DEFAULT_MODEL_ID, image_mode: str = "eval",
                   progress: bool = True, parallel: int = 1) -> EvaluationSummary:
    """Answer the split's samples (resuming from out_dir/result.jsonl), score them, print the report.

    `parallel` samples are answered at once, each in a thread of its own (`answer` must be thread-safe; the
    engine batches their decode steps); the output is the same as one at a time."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    samples = load_samples(data_dir, split)
    selected = samples[:limit]
    os.makedirs(out_dir, exist_ok=True)
    _check_run_settings(out_dir, {"split": split, "model_id": model_id, "image_mode": image_mode})
    answers_path = os.path.join(out_dir, ANSWERS_FILE)
    finished = _keep_finished_answers(answers_path, samples)
    todo = [sample for sample in selected if sample.key not in finished]
    answered = skipped = 0
    with open(answers_path, "a", encoding="utf-8") as answers_file, \
            tqdm(total=len(selected), initial=len(selected) - len(todo), unit="sample", file=sys.stderr,
                 disable=not progress, desc=split) as progress_bar:
        for sample, rows in _answer_samples(todo, answer, model_id, parallel):
            if rows is None:
                skipped += 1
            else:
                # in data order whatever finished first (with --parallel, a sample's rows together once it is
                # done): the file is the one a run one at a time writes; a killed run's partial sample is
                # dropped on resume
                for row in rows:
                    answers_file.write(json.dumps(row) + "\n")
                    answers_file.flush()
                answered += 1
            progress_bar.update(1)

    # Score in data order, so a resumed run reports exactly what an uninterrupted one would.
    order = {sample.key: index for index, sample in enumerate(selected)}
    rows = sorted((row for row in _read_rows(answers_path) if _row_key(row) in order),
                  key=lambda row: order[_row_key(row)])
    dataset_scores, categories, benchmarks = _score_and_write(out_dir, split, rows)
    summary = EvaluationSummary(
        split=split,
        dataset_scores=dataset_scores,
        category_scores=categories,
        benchmark_scores=benchmarks,
        overall=sum(benchmarks.values()) / len(benchmarks) if benchmarks else None,
        samples_selected=len(selected),
        samples_answered=answered,
        samples_already_done=len(selected) - len(todo),
        samples_skipped=skipped,
    )
    print(format_report(summary))
    return summary


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The benchmark flags; the caller adds the model flags and calls run_evaluation."""
    parser.add_argument("--data", required=True, metavar="DIR",
                        help="LLaVA-NeXT-Interleave-Bench folder: <split>.json files and the image folders")
    parser.add_argument("--split", required=True, choices=SPLITS, help="which of the benchmark's splits to answer")
    parser.add_argument("--limit", type=_positive_int, metavar="N", help="evaluate only the first N samples")
    parser.add_argument("--image-mode", choices=IMAGE_MODES, default="eval",
                        help="how images become visual tokens; 'eval' is what produced the published scores")
    parser.add_argument("--parallel", type=_positive_int, default=1, metavar="N",
                        help="answer N samples at once (their decode steps batched by the engine: several times "
                             "the tokens per second on a CPU); the same answers and output as one at a time")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder: answers (result.jsonl, resumed on rerun) and score files")
    return parser
