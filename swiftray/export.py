"""`swiftray export`: merge a LoRA adapter into its base (`--merge_lora true`) and/or push to a hub.

No secret goes into an exported folder or an upload: the copied args.json is redacted (also when an
earlier swiftray wrote the token into it), and the hub token is read from `--hub_token` or the
environment (HF_TOKEN, HUGGING_FACE_HUB_TOKEN; MODELSCOPE_API_TOKEN) only when uploading.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from swiftray.checkpoint import redact_json_file
from swiftray.models.inference import load_inference_model

logger = logging.getLogger("swiftray")

HF_ENDPOINT = "https://huggingface.co"
MODELSCOPE_ENDPOINT = "https://www.modelscope.cn"


def merge_lora(model_dir: str, adapters: list[str], output_dir: str | None, torch_dtype: str | None) -> Path:
    """Write base + adapter as one plain transformers model folder (default: `<adapter>-merged`)."""
    if not adapters:
        raise ValueError("--merge_lora true needs --adapters (a LoRA checkpoint folder)")
    out = Path(output_dir) if output_dir else Path(str(Path(adapters[0])) + "-merged")
    model, tokenizer = load_inference_model(model_dir, adapters, torch_dtype=torch_dtype, merge=True,
                                            device="cpu")
    staging = out.with_name(f".{out.name}.tmp")
    if staging.exists():
        shutil.rmtree(staging)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    args_json = Path(adapters[0]) / "args.json"
    if args_json.is_file():
        shutil.copy(args_json, staging / "args.json")
        redact_json_file(staging / "args.json")
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    logger.info("merged model written to %s", out)
    return out


def check_reachable(endpoint: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not minutes of retries, when the hub cannot be reached."""
    host = urlparse(endpoint).hostname or endpoint
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
    except OSError as err:
        raise ConnectionError(
            f"cannot reach the hub at {endpoint} ({err.__class__.__name__}: {err}); "
            "--push_to_hub needs network access (set HF_ENDPOINT for a mirror)"
        ) from err


HF_TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
MODELSCOPE_TOKEN_VARIABLES = ("MODELSCOPE_API_TOKEN",)


def hub_token(token: str | None, variables: tuple[str, ...]) -> str | None:
    """--hub_token, else the first of `variables` set in the environment (read now, kept nowhere)."""
    return token or next((os.environ[v] for v in variables if os.environ.get(v)), None)


def scrub_folder(folder: str | Path) -> None:
    """Before an upload: an args.json that holds a secret (written by an earlier swiftray) is redacted."""
    args_json = Path(folder) / "args.json"
    if args_json.is_file() and redact_json_file(args_json):
        logger.warning("%s held a secret (hub token or key); redacted it before the upload", args_json)


def push_to_hub(folder: str, hub_model_id: str, *, token: str | None, use_hf: bool, private: bool,
                commit_message: str) -> str:
    scrub_folder(folder)
    if use_hf:
        endpoint = os.environ.get("HF_ENDPOINT", HF_ENDPOINT)
        check_reachable(endpoint)
        from huggingface_hub import HfApi

        api = HfApi(endpoint=endpoint, token=hub_token(token, HF_TOKEN_VARIABLES))
        api.create_repo(hub_model_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=folder, repo_id=hub_model_id, commit_message=commit_message)
        return f"{endpoint}/{hub_model_id}"
    endpoint = os.environ.get("MODELSCOPE_DOMAIN", MODELSCOPE_ENDPOINT)
    check_reachable(endpoint)
    try:
        from modelscope.hub.api import HubApi
    except ImportError as err:
        raise RuntimeError("pushing to ModelScope (--use_hf false) needs `pip install modelscope`; "
                           "or pass --use_hf true for the Hugging Face hub") from err
    api = HubApi()
    token = hub_token(token, MODELSCOPE_TOKEN_VARIABLES)
    if token:
        api.login(token)
    api.push_model(model_id=hub_model_id, model_dir=folder, commit_message=commit_message)
    return f"{endpoint}/models/{hub_model_id}"


def run_export(args: Any) -> Path | str:
    if args.to_mcore or args.to_hf:
        from swiftray.megatron.convert import run_conversion

        return run_conversion(args)
    result: Path | str = Path(args.adapters[0] if args.adapters else args.model)
    if args.merge_lora:
        result = merge_lora(args.model, args.adapters, args.output_dir, args.torch_dtype)
    if args.push_to_hub:
        url = push_to_hub(str(result), args.hub_model_id, token=args.hub_token, use_hf=args.use_hf,
                          private=args.hub_private_repo, commit_message=args.commit_message)
        logger.info("pushed %s to %s", result, url)
        return url
    return result
