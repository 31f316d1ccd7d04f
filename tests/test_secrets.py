"""Secrets never reach disk or logs: hub tokens and any flag or environment value whose name says
token, key, secret or password are redacted in args.json (run folder and checkpoints), logs, the
tracker's config and exported folders; a push reads the token from the flag or the environment
only when it uploads.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from _ray import ray_cluster  # noqa: F401  (session fixture)
from _sft import run_sft

from swiftray import checkpoint as ckpt
from swiftray.arguments import ExportArguments
from swiftray.cli_parser import parse_args

FLAG_TOKEN = "hf_flagSecret7391"
ENV_TOKEN = "hf_envSecret2846"
ENV_KEY = "wb-envKey5512"


def files_holding(root: Path, *needles: str) -> list[str]:
    """Every file under root whose bytes contain one of the needles."""
    hits = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            hits += [f"{path}: {n}" for n in needles if n.encode() in data]
    return hits


def test_secret_names_and_redaction(monkeypatch):
    for name in ("hub_token", "HF_TOKEN", "WANDB_API_KEY", "api_key", "AWS_SECRET_ACCESS_KEY", "db-password",
                 "apikey", "gcp.credentials"):
        assert ckpt.is_secret_name(name), name
    for name in ("max_new_tokens", "tokenizer", "TOKENIZERS_PARALLELISM", "monkey", "num_tokens", "keyword",
                 "max_length"):
        assert not ckpt.is_secret_name(name), name
    monkeypatch.setenv("MY_SERVICE_KEY", ENV_KEY)
    data = {"hub_token": FLAG_TOKEN, "api_key": None, "max_new_tokens": 64, "tokenizer": "tok",
            "reward_kwargs": {"judge": {"password": "pw-123456"}, "url": f"https://x/?k={ENV_KEY}"},
            "system": f"never say {FLAG_TOKEN}", "secrets": ["a-secret-1", "b-secret-2"]}
    clean = ckpt.redact(data)
    assert clean == {"hub_token": "<redacted>", "api_key": None, "max_new_tokens": 64, "tokenizer": "tok",
                     "reward_kwargs": {"judge": {"password": "<redacted>"}, "url": "https://x/?k=<redacted>"},
                     "system": "never say <redacted>", "secrets": ["<redacted>", "<redacted>"]}
    assert data["hub_token"] == FLAG_TOKEN  # the input is not changed


def test_log_records_lose_secret_values(caplog, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", ENV_TOKEN)
    root = logging.getLogger()
    handler = logging.StreamHandler()
    root.addHandler(handler)
    try:
        ckpt.install_secret_filter({"hub_token": FLAG_TOKEN})
        record = logging.LogRecord("swiftray", logging.ERROR, __file__, 1, "pushing with %s and %s",
                                   (FLAG_TOKEN, ENV_TOKEN), None)
        for secret_filter in handler.filters:
            secret_filter.filter(record)
        assert record.getMessage() == "pushing with <redacted> and <redacted>"
        try:
            raise ValueError(f"bad token {FLAG_TOKEN}")
        except ValueError:
            import sys

            record = logging.LogRecord("swiftray", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
        handler.filters[0].filter(record)
        assert FLAG_TOKEN not in logging.Formatter().format(record) and "bad token <redacted>" in record.exc_text
    finally:
        root.removeHandler(handler)


def test_sft_run_and_export_folder_hold_no_secret(ray_cluster, tiny_model_dir, tmp_path, monkeypatch, capsys,  # noqa: F811
                                                   caplog):
    monkeypatch.setenv("HF_TOKEN", ENV_TOKEN)
    monkeypatch.setenv("WANDB_API_KEY", ENV_KEY)
    caplog.set_level(logging.INFO)
    out = tmp_path / "out"
    run = run_sft(tiny_model_dir, out, "--train_type", "lora", "--dataset", "swiftray/arithmetic#16",
                  "--max_steps", 2, "--save_steps", 1, "--per_device_train_batch_size", 2,
                  "--gradient_accumulation_steps", 1, "--report_to", "tensorboard", "--hub_token", FLAG_TOKEN,
                  "--system", f"You are a bot. {ENV_TOKEN}")
    saved = ckpt.read_args(run)
    assert saved["hub_token"] == "<redacted>" and saved["system"] == "You are a bot. <redacted>"
    assert (run / "checkpoint-2" / "train_state" / "train_state.json").is_file()
    assert any((run / "runs").iterdir())  # tensorboard wrote its events

    from swiftray.export import run_export

    merged = tmp_path / "merged"
    args = parse_args(ExportArguments, ["--adapters", str(run / "checkpoint-2"), "--merge_lora", "true",
                                        "--output_dir", str(merged), "--hub_token", FLAG_TOKEN])
    run_export(args)
    assert json.loads((merged / "args.json").read_text())["hub_token"] == "<redacted>"

    assert files_holding(out, FLAG_TOKEN, ENV_TOKEN, ENV_KEY) == []
    assert files_holding(merged, FLAG_TOKEN, ENV_TOKEN, ENV_KEY) == []
    captured = capsys.readouterr()
    for text in (captured.out, captured.err, caplog.text):
        assert FLAG_TOKEN not in text and ENV_TOKEN not in text


class FakeHfApi:
    """Stands in for huggingface_hub.HfApi: records the token and what the folder held at upload."""

    calls: list[dict] = []

    def __init__(self, endpoint: str, token: str | None) -> None:
        self.token = token

    def create_repo(self, repo_id: str, private: bool, exist_ok: bool) -> None:
        pass

    def upload_folder(self, folder_path: str, repo_id: str, commit_message: str) -> None:
        folder = Path(folder_path)
        FakeHfApi.calls.append({"token": self.token, "repo": repo_id,
                                "leaks": files_holding(folder, FLAG_TOKEN, ENV_TOKEN)})


def test_push_reads_the_token_at_upload_and_uploads_no_secret(tmp_path, monkeypatch):
    import huggingface_hub

    from swiftray import export

    monkeypatch.setattr(export, "check_reachable", lambda endpoint: None)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    FakeHfApi.calls = []
    folder = tmp_path / "checkpoint-5"  # as an earlier swiftray wrote it: the token in plain text
    folder.mkdir()
    (folder / "args.json").write_text(json.dumps({"model": "m", "hub_token": FLAG_TOKEN}))

    monkeypatch.setenv("HF_TOKEN", ENV_TOKEN)
    export.push_to_hub(str(folder), "me/model", token=None, use_hf=True, private=False, commit_message="c")
    export.push_to_hub(str(folder), "me/model", token=FLAG_TOKEN, use_hf=True, private=False, commit_message="c")
    monkeypatch.delenv("HF_TOKEN")
    export.push_to_hub(str(folder), "me/model", token=None, use_hf=True, private=False, commit_message="c")
    assert [c["token"] for c in FakeHfApi.calls] == [ENV_TOKEN, FLAG_TOKEN, None]
    assert all(c["leaks"] == [] and c["repo"] == "me/model" for c in FakeHfApi.calls)
    assert json.loads((folder / "args.json").read_text()) == {"model": "m", "hub_token": "<redacted>"}


@pytest.mark.parametrize("config", [{"hub_token": FLAG_TOKEN}, {"nested": {"api_key": FLAG_TOKEN}}])
def test_tracker_config_is_redacted_before_wandb(tmp_path, monkeypatch, config):
    from swiftray import tracking

    seen = {}
    monkeypatch.setattr(tracking, "_start_wandb", lambda run_dir, cfg: seen.setdefault("config", cfg))
    tracker = tracking.Tracker(tmp_path, ["wandb"], total_steps=1, config=config)
    tracker.wandb = None
    tracker.close()
    assert FLAG_TOKEN not in json.dumps(seen["config"]) and "<redacted>" in json.dumps(seen["config"])


def test_a_failed_run_writes_its_traceback_to_the_run_folder_without_secrets(tmp_path, monkeypatch, capsys):
    from swiftray import checkpoint, cli

    monkeypatch.setattr(checkpoint, "RUN_DIRS", [])
    monkeypatch.setenv("HF_TOKEN", "hf_supersecretvalue123")

    def failing_run(command, rest):
        checkpoint.make_run_dir(str(tmp_path / "out"))
        raise ZeroDivisionError("boom near hf_supersecretvalue123")

    monkeypatch.setattr(cli, "run_command", failing_run)
    with pytest.raises(SystemExit) as exited:
        cli.main(["sft"])
    assert exited.value.code == 1
    console = capsys.readouterr().err.strip().splitlines()
    log = next((tmp_path / "out").glob("v*/error.log"))
    # One line on the console, naming the error and where the whole traceback is ...
    assert console == [f"swiftray sft: error: ZeroDivisionError: boom near <redacted> (full traceback: {log})"]
    # ... which holds the frames (the failing function's among them), and no secret.
    text = log.read_text()
    assert "Traceback" in text and "failing_run" in text and "hf_supersecretvalue123" not in text


def test_an_error_before_any_run_folder_keeps_its_traceback_as_before(monkeypatch):
    from swiftray import checkpoint, cli

    monkeypatch.setattr(checkpoint, "RUN_DIRS", [])
    monkeypatch.setattr(cli, "run_command", lambda command, rest: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # a bug, not bad input, and nowhere to write it: Python's traceback
        cli.main(["sft"])
