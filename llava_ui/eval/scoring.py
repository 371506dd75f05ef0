"""Scoring of LLaVA-Interleave-Bench answers, rule for rule as the model card's evaluation does it
(LLaVA-NeXT `llava/eval/evaluate_interleave.py`, run by `scripts/interleave/eval_all.sh`).

Then grouped under the labels of the published table. Scores here are fractions in 0..1, as the reference
writes them to its JSON files.
"""

import re

from rouge import Rouge

# Order as in the reference; each mark is handled independently, so the order does not change the result.
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# The reference's pattern starts with `(?!<=\d)`, a lookahead that always holds in front of a '.',
# so what it removes is exactly a period not followed by a digit.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
# The reference passes `re.UNICODE` where `re.sub` takes its count: at most 32 such periods are removed.
PERIOD_REMOVAL_LIMIT = int(re.UNICODE)

MAX_PREDICTION_CHARS = 512
CHOICE_LETTERS = "abcdefgh"
OPEN_ENDED_METRIC = "Rouge-L f"
MULTI_CHOICE_METRIC = "Accuracy"

CATEGORIES = {
    "spot_the_diff": ("Spot-the-Diff", "Birds-to-Words", "CLEVR-Change"),
    "image_edit_instruct": ("IEdit", "HQ-Edit", "MagicBrush"),
    "visual_story_telling": ("AESOP", "FlintstonesSV", "PororoSV", "VIST"),
    "visual_cloze": ("COMICS_Dialogue", "RecipeQA_VisualCloze"),
    "text_rich_vqa": ("WebQA", "TQA", "OCR-VQA", "DocVQA"),
    "multi_image_vqa": ("MIT-States_StateCoherence", "MIT-States_PropertyCoherence", "VISION", "RecipeQA_ImageCoherence"),
    "puzzle": ("RAVEN",),
    "nlrv2": ("NLVR2_Mantis",),
    "qbench": ("QBench",),
}

# Reference category -> its name in the published table (Visual Cloze is not published).
CATEGORY_LABELS = {
    "spot_the_diff": "Spot the Difference",
    "image_edit_instruct": "Image Edit",
    "visual_story_telling": "Visual Story Telling",
    "visual_cloze": "Visual Cloze",
    "text_rich_vqa": "Text-rich VQA",
    "multi_image_vqa": "Multi-image VQA",
    "puzzle": "Puzzle",
    "qbench": "Q-Bench",
    "nlrv2": "NLVR2",
}
# The reference script names no out-domain dataset. BLINK, Mantis, MathVerse and SciVerse are the names
# lmms-eval's llava_interleave_bench task and third-party readers of multi_image_out_domain.json use;
# the MMMU spellings are our inference.
OUT_DOMAIN_LABELS = {
    "Mantis": "Mantis-Eval",
    "BLINK": "BLINK",
    "MMMU": "MMMU-mv",
    "MMMU_mv": "MMMU-mv",
    "MMMU-mv": "MMMU-mv",
    "MathVerse": "MathVerse-mv",
    "SciVerse": "SciVerse-mv",
}

_rouge_l = Rouge(metrics=["rouge-l"], stats=["f"])


def _remove_punctuation(text: str) -> str:
    # Every test looks at the text as it entered this step, not at what earlier replacements made of it.
    any_digit_comma_digit = _DIGIT_COMMA_DIGIT.search(text) is not None
    cleaned = text
    for mark in PUNCTUATION:
        next_to_space = mark + " " in text or " " + mark in text
        cleaned = cleaned.replace(mark, "" if next_to_space or any_digit_comma_digit else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", cleaned, count=PERIOD_REMOVAL_LIMIT)


def normalize_answer(text: str) -> str:
    """The reference's normalisation, applied to predictions and ground truths alike."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = _remove_punctuation(text)
    for edge in ("'", '"', ")", "("):
        text = text.strip(edge)
    return text.strip().lower()


def rouge_l_f(prediction: str, truth: str) -> float:
    """ROUGE-L F of the `rouge` package (summary level over '.'-split sentences, unique words)."""
    try:
        return _rouge_l.get_scores(prediction, truth)[0]["rouge-l"]["f"]
    except ValueError:
        # Text made only of periods (possible past the 32-removal limit) has no sentence left; the reference
        # crashes there, we score the row 0.
        return 0.0


def open_ended_score(prediction: str, truth: str) -> float | None:
    """ROUGE-L F of the normalised answers; None when the normalised ground truth is empty (row not scored)."""
    truth = normalize_answer(truth)
    prediction = normalize_answer(prediction)
    if not truth:
        return None
    if not prediction:
        return 0
    return rouge_l_f(prediction[:MAX_PREDICTION_CHARS], truth)


def extract_choice(prediction: str) -> str:
    """From a normalised prediction: the last ':'-separated piece that is a single letter a-h, else the whole."""
    if ":" not in prediction:
        return prediction
    choice = prediction
    for piece in prediction.split(":"):
        piece = piece.strip()
        if len(piece) == 1 and piece in CHOICE_LETTERS:
            choice = piece
    return choice


def multi_choice_score(prediction: str, truth: str) -> int:
    return int(extract_choice(normalize_answer(prediction)) == normalize_answer(truth))


def score_dataset(dataset: str, rows: list[dict]) -> tuple[dict, list[dict]]:
    """({metric: mean}, per-row details) for one dataset's rows (one row per answered turn).

    The metric follows the question_type of the first row. Raises ValueError for an unknown type
    and when no row can be scored (every ground truth empty).
    """
    question_type = rows[0]["question_type"]
    details = []
    if question_type == "open-ended":
        metric, scores = OPEN_ENDED_METRIC, []
        for row in rows:
            score = open_ended_score(row["pred_response"], row["gt_response"])
            if score is None:
                continue
            scores.append(score)
            details.append({"id": str(row["sample_id"]), "score": str(round(score, 3))})
    elif question_type == "multi-choice" or dataset == "nlrv2":  # the reference's name test, kept for fidelity
        metric = MULTI_CHOICE_METRIC
        scores = [multi_choice_score(row["pred_response"], row["gt_response"]) for row in rows]
        details = [{"id": str(row["sample_id"]), "score": str(score)} for row, score in zip(rows, scores)]
    else:
        raise ValueError(f"dataset {dataset}: unknown question_type {question_type!r}")
    if not scores:
        raise ValueError(f"dataset {dataset}: every ground-truth answer is empty, nothing to score")
    return {metric: sum(scores) / len(scores)}, details


def score_rows(rows: list[dict], warn=print) -> tuple[dict, dict]:
    """Score answer rows dataset by dataset, in order of first appearance.

    Returns (eval_dataset, eval_dataset_details) shaped as the reference's JSON files. A dataset that
    cannot be scored is reported through `warn` and left out (the reference stops the whole run there).
    """
    rows_by_dataset: dict[str, list[dict]] = {}
    for row in rows:
        rows_by_dataset.setdefault(row["dataset"], []).append(row)
    dataset_scores, dataset_details = {}, {}
    for dataset, dataset_rows in rows_by_dataset.items():
        try:
            dataset_scores[dataset], dataset_details[dataset] = score_dataset(dataset, dataset_rows)
        except ValueError as error:
            warn(f"not scored: {error}")
    return dataset_scores, dataset_details


def dataset_value(metric_and_value: dict) -> float:
    return next(iter(metric_and_value.values()))


def category_scores(dataset_scores: dict) -> dict:
    """Unweighted mean of each reference category's datasets that are present (eval_cat.json)."""
    categories = {}
    for category, members in CATEGORIES.items():
        values = [dataset_value(dataset_scores[name]) for name in members if name in dataset_scores]
        if values:
            categories[category] = sum(values) / len(values)
    return categories


def benchmark_scores(split: str, dataset_scores: dict, categories: dict) -> dict:
    """Scores under the published labels: reference categories in-domain, else dataset by dataset."""
    if split == "multi_image_in_domain":
        return {CATEGORY_LABELS[category]: score for category, score in categories.items()}
    groups: dict[str, list[float]] = {}
    for dataset, score in dataset_scores.items():
        label = OUT_DOMAIN_LABELS.get(dataset, dataset) if split == "multi_image_out_domain" else dataset
        groups.setdefault(label, []).append(dataset_value(score))
    return {label: sum(values) / len(values) for label, values in groups.items()}
