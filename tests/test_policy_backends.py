"""PolicyActor on Ray (CPU, gloo): N ranks on any backend train like one process does.

The reference is a plain training loop in this process (AdamW, clipping, warmup +
cosine LR, token-mean cross-entropy) over the same global batches; 2-rank DDP, FSDP2,
ZeRO-2 and ZeRO-3 must reproduce its losses, and resuming from a checkpoint must
reproduce an uninterrupted run exactly.
"""

from __future__ import annotations

import json
import math

import pytest
import ray
import torch
from _ray import ray_cluster  # noqa: F401  (session fixture)
from safetensors.torch import load_file

from swiftray.actors.group import ActorGroup
from swiftray.actors.policy import PolicyActor
from swiftray.algorithms.sft import SFT
from swiftray.models.token_stats import token_logprobs

torch.set_num_threads(1)
STEPS, SEQS, SEQ_LEN, VOCAB = 5, 4, 16, 300
SAVE_AFTER = 3  # steps before the checkpoint in the resume check
TRAIN = dict(learning_rate=2e-3, weight_decay=0.1, warmup_ratio=0.2, total_steps=STEPS,
             max_grad_norm=1.0, lr_scheduler_type="cosine", seed=7)


class CrossEntropyLoss:
    """Token-mean cross-entropy over the global batch, as swiftray's SFT algorithm defines it."""

    def __call__(self, token_logprobs, batch, num_tokens_global):
        loss = -(token_logprobs * batch["loss_mask"]).sum() / num_tokens_global
        return loss, {"nll_sum": -token_logprobs.sum().item()}


def make_batches(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """STEPS global batches: a masked prompt, random lengths (right padding), uneven loss tokens."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(STEPS):
        ids = torch.randint(0, VOCAB, (SEQS, SEQ_LEN), generator=gen)
        lengths = torch.randint(6, SEQ_LEN + 1, (SEQS,), generator=gen)
        prompt = torch.randint(1, 5, (SEQS,), generator=gen)
        pos = torch.arange(SEQ_LEN)
        attention = (pos < lengths[:, None]).long()
        labels = ids.masked_fill((pos < prompt[:, None]) | (attention == 0), -100)
        batches.append({"input_ids": ids, "attention_mask": attention, "labels": labels})
    return batches


def split(batch: dict, parts: int) -> list[dict]:
    size = SEQS // parts
    return [{k: v[i * size:(i + 1) * size] for k, v in batch.items()} for i in range(parts)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("tiny_qwen3")
    Qwen3ForCausalLM(config).save_pretrained(path)
    return str(path)


def make_group_batches(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """GRPO-shaped batches: rows 2k and 2k+1 share a prompt (with `prompt_lens`, so the policy may
    compute it once), labels on the completions only, completions of random lengths."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(STEPS):
        prompts = [torch.randint(0, VOCAB, (int(torch.randint(7, 10, (1,), generator=gen)),), generator=gen)
                   for _ in range(SEQS // 2)]
        rows = [(prompts[i // 2], torch.randint(0, VOCAB, (int(torch.randint(2, 7, (1,), generator=gen)),),
                                                 generator=gen)) for i in range(SEQS)]
        ids = torch.zeros((SEQS, SEQ_LEN), dtype=torch.long)
        labels = torch.full((SEQS, SEQ_LEN), -100)
        attention = torch.zeros((SEQS, SEQ_LEN), dtype=torch.long)
        for i, (prompt, completion) in enumerate(rows):
            n = len(prompt) + len(completion)
            ids[i, :n] = torch.cat([prompt, completion])
            labels[i, len(prompt):n] = completion
            attention[i, :n] = 1
        batches.append({"input_ids": ids, "attention_mask": attention, "labels": labels,
                        "prompt_lens": torch.tensor([len(p) for p, _ in rows])})
    return batches


@pytest.fixture(scope="module")
def reference(model_dir):
    return reference_run(model_dir, make_batches())


def reference_run(model_dir: str, batches: list[dict[str, torch.Tensor]]) -> dict:
    """The 1-process loop written out (padded rows): losses, grad norms, and weights after SAVE_AFTER steps."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim >= 2], "weight_decay": TRAIN["weight_decay"]},
         {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
        lr=TRAIN["learning_rate"])
    warmup = math.ceil(TRAIN["warmup_ratio"] * STEPS)

    def lr_at(step):
        if step < warmup:
            return step / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (STEPS - warmup)))

    out = {"loss": [], "grad_norm": [], "logprobs0": None}
    for step, batch in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = TRAIN["learning_rate"] * lr_at(step)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
        targets = batch["labels"][:, 1:]
        mask = targets != -100
        token_lp = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * mask
        if step == 0:
            out["logprobs0"] = token_lp.detach().float()
            out["acc0"] = ((logits[:, :-1].argmax(-1) == targets) & mask).sum().item() / mask.sum().item()
        loss = -token_lp.sum() / mask.sum()
        loss.backward()
        out["grad_norm"].append(torch.nn.utils.clip_grad_norm_(params, TRAIN["max_grad_norm"]).item())
        out["loss"].append(loss.item())
        optimizer.step()
        optimizer.zero_grad()
        if step + 1 == SAVE_AFTER:
            out["weights"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return out


@pytest.fixture(scope="module")
def pair(ray_cluster):  # noqa: F811
    group = ActorGroup(PolicyActor, 2, num_cpus_per_worker=1, name="policy_pair")
    yield group
    group.shutdown()


@pytest.fixture(scope="module")
def single(ray_cluster):  # noqa: F811
    group = ActorGroup(PolicyActor, 1, num_cpus_per_worker=1, name="policy_single")
    yield group
    group.shutdown()


def run_steps(group: ActorGroup, steps: range, micro_per_rank: int = 1, batches: list | None = None,
              loss_fn=None) -> list[dict]:
    """Train `steps` of make_batches(), each global batch split evenly over ranks and micro-batches;
    by default with swiftray's own SFT loss, so that its global-token normaliser is under test too."""
    loss_fn, metrics = loss_fn or SFT().loss, []
    batches = batches or make_batches()
    for step in steps:
        shards = split(batches[step], group.num_workers * micro_per_rank)
        per_rank = [[ray.put(m) for m in shards[r * micro_per_rank:(r + 1) * micro_per_rank]]
                    for r in range(group.num_workers)]
        results = ray.get(group.call_all_ranked("train_step", per_rank, loss_fn))
        assert results[0] == results[-1]  # every rank reports the same global metrics
        metrics.append(results[0])
    return metrics


def export(group: ActorGroup, **kwargs) -> dict[str, torch.Tensor]:
    """export_weights on all ranks; rank 0's buckets joined (and checked to respect bucket_bytes)."""
    refs = group.get_all("export_weights", **kwargs)
    assert all(r == [] for r in refs[1:])
    buckets = ray.get(refs[0])
    limit = kwargs.get("bucket_bytes", 64 << 20)
    sizes = [sum(t.numel() * t.element_size() for t in b.values()) for b in buckets]
    largest = max(t.numel() * t.element_size() for b in buckets for t in b.values())
    assert all(size < limit + largest for size in sizes) and all(size >= limit for size in sizes[:-1])
    return {k: v for bucket in buckets for k, v in bucket.items()}


# name: (config, micro-batches per rank); alternating 1 and 2 covers gradient accumulation's sync path.
BACKENDS = {
    "ddp": ({"backend": "ddp"}, 1),
    "fsdp2": ({"backend": "fsdp2"}, 2),
    "zero2": ({"backend": "deepspeed", "deepspeed": "zero2"}, 1),
    "zero3": ({"backend": "deepspeed", "deepspeed": "zero3"}, 2),
}


@pytest.mark.parametrize("name", list(BACKENDS))
def test_two_ranks_match_reference_and_resume_exactly(pair, model_dir, reference, tmp_path, name):
    backend, micro = BACKENDS[name]
    config = {"model_dir": model_dir, **TRAIN, **backend}
    pair.get_all("setup", config)
    first = run_steps(pair, range(SAVE_AFTER), micro)
    weights = export(pair, bucket_bytes=32 << 10)  # the tiny model is ~0.3 MB: several buckets
    pair.get_all("save_checkpoint", str(tmp_path))
    rest = run_steps(pair, range(SAVE_AFTER, STEPS), micro)

    metrics = first + rest
    torch.testing.assert_close([m["loss"] for m in metrics], reference["loss"], rtol=1e-4, atol=0)
    torch.testing.assert_close([m["grad_norm"] for m in metrics], reference["grad_norm"], rtol=1e-4, atol=0)
    assert metrics[0]["lr"] == 0.0 and metrics[1]["lr"] == pytest.approx(TRAIN["learning_rate"])
    assert metrics[0]["num_tokens"] == int((make_batches()[0]["labels"][:, 1:] != -100).sum())
    # The gathered (FSDP2 / ZeRO-3: unsharded) weights equal the reference's and the saved file.
    torch.testing.assert_close(weights, reference["weights"], rtol=1e-3, atol=1e-5)
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert saved.keys() == weights.keys()
    assert all(torch.equal(saved[k], weights[k]) for k in saved)

    pair.get_all("setup", config)
    assert pair.get_all("load_checkpoint", str(tmp_path)) == [SAVE_AFTER] * 2
    resumed = run_steps(pair, range(SAVE_AFTER, STEPS), micro)
    assert [m["loss"] for m in resumed] == [m["loss"] for m in rest]
    assert [m["grad_norm"] for m in resumed] == [m["grad_norm"] for m in rest]
    # The LR schedule resumed too (loss and grad norm are measured before each update, so a
    # schedule restarted at step 0 would show only from the second resumed step on, in the loss).
    assert [m["lr"] for m in resumed] == [m["lr"] for m in rest] and rest[0]["lr"] > rest[1]["lr"] > 0


@pytest.mark.parametrize("name", ["ddp", "zero3"])
def test_shared_prompts_train_like_padded_rows(pair, model_dir, name):
    """Rows sharing a prompt go through models/prompt_sharing.py in the policy; the losses and grad
    norms must still be the padded 1-process loop's."""
    from transformers import AutoModelForCausalLM

    from swiftray.models.prompt_sharing import shared_forward

    batches = make_group_batches()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    num_params = sum(p.numel() for p in model.parameters())
    half = {k: v[:SEQS // 2] for k, v in batches[0].items()}  # what one rank gets: one prompt, 2 completions
    assert shared_forward(lambda x: model(**x).logits, half, model, num_params) is not None, "sharing not used"

    backend, _ = BACKENDS[name]
    pair.get_all("setup", {"model_dir": model_dir, **TRAIN, **backend})
    metrics = run_steps(pair, range(STEPS), 1, batches)
    want = reference_run(model_dir, batches)
    torch.testing.assert_close([m["loss"] for m in metrics], want["loss"], rtol=1e-4, atol=0)
    torch.testing.assert_close([m["grad_norm"] for m in metrics], want["grad_norm"], rtol=1e-4, atol=0)


def test_token_logprobs_and_accuracy_match_float64_formula():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 7, generator=gen)
    labels = torch.tensor([[-100, 3, 1, -100, 6], [-100, -100, 2, 2, 0]])
    logprobs, mask, correct = token_logprobs(logits, labels)
    for b in range(2):
        for t in range(4):
            target = labels[b, t + 1].item()
            expected = 0.0 if target == -100 else torch.log_softmax(logits[b, t].double(), -1)[target].item()
            assert logprobs[b, t].item() == pytest.approx(expected, abs=1e-6)
            assert mask[b, t].item() == (target != -100)
    hits = sum(int(logits[b, t].argmax() == labels[b, t + 1]) for b in range(2) for t in range(4))
    assert correct.item() == hits


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_one_rank_accumulation_matches_full_batch(single, model_dir, reference, micro_batches):
    """1 rank: 2 accumulated micro-batches of 2 == one batch of 4 == the reference loop."""
    single.get_all("setup", {"model_dir": model_dir, **TRAIN})
    batch0 = make_batches()[0]
    logprobs = ray.get(single.call_rank(0, "compute_logprobs", ray.put(batch0)))
    torch.testing.assert_close(logprobs, reference["logprobs0"], rtol=1e-4, atol=1e-5)
    evaluated = single.get_all("eval_step", split(batch0, 2), CrossEntropyLoss())[0]
    assert evaluated["loss"] == pytest.approx(reference["loss"][0], rel=1e-5)
    assert evaluated["token_acc"] == pytest.approx(reference["acc0"])

    metrics = run_steps(single, range(STEPS), micro_per_rank=micro_batches, loss_fn=CrossEntropyLoss())
    torch.testing.assert_close([m["loss"] for m in metrics], reference["loss"], rtol=1e-5, atol=0)
    torch.testing.assert_close([m["grad_norm"] for m in metrics], reference["grad_norm"], rtol=1e-5, atol=0)
    # loss_fn metrics are averaged over micro-batches: sum of NLL / micro-batches
    nll = -reference["logprobs0"].double().sum().item()
    assert metrics[0]["nll_sum"] == pytest.approx(nll / micro_batches, rel=1e-4)


def test_bad_micro_batches_fail_clearly(pair, model_dir):
    pair.get_all("setup", {"model_dir": model_dir, **TRAIN})
    shards = split(make_batches()[0], 4)
    for ref in pair.call_all_ranked("train_step", [shards[:2], shards[2:3]], CrossEntropyLoss()):
        with pytest.raises(ray.exceptions.RayTaskError, match="different numbers of micro-batches"):
            ray.get(ref)
    for ref in pair.call_all("train_step", [{"ids": shards[0]["input_ids"]}], CrossEntropyLoss()):
        with pytest.raises(ray.exceptions.RayTaskError, match=r"micro-batch 0 must be a dict with an 'input_ids'"):
            ray.get(ref)


@pytest.mark.parametrize(("train_type", "backend"), [("lora", "ddp"), ("dora", "fsdp2"), ("lora", "deepspeed")])
def test_lora_trains_only_the_adapter(pair, model_dir, tmp_path, train_type, backend):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = {"model_dir": model_dir, **TRAIN, "backend": backend, "deepspeed": "zero3",
              "train_type": train_type, "lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.1}
    counts = pair.get_all("setup", config)[0]
    run_steps(pair, range(2))
    pair.get_all("save_checkpoint", str(tmp_path / "ckpt"))
    pair.get_all("save_checkpoint", str(tmp_path / "weights_only"), save_only_model=True)
    adapter = export(pair, merge_lora=False)
    merged = export(pair)
    after = run_steps(pair, range(2, 4))

    saved = load_file(str(tmp_path / "ckpt" / "adapter_model.safetensors"))
    assert not (tmp_path / "ckpt" / "model.safetensors").exists()
    assert saved.keys() == adapter.keys() and all(torch.equal(saved[k], adapter[k]) for k in saved)
    assert all(".lora_" in k for k in saved)
    assert sum(v.numel() for v in saved.values()) == counts["num_trainable_params"] < counts["num_params"]
    assert all(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # B starts at zero: it trained

    # Base weights stayed frozen: PEFT's own merge of (untouched base + saved adapter) == exported weights.
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    expected = PeftModel.from_pretrained(base, str(tmp_path / "ckpt")).merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    torch.testing.assert_close(merged, dict(expected), rtol=1e-5, atol=1e-6)

    for ref in pair.call_all("load_checkpoint", str(tmp_path / "weights_only")):
        with pytest.raises(ray.exceptions.RayTaskError, match="save_only_model"):
            ray.get(ref)
    # Resuming restores adapter, optimizer and the dropout RNG: the same losses, bit for bit.
    pair.get_all("setup", config)
    pair.get_all("load_checkpoint", str(tmp_path / "ckpt"))
    assert run_steps(pair, range(2, 4)) == after


# --- in-process pieces: loader, LoRA merge, LR schedule, DeepSpeed config -------------------


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_merge_matches_peft_merge_and_unload(model_dir, use_dora):
    import copy

    from swiftray.models.loader import load_model, peft_to_base_state_dict

    model = load_model(model_dir, train_type="dora" if use_dora else "lora", lora_rank=4, lora_alpha=16,
                       target_modules=["q_proj", "down_proj"], modules_to_save=["lm_head"])
    assert model.peft_config["default"].use_dora == use_dora
    with torch.no_grad():  # make the adapter non-trivial: B starts at zero, magnitudes at ||W||
        for name, param in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.1)
    merged = peft_to_base_state_dict(model, model.state_dict())
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    torch.testing.assert_close(merged, dict(expected), rtol=1e-5, atol=1e-6)


def test_loader_dtype_trainable_params_and_clear_errors(model_dir, tmp_path):
    from swiftray.models.loader import load_model

    full = load_model(model_dir, torch_dtype="bfloat16", attn_impl="eager", gradient_checkpointing=True)
    assert {p.dtype for p in full.parameters()} == {torch.bfloat16}
    assert all(p.requires_grad for p in full.parameters()) and full.is_gradient_checkpointing
    lora = load_model(model_dir, train_type="lora", lora_rank=2)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert not any("lm_head" in n for n in trainable)  # all-linear leaves the output head alone

    with pytest.raises(RuntimeError, match="qlora.*needs .*(bitsandbytes|CUDA GPU)"):
        load_model(model_dir, train_type="qlora")
    with pytest.raises(RuntimeError, match="flash_attn.*needs .*(flash-attn|CUDA GPU)"):
        load_model(model_dir, attn_impl="flash_attn")
    with pytest.raises(RuntimeError, match="use_liger_kernel needs .*(liger-kernel|CUDA GPU)"):
        load_model(model_dir, use_liger_kernel=True)
    with pytest.raises(ValueError, match="train_type='adapter'"):
        load_model(model_dir, train_type="adapter")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "missing"))


def test_loader_continues_a_saved_adapter(model_dir, tmp_path):
    from swiftray.models.loader import load_model

    first = load_model(model_dir, train_type="lora", lora_rank=2, target_modules=["v_proj"], seed=1)
    with torch.no_grad():
        for name, param in first.named_parameters():
            if "lora_B" in name:
                param.normal_()
    first.save_pretrained(tmp_path)
    again = load_model(model_dir, train_type="lora", adapters=[str(tmp_path)], lora_rank=8, seed=2)
    expected = {k: v for k, v in first.state_dict().items() if "lora_" in k}
    got = {k: v for k, v in again.state_dict().items() if "lora_" in k}
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    assert all(p.requires_grad for n, p in again.named_parameters() if "lora_" in n)
    with pytest.raises(ValueError, match="train_type lora/dora/qlora"):
        load_model(model_dir, train_type="full", adapters=[str(tmp_path)])


def test_load_tokenizer_adds_pad_token(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from swiftray.models.loader import load_tokenizer

    vocab = {"<eos>": 0, "a": 1, "b": 2, "[UNK]": 3}
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
                                   eos_token="<eos>")
    fast.save_pretrained(tmp_path)
    tokenizer = load_tokenizer(str(tmp_path))
    assert tokenizer.pad_token == "<eos>" and tokenizer.pad_token_id == 0


def test_lr_schedule_matches_transformers():
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    from swiftray.actors.policy import lr_lambda

    for kind, reference_fn in (("cosine", get_cosine_schedule_with_warmup),
                               ("linear", get_linear_schedule_with_warmup)):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = reference_fn(opt, num_warmup_steps=3, num_training_steps=20)
        ours = lr_lambda(kind, 3, 20)
        for step in range(22):
            assert ours(step) == pytest.approx(scheduler.get_last_lr()[0], abs=1e-12), (kind, step)
            opt.step()
            scheduler.step()


def test_policy_config_rejects_unknown_fields():
    from swiftray.actors.policy import PolicyConfig

    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['learning_rat'\]"):
        PolicyConfig.from_dict({"model_dir": "m", "learning_rat": 1.0})
    with pytest.raises(ValueError, match="backend='megatron-lm'"):
        PolicyConfig.from_dict({"model_dir": "m", "backend": "megatron-lm"})
    config = PolicyConfig.from_dict({"model_dir": "m", "warmup_ratio": 0.1, "total_steps": 25})
    assert config.num_warmup_steps() == 3
    config = PolicyConfig.from_dict({"model_dir": "m", "warmup_ratio": 0.1, "warmup_steps": 5, "total_steps": 25})
    assert config.num_warmup_steps() == 5


def test_deepspeed_config_from_preset_and_json(tmp_path):
    from swiftray.actors.backends.deepspeed import build_ds_config

    preset = build_ds_config("zero3_offload", world_size=4, max_grad_norm=0.5, dtype=torch.bfloat16, on_cpu=True)
    assert preset["zero_optimization"]["stage"] == 3
    assert preset["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": False}
    assert preset["train_batch_size"] == 4 and preset["gradient_clipping"] == 0.5
    assert preset["bf16"]["enabled"] and not preset["fp16"]["enabled"]

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_clipping": "auto",
                                "train_micro_batch_size_per_gpu": "auto", "optimizer": {"type": "AdamW"},
                                "bf16": {"enabled": "auto"}}))
    loaded = build_ds_config(str(path), world_size=2, max_grad_norm=1.0, dtype=torch.float32, on_cpu=True)
    assert "optimizer" not in loaded and loaded["gradient_clipping"] == 1.0
    assert loaded["train_micro_batch_size_per_gpu"] == 1 and loaded["bf16"]["enabled"] is False
    with pytest.raises(ValueError, match="deepspeed='zero4'"):
        build_ds_config("zero4", world_size=1, max_grad_norm=1.0, dtype=torch.float32, on_cpu=True)
