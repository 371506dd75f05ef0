"""The model card's evaluation: scoring rules of the reference case by case, then the runner on a tiny
benchmark folder with a fake model (reading, multi-turn history, missing images, output files, resume).

Expected scores are worked out by hand in the comments. ROUGE-L here is the `rouge` package's: words are
counted once each, F = 2PR / (P + R) with P = LCS / hypothesis words and R = LCS / reference words.
"""

import argparse
import copy
import json
import re

import pytest
from PIL import Image

from llava_ui.errors import UserError
from llava_ui.eval.benchmark import add_eval_arguments, run_evaluation
from llava_ui.eval.scoring import (
    PERIOD_REMOVAL_LIMIT,
    PUNCTUATION,
    benchmark_scores,
    extract_choice,
    multi_choice_score,
    normalize_answer,
    open_ended_score,
    rouge_l_f,
    score_rows,
)

SPLIT = "multi_image_in_domain"


def test_newlines_and_tabs_become_spaces_and_text_is_lowercased():
    assert normalize_answer("  Red\nCar\tGone  ") == "red car gone"


@pytest.mark.parametrize("mark", PUNCTUATION)
def test_punctuation_touching_no_space_becomes_a_space(mark):
    assert normalize_answer(f"x{mark}y") == "x y"


@pytest.mark.parametrize("mark", PUNCTUATION)
def test_punctuation_followed_or_preceded_by_a_space_is_deleted(mark):
    # Replaced by a space these would read "x  y" (two spaces).
    assert normalize_answer(f"x{mark} y") == "x y"
    assert normalize_answer(f"x {mark}y") == "x y"


def test_a_digit_comma_digit_anywhere_deletes_every_punctuation_mark():
    assert normalize_answer("cats/dogs") == "cats dogs"
    assert normalize_answer("1,000 cats/dogs") == "1000 catsdogs"


def test_punctuation_tests_see_the_text_before_the_punctuation_step():
    # ';' touches no space -> "x -y". Judged on that text '-' would touch a space and vanish ("x y");
    # the reference judges on "x;-y", so '-' becomes a space too.
    assert normalize_answer("x;-y") == "x  y"


def test_periods_are_removed_unless_a_digit_follows():
    assert normalize_answer("It is 3.5 m. Done.") == "it is 3.5 m done"


def test_at_most_32_periods_are_removed():
    assert PERIOD_REMOVAL_LIMIT == 32 == int(re.UNICODE)
    # 40 "a." pairs: the first 32 periods go, the last 8 stay.
    assert normalize_answer("a." * 40) == "a" * 33 + ".a" * 7 + "."


def test_edge_quote_is_stripped_before_surrounding_spaces():
    assert normalize_answer("'no'") == "no"
    # '!' becomes a space -> "'yes' ": the quote strip stops at that space, the space strip comes after.
    assert normalize_answer("'yes'!") == "yes'"
    # '"', ')' and '(' are punctuation marks, gone before their strips run.
    assert normalize_answer('"(yes)"') == "yes"


@pytest.mark.parametrize("prediction, choice", [
    ("the answer is: c", "c"),
    ("c", "c"),
    ("a: cat b: dog", "a"),
    ("option: b: final: d", "d"),
    ("b:", "b"),
    ("answer: i", "answer: i"),
    ("answer: bc", "answer: bc"),
])
def test_choice_is_the_last_single_letter_a_to_h_between_colons(prediction, choice):
    assert extract_choice(prediction) == choice


@pytest.mark.parametrize("prediction, truth, correct", [
    ("The answer is: C", "C", 1),
    ("(C)", "C", 1),
    ("Answer: B.", "(B)", 1),
    ("C. Because it is round", "C", 0),
    ("A: cat, B: dog", "B", 0),
])
def test_multi_choice_compares_extracted_letter_with_normalised_truth(prediction, truth, correct):
    assert multi_choice_score(prediction, truth) == correct


def test_rouge_l_f_matches_lcs_by_hand():
    # hyp 4 words, ref 5, LCS "the car is gone" = 4: P = 1, R = 4/5, F = 2(4/5)/(9/5) = 8/9.
    assert rouge_l_f("the car is gone", "the red car is gone") == pytest.approx(8 / 9, abs=1e-6)
    # hyp 4, ref 3, LCS "dog runs" = 2: P = 1/2, R = 2/3, F = (2/3)/(7/6) = 4/7.
    assert rouge_l_f("a dog runs fast", "the dog runs") == pytest.approx(4 / 7, abs=1e-6)


def test_prediction_is_cut_to_512_characters_after_normalisation():
    # Cut: only "x" remains, LCS 0 -> 0. Uncut it would be P = 1/2 ({x, gone}), R = 1, F = 2/3.
    assert open_ended_score("x " * 300 + "gone", "gone") == 0
    # 600 '!' next to a space are deleted first, leaving "gone"; cutting before normalising would leave nothing.
    assert open_ended_score("!" * 600 + " gone", "gone") == pytest.approx(1, abs=1e-6)


def test_empty_prediction_scores_zero_and_empty_truth_is_not_scored():
    assert open_ended_score("!!!", "a b") == 0
    assert open_ended_score("anything", " ... ") is None


def test_dataset_with_unknown_question_type_is_reported_and_left_out():
    warnings = []
    rows = [{"dataset": "X", "sample_id": 1, "question_type": "yes-no", "pred_response": "a", "gt_response": "a"}]
    assert score_rows(rows, warn=warnings.append) == ({}, {})
    assert "yes-no" in warnings[0]


def test_out_domain_datasets_are_reported_under_the_published_labels():
    scores = {"Mantis": {"Accuracy": 0.5}, "MathVerse": {"Accuracy": 0.25}, "Other": {"Accuracy": 1.0}}
    assert benchmark_scores("multi_image_out_domain", scores, {}) == {
        "Mantis-Eval": 0.5, "MathVerse-mv": 0.25, "Other": 1.0}


def sample(sample_id, dataset, question_type, images, *turns):
    conversation = []
    for question, truth in turns:
        conversation += [{"from": "human", "value": question}, {"from": "gpt", "value": truth}]
    return {"sample_id": sample_id, "image": images, "conversations": conversation,
            "metadata": {"dataset": dataset, "question_type": question_type}}


# Questions are unique, so the fake model finds its answer from the last question alone.
BENCH = [
    sample(0, "Spot-the-Diff", "open-ended", ["Split1/std/0a.png", "Split1/std/0b.png"],
           ("<image><image>What changed?", "The red car is gone.")),
    sample(1, "Spot-the-Diff", "open-ended", ["Split1/std/1a.png", "Split1/std/1b.png"],
           ("<image><image>What changed here?", "a man walks away")),
    sample(2, "Spot-the-Diff", "open-ended", ["Split1/std/2a.png", "Split1/std/2b.png"],
           ("<image><image>Anything?", "")),
    sample(3, "CLEVR-Change", "open-ended", ["Split1/clevr/3a.png", "Split1/clevr/3b.png"],
           ("<image><image>Describe the change.", "the cube moved")),
    sample(4, "RAVEN", "multi-choice", ["Split2/raven/4.png"], ("<image>Which panel fits?", "C")),
    sample(5, "RAVEN", "multi-choice", ["Split2/raven/5.png"], ("<image>Which panel fits next?", "B")),
    sample(6, "NLVR2_Mantis", "multi-choice", ["Split2/nlvr/6a.png", "Split2/nlvr/6b.png", "Split2/nlvr/6c.png"],
           ("<image><image>Is the left dog bigger? A. yes B. no", "A"),
           ("Now with <image> too: is it still? A. yes B. no", "B")),
    sample(7, "NLVR2_Mantis", "multi-choice", ["Split2/nlvr/7a.png", "Split2/nlvr/7b.png"],
           ("<image><image>Two cats? A. yes B. no", "B")),
    sample(8, "QBench", "multi-choice", ["Split2/qbench/8.png"], ("<image>Is it blurry?", "A")),
    sample(9, "VIST", "open-ended", ["Split1/vist/9.png"], ("<image>Tell the story.", "a dog runs")),
    sample(10, "VIST", "multi-choice", ["Split1/vist/10.png"], ("<image>Pick the caption.", "b")),
]
MISSING_IMAGE = "Split2/qbench/8.png"
ANSWERS = {
    "<image><image>What changed?": "the car is gone",  # 8/9 (see test_rouge_l_f_matches_lcs_by_hand)
    "<image><image>What changed here?": "!!!",  # empty after normalising -> 0
    "<image><image>Anything?": "whatever",  # empty truth: not scored
    "<image><image>Describe the change.": "The cube moved.",  # identical after normalising -> 1
    "<image>Which panel fits?": "The answer is: C",  # 1
    "<image>Which panel fits next?": "A",  # 0
    "<image><image>Is the left dog bigger? A. yes B. no": "The answer is: A",  # 1
    "Now with <image> too: is it still? A. yes B. no": "yes",  # 0
    "<image><image>Two cats? A. yes B. no": "(B)",  # 1
    "<image>Is it blurry?": "A",
    "<image>Tell the story.": "A dog runs!",  # 1
    "<image>Pick the caption.": "Answer: b",  # ROUGE because VIST's first row is open-ended: 2/3
}
# Per dataset (mean over scored rows): Spot-the-Diff (8/9 + 0)/2 = 4/9, CLEVR-Change 1, RAVEN 1/2,
# NLVR2_Mantis over turns (1 + 0 + 1)/3 = 2/3, VIST (1 + 2/3)/2 = 5/6; QBench skipped.
EXPECTED_DATASETS = {"Spot-the-Diff": 4 / 9, "CLEVR-Change": 1, "RAVEN": 1 / 2, "NLVR2_Mantis": 2 / 3, "VIST": 5 / 6}
# Categories, unweighted over datasets: spot_the_diff (4/9 + 1)/2 = 13/18 (not the row mean 17/27).
EXPECTED_CATEGORIES = {"spot_the_diff": 13 / 18, "visual_story_telling": 5 / 6, "puzzle": 1 / 2, "nlrv2": 2 / 3}
EXPECTED_OVERALL = (13 / 18 + 5 / 6 + 1 / 2 + 2 / 3) / 4  # = 49/72


@pytest.fixture
def bench_dir(tmp_path):
    root = tmp_path / "interleave_data"
    for entry in BENCH:
        for image in entry["image"]:
            if image != MISSING_IMAGE:
                (root / image).parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (8, 6), (entry["sample_id"] * 20, 90, 200)).save(root / image)
    (root / f"{SPLIT}.json").write_text(json.dumps(BENCH))
    return root


class FakeModel:
    """Answers from ANSWERS by the last question, records each call, can fail after `fail_after` calls."""

    def __init__(self, fail_after=None):
        self.calls = []
        self.fail_after = fail_after

    def __call__(self, messages, image_paths):
        if self.fail_after is not None and len(self.calls) == self.fail_after:
            raise RuntimeError("model crashed")
        self.calls.append((copy.deepcopy(messages), list(image_paths)))
        return ANSWERS[messages[-1]["content"]]

    def questions(self):
        return [messages[-1]["content"] for messages, _ in self.calls]


def read_outputs(out_dir):
    names = ["eval_dataset.json", "eval_dataset_details.json", "eval_cat.json"]
    outputs = {name: json.loads((out_dir / name).read_text()) for name in names}
    outputs["result.jsonl"] = [json.loads(line) for line in (out_dir / "result.jsonl").read_text().splitlines()]
    return outputs


def test_scores_match_the_hand_computation(bench_dir, tmp_path):
    summary = run_evaluation(str(bench_dir), SPLIT, str(tmp_path / "out"), FakeModel(), progress=False)
    datasets = {name: next(iter(score.values())) for name, score in summary.dataset_scores.items()}
    assert datasets == pytest.approx(EXPECTED_DATASETS, abs=1e-6)
    assert summary.category_scores == pytest.approx(EXPECTED_CATEGORIES, abs=1e-6)
    assert summary.overall == pytest.approx(EXPECTED_OVERALL, abs=1e-6)


def test_output_files_have_the_reference_shape(bench_dir, tmp_path):
    run_evaluation(str(bench_dir), SPLIT, str(tmp_path / "out"), FakeModel(), model_id="tiny", progress=False)
    outputs = read_outputs(tmp_path / "out")
    assert list(outputs["eval_dataset.json"]) == ["Spot-the-Diff", "CLEVR-Change", "RAVEN", "NLVR2_Mantis", "VIST"]
    assert outputs["eval_dataset.json"]["Spot-the-Diff"] == {"Rouge-L f": pytest.approx(4 / 9, abs=1e-6)}
    assert outputs["eval_dataset.json"]["RAVEN"] == {"Accuracy": 0.5}
    # Details: ids and scores as strings, ROUGE rounded to 3 places, the empty-truth row absent.
    assert outputs["eval_dataset_details.json"]["Spot-the-Diff"] == [{"id": "0", "score": "0.889"},
                                                                     {"id": "1", "score": "0"}]
    assert outputs["eval_dataset_details.json"]["NLVR2_Mantis"] == [
        {"id": "6", "score": "1"}, {"id": "6", "score": "0"}, {"id": "7", "score": "1"}]
    assert list(outputs["eval_cat.json"]) == ["spot_the_diff", "visual_story_telling", "puzzle", "nlrv2"]
    rows = outputs["result.jsonl"]
    assert len(rows) == 11  # 10 answered samples, one of them with two turns
    assert rows[7] == {"dataset": "NLVR2_Mantis", "sample_id": 6, "prompt": BENCH[6]["conversations"][2]["value"],
                       "pred_response": "yes", "gt_response": "B", "model_id": "tiny",
                       "question_type": "multi-choice"}


def test_multi_turn_sample_is_asked_turn_by_turn_with_its_own_answers(bench_dir, tmp_path):
    model = FakeModel()
    run_evaluation(str(bench_dir), SPLIT, str(tmp_path / "out"), model, progress=False)
    first_question, second_question = (turn["value"] for turn in BENCH[6]["conversations"][::2])
    images = [str(bench_dir / image) for image in BENCH[6]["image"]]
    turn_calls = [call for call in model.calls if call[0][0]["content"] == first_question]
    assert turn_calls == [
        ([{"role": "user", "content": first_question}], images),
        ([{"role": "user", "content": first_question},
          {"role": "assistant", "content": "The answer is: A"},  # the model's answer, not the truth "A"
          {"role": "user", "content": second_question}], images),
    ]


def test_sample_with_a_missing_image_is_reported_and_skipped(bench_dir, tmp_path, capsys):
    model = FakeModel()
    summary = run_evaluation(str(bench_dir), SPLIT, str(tmp_path / "out"), model, progress=False)
    error_output = capsys.readouterr().err
    assert "sample 8 (QBench)" in error_output and str(bench_dir / MISSING_IMAGE) in error_output
    assert summary.samples_skipped == 1 and summary.samples_answered == 10
    assert "<image>Is it blurry?" not in model.questions()
    assert "QBench" not in summary.dataset_scores


def test_report_prints_our_scores_next_to_the_published_ones(bench_dir, tmp_path, capsys):
    run_evaluation(str(bench_dir), SPLIT, str(tmp_path / "out"), FakeModel(), progress=False)
    report = capsys.readouterr().out
    assert re.search(r"Spot the Difference\s+72\.2\s+34\.3", report)  # 13/18
    assert re.search(r"Q-Bench\s+-\s+52\.0", report)
    assert re.search(r"average\s+68\.1\s+43\.9", report)  # 49/72
    assert re.search(r"NLVR2_Mantis\s+Accuracy\s+66\.7", report)
    assert "1 skipped" in report


def test_limit_evaluates_the_first_n_samples(bench_dir, tmp_path):
    model = FakeModel()
    summary = run_evaluation(str(bench_dir), SPLIT, str(tmp_path / "out"), model, limit=3, progress=False)
    assert model.questions() == [turns["conversations"][0]["value"] for turns in BENCH[:3]]
    assert list(summary.dataset_scores) == ["Spot-the-Diff"]


def test_each_answer_is_on_disk_before_the_next_question(bench_dir, tmp_path):
    answers_file = tmp_path / "out" / "result.jsonl"
    model = FakeModel()

    def answer_checking_the_file(messages, image_paths):
        assert len(answers_file.read_text().splitlines()) == len(model.calls)
        return model(messages, image_paths)

    run_evaluation(str(bench_dir), SPLIT, str(tmp_path / "out"), answer_checking_the_file, progress=False)
    assert len(model.calls) == 11


def test_interrupted_run_resumes_without_asking_finished_samples_again(bench_dir, tmp_path):
    run_evaluation(str(bench_dir), SPLIT, str(tmp_path / "whole"), FakeModel(), progress=False)

    out_dir = tmp_path / "resumed"
    # Calls 1-6 answer samples 0-5, call 7 the first turn of sample 6; the 8th (its second turn) fails.
    with pytest.raises(RuntimeError):
        run_evaluation(str(bench_dir), SPLIT, str(out_dir), FakeModel(fail_after=7), progress=False)
    with open(out_dir / "result.jsonl", "a") as answers:
        answers.write('{"dataset": "NLVR2_Ma')  # a row cut short by the crash

    model = FakeModel()
    summary = run_evaluation(str(bench_dir), SPLIT, str(out_dir), model, progress=False)
    # Sample 6 was half done: both its turns are asked again; samples 0-5 are not asked at all.
    assert model.questions() == [BENCH[6]["conversations"][0]["value"], BENCH[6]["conversations"][2]["value"],
                                 BENCH[7]["conversations"][0]["value"], BENCH[9]["conversations"][0]["value"],
                                 BENCH[10]["conversations"][0]["value"]]
    assert summary.samples_already_done == 6
    assert read_outputs(out_dir) == read_outputs(tmp_path / "whole")


def test_skipped_sample_is_answered_once_its_image_exists_and_scored_in_data_order(bench_dir, tmp_path):
    run_evaluation(str(bench_dir), SPLIT, str(tmp_path / "out"), FakeModel(), progress=False)
    (bench_dir / MISSING_IMAGE).parent.mkdir(parents=True)
    Image.new("RGB", (8, 6)).save(bench_dir / MISSING_IMAGE)
    model = FakeModel()
    run_evaluation(str(bench_dir), SPLIT, str(tmp_path / "out"), model, progress=False)
    assert model.questions() == ["<image>Is it blurry?"]

    run_evaluation(str(bench_dir), SPLIT, str(tmp_path / "whole"), FakeModel(), progress=False)
    # QBench's rows were appended last, yet the score files list it where the data has it.
    for name in ("eval_dataset.json", "eval_dataset_details.json", "eval_cat.json"):
        assert (tmp_path / "out" / name).read_text() == (tmp_path / "whole" / name).read_text()


def test_output_folder_of_another_run_is_refused(bench_dir, tmp_path):
    run_evaluation(str(bench_dir), SPLIT, str(tmp_path / "out"), FakeModel(), limit=1, progress=False)
    with pytest.raises(UserError, match="another run"):
        run_evaluation(str(bench_dir), SPLIT, str(tmp_path / "out"), FakeModel(), limit=1, image_mode="flat",
                       progress=False)


def test_missing_split_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="multi_view_in_domain.json not found"):
        run_evaluation(str(tmp_path), "multi_view_in_domain", str(tmp_path / "out"), FakeModel(), progress=False)


def test_eval_arguments():
    parser = add_eval_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--data", "bench", "--split", "multi_view_in_domain", "--out", "results"])
    assert (args.data, args.split, args.out, args.limit, args.image_mode) == (
        "bench", "multi_view_in_domain", "results", None, "eval")
    args = parser.parse_args(["--data", "b", "--split", SPLIT, "--out", "o", "--limit", "5", "--image-mode", "flat"])
    assert (args.limit, args.image_mode) == (5, "flat")
    for bad in (["--data", "b", "--split", SPLIT], ["--data", "b", "--split", "other", "--out", "o"],
                ["--data", "b", "--split", SPLIT, "--out", "o", "--limit", "0"],
                ["--data", "b", "--split", SPLIT, "--out", "o", "--model", "x"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
