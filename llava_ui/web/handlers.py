"""The web chat's event handlers: send, answer (streaming), stop, regenerate, undo, edit, clear, export, status,
and the stateless `/chat` API endpoint. Plain methods over a `ChatSession`, so tests call them directly.

Test-only: LLAVA_UI_TEST_TOKEN_DELAY=<seconds> sleeps that long per streamed piece in `respond`, so a browser test
can watch an answer grow and press Stop mid-answer with a model that decodes hundreds of tokens a second.
"""
import os
import queue
import tempfile
import threading
import time
from collections.abc import Iterator

import gradio as gr
from gradio import FileData

from llava_ui.backends.base import Delta, Progress, Result
from llava_ui.backends.rates import human_seconds
from llava_ui.chat.conversation import Conversation
from llava_ui.chat.media import image_size
from llava_ui.config import GenerationSettings
from llava_ui.errors import UserError
from llava_ui.web.inspector import inspector_views, probabilities_html, stats_line, status_html, write_export
from llava_ui.web.looked import WHOLE, AttentionDrawings, effect_html, shares_html, token_choices, token_texts
from llava_ui.web.render import chat_messages, progress_text, turn_index, typed_text
from llava_ui.web.session import ChatSession, add_message, check_files, settle
from llava_ui.web.uploads import uploaded_paths

REFRESH_S = 0.05  # at most ~20 screen updates a second while tokens stream ...
REDRAW_SHARE = 0.04  # ... and redrawing the chat takes at most this share of the time the model computes
MAX_REFRESH_S = 1.0
LONG_WAIT_S = 20.0  # the input says how long the attached media take when it is at least this
TEST_DELAY_ENV = "LLAVA_UI_TEST_TOKEN_DELAY"
ALTERNATIVES = 5  # per token, when the inspector's token probabilities are on
VIEWS = 14  # outputs of views(): chat, session, stats, summary, prompt, raw prompt, frames, probabilities, token,
# first layer, last layer, heat maps, attention shares, image effect


class Prefetch:
    """A backend stream consumed in its own thread; `batches(wait)` gives the events that arrived, a list at a
    time (blocking for the first, then collecting answer pieces for at most wait() seconds). `delay` (tests only) sleeps after each
    answer piece, pacing the engine itself."""

    def __init__(self, events, delay: float = 0.0):
        self.arrived: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, args=(events, delay), name="llava-chat-stream",
                                       daemon=True)
        self.thread.start()

    def _run(self, events, delay: float) -> None:
        try:
            for event in events:
                self.arrived.put(event)
                if delay and isinstance(event, Delta):
                    time.sleep(delay)
        except BaseException as err:  # handed to the page's thread, which raises it there
            self.arrived.put(_Failed(err))
        finally:
            events.close()
            self.arrived.put(_END)

    def batches(self, wait=lambda: REFRESH_S):
        while True:
            batch = [self.arrived.get()]
            deadline = time.monotonic() + wait()
            # a progress event is shown as it comes (they are seconds apart at real size); answer pieces gather
            while batch[-1] is not _END and not isinstance(batch[-1], (_Failed, Progress)):
                try:
                    batch.append(self.arrived.get(timeout=max(deadline - time.monotonic(), 0)))
                except queue.Empty:
                    break
            done = batch[-1] is _END
            if isinstance(batch[-1], _Failed):
                raise batch[-1].error
            events = batch[:-1] if done else batch
            if events:
                yield events
            if done:
                return

    def join(self, timeout: float = 60.0) -> None:
        self.thread.join(timeout)

    def rest(self) -> list:
        """The events not taken by batches() yet (after join: all that the stream still produced)."""
        events = []
        while True:
            try:
                event = self.arrived.get_nowait()
            except queue.Empty:
                return events
            if event is not _END and not isinstance(event, _Failed):
                events.append(event)


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


_END = object()


def warn(message: str) -> None:
    gr.Warning(str(message), title="Could not do that")


class ChatHandlers:
    def __init__(self, backend, frames: int | None = None, max_files: int = 8, max_upload_mb: float = 50):
        self.backend = backend
        self.frames = frames  # None: from this machine's speed once the model is loaded (default_frames)
        self.max_files, self.max_upload_mb = max_files, max_upload_mb
        self.files_dir = tempfile.mkdtemp(prefix="llava_ui_")  # previews, frame sheets, exports (Gradio serves temp files)
        self.live: dict[str, ChatSession] = {}  # browser session → its chat, so a closed tab stops its answer
        self.drawings = AttentionDrawings()
        self._live_lock = threading.Lock()

    def default_frames(self) -> int:
        return self.frames or self.backend.default_frames()

    def frames_setting(self, status: dict | None = None):
        """The video frames slider: the value in use and why."""
        if self.frames:
            return gr.update(value=self.frames, info="set by --frames; each frame costs ~730 tokens")
        status = status or self.backend.status()
        if status.get("state") != "ready":
            return gr.update(info="each frame costs ~730 tokens; the default follows this machine's speed once "
                                  "the model is loaded")
        frames = self.backend.default_frames()
        device = str(status.get("device") or "")
        why = ("16 on a GPU" if device.startswith("gpu") else "16 for a remote engine" if device.startswith("remote")
               else f"{frames}: the first token within about a minute at this CPU's measured speed (at most 16)")
        return gr.update(value=frames, info=f"default {why}; each frame costs ~730 tokens")

    def status_and_frames(self):
        status = self.backend.status()  # one look for both: the timer asks every second while loading
        return (*self.status(status), self.frames_setting(status))

    def estimate(self, message: dict | None, frames=None, image_mode: str = ""):
        """Next to the input, before sending: how long the attached media will take here, when that is long."""
        files = list((message or {}).get("files") or [])
        if not files:
            return ""
        try:
            images, video = check_files(files, self.max_files, self.max_upload_mb)
            sizes = [image_size(path) for path in images]
            frames = int(frames or self.default_frames()) if video else 0
            estimate = self.backend.estimate(sizes, frames, image_mode or None)
        except (UserError, OSError, ValueError):
            return ""  # the message itself will say what is wrong when it is sent
        if estimate is None:
            return ""
        tokens, seconds = estimate
        if seconds < LONG_WAIT_S:
            return ""
        media = f"{frames} frames" if video else f"{len(images)} image{'s' * (len(images) != 1)}"
        advice = "fewer frames answer faster" if video else "fewer images answer faster"
        return f"{media} ≈ {tokens:,} tokens ≈ {human_seconds(seconds)} here; {advice}"

    def leave(self, request: gr.Request | None = None):
        """The tab was closed or reloaded: its answer in progress stops (the partial answer stays in its
        history)."""
        with self._live_lock:
            session = self.live.pop(getattr(request, "session_hash", None), None)
        if session is not None:
            session.stop.set()

    def _register(self, session: ChatSession, request) -> None:
        key = getattr(request, "session_hash", None)
        if key:
            with self._live_lock:
                self.live[key] = session

    def views(self, session: ChatSession | None) -> tuple:
        """What most handlers return (VIEWS of them): (chatbot, session, stats line, summary, tagged prompt, raw
        prompt, frames, token probabilities, *the attention views, image effect); each inspector view only shows
        when it has something."""
        context = (self.backend.status() or {}).get("context_length")
        summary, spans, prompt, frames = inspector_views(session, context)
        record = session.last_record() if session else None
        probabilities = probabilities_html(record)
        texts = token_texts(record, getattr(getattr(self.backend, "tokenizer", None), "token_bytes", None)) \
            if record else []
        effect = effect_html(record.image_effect if record else None, texts)
        return (chat_messages(session), session, stats_line(record), summary,
                gr.update(value=spans, visible=bool(spans)), prompt, gr.update(value=frames, visible=bool(frames)),
                gr.update(value=probabilities, visible=bool(probabilities)),
                *self._attention_views(session, record, texts), gr.update(value=effect, visible=bool(effect)))

    def _attention_views(self, session: ChatSession | None, record, texts: list[str]) -> tuple:
        """(token choice, first layer, last layer, heat maps, shares): the whole answer over every layer."""
        layers = len(record.attention[0]) if record and record.attention else 0
        if not layers or not record.visual_tokens_per_image:
            return (gr.update(visible=False),) * 3 + (gr.update(value=None, visible=False),
                                                      gr.update(value="", visible=False))
        heatmaps, shares = self.look(session, WHOLE, 1, layers)
        return (gr.update(choices=token_choices(texts), value=WHOLE, visible=True),
                gr.update(maximum=layers, value=1, visible=True), gr.update(maximum=layers, value=layers, visible=True),
                heatmaps, shares)

    def look(self, session: ChatSession | None, token=WHOLE, first_layer=1, last_layer=1):
        """The heat maps and attention shares of the last answer for one token (or the whole answer) and a band of
        layers: (gallery, shares HTML)."""
        drawn = self.drawings.draw(session, getattr(self.backend, "config", None), token, first_layer, last_layer)
        if drawn is None:
            return gr.update(value=None, visible=False), gr.update(value="", visible=False)
        looked, labels = drawn
        rows = -(-len(looked.heatmaps) // 2)  # two to a row: the gallery as tall as its thumbnails, scrolling past 3
        return (gr.update(value=looked.heatmaps, visible=True, height=40 + 250 * min(rows, 3)),
                gr.update(value=shares_html(looked, labels), visible=True))

    @staticmethod
    def streaming(session: ChatSession) -> tuple:
        """A mid-answer update of `respond`'s outputs: only the chat changes (nothing, once the chat was cleared)."""
        if session.cleared:
            return (gr.skip(),) * (VIEWS + 1)
        return (chat_messages(session), session) + (gr.skip(),) * (VIEWS - 1)

    def send(self, message: dict | None, session: ChatSession | None, frames: int | None = None):
        """Append the user's message (text + files). Returns (chatbot, input box, session); on a user error the
        input stays as it was so it can be fixed, and a warning says what is wrong."""
        session = session or ChatSession()
        message = message or {}
        try:
            add_message(session, message.get("text") or "", list(message.get("files") or []),
                        frames or self.default_frames(), self.max_files, self.max_upload_mb, self.files_dir)
        except UserError as err:
            warn(err)
            return chat_messages(session), gr.skip(), session
        return chat_messages(session), None, session

    def respond(self, session: ChatSession | None, system: str = "", temperature=0.2, top_p=1.0, top_k=0,
                repetition_penalty=1.0, max_new_tokens=1024, seed=None, image_mode: str = "",
                token_probabilities: bool = False, attention: bool = False, image_effect: bool = False,
                request: gr.Request = None):
        """Answer the waiting message, streaming. Yields (*views, input box): the input gets the message back
        when it could not be answered at all. For the inspector: `token_probabilities` keeps each token's
        probability and its ALTERNATIVES likeliest alternatives, `attention` each token's attention over the
        images, `image_effect` how much the images changed each token's log-probability."""
        turns = session.conversation.turns if session else []
        if session is None or session.busy or not turns or turns[-1].answer is not None:
            yield *self.views(session), gr.skip()
            return
        session.idle.clear()
        session.stop.clear()
        self._register(session, request)
        session.partial, session.notice = "", ""
        restore = gr.skip()
        try:
            shown = session.turns[-1]
            shown.settings = GenerationSettings.from_inputs(temperature, top_p, top_k, repetition_penalty, max_new_tokens, seed)
            shown.settings.logprobs = ALTERNATIVES if token_probabilities else None
            shown.settings.attention, shown.settings.image_effect = bool(attention), bool(image_effect)
            session.conversation.system = (system or "").strip() or None
            yield self.streaming(session)  # "…" in place of the answer until the first token
            for _ in self._wait_for_model(session):
                yield self.streaming(session)
            yield from self._stream(session, shown, image_mode or None)
        except UserError as err:
            if not session.partial:  # nothing written: take the message back so it can be fixed and resent
                restore = self._take_back(session)
            warn(err)
        finally:
            session.idle.set()
            settle(session)
        yield self.streaming(session) if session.cleared else (*self.views(session), restore)

    def _stream(self, session: ChatSession, shown, image_mode: str | None):
        """The answer as it grows: the backend's stream runs ahead in its own thread (the engine computes at its
        pace, not at the page's), and the page is redrawn once per batch of what arrived, at most every
        REFRESH_S while tokens flow."""
        events = self.backend.stream(session.conversation, shown.settings, image_mode=image_mode,
                                     stop_event=session.stop)
        feed = Prefetch(events, float(os.environ.get(TEST_DELAY_ENV) or 0))
        unit = "frame" if session.conversation.turns[-1].video is not None else "image"

        def take(events):
            for event in events:
                if isinstance(event, Result):
                    shown.record = event
                elif isinstance(event, Progress):  # before the first token: what runs, how long it takes
                    session.notice = progress_text(event, unit)
                else:
                    session.partial += event.text

        finished, wait = False, REFRESH_S
        try:
            for batch in feed.batches(lambda: wait):
                take(batch)
                began = time.monotonic()
                yield self.streaming(session)
                # Gradio's work on that update (diffing and sending the chat) runs on the cores the model needs:
                # the next redraw waits long enough that redrawing takes at most REDRAW_SHARE of the time
                wait = min(max(REFRESH_S, (time.monotonic() - began) / REDRAW_SHARE), MAX_REFRESH_S)
            finished = True
        finally:
            if not finished:  # Gradio cancelled us mid-answer: the engine stops and keeps the partial answer
                session.stop.set()
                feed.join()
                take(feed.rest())  # what the engine wrote after the last redraw: the kept answer is all of it

    def _wait_for_model(self, session: ChatSession):
        """Start loading if needed and wait, showing the progress in place of the answer."""
        status = self.backend.status()
        if status["state"] == "not_loaded":
            self.backend.load_in_background()
        while status["state"] != "ready":
            if status["state"] == "failed":
                raise UserError(f"the model failed to load ({status.get('error')}); press Retry load at the top")
            if session.stop.is_set():
                raise UserError("stopped while the model was loading; your message is back in the box")
            notice = f"*The model is loading ({status.get('message') or 'starting'}); the answer starts when it is ready.*"
            if notice != session.notice:
                session.notice = notice
                yield
            time.sleep(0.25)
            status = self.backend.status()
        session.notice = ""

    def _take_back(self, session: ChatSession) -> dict:
        """Remove the last turn; its text and files go back into the input box."""
        turn = session.conversation.undo()
        return {"text": turn.text if turn else "", "files": turn.shown.files if turn and turn.shown else []}

    def stop(self, session: ChatSession | None):
        """Stop the model within one step; the partial answer stays. Returns the settled views."""
        if session is not None:
            session.stop.set()
            session.idle.wait(timeout=10)
            settle(session)
        return self.views(session)

    def _idle(self, session: ChatSession | None) -> ChatSession:
        session = session or ChatSession()
        if session.busy:
            raise UserError("an answer is still being written: wait for it or press Stop")
        settle(session)
        return session

    def retry(self, session: ChatSession | None, event: gr.RetryData):
        return self.regenerate(session, event.index)

    def regenerate(self, session: ChatSession | None, message_index: int | None = None):
        """Clear an answer (the last, or the one a Chatbot retry points at) so `respond` writes it again."""
        try:
            session = self._idle(session)
            if not session.conversation.turns:
                raise UserError("nothing to regenerate yet")
            index = len(session.turns) - 1 if message_index is None else turn_index(session, message_index)
            turn = session.conversation.turns[index]
            session.conversation.edit(index, turn.text)  # drops later turns; the answer is cleared
            session.turns[index].record = None
        except UserError as err:
            warn(err)
        return self.views(session)

    def undo_at(self, session: ChatSession | None, event: gr.UndoData):
        return self.undo(session, event.index)

    def undo(self, session: ChatSession | None, message_index: int | None = None):
        """Remove the last exchange (or from the one the Chatbot's undo points at); its message returns to the box.
        Returns (*views, input box)."""
        try:
            session = self._idle(session)
            if not session.conversation.turns:
                raise UserError("nothing to undo")
            index = len(session.turns) - 1 if message_index is None else turn_index(session, message_index)
            session.conversation.turns = session.conversation.turns[:index + 1]
            restore = self._take_back(session)
        except UserError as err:
            warn(err)
            restore = gr.skip()
        return *self.views(session), restore

    def edit_at(self, session: ChatSession | None, event: gr.EditData):
        return self.edit(session, event.index, event.value)

    def edit(self, session: ChatSession | None, message_index: int, value):
        """Replace a past user message; later turns are dropped and `respond` answers the edited one."""
        try:
            session = self._idle(session)
            if isinstance(value, list):  # a message's pieces: its text is the string among them
                value = next((v for v in value if isinstance(v, str)), "")
            index = turn_index(session, message_index)
            session.conversation.edit(index, typed_text(str(value)))
            session.turns[index].record = None
        except UserError as err:
            warn(err)
        return self.views(session)

    def clear(self, session: ChatSession | None):
        if session is not None:  # an answer still being written stops and no longer touches the screen
            session.cleared = True
            session.stop.set()
        return self.views(ChatSession())

    def export(self, session: ChatSession | None):
        """A JSON file that `python -m llava_ui replay FILE.json` re-runs."""
        if session is not None and not session.busy:
            settle(session)
        if session is None or not any(t.settings for t in session.turns):
            warn("nothing to export yet: the conversation has no answers")
            return gr.skip()
        status = self.backend.status()
        paths = write_export(session, str(status.get("model")), self.files_dir, status.get("dtype") or None)
        return gr.update(value=paths[0] if len(paths) == 1 else paths, visible=True)  # the JSON, and its arrays

    def status(self, status: dict | None = None):
        """(status HTML, load button, timer): the timer stops once the model is ready."""
        status = status or self.backend.status()
        state = status.get("state")
        label = {"failed": "Retry load", "not_loaded": "Load now"}.get(state)
        return (status_html(status), gr.update(visible=label is not None, value=label or "Load now"),
                gr.update(active=state != "ready"))

    def load(self):
        self.backend.load_in_background()
        time.sleep(0.1)  # let the state leave "not_loaded"/"failed" so the badge shows the load starting
        return self.status()

    def chat_api(self, message: str, files: list[FileData] | None = None, system_prompt: str = "",
                 temperature: float = 0.2, top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0,
                 max_new_tokens: int = 1024, frames: int = 0, seed: int = -1,
                 image_mode: str = "") -> Iterator[str]:
        """Stateless one-message chat (gr.api, "/chat"): streams the growing answer text; the last value is the
        final answer. frames 0: the default in use; seed -1: a random one."""
        try:
            paths = uploaded_paths(files or [])
            images, video_path = check_files(paths, self.max_files, self.max_upload_mb)
            conversation = Conversation(system=(system_prompt or "").strip() or None)
            conversation.add_user_files(message or "", images, video_path, int(frames or self.default_frames()))
            settings = GenerationSettings.from_inputs(temperature, top_p, top_k, repetition_penalty, max_new_tokens,
                                                      seed)
            self.backend.load()
            stop, text, finished = threading.Event(), "", False
            feed = Prefetch(self.backend.stream(conversation, settings, image_mode=image_mode or None,
                                                stop_event=stop))
            try:
                for batch in feed.batches():
                    for event in batch:
                        if isinstance(event, Result):
                            text = event.text
                        elif isinstance(event, Delta):
                            text += event.text
                    yield text
                finished = True
            finally:
                if not finished:  # the client left: the engine stops at its next layer
                    stop.set()
                    feed.join()
        except UserError as err:
            raise gr.Error(str(err), title="Could not answer") from None
