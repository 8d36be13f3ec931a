"""A browser chat for a trained model: `medllava web MODEL` (Gradio, loopback by default).

Upload PNG/JPEG/DICOM images (several for one question: prior and current study, views; a NIfTI volume gives its
slices; CT window presets for DICOM), ask questions, read the answer as it streams, reset.
Answers come from the same code as `medllava chat` (`ChatSession`), greedy; the model card's medical disclaimer
is shown above the chat. One answer is generated at a time (Gradio's queue holds the others).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from medllava.chat import ChatSession
from medllava.config import ConfigError
from medllava.imaging import WINDOW_PRESETS, WINDOW_STACKS, ImageError, Window
from medllava.volumes import SliceSpec, load_images

logger = logging.getLogger(__name__)

FILE_WINDOW = "file's own window"
DEFAULT_DISCLAIMER = ("This model is not a medical device and is not intended for diagnosis, treatment, or any "
                      "clinical decision. Its outputs can be wrong; a qualified professional must review any output "
                      "used outside research.")


def disclaimer_for(model_dir: str | Path) -> str:
    """The "Medical disclaimer" section of the model card (README.md), or a default one when there is none."""
    card = Path(model_dir) / "README.md"
    if card.is_file():
        lines = card.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if line.strip().lower() == "## medical disclaimer":
                body = []
                for rest in lines[i + 1:]:
                    if rest.startswith("## "):
                        break
                    body.append(rest)
                text = " ".join(" ".join(body).split())
                if text:
                    return text
    return DEFAULT_DISCLAIMER


def read_uploads(paths: str | list[str] | None, window_name: str, max_pixels: int | None = None,
                 slices: SliceSpec | None = None, max_images: int = 8) -> list[Image.Image]:
    """The files uploaded for one question, in order, as RGB images: a NIfTI volume gives its slices (`slices`), the
    rest one image each (DICOM through the chosen window). At most `max_images` images; ImageError names what is
    wrong."""
    paths = [paths] if isinstance(paths, str) else [p for p in paths or [] if p]
    if not paths:
        raise ImageError("missing_image", "<upload>", "no file")
    window = None if window_name in ("", FILE_WINDOW) else Window.parse(window_name)
    images: list[Image.Image] = []
    for path in paths:
        images += load_images(path, window=window, slices=slices, max_images=max_images - len(images),
                              **({"max_pixels": max_pixels} if max_pixels else {}))
        if len(images) > max_images:
            raise ImageError("image_too_large", "<upload>", f"{len(images)} images; the page takes at most {max_images}")
    return images


class WebLimitError(ValueError):
    """A question the page refuses before any generation (shown to the user as it is)."""


def answer_stream(model: Any, processor: Any, state: dict[str, Any], text: str,
                  max_new_tokens: int, *, max_images: int = 8) -> Iterator[str]:
    """The growing answer to `text`, piece by piece, from a ChatSession rebuilt from `state` (earlier turns and
    images, plus the pending upload); `state` is updated with the finished turn. The server's limits hold: at most
    `max_images` images in a conversation and a prompt within the model's context minus `max_new_tokens`
    (WebLimitError before anything is generated); closing the stream (the page went away) stops generation."""
    session = ChatSession(model, processor, max_new_tokens=max_new_tokens)
    session.messages = list(state.get("messages", []))
    session.images = list(state.get("images", []))
    session.pending = list(state.get("pending") or [])  # the images uploaded for this question
    if len(session.images) + len(session.pending) > max_images:
        raise WebLimitError(f"this conversation would hold {len(session.images) + len(session.pending)} images; "
                            f"the page takes at most {max_images}: press Reset to start a new one")
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if context is not None:
        n = session.prompt_tokens(text)
        if n > context - max_new_tokens:
            raise WebLimitError(f"the question and the conversation so far are {n} tokens; the model's context "
                                f"({context}) leaves room for {context - max_new_tokens}: shorten it or press Reset")
    pieces: queue.Queue = queue.Queue()
    failure: list[BaseException] = []
    stop = threading.Event()

    def work() -> None:
        try:
            session.ask(text, on_text=pieces.put, stop=stop)
        except Exception as err:  # noqa: BLE001 -- shown to the user below
            failure.append(err)
        finally:
            pieces.put(None)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    so_far = ""
    try:
        while (piece := pieces.get()) is not None:
            so_far += piece
            yield so_far.strip()
    finally:  # also when the page went away and the stream was closed mid-answer
        if worker.is_alive():
            stop.set()
            worker.join()
            usage = session.last_usage
            logger.info("web: generation stopped after %s of %d tokens", usage.get("completion_tokens"),
                        max_new_tokens)
    if failure:
        raise RuntimeError(f"generation failed: {failure[0]}")
    state["messages"], state["images"], state["pending"] = session.messages, session.images, None
    yield session.messages[-1]["content"][0]["text"]


def build_app(model: Any, processor: Any, *, title: str, disclaimer: str, max_new_tokens: int = 256,
              max_pixels: int | None = None, max_images: int = 8, slices: SliceSpec | None = None) -> Any:
    """The Gradio Blocks app. Several files may be uploaded for one question (prior and current study, views),
    in the order given; a NIfTI volume gives its slices."""
    import gradio as gr

    windows = [FILE_WINDOW, *WINDOW_PRESETS, *WINDOW_STACKS]
    with gr.Blocks(title=f"medllava: {title}") as app:
        gr.Markdown(f"## {title}\n\n**Medical disclaimer.** {disclaimer}", elem_id="disclaimer")
        state = gr.State(value=None)
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Images (PNG, JPEG, DICOM or a NIfTI volume; several for a comparison)",
                                 file_types=[".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".nii", ".gz"],
                                 file_count="multiple", elem_id="upload")
                window = gr.Dropdown(windows, value=FILE_WINDOW, label="DICOM window (CT presets)", elem_id="window")
                preview = gr.Gallery(label="Attached to the next question", type="pil", interactive=False,
                                     height=240, columns=4, elem_id="preview")
            with gr.Column(scale=2):
                chat = gr.Chatbot(label="Conversation", height=420, elem_id="chat")
                question = gr.Textbox(label="Question", placeholder="Is there a pleural effusion?", elem_id="question")
                with gr.Row():
                    send = gr.Button("Ask", variant="primary", elem_id="ask")
                    reset = gr.Button("Reset", elem_id="reset")

        def attach(paths: list[str] | str | None, window_name: str, current: dict | None) -> tuple[Any, dict]:
            current = current or {"messages": [], "images": [], "pending": None}
            if not paths:
                current["pending"] = None
                return None, current
            try:
                images = read_uploads(paths, window_name, max_pixels, slices, max_images)
            except (ImageError, ValueError) as err:
                current["pending"] = None
                raise gr.Error(f"cannot use these files: {err}") from None
            current["pending"] = images
            return images, current

        def ask(text: str, history: list | None, current: dict | None) -> Iterator[tuple[list, dict, str]]:
            current = current or {"messages": [], "images": [], "pending": None}
            history = list(history or [])
            if not text.strip():
                raise gr.Error("type a question first")
            history.append({"role": "user", "content": text})
            history.append({"role": "assistant", "content": ""})
            try:
                for partial in answer_stream(model, processor, current, text, max_new_tokens, max_images=max_images):
                    history[-1] = {"role": "assistant", "content": partial}
                    yield history, current, ""
            except WebLimitError as err:
                raise gr.Error(str(err)) from None

        def clear() -> tuple[list, None, None, None]:
            return [], None, None, None

        upload.change(attach, [upload, window, state], [preview, state])
        window.change(attach, [upload, window, state], [preview, state])
        send.click(ask, [question, chat, state], [chat, state, question])
        question.submit(ask, [question, chat, state], [chat, state, question])
        reset.click(clear, None, [chat, state, preview, upload])
    app.queue(default_concurrency_limit=1)
    return app


LOOPBACK = ("127.0.0.1", "localhost", "::1")
PASSWORD_ENV = "MEDLLAVA_WEB_PASSWORD"


def launch_options(host: str, port: int, *, user: str = "medllava", password: str | None = None,
                   max_upload_mb: float = 20.0) -> dict[str, Any]:
    """Gradio `launch` arguments: loopback unless told otherwise, a sign-in when a password is set (Gradio's
    auth), uploads capped at `max_upload_mb`. Bound beyond loopback without a password, anyone who reaches the
    address can use the model: said loudly. The password itself is never logged."""
    if not max_upload_mb > 0:
        raise ConfigError(f"--max-upload-mb (max_upload_mb) must be positive, got {max_upload_mb}")
    options: dict[str, Any] = {"server_name": host, "server_port": port, "share": False, "inbrowser": False,
                               "show_error": True, "max_file_size": int(max_upload_mb * 2**20)}  # bytes
    if password:
        options["auth"] = (user, password)
    if host not in LOOPBACK:
        if password:
            logger.warning("medllava web on %s: reachable from other machines; sign-in required (user %r)", host, user)
        else:
            logger.warning("!" * 78 + "\nmedllava web on %s: reachable from other machines WITHOUT A PASSWORD: anyone "
                           "who reaches this address can use the model and read what it is sent. Set --password "
                           "(or %s), or bind to 127.0.0.1.\n" + "!" * 78, host, PASSWORD_ENV)
    return options


def run_web(args: Any) -> int:
    """Entry point for `medllava web` (arguments from the CLI parser)."""
    import os

    from medllava.config import slices_option, stage_slices
    from medllava.model import load_for_inference

    password = args.password or os.environ.get(PASSWORD_ENV)
    options = launch_options(args.host, args.port, user=args.user, password=password, max_upload_mb=args.max_upload_mb)
    bits = 4 if args.load_in_4bit else 8 if args.load_in_8bit else None
    model, processor = load_for_inference(args.model, bits=bits, device=args.device, allow_pickle=args.allow_pickle)
    app = build_app(model, processor, title=Path(args.model).resolve().name, disclaimer=disclaimer_for(args.model),
                    max_new_tokens=args.max_new_tokens, max_pixels=args.max_pixels, max_images=args.max_images,
                    slices=slices_option(args.slices, stage_slices(args.model)))
    app.launch(**options)
    return 0
