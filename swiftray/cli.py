"""`swiftray sft | rlhf | infer | export | make-tiny-model`: one entry point, ms-swift's flags."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from swiftray.arguments import COMMANDS, ArgumentError
from swiftray.checkpoint import install_secret_filter
from swiftray.cli_parser import parse_args, parse_bool

USAGE = """usage: swiftray {sft,rlhf,infer,export,megatron,make-tiny-model} [flags] [config.yaml]

commands:
  sft              supervised fine-tuning (full, LoRA, DoRA) on a Ray actor group
  rlhf             RL and preference training: --rlhf_type grpo | dapo | dpo | kto | orpo | simpo | cpo | rm
  infer            chat with a model or adapter, or batch-generate over --val_dataset
  export           merge a LoRA adapter (--merge_lora true), convert HF <-> megatron-core, or push to a hub
  megatron         `swiftray megatron sft`: megatron-core training (TP, PP, EP, SP)
  make-tiny-model  write a small Qwen3-style model and tokenizer for offline tests and demos

`swiftray COMMAND --help` lists every flag with its meaning and default."""


def make_tiny_model_main(argv: list[str]) -> None:
    from swiftray.models.tiny import make_tiny_model

    parser = argparse.ArgumentParser(prog="swiftray make-tiny-model", allow_abbrev=False)
    parser.add_argument("--output_dir", required=True, help="folder to write the model and tokenizer to")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and tokenizer training")
    parser.add_argument("--hidden_size", type=int, default=128, help="model width")
    parser.add_argument("--num_layers", type=int, default=2, help="transformer layers")
    parser.add_argument("--num_heads", type=int, default=4, help="attention heads (head_dim stays >= 32)")
    parser.add_argument("--intermediate_size", type=int, default=384, help="MLP width")
    parser.add_argument("--moe", type=parse_bool, default=False,
                        help="a Qwen3-MoE model (4 experts, top-2) instead of a dense Qwen3")
    opts = parser.parse_args(argv)
    path = make_tiny_model(
        opts.output_dir, seed=opts.seed, hidden_size=opts.hidden_size, num_layers=opts.num_layers,
        num_heads=opts.num_heads, intermediate_size=opts.intermediate_size, moe=opts.moe,
    )
    print(f"tiny model written to {path}")


def run_command(command: str, argv: list[str]) -> None:
    args = parse_args(COMMANDS[command], argv, prog=f"swiftray {command}")
    install_secret_filter(vars(args))  # token values never reach the console or a log file
    if command in ("sft", "rlhf"):
        from swiftray import launch

        if launch.multi_node(args):  # NNODES/NODE_RANK/MASTER_ADDR: every node runs this same command
            sys.exit(launch.run_node(lambda a: train(command, a), args))
        train(command, args)
    else:
        serve(command, args)


def train(command: str, args: object) -> None:
    if command == "sft":
        from swiftray.controller import run_sft

        run_sft(args)
    elif command == "rlhf":
        from swiftray.controller import run_rlhf

        run_rlhf(args)


def serve(command: str, args: object) -> None:
    if command == "infer":
        from swiftray.infer import run_infer

        run_infer(args)
    elif command == "export":
        from swiftray.export import run_export

        run_export(args)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="[swiftray %(levelname)s] %(message)s")
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    try:
        if command == "make-tiny-model":
            make_tiny_model_main(rest)
        elif command == "megatron":
            from swiftray.megatron.command import megatron_main

            megatron_main(rest)
        elif command in COMMANDS:
            run_command(command, rest)
        else:
            print(f"swiftray: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
            sys.exit(2)
    except (ArgumentError, ValueError, FileNotFoundError, KeyError, RuntimeError, ConnectionError) as err:
        # Bad input gets one clear line; SWIFTRAY_DEBUG=1 shows the traceback.
        if os.environ.get("SWIFTRAY_DEBUG") == "1":
            raise
        print(f"swiftray {command}: error: {one_line(err)}{traceback_note(err)}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:
        # Not the user's input: once a run folder exists, the one line says where the whole story is.
        if os.environ.get("SWIFTRAY_DEBUG") == "1" or not (note := traceback_note(err)):
            raise
        print(f"swiftray {command}: error: {type(err).__name__}: {one_line(err)}{note}", file=sys.stderr)
        sys.exit(1)


def one_line(err: BaseException) -> str:
    from swiftray.checkpoint import redact_text

    return redact_text("; ".join(line.strip() for line in str(err).splitlines() if line.strip()), known_secrets())


def known_secrets() -> set[str]:
    """Secret values of the environment and of the flags (which the run's log filter holds)."""
    from swiftray.checkpoint import SecretFilter, secret_values

    secrets = secret_values(os.environ)
    for handler in logging.getLogger().handlers + logging.getLogger("swiftray").handlers:
        secrets |= {s for f in handler.filters if isinstance(f, SecretFilter) for s in f.secrets}
    return secrets


def traceback_note(err: BaseException) -> str:
    """Write the full traceback (with the actor's own, which Ray keeps as the cause) to error.log in
    the run folder this process made, if any; the note that points to it."""
    import traceback

    from swiftray.checkpoint import RUN_DIRS, redact_text

    if not RUN_DIRS or not RUN_DIRS[-1].is_dir():
        return ""
    path = RUN_DIRS[-1] / "error.log"
    path.write_text(redact_text("".join(traceback.format_exception(err)), known_secrets()))
    return f" (full traceback: {path})"


if __name__ == "__main__":
    main()
