"""Chat with a trained model about medical images: interactive (streamed) or one-shot for scripts.

    medllava chat MODEL [--image PATH ...] [--prompt TEXT] [--temperature T] [--max-new-tokens N]
                        [--load-in-4bit | --load-in-8bit] [--device auto|cuda|mps|cpu] [--window C,W] [--frame N]
                        [--slices COUNT[,SPACING]]

--image and /image take PNG/JPEG/TIFF/DICOM files, and a DICOM series folder or a NIfTI volume, which attach their
slices (medllava.volumes). In a session: plain lines are questions; `/image PATH` attaches an image to the next
question; `/reset`
starts over; `/exit` (or end of input) leaves. MODEL is any stage output or exported folder, full model or
LoRA adapter (merged into its base on load). Greedy decoding unless --temperature > 0.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

from PIL import Image

from medllava.imaging import Window
from medllava.volumes import SliceSpec, load_images

if TYPE_CHECKING:
    import torch

HELP = "commands: /image PATH (attach to next question), /reset, /help, /exit"


@dataclass
class ChatSession:
    """A multi-turn conversation with one model; images join the next user turn in order."""

    model: Any
    processor: Any
    max_new_tokens: int = 256
    temperature: float = 0.0
    system_prompt: str | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    pending: list[Image.Image] = field(default_factory=list)
    last_usage: dict[str, Any] = field(default_factory=dict)
    """Of the last answer: prompt_tokens, completion_tokens, finish_reason ("stop", "length", or "cancelled" when
    the caller's stop event ended it)."""

    def add_image(self, image: Image.Image) -> None:
        self.pending.append(image)

    def reset(self) -> None:
        self.messages.clear()
        self.images.clear()
        self.pending.clear()

    def _prompt(self) -> str:
        messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else []) + self.messages
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def prompt_tokens(self, text: str) -> int:
        """The length the prompt of asking `text` next would have (each image counted at its expanded size),
        without asking it: what a server checks against the model's context before generating."""
        from medllava.data.expand import ImageExpander

        content: list[dict[str, Any]] = [{"type": "image"} for _ in self.pending] + [{"type": "text", "text": text}]
        messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else []) + \
            self.messages + [{"role": "user", "content": content}]
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        expander = ImageExpander(self.processor)
        images = [*self.images, *self.pending]
        return len(self.processor.tokenizer(prompt)["input_ids"]) + sum(expander.count(im.size) - 1 for im in images)

    def ask(self, text: str, on_text: Callable[[str], None] | None = None,
            stop: threading.Event | None = None) -> str:
        """Add a user turn (with pending images), generate the answer (streamed to `on_text`), keep it. Setting
        `stop` (from any thread) ends generation after the token being made: a server stops the answer of a
        client that went away."""
        import torch

        with torch.no_grad():
            return self._ask(text, on_text, stop)

    def _ask(self, text: str, on_text: Callable[[str], None] | None, stop: threading.Event | None) -> str:
        from medllava.model import decoding_config

        content: list[dict[str, Any]] = [{"type": "image"} for _ in self.pending] + [{"type": "text", "text": text}]
        self.messages.append({"role": "user", "content": content})
        self.images.extend(self.pending)
        self.pending = []
        inputs = self.processor(text=[self._prompt()], images=self.images or None, return_tensors="pt")
        device = next(self.model.parameters()).device
        dtype = next(p.dtype for p in self.model.parameters() if p.is_floating_point())
        inputs = {k: (v.to(device, dtype) if k == "pixel_values" else v.to(device)) for k, v in inputs.items()}
        config = decoding_config(self.model, self.max_new_tokens, temperature=self.temperature)
        kwargs = dict(**inputs, generation_config=config)
        if stop is not None:
            from transformers import StoppingCriteriaList

            kwargs["stopping_criteria"] = StoppingCriteriaList([_stop_when_set(stop)])
        prompt_len = inputs["input_ids"].shape[1]
        if on_text is None:
            out = self.model.generate(**kwargs)
            answer = self.processor.tokenizer.decode(out[0, prompt_len:], skip_special_tokens=True)
        else:
            from transformers import TextIteratorStreamer

            streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
            result: list[torch.Tensor] = []
            worker = threading.Thread(target=lambda: result.append(self.model.generate(**kwargs, streamer=streamer)))
            worker.start()
            pieces = []
            for piece in streamer:
                pieces.append(piece)
                on_text(piece)
            worker.join()
            if not result:
                raise RuntimeError("generation failed (see the error above)")
            out = result[0]
            answer = "".join(pieces)
        new = out[0, prompt_len:]
        eos = config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        stopped = len(new) > 0 and int(new[-1]) in eos_ids
        finish = "length" if len(new) >= self.max_new_tokens and not stopped else "stop"
        if stop is not None and stop.is_set() and not stopped and len(new) < self.max_new_tokens:
            finish = "cancelled"
        self.last_usage = {"prompt_tokens": int(prompt_len), "completion_tokens": int(len(new)),
                           "finish_reason": finish}
        answer = answer.strip()
        self.messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return answer


def _stop_when_set(event: threading.Event) -> Any:
    """A transformers stopping criterion that ends generation once `event` is set."""
    import torch
    from transformers import StoppingCriteria

    class StopWhenSet(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            return torch.full((input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device)

    return StopWhenSet()


def _read_image(path: str, window: Window | None, frame: int | None, slices: SliceSpec | None = None) -> list[Image.Image]:
    """The images of one --image / /image path: a series folder or NIfTI volume gives its slices."""
    return load_images(path, window=window, frame=frame, slices=slices)


def interactive(session: ChatSession, stdin: TextIO, stdout: TextIO, window: Window | None, frame: int | None,
                slices: SliceSpec | None = None) -> int:
    """The read-answer loop. User errors inside the loop print one line and the session goes on."""
    from medllava.imaging import ImageError

    interactive_tty = stdin.isatty()
    print(f"medllava chat: {HELP}", file=stdout, flush=True)
    while True:
        if interactive_tty:
            stdout.write("you> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/help":
            print(HELP, file=stdout, flush=True)
            continue
        if line == "/reset":
            session.reset()
            print("(conversation reset)", file=stdout, flush=True)
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            try:
                images = _read_image(path, window, frame, slices)
                for image in images:
                    session.add_image(image)
                print(f"(image attached: {path})" if len(images) == 1 else
                      f"({len(images)} slice images attached: {path})", file=stdout, flush=True)
            except ImageError as err:
                print(f"error: {err}", file=stdout, flush=True)
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]}; {HELP}", file=stdout, flush=True)
            continue
        stdout.write("assistant> ")
        stdout.flush()
        session.ask(line, on_text=lambda piece: (stdout.write(piece), stdout.flush()))
        stdout.write("\n")
        stdout.flush()
    return 0


def run_chat(args: Any) -> int:
    """Entry point for `medllava chat` (arguments from the CLI parser)."""
    from medllava.config import require_model_folder, slices_option, stage_slices, window_option

    window = window_option(args.window)
    slices = slices_option(args.slices, stage_slices(args.model))  # unset: the model's stage's data.slices
    images = [im for p in args.image or [] for im in _read_image(p, window, args.frame, slices)]  # before the model
    require_model_folder(args.model)  # and before importing torch
    from medllava.model import load_for_inference

    bits = 4 if args.load_in_4bit else 8 if args.load_in_8bit else None
    model, processor = load_for_inference(args.model, bits=bits, device=args.device, allow_pickle=args.allow_pickle)
    session = ChatSession(model, processor, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          system_prompt=args.system)
    for image in images:
        session.add_image(image)
    if args.prompt is not None:
        print(session.ask(args.prompt))
        return 0
    return interactive(session, sys.stdin, sys.stdout, window, args.frame, slices)
