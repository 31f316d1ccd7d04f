"""Named chat templates (`--template NAME`, ms-swift's names) and template files.

The template texts are the ones TRL ships inside its package (`trl/chat_templates/`):
each model family's official template (`qwen3.jinja`, `phi3.jinja`, ...), byte-identical
to what the family's checkpoints carry, and for most families a `*_training.jinja`
variant that renders the same conversation with `{% generation %}` markers around what
the assistant says (and, for DeepSeek-R1, keeps the reasoning that the official template
strips). TRL keeps them in sync with the model repos, so swiftray reads them from there
instead of carrying copies.

- `resolve_chat_template(name_or_path)`: the official template of a named family, or the
  text of a template file; it becomes the tokenizer's chat template (prompts, inference).
- `training_variant(chat_template)`: when a template is a known official one, its family
  name and training variant; `Template` renders training samples with that variant.
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from pathlib import Path

# ms-swift's template names (and a few of swiftray's own for families ms-swift names differently or
# not yet) -> the stem of TRL's file holding the family's official template.
TEMPLATE_FILES: dict[str, str] = {
    "qwen2_5": "qwen2_5",
    "qwen3": "qwen3",
    "qwen3_nothinking": "qwen3_instruct_2507",
    "qwen3_instruct_2507": "qwen3_instruct_2507",
    "qwen3_5": "qwen3_5_think",
    "qwen3_5_nothinking": "qwen3_5_nothink",
    "qwen3_6": "qwen3_6",
    "qwen3_8": "qwen3_8",
    "qwen2_vl": "qwen2_5_vl",
    "qwen2_5_vl": "qwen2_5_vl",
    "qwen3_vl": "qwen3_vl",
    "llama3": "llama3",
    "llama3_1": "llama3_1",
    "llama3_2": "llama3_2",
    "deepseek_r1": "deepseek_r1_distill",
    "deepseek_v3": "deepseekv3",
    "phi3": "phi3",
    "phi3_5": "phi3_5",
    "gemma": "gemma",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
    "gemma3_vision": "gemma3",
    "gemma4": "gemma4",
    "gpt_oss": "gptoss",
    "glm4_5": "glm4moe",
    "aya": "cohere",
    "cohere": "cohere",
    "cohere2": "cohere2",
    "lfm2": "lfm2",
    "lfm2_5": "lfm2_2_5",
    "idefics3": "idefics3",
    "smolvlm": "smolvlm",
    "llava1_6_mistral_hf": "llava_next",
    "nemotron_3_nano": "nemotron_3_nano",
    "nemotron_3_super": "nemotron_3_super",
    "nemotron_3_ultra": "nemotron_3_ultra",
    "nemotron_3_5_lightning": "nemotron_3_5_lightning",
}
TRAINING_SUFFIX = "_training"


def trl_template_dir() -> Path:
    """TRL's folder of chat templates, found without importing TRL."""
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("named chat templates come from the 'trl' package, which is not installed "
                           "(pip install trl); pass a template file path instead")
    folder = Path(next(iter(spec.submodule_search_locations))) / "chat_templates"
    if not folder.is_dir():
        raise RuntimeError(f"the installed trl has no chat_templates folder ({folder}); upgrade it (pip install -U trl)")
    return folder


def known_template_names() -> list[str]:
    """Every name `--template` accepts: ms-swift's names, then TRL's own file stems."""
    try:
        stems = sorted(p.stem for p in trl_template_dir().glob("*.jinja") if not p.stem.endswith(TRAINING_SUFFIX))
    except RuntimeError:
        stems = []
    return list(TEMPLATE_FILES) + [s for s in stems if s not in TEMPLATE_FILES]


def resolve_chat_template(template: str) -> str:
    """The chat template text for `--template`: a known name, or the path of a Jinja file."""
    if os.path.sep in template or template.endswith(".jinja") or os.path.isfile(template):
        if not os.path.isfile(template):
            raise FileNotFoundError(f"--template {template!r}: no such template file")
        text = Path(template).read_text(encoding="utf-8")
        if "{{" not in text and "{%" not in text:
            raise ValueError(f"--template {template!r}: the file is not a Jinja chat template (no {{{{ or {{%)")
        return text
    stem = TEMPLATE_FILES.get(template, template)
    path = trl_template_dir() / f"{stem}.jinja"
    if stem.endswith(TRAINING_SUFFIX) or not path.is_file():
        raise ValueError(f"--template {template!r}: unknown template name; known: {', '.join(known_template_names())} "
                         "(or the path of a .jinja file)")
    return path.read_text(encoding="utf-8")


def training_variant(chat_template: str | None) -> tuple[str, str] | None:
    """(family name, training template) when `chat_template` is a known official template, else None."""
    if not chat_template:
        return None
    try:
        return _training_variants().get(chat_template.strip())
    except RuntimeError:  # no trl: no known templates
        return None


def family_name(chat_template: str | None) -> str | None:
    """The family name of a known official or training template, else None."""
    if not chat_template:
        return None
    try:
        return _family_names().get(chat_template.strip())
    except RuntimeError:
        return None


@lru_cache(maxsize=1)
def _training_variants() -> dict[str, tuple[str, str]]:
    folder = trl_template_dir()
    out = {}
    for train_path in sorted(folder.glob(f"*{TRAINING_SUFFIX}.jinja")):
        stem = train_path.stem[: -len(TRAINING_SUFFIX)]
        official = folder / f"{stem}.jinja"
        if official.is_file():
            out[official.read_text(encoding="utf-8").strip()] = (_name_of(stem), train_path.read_text(encoding="utf-8"))
    return out


@lru_cache(maxsize=1)
def _family_names() -> dict[str, str]:
    folder = trl_template_dir()
    return {p.read_text(encoding="utf-8").strip(): _name_of(p.stem.removesuffix(TRAINING_SUFFIX))
            for p in sorted(folder.glob("*.jinja"))}


def _name_of(stem: str) -> str:
    """The first ms-swift name that maps to a TRL file stem, or the stem itself."""
    return next((name for name, s in TEMPLATE_FILES.items() if s == stem), stem)
