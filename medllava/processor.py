"""The LlavaProcessor we ship: image processor, tokenizer with `<image>`, and a chat template built from the LLM's own.

The template is the LLM's template with a short prelude that turns structured content
(`[{"type": "image"}, {"type": "text", "text": ...}]`) into the plain string the LLM template expects, with
every image part rendered as the `<image>` placeholder. The processor then expands each `<image>` to the
number of vision features. `parts_to_text` is the same rule in Python, for records.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # transformers is imported where it is used: the text helpers here stay free of it (the
    # self-instruct generator and the data readers use them and start in a fraction of a second)
    from transformers import LlavaProcessor, PreTrainedTokenizerBase

IMAGE_TOKEN = "<image>"

# Marks our prelude so that wrapping is idempotent (a saved processor's template is not wrapped twice).
_PRELUDE_MARK = "{#- medllava: image parts -> <image> #}"

_PRELUDE = (
    _PRELUDE_MARK
    + "{%- set _ml = namespace(msgs=[]) -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string or m['content'] is none -%}"
    "{%- set _ml.msgs = _ml.msgs + [m] -%}"
    "{%- else -%}"
    "{%- set _t = namespace(s='') -%}"
    "{%- for part in m['content'] -%}"
    "{%- if part['type'] == 'image' -%}"
    "{%- set _t.s = _t.s + '" + IMAGE_TOKEN + "' -%}"
    "{%- if not loop.last -%}{%- set _t.s = _t.s + '\\n' -%}{%- endif -%}"
    "{%- elif part['type'] == 'text' -%}"
    "{%- set _t.s = _t.s + part['text'] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set _ml.msgs = _ml.msgs + [{'role': m['role'], 'content': _t.s}] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = _ml.msgs -%}"
)


def parts_to_text(content: str | Iterable[dict[str, Any]]) -> str:
    """Flatten structured message content to text with `<image>` placeholders (same rule as the template)."""
    if isinstance(content, str):
        return content
    parts = list(content)
    out = []
    for i, part in enumerate(parts):
        kind = part.get("type")
        if kind == "image":
            out.append(IMAGE_TOKEN + ("\n" if i < len(parts) - 1 else ""))
        elif kind == "text":
            out.append(str(part.get("text", "")))
        else:
            raise ValueError(f"unsupported content part type {kind!r} (expected 'image' or 'text')")
    return "".join(out)


def wrap_chat_template(template: str) -> str:
    """Prefix an LLM chat template with the prelude that renders image parts as `<image>`."""
    if template.startswith(_PRELUDE_MARK):
        return template
    return _PRELUDE + template


def llm_chat_template(tokenizer: PreTrainedTokenizerBase, override: str | None = None) -> str:
    """The chat template to wrap: `override`, else the tokenizer's own; a clear error when there is none."""
    template = override or tokenizer.chat_template
    if isinstance(template, dict):  # several named templates: use the default one
        template = template.get("default") or next(iter(template.values()))
    if not template:
        raise ValueError(
            "the LLM's tokenizer has no chat template; set `model.chat_template` in the stage config "
            "(a Jinja template, e.g. copied from the instruct variant of the same LLM)"
        )
    return template


def image_processor_for_tower(
    vision_source: str | None,
    image_size: int,
    *,
    aspect: str = "pad",
    model_type: str = "",
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> Any:
    """A LLaVA image processor sized for the tower: pad-to-square (LLaVA expand2square) or resize, no crop.

    Normalisation statistics come from the tower's own preprocessor config when it has one (`vision_source`,
    None for a tower built from a config); otherwise the usual values for its family (0.5 for SigLIP, OpenAI
    CLIP statistics for the rest).
    """
    from transformers import AutoImageProcessor
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    from transformers.utils import is_torchvision_available

    mean: list[float] | None = None
    std: list[float] | None = None
    if vision_source is not None:
        try:
            own = AutoImageProcessor.from_pretrained(vision_source, revision=revision, trust_remote_code=trust_remote_code)
            mean, std = list(own.image_mean), list(own.image_std)
        except (OSError, ValueError, TypeError, AttributeError, KeyError):
            pass  # no preprocessor config in the tower folder: fall back to the family defaults below
    if mean is None or std is None:
        if "siglip" in model_type:
            mean, std = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
        else:
            mean, std = list(OPENAI_CLIP_MEAN), list(OPENAI_CLIP_STD)
    if is_torchvision_available():
        from transformers import LlavaImageProcessor as cls
    else:
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil as cls
    return cls(
        do_pad=aspect == "pad",
        do_resize=True,
        size={"height": image_size, "width": image_size},
        do_center_crop=False,
        crop_size={"height": image_size, "width": image_size},
        image_mean=mean,
        image_std=std,
        do_convert_rgb=True,
    )


def set_image_aspect(processor: LlavaProcessor, aspect: str) -> None:
    """Switch a processor between pad-to-square and plain resize."""
    processor.image_processor.do_pad = aspect == "pad"


def build_processor(
    image_processor: Any,
    tokenizer: PreTrainedTokenizerBase,
    *,
    patch_size: int,
    select_strategy: str,
    num_additional_image_tokens: int,
    chat_template: str,
) -> LlavaProcessor:
    """Assemble the LlavaProcessor; `<image>` must already be a special token of `tokenizer`."""
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=select_strategy,
        num_additional_image_tokens=num_additional_image_tokens,
        chat_template=wrap_chat_template(chat_template),
        image_token=IMAGE_TOKEN,
    )


def num_image_tokens(processor: LlavaProcessor) -> int:
    """Number of `<image>` tokens one image expands to (== projector output length)."""
    size = processor.image_processor.size
    height, width = size["height"], size["width"]
    n = (height // processor.patch_size) * (width // processor.patch_size) + processor.num_additional_image_tokens
    if processor.vision_feature_select_strategy == "default":
        n -= 1
    return n
