"""`python -m llava_ui eval`: the benchmark runner wired to the local engine or a remote one."""
from __future__ import annotations

from .config import GenerationSettings
from .evaluation import EVAL_MAX_NEW_TOKENS, add_eval_arguments, run_evaluation
from .prompt import IMAGE_TOKEN


def add_eval_command(sub) -> None:
    from .cli import add_model_arguments

    parser = sub.add_parser("eval", help="run the model card's evaluation (LLaVA-Interleave-Bench)")
    add_model_arguments(parser, image_mode=False)  # eval has its own --image-mode, default eval
    add_eval_arguments(parser)
    parser.set_defaults(func=cmd_eval)


def engine_answerer(backend, image_mode: str):
    """answer(messages, image_paths) for run_evaluation: greedy, EVAL_MAX_NEW_TOKENS, images by marker order."""
    from .conversation import Conversation
    from .media import load_image

    settings = GenerationSettings(max_new_tokens=EVAL_MAX_NEW_TOKENS, temperature=0, seed=0)

    def answer(messages, image_paths) -> str:
        conversation = Conversation()
        images = iter(image_paths)
        for message in messages:
            if message["role"] == "user":
                count = message["content"].count(IMAGE_TOKEN)
                conversation.add_user(message["content"], [load_image(next(images)) for _ in range(count)])
            else:
                conversation.turns[-1].answer = message["content"]
        return backend.generate(conversation, settings, image_mode=image_mode)["text"]

    return answer


def cmd_eval(args) -> int:
    from .cli import make_backend

    backend = make_backend(args)
    backend.load()
    summary = run_evaluation(args.data, args.split, args.out, engine_answerer(backend, args.image_mode),
                             limit=args.limit, model_id=backend.status()["model"], image_mode=args.image_mode)
    return 0 if summary is not None else 1
