"""The bad-input corpus: every case is a command a user could type, and each must end the same way.

    exit code 2, one line `swiftray CMD: error: ...` last on the console, naming the file (and line),
    field or flag at fault and what was expected; no traceback; nothing written (no run folder, and
    the corpus, the model and every checkpoint byte-identical after the run); Ray never started.

Cases run in-process through `swiftray.cli.main` (the subprocess start-up alone takes seconds); a few
run as real `python -m swiftray` processes, to see the console a user sees. The `--print_plan true`
in most commands means a case that slipped past the checks would print a plan and exit 0, not train.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from swiftray.cli import main

SFT = "sft --model $M --dataset $D/good.jsonl --output_dir $O --print_plan true"
GRPO = "rlhf --rlhf_type grpo --reward_funcs accuracy " + SFT[4:]
DPO = "rlhf --rlhf_type dpo " + SFT[4:]


@dataclass
class Case:
    id: str
    argv: str  # $D: the corpus folder, $M: the tiny model, $O: the output folder (must stay absent)
    expect: tuple[str, ...]  # substrings of the one error line
    env: dict[str, str] = field(default_factory=dict)


CASES = [
    # ----------------------------------------------------------------------------------------- data
    Case("data-missing-file", f"{SFT} --dataset $D/nope.jsonl", ("nope.jsonl", "not found", "use local files")),
    Case("data-malformed-line-strict", f"{SFT} --dataset $D/bad_line.jsonl --strict true",
         ("bad_line.jsonl line 2", "malformed JSON", "expected one JSON object per line")),
    Case("data-every-line-malformed", f"{SFT} --dataset $D/all_bad.jsonl",
         ("all_bad.jsonl", "no valid rows", "all_bad.jsonl line 1: malformed JSON")),
    Case("data-empty-file", f"{SFT} --dataset $D/empty.jsonl", ("empty.jsonl", "holds no rows")),
    Case("data-no-messages-column", f"{SFT} --dataset $D/no_messages.jsonl",
         ("no_messages.jsonl line 1", "'<columns>'", "expected 'messages'")),
    Case("data-wrong-role", f"{SFT} --dataset $D/wrong_role.jsonl --strict true",
         ("wrong_role.jsonl line 1", "messages[0].role", "'robot'", "expected one of system, user, assistant")),
    Case("data-not-utf8", f"{SFT} --dataset $D/latin1.jsonl", ("latin1.jsonl line 2", "not UTF-8")),
    Case("data-unsupported-file-type", f"{SFT} --dataset $D/data.txt",
         ("data.txt", "unsupported file type '.txt'", ".jsonl")),
    Case("data-sample-suffix-zero", f"{SFT} --dataset $D/good.jsonl#0", ("good.jsonl#0", "'#N' must be a positive")),
    Case("data-json-list-malformed", f"{SFT} --dataset $D/bad_list.json",
         ("bad_list.json line 1, column", "malformed JSON")),
    Case("data-val-dataset-missing", f"{SFT} --val_dataset $D/nope_val.jsonl", ("nope_val.jsonl", "not found")),
    Case("data-preference-no-rejected", f"{DPO} --strict true",
         ("good.jsonl line 1", "field 'rejected_response'", "expected a 'rejected_response'")),
    Case("data-kto-label-not-boolean", f"{DPO} --rlhf_type kto --dataset $D/kto_label.jsonl --strict true",
         ("kto_label.jsonl line 1", "field 'label'", "'maybe'", "expected a boolean")),
    # ---------------------------------------------------------------------------------------- flags
    Case("flag-unknown", f"{SFT} --datset x", ("unknown flag --datset", "did you mean --dataset?")),
    Case("flag-batch-size-zero", f"{SFT} --per_device_train_batch_size 0",
         ("--per_device_train_batch_size 0", "expected an integer >= 1")),
    Case("flag-accumulation-zero", f"{SFT} --gradient_accumulation_steps 0",
         ("--gradient_accumulation_steps 0", ">= 1")),
    Case("flag-save-steps-zero", f"{SFT} --save_steps 0", ("--save_steps 0", ">= 1")),
    Case("flag-learning-rate-negative", f"{SFT} --learning_rate -1", ("--learning_rate -1", "a number > 0")),
    Case("flag-epochs-negative", f"{SFT} --num_train_epochs -2", ("--num_train_epochs -2", "> 0")),
    Case("flag-lora-rank-zero", f"{SFT} --lora_rank 0", ("--lora_rank 0", ">= 1")),
    Case("flag-dtype-choice", f"{SFT} --torch_dtype float7", ("--torch_dtype float7", "one of bfloat16")),
    Case("flag-scheduler-choice", f"{SFT} --lr_scheduler_type foo", ("--lr_scheduler_type foo", "cosine")),
    Case("flag-bool-value", f"{SFT} --packing maybe", ("--packing", "expected true or false, got 'maybe'")),
    Case("flag-int-value", f"{SFT} --save_steps abc", ("--save_steps", "invalid int value: 'abc'")),
    Case("flag-max-steps-zero", f"{SFT} --max_steps 0", ("--max_steps 0", "positive number of steps")),
    Case("flag-deepspeed-zero1-refused", f"{SFT} --deepspeed zero1", ("--deepspeed 'zero1'", "zero2, zero3")),
    Case("flag-streaming-refused", f"{SFT} --streaming true", ("--streaming true", "not supported")),
    Case("flag-vllm-server-refused", f"{GRPO} --vllm_mode server", ("--vllm_mode server", "not supported")),
    Case("flag-seq-kd-refused", "rlhf --rlhf_type gkd --teacher_model $M " + SFT[4:] + " --seq_kd true",
         ("--seq_kd true", "not supported")),
    Case("flag-deepspeed-and-fsdp", f"{SFT} --deepspeed zero2 --fsdp full_shard",
         ("--deepspeed and --fsdp are alternatives",)),
    Case("flag-split-ratio-one", f"{SFT} --split_dataset_ratio 1", ("--split_dataset_ratio 1.0", "< 1.0")),
    Case("flag-nccl-on-cpu", f"{SFT} --ddp_backend nccl", ("--ddp_backend nccl needs GPUs",)),
    Case("flag-columns-not-json", SFT + " --columns {oops", ("--columns '{oops'", "expected a JSON object")),
    Case("flag-rlhf-type-unknown", f"{GRPO} --rlhf_type nosuch", ("--rlhf_type 'nosuch'", "registered: cpo")),
    Case("flag-num-generations-one", f"{GRPO} --num_generations 1", ("--num_generations 1", ">= 2")),
    Case("flag-nproc-env", SFT, ("NPROC_PER_NODE='two'", "expected a positive integer"),
         env={"NPROC_PER_NODE": "two"}),
    # -------------------------------------------------------------------------------------- configs
    Case("config-deepspeed-missing-file", f"{SFT} --deepspeed $D/nope_ds.json",
         ("--deepspeed", "nope_ds.json", "or a JSON config file")),
    Case("config-deepspeed-bad-json", f"{SFT} --deepspeed $D/ds_broken.json",
         ("--deepspeed", "ds_broken.json", "not valid JSON", "line 1 column")),
    Case("config-fsdp-unknown-option", f"{SFT} --fsdp full_shard,bogus", ("--fsdp", "unknown option 'bogus'")),
    Case("config-fsdp-offload-on-cpu", f"{SFT} --fsdp offload", ("--fsdp offload", "needs GPUs")),
    Case("config-file-missing", f"sft $D/nope.yaml {SFT[4:]}", ("config file", "nope.yaml: not found")),
    Case("config-file-invalid-yaml", f"sft $D/broken.yaml {SFT[4:]}",
         ("broken.yaml: not valid YAML", "line 2, column 11", "mapping values are not allowed")),
    Case("config-file-invalid-json", f"sft $D/broken_cfg.json {SFT[4:]}",
         ("broken_cfg.json: not valid JSON", "line 1 column")),
    Case("config-file-unknown-field", f"sft $D/unknown_field.yaml {SFT[4:]}",
         ("unknown_field.yaml", "unknown field 'modle'", "did you mean 'model'")),
    Case("config-file-wrong-type", f"sft $D/wrong_type.yaml {SFT[4:]}",
         ("wrong_type.yaml", "field 'lora_rank'", "'eight'")),
    Case("config-file-not-a-mapping", f"sft $D/list.yaml {SFT[4:]}",
         ("list.yaml", "expected a mapping of flag names")),
    Case("config-template-unknown", f"{SFT} --template nosuch_template",
         ("--template 'nosuch_template'", "unknown template name")),
    # --------------------------------------------------------------------------------------- models
    Case("model-missing-folder", f"{SFT} --model $D/no_model", ("--model", "no_model", "no such folder")),
    Case("model-no-config", f"{SFT} --model $D/no_config", ("--model", "no_config", "no config.json there")),
    Case("model-config-not-json", f"{SFT} --model $D/bad_config_model",
         ("--model", "bad_config_model/config.json", "not valid JSON")),
    Case("model-truncated-safetensors", f"{SFT} --model $D/truncated_model",
         ("--model", "truncated_model/model.safetensors", "not a valid safetensors file")),
    Case("model-type-mismatch", f"{SFT} --model_type llama",
         ("--model_type llama", "says model_type 'qwen3'", "a llama checkpoint")),
    Case("model-adapters-missing", f"{SFT} --adapters $D/no_adapter", ("--adapters", "no_adapter", "no such folder")),
    Case("model-adapters-not-lora", f"{SFT} --adapters $M", ("--adapters", "no adapter_config.json")),
    Case("model-adapters-with-full", f"{SFT} --train_type full --adapters $D/adapter",
         ("--adapters", "takes one LoRA folder", "got --train_type full")),
    Case("model-adapters-other-base", f"{SFT} --adapters $D/adapter_other_base",
         ("--adapters", "adapter_other_base: does not fit", "output size 64, the base model's", "trained on another model")),
    Case("model-ref-adapters-other-base", f"{DPO} --ref_adapters $D/adapter_other_base",
         ("--ref_adapters", "adapter_other_base: does not fit", "trained on another model")),
    Case("model-infer-adapters-other-base",
         "infer --model $M --adapters $D/adapter_other_base --val_dataset $D/good.jsonl --result_path $O/r.jsonl",
         ("--adapters", "adapter_other_base: does not fit", "trained on another model")),
    Case("model-liger-without-gpu", "sft --model $M --dataset $D/good.jsonl --output_dir $O --use_liger_kernel true",
         ("--use_liger_kernel true: needs GPUs",)),
    Case("model-qlora-without-gpu", "sft --model $M --dataset $D/good.jsonl --output_dir $O --train_type qlora",
         ("--train_type qlora: needs GPUs",)),
    Case("model-ref-model-missing", f"{DPO} --ref_model $D/no_ref", ("--ref_model", "no_ref", "no such folder")),
    Case("model-teacher-missing", "rlhf --rlhf_type gkd --teacher_model $D/no_teacher " + SFT[4:],
         ("--teacher_model", "no_teacher", "no such folder")),
    # ---------------------------------------------------------------------------------- checkpoints
    Case("ckpt-missing-folder", f"{SFT} --resume_from_checkpoint $D/no_ckpt",
         ("--resume_from_checkpoint", "no_ckpt", "no such folder")),
    Case("ckpt-missing-folder-no-model",
         "sft --dataset $D/good.jsonl --output_dir $O --print_plan true --resume_from_checkpoint $D/no_ckpt",
         ("--resume_from_checkpoint", "no_ckpt", "no such folder")),
    Case("ckpt-pickle-refused", f"{SFT} --resume_from_checkpoint $D/ckpt_pickle",
         ("ckpt_pickle", "rank_0.pt", "pickle format", "not loaded because unpickling can run code")),
    Case("ckpt-pickle-refused-no-model",
         "sft --dataset $D/good.jsonl --output_dir $O --print_plan true --resume_from_checkpoint $D/ckpt_pickle",
         ("ckpt_pickle", "rank_0.pt", "not loaded because unpickling can run code")),
    Case("ckpt-other-model", f"{SFT} --train_type full --resume_from_checkpoint $D/ckpt_other_model",
         ("--resume_from_checkpoint", "ckpt_other_model", "another model", "hidden_size 64", "has 128")),
    Case("ckpt-lora-rank-differs", f"{SFT} --resume_from_checkpoint $D/ckpt_lora_r16",
         ("ckpt_lora_r16", "rank 16", "--lora_rank is 8")),
    Case("ckpt-weights-only", f"{SFT} --resume_from_checkpoint $D/ckpt_weights_only",
         ("ckpt_weights_only/train_state/train_state.json: missing", "--save_only_model")),
    Case("ckpt-part-missing", f"{SFT} --resume_from_checkpoint $D/ckpt_no_optimizer",
         ("ckpt_no_optimizer/train_state/optimizer.safetensors: missing", "incomplete")),
    Case("ckpt-truncated-part", f"{SFT} --resume_from_checkpoint $D/ckpt_truncated",
         ("ckpt_truncated/train_state/trainable.safetensors", "not a valid safetensors file")),
    Case("ckpt-no-trainer-state", f"{SFT} --resume_from_checkpoint $D/ckpt_no_trainer_state",
         ("ckpt_no_trainer_state", "no trainer_state.json there")),
    # ------------------------------------------------------------------------------------- plug-ins
    Case("plugin-missing-file", f"{GRPO} --external_plugins $D/plugins/nope.py",
         ("--external_plugins", "no such file", "nope.py")),
    Case("plugin-raises-on-import", f"{GRPO} --external_plugins $D/plugins/raises.py",
         ("--external_plugins", "raises.py failed", "RuntimeError: plugin boom", "(line 3)")),
    Case("plugin-syntax-error", f"{GRPO} --external_plugins $D/plugins/syntax.py",
         ("--external_plugins", "syntax.py failed", "SyntaxError", "line 1")),
    Case("plugin-missing-module", f"{GRPO} --external_plugins $D/plugins/missing_module.py",
         ("--external_plugins", "missing_module.py failed", "no_such_module_xyz", "(line 2)")),
    Case("plugin-ms-swift-import", f"{GRPO} --external_plugins $D/plugins/ms_swift.py",
         ("ms_swift.py failed", "import ORM, AsyncORM and orms from swiftray.rewards")),
    Case("plugin-dataset-algorithm-raises", f"{DPO} --external_plugins $D/plugins/raises.py",
         ("raises.py failed", "RuntimeError: plugin boom")),
    # -------------------------------------------------------------------------------------- rewards
    Case("reward-unknown-name", f"{GRPO} --reward_funcs accuracy nosuch",
         ("--reward_funcs nosuch", "unknown reward function", "registered: accuracy")),
    Case("reward-weights-count", f"{GRPO} --reward_funcs accuracy format --reward_weights 1",
         ("--reward_weights has 1 values", "--reward_funcs names 2 functions")),
    Case("reward-weights-count-with-model", f"{GRPO} --reward_model $M --reward_weights 1",
         ("--reward_weights has 1 values", "--reward_model 1 models")),
    Case("reward-model-missing-folder", f"{GRPO} --reward_model $D/no_rm",
         ("--reward_model", "no_rm", "no config.json or adapter_config.json")),
    Case("reward-timeout-zero", f"{GRPO} --reward_timeout 0", ("--reward_timeout 0", "> 0")),
    Case("reward-nonfinite-choice", f"{GRPO} --nonfinite_reward skip",
         ("--nonfinite_reward skip", "one of error, missing")),
]
# Also run as real processes: the console a user sees, with nothing of pytest's in between.
SUBPROCESS_CASES = ("flag-unknown", "ckpt-pickle-refused", "plugin-raises-on-import")


class CreatesFile:
    """Unpickling this runs `open(path, "w")`: the stand-in for the code a crafted pickle runs."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _train_state(folder: Path, *, parts: tuple[str, ...] = ("trainable", "optimizer", "rng_rank_0")) -> None:
    """A swiftray training state (JSON and safetensors) of one tiny tensor: enough for every check
    made before Ray starts."""
    import torch
    from safetensors.torch import save_file

    (folder / "train_state").mkdir(parents=True)
    meta = {"format": "swiftray.train_state", "version": 1, "global_step": 2, "world_size": 1, "param_groups": [],
            "scheduler": {}}
    (folder / "train_state" / "train_state.json").write_text(json.dumps(meta))
    for part in parts:
        save_file({"x": torch.zeros(2)}, str(folder / "train_state" / f"{part}.safetensors"))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 2}))


def _checkpoint(root: Path, name: str, model: Path, **kw) -> Path:
    folder = root / name
    _train_state(folder, **kw)
    (folder / "args.json").write_text(json.dumps({"model": str(model), "train_type": "lora"}))
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_model_dir) -> Path:
    d = tmp_path_factory.mktemp("bad_input")
    turn = '[{"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"}]'
    good = f'{{"messages": {turn}}}\n'
    (d / "good.jsonl").write_text(good * 2)
    (d / "bad_line.jsonl").write_text(good + '{"messages": [oops\n')
    (d / "all_bad.jsonl").write_text("not json\n[1, 2]\n")
    (d / "empty.jsonl").write_text("")
    (d / "no_messages.jsonl").write_text('{"foo": 1}\n')
    (d / "wrong_role.jsonl").write_text(good.replace('"user"', '"robot"'))
    (d / "latin1.jsonl").write_bytes(good.encode() + good.replace("2+2", "caf\xe9").encode("latin-1"))
    (d / "data.txt").write_text("hello\n")
    (d / "bad_list.json").write_text('[{"messages": [], }]\n')
    (d / "kto_label.jsonl").write_text(f'{{"messages": {turn}, "label": "maybe"}}\n')
    (d / "ds_broken.json").write_text('{"zero_optimization": {"stage": 2,}}')
    (d / "broken.yaml").write_text("model: m\ndataset: a: b\n")
    (d / "broken_cfg.json").write_text('{"model": }')
    (d / "unknown_field.yaml").write_text("modle: x\n")
    (d / "wrong_type.yaml").write_text("lora_rank: eight\n")
    (d / "list.yaml").write_text("- a\n- b\n")
    plugins = d / "plugins"
    plugins.mkdir()
    (plugins / "raises.py").write_text('"""A plug-in that fails while it is imported."""\n\nraise RuntimeError("plugin boom")\n')
    (plugins / "syntax.py").write_text("def f(:\n    pass\n")
    (plugins / "missing_module.py").write_text('"""Needs a package that is not installed."""\nimport no_such_module_xyz\n')
    (plugins / "ms_swift.py").write_text("from swift.plugin import ORM\n")
    # Models
    (d / "no_config").mkdir()
    (d / "no_config" / "README.md").write_text("not a model\n")
    shutil.copytree(tiny_model_dir, d / "bad_config_model")
    (d / "bad_config_model" / "config.json").write_text("{not json")
    shutil.copytree(tiny_model_dir, d / "truncated_model")
    weights = d / "truncated_model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (d / "adapter").mkdir()
    (d / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    # A real LoRA adapter of another base (hidden size 64, the tiny model's 128)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from swiftray.models.tiny import make_tiny_model

    make_tiny_model(d / "other_base", hidden_size=64, num_heads=2, num_kv_heads=1, head_dim=32)
    get_peft_model(AutoModelForCausalLM.from_pretrained(d / "other_base"),
                   LoraConfig(r=8, target_modules="all-linear")).save_pretrained(d / "adapter_other_base")
    # Checkpoints
    legacy = d / "ckpt_pickle"
    legacy.mkdir()
    for name in ("rank_0.pt", "rank_1.pt"):
        with open(legacy / name, "wb") as f:
            pickle.dump({"scheduler": CreatesFile(str(d / "PICKLE_RAN"))}, f)
    (legacy / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    (legacy / "args.json").write_text(json.dumps({"model": str(tiny_model_dir)}))
    other = _checkpoint(d, "ckpt_other_model", tiny_model_dir)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))
    lora = _checkpoint(d, "ckpt_lora_r16", tiny_model_dir)
    (lora / "adapter_config.json").write_text(json.dumps({"r": 16, "lora_alpha": 32, "peft_type": "LORA"}))
    weights_only = d / "ckpt_weights_only"
    weights_only.mkdir()
    (weights_only / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    (weights_only / "args.json").write_text(json.dumps({"model": str(tiny_model_dir)}))
    _checkpoint(d, "ckpt_no_optimizer", tiny_model_dir, parts=("trainable", "rng_rank_0"))
    truncated = _checkpoint(d, "ckpt_truncated", tiny_model_dir)
    part = truncated / "train_state" / "trainable.safetensors"
    part.write_bytes(part.read_bytes()[:-4])
    _checkpoint(d, "ckpt_no_trainer_state", tiny_model_dir).joinpath("trainer_state.json").unlink()
    return d


def digest(*roots: Path) -> dict[str, str]:
    """Every file under `roots` (Python's bytecode caches aside) -> its content hash."""
    out = {}
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def expand(case: Case, corpus: Path, model: Path, out: Path) -> list[str]:
    subs = {"$D": str(corpus), "$M": str(model), "$O": str(out)}
    argv = []
    for token in case.argv.split():
        for key, value in subs.items():
            token = token.replace(key, value)
        argv.append(token)
    return argv


def check_console(case: Case, code: object, console: str, corpus: Path) -> None:
    assert code == 2, f"exit code {code}, expected 2:\n{console[-3000:]}"
    assert "Traceback" not in console, console[-3000:]
    lines = [line for line in console.splitlines() if line.strip()]
    last = lines[-1]
    # The message is the last line and starts there: so it is one line.
    assert last.startswith(f"swiftray {case.argv.split()[0]}: error: "), console[-3000:]
    assert sum(": error: " in line for line in lines) == 1, console[-3000:]
    for text in case.expect:
        assert text.replace("$D", str(corpus)) in last, f"{text!r} not in the error line: {last}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_before_anything_starts(case, corpus, tiny_model_dir, tmp_path, capsys, monkeypatch):
    for name in ("RAY_ADDRESS", "SWIFTRAY_DEBUG", "NPROC_PER_NODE", "NNODES", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
    started = []  # the session's Ray may already run (other tests): watch for a start instead

    def no_ray(*args, **kwargs):
        started.append(args)
        raise AssertionError("Ray was started before the bad input was refused")

    for module in ("swiftray.cluster", "swiftray.controller.common", "swiftray.megatron.sft"):
        monkeypatch.setattr(f"{module}.init_ray", no_ray)
    out = tmp_path / "out"
    before = digest(corpus, tiny_model_dir)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(expand(case, corpus, tiny_model_dir, out))
    captured = capsys.readouterr()
    check_console(case, exit_info.value.code, captured.out + captured.err, corpus)
    assert not out.exists(), f"{out} was created: {list(out.rglob('*'))}"
    assert digest(corpus, tiny_model_dir) == before  # no checkpoint, model or data file touched
    assert not (corpus / "PICKLE_RAN").exists()  # no pickle was loaded
    assert not started


@pytest.mark.parametrize("case_id", SUBPROCESS_CASES)
def test_bad_input_on_the_real_console(case_id, corpus, tiny_model_dir, tmp_path):
    case = next(c for c in CASES if c.id == case_id)
    out = tmp_path / "out"
    before = digest(corpus, tiny_model_dir)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "SWIFTRAY_DEBUG")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-m", "swiftray", *expand(case, corpus, tiny_model_dir, out)],
                            capture_output=True, text=True, env=env, timeout=300)
    check_console(case, result.returncode, result.stdout + result.stderr, corpus)
    assert not out.exists()
    assert digest(corpus, tiny_model_dir) == before
    assert not (corpus / "PICKLE_RAN").exists()


def test_corpus_covers_every_kind_of_input():
    kinds = {}
    for case in CASES:
        kinds[case.id.split("-")[0]] = kinds.get(case.id.split("-")[0], 0) + 1
    assert set(kinds) == {"data", "flag", "config", "model", "ckpt", "plugin", "reward"}
    assert len(CASES) >= 40 and min(kinds.values()) >= 5, kinds
    assert len({c.id for c in CASES}) == len(CASES)
