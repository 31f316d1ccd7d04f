"""Model and tokenizer loading for training: transformers + PEFT.

`load_model` is the one place that turns ms-swift's model flags (dtype, attention
implementation, train type, LoRA settings, liger kernels) into a ready-to-train
module. Flags that need hardware or packages this machine lacks fail here, with a
message saying what is missing, instead of deep inside a training step.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

import torch

# The one dtype table: ms-swift's names (long and short) -> torch.
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
# ms-swift's names for the attention implementation -> transformers' names.
ATTN_IMPLS = {"sdpa": "sdpa", "eager": "eager", "flash_attn": "flash_attention_2",
              "flash_attention_2": "flash_attention_2"}
TRAIN_TYPES = ("full", "lora", "dora", "qlora")


def resolve_dtype(torch_dtype: str, model_dir: str | None = None) -> torch.dtype:
    """Map a dtype name to torch; "auto" reads the checkpoint's config (float32 if it names none)."""
    if torch_dtype == "auto":
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_dir)
        found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(found, torch.dtype):
            return found
        return DTYPES.get(str(found), torch.float32)
    if torch_dtype not in DTYPES:
        raise ValueError(f"torch_dtype={torch_dtype!r}: expected one of {[*DTYPES, 'auto']}")
    return DTYPES[torch_dtype]


def _require(package: str, feature: str, needs_cuda: bool) -> None:
    """Fail early, naming what `feature` needs, when the package or CUDA is absent."""
    missing = []
    if importlib.util.find_spec(package) is None:
        missing.append(f"the '{package}' package (pip install {package.replace('_', '-')})")
    if needs_cuda and not torch.cuda.is_available():
        missing.append("a CUDA GPU")
    if missing:
        raise RuntimeError(f"{feature} needs {' and '.join(missing)}; this machine lacks it.")


def load_tokenizer(model_dir: str, template: str | None = None):
    """The checkpoint's tokenizer; a missing pad token falls back to the EOS token.

    `template` (ms-swift's `--template`) replaces the checkpoint's chat template: a family name
    (`qwen3`, `deepseek_r1`, `phi3`, `gpt_oss`, ...: swiftray/data/chat_templates.py) or the path
    of a Jinja file. An unknown name raises ValueError listing the known ones.
    """
    from transformers import AutoTokenizer

    from swiftray.data.chat_templates import resolve_chat_template

    _check_dir(model_dir)
    chat_template = resolve_chat_template(template) if template else None  # fail before the slow load
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    model_dir: str,
    *,
    torch_dtype: str = "float32",
    attn_impl: str | None = None,
    gradient_checkpointing: bool = False,
    train_type: str = "full",
    adapters: Sequence[str] = (),
    lora_rank: int = 8,
    lora_alpha: int = 32,
    lora_dropout: float = 0.05,
    target_modules: Sequence[str] = ("all-linear",),
    modules_to_save: Sequence[str] = (),
    use_liger_kernel: bool = False,
    seed: int = 42,
) -> torch.nn.Module:
    """Load a causal LM from `model_dir` on CPU, ready for training.

    train_type "full" trains every parameter; "lora"/"dora" wrap the model in a PEFT
    adapter (only adapter and `modules_to_save` parameters train); "qlora" loads the
    base in 4 bits (needs CUDA + bitsandbytes). `adapters` (one LoRA folder) continues
    training that adapter instead of starting a new one. `seed` fixes the adapter's random
    init, so every rank of a group builds identical weights.
    """
    from transformers import AutoModelForCausalLM

    _check_dir(model_dir)
    if train_type not in TRAIN_TYPES:
        raise ValueError(f"train_type={train_type!r}: expected one of {TRAIN_TYPES}")
    if attn_impl is not None and attn_impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl={attn_impl!r}: expected None or one of {list(ATTN_IMPLS)}")
    if attn_impl == "flash_attn":
        _require("flash_attn", "attn_impl='flash_attn'", needs_cuda=True)
    if use_liger_kernel:
        _require("liger_kernel", "use_liger_kernel", needs_cuda=True)
    if train_type == "qlora":
        _require("bitsandbytes", "train_type='qlora'", needs_cuda=True)
    if adapters and (train_type == "full" or len(adapters) > 1):
        raise ValueError(f"adapters={list(adapters)}: continuing training takes one adapter folder and "
                         f"train_type lora/dora/qlora (got train_type={train_type!r})")
    for adapter in adapters:
        _check_dir(adapter)

    dtype = resolve_dtype(torch_dtype, model_dir)
    kwargs: dict = {"dtype": dtype}
    if attn_impl is not None:
        kwargs["attn_implementation"] = ATTN_IMPLS[attn_impl]
    if train_type == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    model.config.use_cache = False  # the KV cache is useless in training and costs memory

    if use_liger_kernel:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model)
    if gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs (LoRA) and with DDP/FSDP2.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    if train_type == "full":
        return model
    return _wrap_peft(
        model, train_type, list(adapters), lora_rank, lora_alpha, lora_dropout, target_modules,
        modules_to_save, gradient_checkpointing, seed,
    )


def _wrap_peft(model, train_type, adapters, rank, alpha, dropout, target_modules, modules_to_save,
               gradient_checkpointing, seed, task_type="CAUSAL_LM"):
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    if train_type == "qlora":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    if adapters:  # its saved LoraConfig (rank, targets, DoRA) wins over the flags
        return PeftModel.from_pretrained(model, adapters[0], is_trainable=True)
    targets = list(target_modules)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        # PEFT spells the "every linear layer but the output head" shortcut as a string.
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        modules_to_save=list(modules_to_save) or None,
        use_dora=train_type == "dora",
        task_type=task_type,
    )
    torch.manual_seed(seed)
    return get_peft_model(model, config)


def _check_dir(model_dir: str) -> None:
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model directory {model_dir!r} does not exist (no model hub is used)")


def peft_to_base_state_dict(model, state_dict: dict[str, torch.Tensor], adapter: str = "default"
                            ) -> dict[str, torch.Tensor]:
    """A PEFT model's full state dict as the plain model's weights, with LoRA/DoRA merged in.

    `state_dict` is the PEFT model's own (`model.state_dict()` or a gathered copy); keys
    come back as the base model names them ("model.layers.0.self_attn.q_proj.weight"), so
    any engine holding the base model can load them. Merging follows PEFT's
    `merge_and_unload`: W + scaling * B @ A, and for DoRA the per-row rescale
    magnitude / ||W + scaling * B @ A||. Only linear LoRA layers are supported.
    """
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    def base_key(key: str) -> str:
        key = key.replace(f".modules_to_save.{adapter}.", ".").replace(".base_layer.", ".")
        return key.removeprefix("base_model.model.")

    lora_parts = (".lora_A.", ".lora_B.", ".lora_magnitude_vector.", ".lora_embedding_", ".original_module.")
    merged = {base_key(k): v for k, v in state_dict.items() if not any(p in k for p in lora_parts)}
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer) or adapter not in layer.lora_A:
            continue
        if not isinstance(layer, LoraLinear):
            raise NotImplementedError(f"merging LoRA into {type(layer).__name__} ({name}) is not supported")
        weight = state_dict[f"{name}.base_layer.weight"]
        w = weight.float().T if layer.fan_in_fan_out else weight.float()  # as [out, in]
        a = state_dict[f"{name}.lora_A.{adapter}.weight"].float()
        b = state_dict[f"{name}.lora_B.{adapter}.weight"].float()
        w = w + (b @ a) * layer.scaling[adapter]
        magnitude = state_dict.get(f"{name}.lora_magnitude_vector.{adapter}.weight")
        if magnitude is not None:  # DoRA
            w = (magnitude.float() / torch.linalg.norm(w, dim=1)).view(-1, 1) * w
        merged[base_key(f"{name}.base_layer.weight")] = (w.T if layer.fan_in_fan_out else w).to(weight.dtype)
    return merged
