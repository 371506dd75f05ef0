"""A request's plan, everything known before any compute: the prompt ids, the images to encode (each one's
tokens and views), the items a cached prompt prefix is matched by, and the checks that refuse a request before it
costs anything."""
from __future__ import annotations

from dataclasses import dataclass

from llava_ui.chat.conversation import Conversation
from llava_ui.chat.prompt import IMAGE_MARKER, render_prompt
from llava_ui.errors import UserError
from llava_ui.model.processing import prepare_images


@dataclass
class Plan:
    """Everything known about a request before any compute."""

    prompt_ids: list[int]
    images: list  # PreparedImage per marker, in order
    pil_images: list
    prompt: str
    prompt_tokens: int
    visual_tokens: int
    max_new_tokens: int
    dropped_turns: int
    image_mode: str


def plan_conversation(conversation: Conversation, tokenizer, config, mode: str, context_length: int,
                      max_new_tokens: int) -> Plan:
    """Render, tokenize and count the conversation's prompt for its pending turn; drop the oldest turns when the
    history no longer fits the context (a UserError saying what fits when even the last turn does not)."""
    conversation.pending()
    turns = conversation.turns
    for dropped in range(len(turns)):
        kept = turns[dropped:]
        media = conversation.media(kept)
        images = prepare_images([m[0] for m in media], mode, config, [m[1] for m in media],
                                has_video=any(turn.video is not None for turn in kept))
        messages = conversation.messages(kept)
        ids = tokenizer.encode_prompt(conversation.system, messages)
        visual = sum(p.tokens for p in images)
        total = len(ids) - len(images) + visual
        if total < context_length:
            return Plan(ids, images, [m[0] for m in media], render_prompt(conversation.system, messages),
                        total, visual, min(max_new_tokens, context_length - total), dropped, mode)
    n, text = len(images), total - visual
    per_image = max(visual // max(n, 1), 1)
    fit = max(0, (context_length - 1 - text) // per_image)
    hint = "attach fewer images or lower the frame count"
    if mode == "trained" and n == 1 and per_image > config.vision.num_patches + 1:
        hint = "this lone image uses anyres tiles in 'trained' mode; 'eval' or 'flat' mode needs about 730 tokens"
    raise UserError(f"this message needs {total:,} tokens ({n} image{'s' * (n != 1)} or frames take {visual:,}, "
                    f"{per_image:,} each) but the context holds {context_length:,} and the text takes "
                    f"{text:,}: there is room for at most {fit} image{'s' * (fit != 1)} or frame"
                    f"{'s' * (fit != 1)}; {hint}")


def estimate_work(image_sizes: list[tuple[int, int]], frames: int, mode: str, config,
                  text_tokens: int = 64) -> tuple[int, int]:
    """(prompt tokens, vision views) of a message with images of these sizes and a video of `frames` frames."""
    sizes = list(image_sizes) + [(1, 1)] * frames  # a frame's cost does not depend on its size
    planned = prepare_images([_Sized(size) for size in sizes], mode, config, digests=[""] * len(sizes),
                             has_video=frames > 0)
    return text_tokens + sum(p.tokens for p in planned), sum(p.views for p in planned)


ATTENTION_VALUES = 10_000_000  # attention values one answer may hold (kept as Python floats: a few hundred MB)


def check_attention_size(visual_tokens: int, max_new_tokens: int, layers: int) -> None:
    """Refuse, before any compute, an attention request whose rows (tokens x layers x visual positions) could
    exhaust the server's memory."""
    values = max_new_tokens * layers * visual_tokens
    if values > ATTENTION_VALUES:
        most = ATTENTION_VALUES // max(layers * visual_tokens, 1)
        raise UserError(f"attention over {visual_tokens} visual positions for up to {max_new_tokens} new tokens "
                        f"would hold {values / 1e6:.0f} M values: with attention on, ask for at most {most} new "
                        "tokens, or use fewer images or frames")


def prompt_items(plan: Plan) -> tuple[list, list[int]]:
    """Prompt items for prefix matching: token ids, and one key per image spanning its visual tokens."""
    items, sizes, k = [], [], 0
    for t in plan.prompt_ids:
        if t == IMAGE_MARKER:
            items.append(plan.images[k].cache_key)
            sizes.append(plan.images[k].tokens)
            k += 1
        else:
            items.append(t)
            sizes.append(1)
    return items, sizes


@dataclass
class _Sized:
    """Stands for an image of this size when only the plan's counts are wanted."""

    size: tuple[int, int]
