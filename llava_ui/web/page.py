"""The Gradio Blocks page: chat on the left, research inspector on the right, model status on top.

Layout and event wiring only; the handlers live in `ui_chat.py`, the chat state in `ui_session.py` and what the
inspector shows in `ui_inspector.py`. Endpoints (api_name): `chat` (stateless, for gradio_client), and the page's
own steps `send`, `respond`, `stop`, `regenerate`, `undo`, `clear`, `export`, `status`, `load`.
"""
from __future__ import annotations

import json
from pathlib import Path

import gradio as gr

from llava_ui.config import DEFAULT_SYSTEM_PROMPT, IMAGE_MODES
from llava_ui.web.handlers import ChatHandlers
from llava_ui.web.inspector import EMPTY_INSPECTOR
from llava_ui.web.looked import WHOLE
from llava_ui.web.session import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "assets"
UNDOCUMENTED = {"api_visibility": "undocumented", "show_progress": "hidden"}  # callable by name, not on the API page
QUIET = {"api_visibility": "private", "show_progress": "hidden"}

PLACEHOLDER = """### Chat with LLaVA-NeXT-Interleave
Attach **one or more images** or **a video** (the clip button, drag-and-drop or paste) and ask about them,
or pick an example below. The inspector on the right shows exactly what the model saw."""


def help_line(max_files: int, max_upload_mb: float) -> str:
    return (f"Write `<image>` where each image goes: the 1st marker is the 1st attached image, the 2nd the 2nd, … "
            f"`<video>` places the video's frames. Without markers the images come first. "
            f"Up to {max_files} files of {max_upload_mb:g} MB each, at most one video.")


def launch_options() -> dict:
    """Theme and CSS for `demo.launch(...)` / `gr.mount_gradio_app(...)` (Gradio 6 takes them there)."""
    return {"theme": gr.themes.Soft(primary_hue="indigo"), "css_paths": [ASSETS / "style.css"]}


def load_examples() -> list[list[dict]]:
    entries = json.loads((ASSETS / "examples.json").read_text())
    return [[{"text": e["text"], "files": [str(ROOT / f) for f in e["files"]]}] for e in entries]


def build_demo(backend, args) -> gr.Blocks:
    frames = getattr(args, "frames", None)  # None: from this machine's speed
    max_files, max_upload_mb = getattr(args, "max_files", 8), getattr(args, "max_upload_mb", 50)
    chat = ChatHandlers(backend, frames=frames, max_files=max_files, max_upload_mb=max_upload_mb)
    file_types = list(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)

    with gr.Blocks(title="LLaVA-NeXT-Interleave chat") as demo:
        session = gr.State(None)
        with gr.Row(elem_id="header", equal_height=True):
            gr.Markdown("## LLaVA-NeXT-Interleave\nQwen1.5-0.5B + SigLIP on PaddlePaddle: chat, demo, inspect",
                        elem_id="title")
            status = gr.HTML(elem_id="status")
            load_button = gr.Button("Load now", size="sm", visible=False, scale=0, min_width=110)

        with gr.Row(equal_height=False):
            with gr.Column(scale=3, min_width=420):
                chatbot = gr.Chatbot(elem_id="chatbot", label="Chat", editable="user", height=560,
                                     placeholder=PLACEHOLDER, buttons=["copy", "copy_all"], feedback_options=None,
                                     group_consecutive_messages=False)  # a turn's files and text: separate bubbles
                chat_input = gr.MultimodalTextbox(
                    file_count="multiple", file_types=file_types, sources=["upload"], show_label=False,
                    placeholder="Ask about your images or video…", elem_id="chat-input")
                estimate = gr.Markdown("", elem_id="input-estimate", elem_classes=["help-line"])
                gr.Markdown(help_line(max_files, max_upload_mb), elem_classes=["help-line"])
                with gr.Row(elem_id="chat-buttons"):
                    stop_button = gr.Button("Stop", variant="stop", size="sm", elem_id="stop-button")
                    regenerate_button = gr.Button("Regenerate", size="sm", elem_id="regenerate-button")
                    undo_button = gr.Button("Undo", size="sm", elem_id="undo-button")
                    clear_button = gr.Button("Clear", size="sm", elem_id="clear-button")
                stats = gr.Markdown(elem_id="stats")
                with gr.Accordion("Settings", open=False, elem_id="settings"):
                    system = gr.Textbox(label="System prompt", placeholder=DEFAULT_SYSTEM_PROMPT, lines=2,
                                        info="empty = the default above")
                    with gr.Row():
                        temperature = gr.Slider(0, 2, value=0.2, step=0.05, label="Temperature", info="0 = greedy")
                        top_p = gr.Slider(0.05, 1, value=1.0, step=0.05, label="Top-p")
                    with gr.Row():
                        top_k = gr.Slider(0, 200, value=0, step=1, label="Top-k", info="0 = off")
                        repetition_penalty = gr.Slider(0.8, 2, value=1.0, step=0.05, label="Repetition penalty")
                    with gr.Row():
                        max_new_tokens = gr.Slider(1, 4096, value=1024, step=1, label="Max new tokens")
                        video_frames = gr.Slider(1, 64, value=frames or 16, step=1, label="Video frames",
                                                 info="sampled evenly; each frame costs ~730 tokens",
                                                 elem_id="video-frames")
                    with gr.Row():
                        seed = gr.Textbox(value="", label="Seed", placeholder="random", info="empty = random",
                                          elem_id="seed")
                        image_mode = gr.Dropdown([("model default", ""), *[(m, m) for m in IMAGE_MODES]], value="",
                                                 label="Image mode", info="trained = anyres as trained")
                gr.Examples(load_examples(), inputs=[chat_input], label="Examples (click one, then send)",
                            examples_per_page=8)

            with gr.Column(scale=2, min_width=340, elem_id="inspector"):
                gr.Markdown("### Research inspector")
                summary = gr.Markdown(EMPTY_INSPECTOR, elem_id="inspector-summary")
                prompt_view = gr.HighlightedText(label="Prompt as rendered: each <image> tagged with its image",
                                                 show_legend=False, combine_adjacent=False, elem_id="prompt-view",
                                                 visible=False)
                with gr.Accordion("Raw prompt text", open=False):
                    raw_prompt = gr.Code(language=None, label="Prompt", interactive=False, lines=6, max_lines=24)
                gallery = gr.Gallery(label="Sampled video frames", columns=4, height="auto", elem_id="frames",
                                     allow_preview=True, buttons=["fullscreen"], visible=False)
                token_probabilities = gr.Checkbox(False, label="Token probabilities",
                                                  info="keep each token's probability and its alternatives for the "
                                                       "next answers", elem_id="token-probabilities-toggle")
                probabilities = gr.HTML("", elem_id="token-probabilities", visible=False)
                with gr.Row():
                    attention = gr.Checkbox(False, label="Where the model looked",
                                            info="each answer token's attention over the images, read after the "
                                                 "answer (one more pass over prompt and answer)",
                                            elem_id="attention-toggle")
                    image_effect = gr.Checkbox(False, label="What the images changed",
                                               info="the answer read again without the images: how much each "
                                                    "token owed to them", elem_id="image-effect-toggle")
                look_token = gr.Dropdown([("the whole answer", WHOLE)], value=WHOLE, label="Attention of",
                                         elem_id="look-token", visible=False)
                with gr.Row():
                    first_layer = gr.Slider(1, 24, value=1, step=1, label="From layer", elem_id="look-first-layer",
                                            visible=False)
                    last_layer = gr.Slider(1, 24, value=24, step=1, label="To layer", elem_id="look-last-layer",
                                           visible=False)
                heatmaps = gr.Gallery(label="Where the model looked", show_label=False, columns=2, elem_id="heatmaps",
                                      object_fit="contain", allow_preview=True, buttons=["fullscreen"], visible=False)
                shares = gr.HTML("", elem_id="attention-shares", visible=False)
                effect = gr.HTML("", elem_id="image-effect", visible=False)
                export_button = gr.Button("Export conversation (JSON)", size="sm", elem_id="export-button")
                export_file = gr.File(label="Replay with: python -m llava_ui replay FILE.json",
                                      interactive=False, elem_id="export-file", visible=False)

        timer = gr.Timer(1.0)

        views = [chatbot, session, stats, summary, prompt_view, raw_prompt, gallery, probabilities, look_token,
                 first_layer, last_layer, heatmaps, shares, effect]
        answer = dict(fn=chat.respond, inputs=[session, system, temperature, top_p, top_k, repetition_penalty,
                                               max_new_tokens, seed, image_mode, token_probabilities, attention,
                                               image_effect],
                      outputs=views + [chat_input])
        answering = [
            chat_input.submit(chat.send, [chat_input, session, video_frames], [chatbot, chat_input, session],
                              api_name="send", **UNDOCUMENTED)
            .then(api_name="respond", **answer, **UNDOCUMENTED),
            regenerate_button.click(chat.regenerate, [session], views, api_name="regenerate", **UNDOCUMENTED)
            .then(**answer, **QUIET),
            chatbot.retry(chat.retry, [session], views, **QUIET).then(**answer, **QUIET),
            chatbot.edit(chat.edit_at, [session], views, **QUIET).then(**answer, **QUIET),
        ]
        stop_button.click(chat.stop, [session], views, cancels=answering, api_name="stop", **UNDOCUMENTED)
        undo_button.click(chat.undo, [session], views + [chat_input], api_name="undo", **UNDOCUMENTED)
        chatbot.undo(chat.undo_at, [session], views + [chat_input], **QUIET)
        clear_button.click(chat.clear, [session], views, cancels=answering, api_name="clear", **UNDOCUMENTED)
        chatbot.clear(chat.clear, [session], views, cancels=answering, **QUIET)
        export_button.click(chat.export, [session], [export_file], api_name="export", **UNDOCUMENTED)
        looking = dict(fn=chat.look, inputs=[session, look_token, first_layer, last_layer], outputs=[heatmaps, shares],
                       **QUIET)
        look_token.input(**looking)  # input, not change: a new answer sets the choice without redrawing twice
        first_layer.release(**looking)
        last_layer.release(**looking)

        status_outputs = [status, load_button, timer]
        demo.load(chat.status_and_frames, None, status_outputs + [video_frames], api_name="status", **UNDOCUMENTED)
        timer.tick(chat.status_and_frames, None, status_outputs + [video_frames], **QUIET)
        load_button.click(chat.load, None, status_outputs, api_name="load", **UNDOCUMENTED)
        for changed in (chat_input.change, video_frames.release, image_mode.change):
            changed(chat.estimate, [chat_input, video_frames, image_mode], [estimate], **QUIET)
        demo.unload(chat.leave)  # a closed tab stops its answer
        gr.api(chat.chat_api, api_name="chat",
               api_description="Answer one message (text with optional <image>/<video> markers, plus image files "
                               "and/or one video); streams the growing answer text.")
    demo.chat_handlers = chat  # for tests and app.py
    return demo
