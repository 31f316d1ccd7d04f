"""`swiftray rlhf --use_vllm true` end to end on CPU: the reference document's GRPO command with the
vLLM rollout engine inside Ray, and the engine's log-probs equal to the policy's after every weight sync.

Runs where vLLM is installed: on CPU that is .venv-vllm (scripts/test_vllm_cpu.sh); the main .venv
has no vLLM and skips this file. One GRPO run serves both tests: a vLLM engine takes a while to start.
"""

from __future__ import annotations

import json
import math
import shlex
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

import ray  # noqa: E402
from _ray import ray_cluster  # noqa: E402, F401
from test_rl_loop import REFERENCE_GRPO  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from swiftray.arguments import RlhfArguments  # noqa: E402
from swiftray.cli_parser import parse_args  # noqa: E402
from swiftray.controller import rl  # noqa: E402
from swiftray.data.template import Template  # noqa: E402
from swiftray.experience import sequences_batch, tokens_to_completion_values  # noqa: E402
from swiftray.models.generation import SamplingParams  # noqa: E402

torch.set_num_threads(1)
PROBLEM = "What is 2 + 2?"
ANSWERS = ["\\boxed{4}", "\\boxed{5}"]  # the right answer and a wrong one
ATOL = 1e-3  # vLLM's CPU kernels against the policy's transformers forward, both float32


@pytest.fixture(scope="module")
def coin_flip_model(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model taught to answer PROBLEM with one of ANSWERS, half and half, and then stop.

    The random tiny model never stops within a few tokens (so --overlong_filter would leave no loss
    tokens) and never answers right (so every advantage would be zero): its GRPO step would change
    nothing, and a weight sync that did nothing would pass unseen. This one's groups mix right and
    wrong answers that end on <|im_end|>, so the step really moves the policy.
    """
    out = tmp_path_factory.mktemp("coin_flip") / "model"
    shutil.copytree(tiny_model_dir, out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    prompt = Template(tokenizer).encode_prompt([{"role": "user", "content": PROBLEM}])
    ids = torch.tensor([prompt + tokenizer.encode(a) + [tokenizer.eos_token_id] for a in ANSWERS])
    labels = ids.clone()
    labels[:, :len(prompt)] = -100
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        optimizer.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
    with torch.no_grad():  # the two answers differ in one token, the digit: both must stay likely
        digit = ids.ne(ids[0]).any(0).nonzero().item()
        probs = model(input_ids=ids[:1, :digit]).logits[0, -1].softmax(-1)
    assert all(0.25 < probs[i].item() < 0.75 for i in ids[:, digit]), probs[ids[:, digit]]
    model.save_pretrained(out)
    return out


class SyncCheckingStep(rl.RLStep):
    """The run's own step, measuring around every weight sync how far the vLLM engine's log-probs of
    its own samples are from the policy's: `gaps[version] = (just before, just after)`."""

    gaps: dict[int, tuple[float, float]] = {}
    engines: list[str] = []

    def __init__(self, plan, roles, pad_token_id: int, run_dir=None):
        super().__init__(plan, roles, pad_token_id, run_dir)
        tokenizer = AutoTokenizer.from_pretrained(plan.model)
        self.pad_id = tokenizer.pad_token_id
        self.probe = [{"prompt_ids": Template(tokenizer).encode_prompt([{"role": "user", "content": PROBLEM}])}]
        type(self).engines = ray.get([a.__ray_call__.remote(lambda actor: type(actor.engine).__name__)
                                      for a in roles["rollout"].actors])

    def sync_weights(self, version: int) -> float:
        before = self.logprob_gap()
        seconds = super().sync_weights(version)
        self.gaps[version] = (before, self.logprob_gap())
        return seconds

    def logprob_gap(self) -> float:
        rollout = self.roles["rollout"].actors[0]
        batch = ray.get(rollout.generate.remote(self.probe, SamplingParams(max_new_tokens=8, temperature=1.0, n=4), 0))
        rows = ray.put(sequences_batch(batch.prompt_ids, batch.completion_ids, self.pad_id))
        token_lp = ray.get(self.roles["policy"].call_all("compute_logprobs", rows))[0]  # ZeRO-3: every rank takes part
        policy = tokens_to_completion_values(token_lp, [len(p) for p in batch.prompt_ids],
                                             [len(c) for c in batch.completion_ids])
        engine = ray.get(rollout.sequence_logprobs.remote(batch.prompt_ids, batch.completion_ids))
        return max(abs(a - b) for pa, ea in zip(policy, engine) for a, b in zip(pa, ea))


@pytest.fixture(scope="module")
def vllm_run(ray_cluster, coin_flip_model: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: F811
    """The reference GRPO command with --use_vllm true, cut down for a CPU box; returns its run folder."""
    tmp = tmp_path_factory.mktemp("vllm_grpo")
    data = tmp / "numina.jsonl"  # NuminaMath-TIR's columns: problem, solution (with \boxed{})
    data.write_text(json.dumps({"problem": PROBLEM, "solution": "2 + 2 = 4, so $\\boxed{4}$."}) + "\n")
    words = shlex.split(REFERENCE_GRPO.replace("\\\n", " "))
    argv = words[words.index("swift") + 2:]
    # What changes for a CPU box: local model and data, two policy workers, one vLLM engine (one per
    # process), small counts. float32, so that vLLM and the policy agree to ATOL (bfloat16 rounding is
    # coarser); a learning rate that moves the weights visibly in one step (step 1's is 0: warmup).
    cut = {"--model": str(coin_flip_model), "--dataset": f"{data}#8", "--output_dir": str(tmp / "out"),
           "--torch_dtype": "float32", "--learning_rate": "1e-2", "--num_infer_workers": "1",
           "--num_generations": "4", "--max_completion_length": "16", "--vllm_max_model_len": "256"}
    for flag, value in cut.items():
        argv[argv.index(flag) + 1] = value
    argv[argv.index("--num_train_epochs"):argv.index("--num_train_epochs") + 2] = ["--max_steps", "2"]
    assert argv[argv.index("--use_vllm") + 1] == "true"
    mp = pytest.MonkeyPatch()
    mp.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    mp.setenv("NPROC_PER_NODE", "2")
    mp.setattr(rl, "RLStep", SyncCheckingStep)
    try:
        args = parse_args(RlhfArguments, argv)
        assert args.use_vllm and args.deepspeed == "zero3" and args.world_size == 2
        yield rl.run_rlhf(args)
    finally:
        mp.undo()


def test_reference_grpo_command_runs_with_vllm(vllm_run: Path):
    assert SyncCheckingStep.engines == ["VLLMEngine"]
    lines = [json.loads(x) for x in (vllm_run / "logging.jsonl").read_text().splitlines()]
    train = [line for line in lines if "train/loss" in line]
    assert [line["step"] for line in train] == [1, 2]
    assert all(math.isfinite(line["train/loss"]) for line in train)
    for line in train:  # the answers stop on <|im_end|>: nothing clipped, every completion carries loss
        assert line["train/completions/clipped_ratio"] == 0.0 and line["train/num_tokens"] > 0
    accuracy = [line["train/rewards/accuracy/mean"] for line in train]
    assert all(0.0 < a < 1.0 for a in accuracy), accuracy  # right and wrong answers: non-zero advantages
    completions = [json.loads(x) for x in (vllm_run / "completions.jsonl").read_text().splitlines()]
    assert len(completions) == 8 and {c["completion"] for c in completions} <= set(ANSWERS)
    assert (vllm_run / "checkpoint-2").is_dir()


def test_vllm_logprobs_equal_the_policy_after_every_sync(vllm_run: Path):
    gaps = SyncCheckingStep.gaps
    assert sorted(gaps) == [0, 1, 2]  # the start, then once per step
    assert all(after < ATOL for _, after in gaps.values()), gaps
    assert gaps[2][0] > 10 * ATOL, gaps  # step 2 trained: an engine left on the old weights would show
