"""`swiftray megatron sft|rlhf ...`: ms-swift's `megatron` entry point."""

from __future__ import annotations

import sys

from swiftray.arguments import ArgumentError

USAGE = """usage: swiftray megatron {sft,rlhf} [flags] [config.yaml]

  sft    supervised fine-tuning with megatron-core (TP, PP, EP, SP) on a Ray actor group
  rlhf   RL (--rlhf_type grpo) with a megatron-core policy: `swiftray rlhf`'s loop, rollout, reference and
         reward roles, the policy trained over TP x PP x EP x DP ranks and synced to the engines in HF names

`swiftray megatron sft --help` / `swiftray megatron rlhf --help` list every flag with its meaning and default."""


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
        from swiftray import launch
        from swiftray.cli_parser import parse_args
        from swiftray.megatron.rlhf import MegatronRlhfArguments, run_megatron_rlhf

        args = parse_args(MegatronRlhfArguments, rest, prog="swiftray megatron rlhf")
        if launch.multi_node(args):  # NNODES/NODE_RANK/MASTER_ADDR: every node runs this same command
            sys.exit(launch.run_node(run_megatron_rlhf, args))
        run_megatron_rlhf(args)
    else:
        raise ArgumentError(f"unknown megatron command {sub!r}; expected sft or rlhf\n\n{USAGE}")
