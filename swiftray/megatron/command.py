"""`swiftray megatron sft|rlhf ...`: ms-swift's `megatron` entry point."""

from __future__ import annotations

from swiftray.arguments import ArgumentError

USAGE = """usage: swiftray megatron {sft,rlhf} [flags] [config.yaml]

  sft    supervised fine-tuning with megatron-core (TP, PP, EP, SP) on a Ray actor group
  rlhf   RL with a Megatron policy (not wired yet)

`swiftray megatron sft --help` lists every flag with its meaning and default."""


def megatron_main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    sub, rest = argv[0], argv[1:]
    if sub == "sft":
        from swiftray.cli_parser import parse_args
        from swiftray.megatron.arguments import MegatronSftArguments
        from swiftray.megatron.sft import run_megatron_sft

        run_megatron_sft(parse_args(MegatronSftArguments, rest, prog="swiftray megatron sft"))
    elif sub == "rlhf":
        raise ArgumentError("swiftray megatron rlhf is not available yet: a Megatron policy in the RL loop comes "
                            "with the run plan (MegatronPolicyActor already takes PolicyActor's calls)")
    else:
        raise ArgumentError(f"unknown megatron command {sub!r}; expected sft or rlhf\n\n{USAGE}")
