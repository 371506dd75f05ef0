"""`python -m llava_ui eval` end to end on a tiny benchmark folder with the tiny random model: output files,
prompts rendered as the reference's model_vqa.py renders them, resume, --limit, --image-mode, the same greedy
answers as engine.generate, a remote backend, and samples the model cannot be asked.

New tokens are capped at NEW_TOKENS (the reference's 1024 would take a random model minutes).
"""
import json
import shutil

import pytest
from PIL import Image
from test_evaluation import sample  # noqa: E402  (the benchmark sample format)

from llava_ui.backends.base import Result, Stats
from llava_ui.engine import get_engine
from llava_ui.chat.conversation import Conversation
from llava_ui.checkpoints.load import load_tokenizer
from llava_ui.commands import eval as eval_command
from llava_ui.commands import main as cli
from llava_ui.config import DEFAULT_PINPOINTS, GenerationSettings
from llava_ui.eval import answerers as evaluation_cli
from llava_ui.eval.answerers import question_block
from llava_ui.model.processing import anyres_token_count

SPLIT = "multi_image_in_domain"
NEW_TOKENS = 6
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


BENCH = [
    sample(0, "Spot-the-Diff", "open-ended", ["Split1/std/0a.png", "Split1/std/0b.png"],
           ("<image><image>What changed?", "the car is gone")),
    sample(1, "RAVEN", "multi-choice", ["Split2/raven/1.png"], ("<image>Which panel fits? A. x B. y", "B")),
    sample(2, "NLVR2_Mantis", "multi-choice", ["Split2/nlvr/2a.png", "Split2/nlvr/2b.png", "Split2/nlvr/2c.png"],
           ("<image><image>Is the left dog bigger? A. yes B. no", "A"),
           ("Now with <image>: still? A. yes B. no", "B")),
    sample(3, "QBench", "multi-choice", ["Split2/qbench/3.png"], ("<image>Is it blurry?", "A")),
    sample(4, "CLEVR-Change", "open-ended", ["Split1/clevr/4.png"], ("<image>Describe the change.", "none")),
]
MISSING = "Split2/qbench/3.png"
CORRUPT = "Split1/clevr/4.png"
IMAGE_SIZE = (40, 30)


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("interleave_data")
    for entry in BENCH:
        for k, image in enumerate(entry["image"]):
            (root / image).parent.mkdir(parents=True, exist_ok=True)
            if image == CORRUPT:
                (root / image).write_bytes(b"not a png")
            elif image != MISSING:
                colour = (50 * entry["sample_id"], 80 + 60 * k, 200 - 30 * k)
                Image.new("RGB", IMAGE_SIZE, colour).save(root / image)
    (root / f"{SPLIT}.json").write_text(json.dumps(BENCH))
    return root


def run_eval(tiny_dir, bench_dir, out, *flags):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluation_cli, "EVAL_MAX_NEW_TOKENS", NEW_TOKENS)
        return cli.main(["eval", "--model", str(tiny_dir), "--data", str(bench_dir), "--split", SPLIT,
                         "--out", str(out), *flags])


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def first_run(tiny_dir, bench_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-out")
    assert run_eval(tiny_dir, bench_dir, out) == 0
    return out


def test_runs_and_writes_the_reference_output_files(first_run, tiny_dir):
    rows = read_jsonl(first_run / "result.jsonl")
    # sample 3 is skipped (image missing); sample 4's image is unreadable: answered "" (see below)
    assert [(r["dataset"], r["sample_id"]) for r in rows] == [
        ("Spot-the-Diff", 0), ("RAVEN", 1), ("NLVR2_Mantis", 2), ("NLVR2_Mantis", 2), ("CLEVR-Change", 4)]
    assert set(rows[0]) == {"dataset", "sample_id", "prompt", "pred_response", "gt_response", "model_id",
                            "question_type"}
    assert rows[0]["prompt"] == "<image><image>What changed?" and rows[0]["gt_response"] == "the car is gone"
    assert {r["model_id"] for r in rows} == {tiny_dir.name}  # as get_model_name_from_path: the folder's name
    for name in ("eval_dataset.json", "eval_dataset_details.json", "eval_cat.json"):
        assert json.loads((first_run / name).read_text())
    assert json.loads((first_run / "eval_run.json").read_text())["image_mode"] == "eval"


def test_prompts_are_rendered_as_model_vqa_renders_them(first_run, tiny_dir):
    trace = read_jsonl(first_run / "eval_trace.jsonl")
    assert len(trace) == 4  # one line per answered turn
    first = trace[0]
    assert first["prompt"] == (SYSTEM + "<|im_start|>user\n<image>\n<image>\nWhat changed?<|im_end|>\n"
                               "<|im_start|>assistant\n")
    assert first["visual_tokens_per_image"] == [730, 730] and first["image_mode"] == "eval"
    assert first["generated_tokens"] <= NEW_TOKENS

    # a later turn: the previous prompt, the answer as generated (stop token included, no newline), then a
    # fresh system block with the new question; the images of both turns, in marker order
    turn1, turn2 = trace[2], trace[3]
    block2 = SYSTEM + "<|im_start|>user\nNow with <image>\n: still? A. yes B. no<|im_end|>\n<|im_start|>assistant\n"
    assert turn2["prompt"].startswith(turn1["prompt"]) and turn2["prompt"].endswith(block2)
    answer = turn2["prompt"][len(turn1["prompt"]):-len(block2)]
    first_answer = read_jsonl(first_run / "result.jsonl")[2]["pred_response"]
    assert answer.removesuffix("<|im_end|>").strip() == first_answer
    assert answer.endswith("<|im_end|>") == (turn1["finish_reason"] == "stop")
    assert turn2["visual_tokens_per_image"] == [730, 730, 730]
    # the answer enters as the ids generated (re-tokenizing its text could give other ids and another count)
    block2_ids, _ = question_block(load_tokenizer(tiny_dir), "Now with <image>: still? A. yes B. no")
    answer_ids = turn1["generated_tokens"] + (turn1["finish_reason"] == "stop")
    assert turn2["prompt_tokens"] == turn1["prompt_tokens"] + answer_ids + len(block2_ids) - 1 + 730


def test_greedy_answers_equal_engine_generate_on_the_same_conversation(first_run, tiny_dir, bench_dir):
    engine = get_engine(str(tiny_dir), device=None, dtype=None, image_mode="eval", context_length=None, batch_slots=1).load()
    rows = read_jsonl(first_run / "result.jsonl")
    for entry, row in zip(BENCH[:3], rows[:3]):  # the single-turn samples and the first turn of the multi-turn one
        question = entry["conversations"][0]["value"]
        conversation = Conversation()
        images = [Image.open(bench_dir / path).convert("RGB") for path in entry["image"][:question.count("<image>")]]
        conversation.add_user(question.replace("<image>", "<image>\n"), images)
        assert engine.plan(conversation).prompt_ids == question_block(engine.tokenizer, question)[0]
        final = engine.generate(conversation, GenerationSettings(max_new_tokens=NEW_TOKENS, temperature=0))
        assert final.text.strip() == row["pred_response"]


def test_second_run_asks_nothing_new(first_run, tiny_dir, bench_dir, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(first_run, out)
    before = (out / "result.jsonl").read_text()
    assert run_eval(tiny_dir, bench_dir, out) == 0
    assert (out / "result.jsonl").read_text() == before
    assert len(read_jsonl(out / "eval_trace.jsonl")) == 4  # nothing was asked
    assert "0 answered now, 4 answered before" in capsys.readouterr().out


def test_limit_answers_only_the_first_samples(tiny_dir, bench_dir, tmp_path):
    assert run_eval(tiny_dir, bench_dir, tmp_path, "--limit", "1") == 0
    assert [r["sample_id"] for r in read_jsonl(tmp_path / "result.jsonl")] == [0]
    assert len(read_jsonl(tmp_path / "eval_trace.jsonl")) == 1


@pytest.mark.parametrize("mode, tokens", [
    # a lone image under `trained` is anyres: base view + its unpadded tile grid
    ("trained", [[730, 730], [anyres_token_count(IMAGE_SIZE, DEFAULT_PINPOINTS)]]),
    ("flat", [[729, 729], [729]]),
])
def test_image_mode_is_passed_through(tiny_dir, bench_dir, tmp_path, mode, tokens):
    assert run_eval(tiny_dir, bench_dir, tmp_path, "--limit", "2", "--image-mode", mode) == 0
    trace = read_jsonl(tmp_path / "eval_trace.jsonl")
    assert [t["visual_tokens_per_image"] for t in trace] == tokens
    assert {t["image_mode"] for t in trace} == {mode}
    assert json.loads((tmp_path / "eval_run.json").read_text())["image_mode"] == mode


def test_unreadable_image_is_answered_empty(first_run):
    row = read_jsonl(first_run / "result.jsonl")[-1]
    assert row["sample_id"] == 4 and row["pred_response"] == ""


def test_prompt_longer_than_the_context_is_answered_empty_and_reported(tiny_dir, bench_dir, tmp_path, capsys):
    assert run_eval(tiny_dir, bench_dir, tmp_path, "--limit", "2", "--context-length", "1000") == 0
    rows = read_jsonl(tmp_path / "result.jsonl")
    assert rows[0]["pred_response"] == ""  # two images: 1,524 tokens
    assert len(read_jsonl(tmp_path / "eval_trace.jsonl")) == 1  # the one-image sample fits and is answered
    captured = capsys.readouterr()
    assert "needs 1,524 tokens but the context holds 1,000" in captured.err
    assert "1 turn could not be put to the model and scored as wrong" in captured.out


class FakeRemote:
    """Stands in for llava_ui.remote.RemoteEngine: records every request, answers with padded text."""

    def __init__(self):
        self.calls = []

    def load(self):
        return self

    def status(self):
        return {"model": "org/remote-model", "state": "ready"}

    def generate(self, conversation, settings=None, image_mode=None):
        self.calls.append((conversation.copy(), settings, image_mode))
        return Result(text=f"  answer {len(self.calls)}\n", finish_reason="stop", image_mode=image_mode,
                      stats=Stats(prompt_tokens=1, generated_tokens=2))


def test_remote_backend_is_asked_the_same_questions(bench_dir, tmp_path, monkeypatch):
    remote = FakeRemote()
    monkeypatch.setattr(eval_command, "make_backend", lambda args, **_: remote if args.backend == "remote" else None)
    code = cli.main(["eval", "--backend", "remote", "--base-url", "http://remote.invalid/v1", "--data", str(bench_dir),
                     "--split", SPLIT, "--out", str(tmp_path), "--limit", "3"])
    assert code == 0
    assert [len(c.turns) for c, _, _ in remote.calls] == [1, 1, 1, 2]
    first, _, mode = remote.calls[0]
    assert mode == "eval" and first.turns[0].text == "<image>\n<image>\nWhat changed?"
    assert len(first.turns[0].pictures) == 2
    later = remote.calls[3][0]
    assert later.turns[0].answer == "answer 3"  # the stripped answer of the first turn
    assert later.turns[1].text == "Now with <image>\n: still? A. yes B. no" and len(later.turns[1].pictures) == 1
    assert all(s.temperature == 0 and s.max_new_tokens == 1024 for _, s, _ in remote.calls)
    rows = read_jsonl(tmp_path / "result.jsonl")
    assert [r["pred_response"] for r in rows] == ["answer 1", "answer 2", "answer 3", "answer 4"]
    assert {r["model_id"] for r in rows} == {"remote-model"}


def test_repetition_penalty_of_the_checkpoint_generation_config_is_applied_to_generated_tokens(
        tiny_dir, bench_dir, tmp_path):
    from llava_ui.engine.steps import generate_ids

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_dir, model_dir)
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "repetition_penalty": 1.3}))
    assert run_eval(model_dir, bench_dir, tmp_path / "out", "--limit", "1") == 0
    [trace] = read_jsonl(tmp_path / "out" / "eval_trace.jsonl")
    [row] = read_jsonl(tmp_path / "out" / "result.jsonl")
    assert trace["repetition_penalty"] == 1.3

    engine = get_engine(str(model_dir), device=None, dtype=None, image_mode="eval", context_length=None, batch_slots=1).load()
    conversation = Conversation()
    conversation.add_user("<image>\n<image>\nWhat changed?",
                          [Image.open(bench_dir / p).convert("RGB") for p in BENCH[0]["image"]])
    plan = engine.plan(conversation)
    embeds = engine.model.embed_prompt(plan.prompt_ids, engine.image_rows(plan)[0])
    answers = {}
    for penalty in (1.0, 1.3):
        settings = GenerationSettings(max_new_tokens=NEW_TOKENS, temperature=0, repetition_penalty=penalty)
        ids = engine.run(lambda: list(generate_ids(engine.model, embeds, settings,  # no prompt ids seen
                                                   engine.tokenizer.stop_ids)))  # (the compute thread)
        answers[penalty] = engine.tokenizer.decode(ids).strip()
    assert row["pred_response"] == answers[1.3] != answers[1.0]


def run_fp32(tiny_dir, bench_dir, out, *flags, tokens=12):
    with pytest.MonkeyPatch.context() as patch:  # answers long enough to overlap
        patch.setattr(evaluation_cli, "EVAL_MAX_NEW_TOKENS", tokens)
        return cli.main(["eval", "--model", str(tiny_dir), "--data", str(bench_dir), "--split", SPLIT, "--out",
                         str(out), "--dtype", "float32", *flags])


@pytest.fixture(scope="module")
def one_at_a_time(tiny_dir, bench_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-sequential")
    assert run_fp32(tiny_dir, bench_dir, out) == 0
    return out


def test_parallel_answers_and_output_are_those_of_one_at_a_time(one_at_a_time, tiny_dir, bench_dir, tmp_path,
                                                                 capsys):
    capsys.readouterr()
    assert run_fp32(tiny_dir, bench_dir, tmp_path, "--parallel", "3") == 0
    out = capsys.readouterr().out
    # byte for byte: the same answers (greedy, fp32: a batched step computes each chat's logits as alone), in
    # data order whatever finished first
    assert (tmp_path / "result.jsonl").read_text() == (one_at_a_time / "result.jsonl").read_text()
    for name in ("eval_dataset.json", "eval_cat.json"):
        assert (tmp_path / name).read_text() == (one_at_a_time / name).read_text()
    key = lambda row: (row["question"], row["prompt"])  # noqa: E731  (the trace is in finishing order)
    trace, expected = (sorted(read_jsonl(d / "eval_trace.jsonl"), key=key) for d in (tmp_path, one_at_a_time))
    assert [(t["prompt"], t["generated_tokens"]) for t in trace] == [(t["prompt"], t["generated_tokens"])
                                                                      for t in expected]
    # the closing line says how many shared a step and the speed-up the engine measured
    line = next(line for line in out.splitlines() if "turns answered in" in line)
    shared = float(line.split("a decode step shared by ")[1].split()[0])
    assert "3 at once" in line and 1.0 < shared <= 3.0 and "x the speed of one at a time" in line


def test_parallel_run_resumes_a_sequential_one(one_at_a_time, tiny_dir, bench_dir, tmp_path):
    assert run_fp32(tiny_dir, bench_dir, tmp_path, "--limit", "1") == 0
    assert run_fp32(tiny_dir, bench_dir, tmp_path, "--parallel", "4") == 0
    assert (tmp_path / "result.jsonl").read_text() == (one_at_a_time / "result.jsonl").read_text()
    assert len(read_jsonl(tmp_path / "eval_trace.jsonl")) == 4  # the first sample was not asked again


def test_parallel_runs_samples_at_once_and_an_error_stops_it_keeping_whole_samples_in_order(bench_dir, tmp_path):
    import threading
    import time

    from llava_ui.eval.benchmark import run_evaluation

    lock, running, most = threading.Lock(), [0], [0]

    def answer(messages, image_paths):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            time.sleep(0.2)
            if "Which panel" in messages[-1]["content"]:  # sample 1
                raise RuntimeError("the remote engine went away")
            return f"answer to {messages[-1]['content'][:8]}"
        finally:
            with lock:
                running[0] -= 1

    with pytest.raises(RuntimeError, match="went away"):
        run_evaluation(str(bench_dir), SPLIT, str(tmp_path), answer, parallel=3, progress=False)
    assert most[0] == 3
    # sample 0 finished before the error and is kept; sample 2 (maybe finished too) comes after it and is not
    assert [r["sample_id"] for r in read_jsonl(tmp_path / "result.jsonl")] == [0]
