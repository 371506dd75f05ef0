"""One side running one case in this process; prints one JSON line starting with RESULT.

Sides: paddle (the engine's default precision: bf16 on a CPU with bf16 units), paddle-fp32 (--dtype float32),
paddle-int8 (--weights int8), transformers (fp32 on a CPU), transformers-bf16. Run by bench/run.py, one subprocess
per (side, case, repetition). Generation is forced to its length (no stop token), greedy or sampled as the case
says, after a small warm-up generation.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from cases import CASES, WARM_UP, Case, media, warm_up_media  # noqa: E402

SYSTEM = "You are a helpful assistant."
SIDES = {"paddle": ("paddle", None), "paddle-fp32": ("paddle", "float32"), "paddle-int8": ("paddle", "int8"),
         "transformers": ("transformers", None), "transformers-bf16": ("transformers", "bfloat16")}
# side → (engine, dtype; None: its default; "int8": the engine's default dtype with --weights int8)


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """This process's own peak: VmHWM belongs to its address space, made at exec. (ru_maxrss is not: Linux folds
    the parent's peak at fork into the child's, so every worker of a parent that once held 7 GB reported 7 GB.)"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: the best there is


def run_paddle(case: Case, model_dir: Path, device: str | None, dtype: str | None = None) -> dict:
    from llava_ui.engine import Engine
    from llava_ui.chat.conversation import Conversation
    from llava_ui.chat.media import Frame, Video
    from llava_ui.config import GenerationSettings

    started = time.perf_counter()
    weights = "int8" if dtype == "int8" else None
    engine = Engine(str(model_dir), device=device, dtype=None if weights else dtype, image_mode="flat",
                    weights=weights).load()
    loaded = time.perf_counter() - started
    after_load = rss_bytes()
    engine.tokenizer.stop_ids = set()  # force the length: no stop token ends an answer early

    def ask(c: Case, images) -> tuple[Conversation, dict]:
        conversation = Conversation()
        if c.video:
            video = Video([Frame(im, i, float(i)) for i, im in enumerate(images)], len(images), 1.0, "bench")
            conversation.add_user(c.question, video=video)
        else:
            conversation.add_user(c.question, images)
        settings = GenerationSettings(max_new_tokens=c.new_tokens, temperature=c.temperature, seed=0)
        return conversation, engine.generate(conversation, settings)

    ask(WARM_UP, warm_up_media())
    engine.prefixes.clear()  # the measured turn starts cold (its images were never seen either)
    conversation, first = ask(case, media(case))
    result = {"first": _paddle_turn(first)}
    if case.follow_up:
        conversation.add_user(case.follow_up)
        settings = GenerationSettings(max_new_tokens=case.new_tokens, temperature=case.temperature, seed=0)
        result["second"] = _paddle_turn(engine.generate(conversation, settings))
    result.update(load_s=loaded, rss_after_load=after_load, peak_rss=peak_rss_bytes(),
                  threads=_paddle_threads(), device=engine.status()["device"], dtype=engine.status()["dtype"],
                  precision=engine.status()["precision"] + (", int8 weights" if weights else ""))
    if result["device"].startswith("gpu"):
        import paddle

        result["gpu_peak_bytes"] = paddle.device.cuda.max_memory_allocated()
    return result


def _paddle_turn(record) -> dict:
    s = record.stats
    return {"ttft_s": s.ttft_s, "decode_tokens_per_s": s.decode_tokens_per_s, "generated_tokens": s.generated_tokens,
            "prompt_tokens": s.prompt_tokens, "cached_prefix_tokens": s.cached_prefix_tokens,
            "images_from_cache": s.images_from_cache, "total_s": s.total_s, "first_ids": record.token_ids[:8]}


def _paddle_threads():
    try:
        import paddle

        return paddle.get_flags(["FLAGS_paddle_num_threads"])["FLAGS_paddle_num_threads"]
    except Exception:
        return None


class TimingStreamer:
    """transformers streamer that records when each generated token arrives (the first put is the prompt)."""

    def __init__(self):
        self.times: list[float] = []
        self.ids: list[int] = []
        self.prompt_seen = False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter())
        self.ids.extend(int(v) for v in value.reshape(-1).tolist())

    def end(self):
        pass


def run_transformers(case: Case, model_dir: Path, device: str | None, dtype: str | None = None) -> dict:
    import torch
    from transformers import LlavaForConditionalGeneration, Qwen2Tokenizer

    from llava_ui.model.processing import preprocess

    device = {"gpu": "cuda", None: "cpu"}.get(device, device)
    dtype = getattr(torch, dtype) if dtype else torch.float32 if device == "cpu" else torch.bfloat16
    torch.set_grad_enabled(False)
    started = time.perf_counter()
    model = LlavaForConditionalGeneration.from_pretrained(str(model_dir), torch_dtype=dtype).to(device).eval()
    tokenizer = Qwen2Tokenizer.from_pretrained(str(model_dir))  # (AutoTokenizer in transformers 5 wants a tokenizer.json)
    loaded = time.perf_counter() - started
    after_load = rss_bytes()
    image_token = model.config.image_token_index
    patches = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    regular = tokenizer.convert_tokens_to_ids("<|endoftext|>")

    def turn(messages: list[tuple[str, str]], images, new_tokens: int) -> dict:
        begun = time.perf_counter()
        pixels = torch.from_numpy(np.stack([preprocess(im) for im in images])).to(device, dtype)
        text = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
        for role, content in messages:
            text += f"<|im_start|>{role}\n{content}<|im_end|>\n"
        text += "<|im_start|>assistant\n"
        text = text.replace("<image>", "<image>" * patches)
        ids = tokenizer(text, return_tensors="pt")["input_ids"].to(device)
        assert int((ids == image_token).sum()) == patches * len(images)
        streamer = TimingStreamer()
        sampling = dict(do_sample=True, temperature=case.temperature, top_k=0, top_p=1.0) if case.temperature \
            else dict(do_sample=False)
        torch.manual_seed(0)
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                       max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None,
                       pad_token_id=regular, streamer=streamer, **sampling)
        t = streamer.times
        answer = tokenizer.decode([i for i in streamer.ids if i < regular], skip_special_tokens=True)
        return {"ttft_s": t[0] - begun, "decode_tokens_per_s": (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 else None,
                "generated_tokens": len(streamer.ids), "prompt_tokens": int(ids.shape[1]),
                "total_s": time.perf_counter() - begun, "first_ids": streamer.ids[:8], "answer": answer}

    def user(c: Case, count: int) -> str:
        return "<image>" * count + "\n" + c.question

    turn([("user", user(WARM_UP, 1))], warm_up_media(), WARM_UP.new_tokens)
    images = media(case)
    first = turn([("user", user(case, len(images)))], images, case.new_tokens)
    result = {"first": first}
    if case.follow_up:
        history = [("user", user(case, len(images))), ("assistant", first["answer"]), ("user", case.follow_up)]
        result["second"] = turn(history, images, case.new_tokens)
    for record in result.values():
        record.pop("answer")
    result.update(load_s=loaded, rss_after_load=after_load, peak_rss=peak_rss_bytes(),
                  threads=torch.get_num_threads(), device=device, dtype=str(dtype).replace("torch.", ""))
    if device != "cpu":
        result["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("side", choices=list(SIDES))
    parser.add_argument("case", choices=sorted(CASES))
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    engine, dtype = SIDES[args.side]
    run = run_paddle if engine == "paddle" else run_transformers
    result = run(CASES[args.case], args.model_dir, args.device, dtype)
    print("RESULT " + json.dumps({"side": args.side, "case": args.case, "pid": os.getpid(), **result}), flush=True)


if __name__ == "__main__":
    main()
