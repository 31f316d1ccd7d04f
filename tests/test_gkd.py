"""GKD (issue 13), without Ray: the teacher actor's log-probs, the student's loss from the rows
make_experience lays out (whole vocabulary and top-k) against a float64 re-statement of the
generalised JSD, the per-step data source, and the dataset responses that off-policy steps train on."""

from __future__ import annotations

import math
import random

import pytest
import torch

from swiftray.actors.configs import TeacherConfig
from swiftray.algorithms.gkd import GKD
from swiftray.algorithms.gkd_math import gkd_data_source
from swiftray.experience import RolloutBatch, split_for_ranks
from swiftray.models.generation import SamplingParams

torch.set_num_threads(1)


def rollouts(seed: int, n: int = 4, vocab: int = 1500) -> RolloutBatch:
    rng = random.Random(seed)
    prompts = [[rng.randrange(1, vocab) for _ in range(rng.randint(2, 5))] for _ in range(n)]
    completions = [[rng.randrange(1, vocab) for _ in range(rng.randint(1, 6))] for _ in range(n)]
    return RolloutBatch(prompts, completions, ["x"] * n, [False] * n, list(range(n)), {}, 0)


@pytest.fixture(scope="module")
def teacher(tiny_model_dir):
    from swiftray.actors.teacher import TeacherActor

    actor = TeacherActor()
    actor.setup(TeacherConfig(model_dir=str(tiny_model_dir), torch_dtype="float32", batch_size=3))
    return actor


def test_teacher_writes_each_completion_tokens_log_probs(teacher):
    batch = teacher.annotate(rollouts(0))
    full = batch.annotations["teacher_logprobs"]
    for b, (prompt, completion) in enumerate(zip(batch.prompt_ids, batch.completion_ids)):
        with torch.no_grad():  # the sequence alone, unpadded: position P-1+t predicts completion token t
            logits = teacher.model(input_ids=torch.tensor([prompt + completion])).logits[0].double()
        expected = torch.log_softmax(logits[len(prompt) - 1:len(prompt) - 1 + len(completion)], dim=-1)
        assert full[b].shape == expected.shape
        assert torch.allclose(full[b].double(), expected, atol=1e-4)
    teacher.cfg = TeacherConfig(model_dir=teacher.cfg.model_dir, topk=5, batch_size=3)
    top = teacher.annotate(rollouts(0))
    for values, ids, whole in zip(top.annotations["teacher_logprobs"], top.annotations["teacher_token_ids"], full):
        assert values.shape == ids.shape == (whole.shape[0], 5) and ids.dtype == torch.int32
        assert torch.allclose(values, whole.topk(5, dim=-1).values, atol=1e-6)
        assert torch.equal(whole.gather(-1, ids.long()), values)


def jsd64(student: list[float], teacher: list[float], beta: float, temperature: float) -> float:
    """The generalised JSD of one position from logits (both renormalised over the given entries)."""
    def softmax(x):
        top = max(v / temperature for v in x)
        e = [math.exp(v / temperature - top) for v in x]
        return [v / sum(e) for v in e]

    s, t = softmax(student), softmax(teacher)
    kl = lambda p, q: sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q) if a > 0)  # noqa: E731
    if beta == 0:
        return kl(t, s)
    if beta == 1:
        return kl(s, t)
    m = [(1 - beta) * a + beta * b for a, b in zip(s, t)]
    return beta * kl(t, m) + (1 - beta) * kl(s, m)


@pytest.mark.parametrize("topk,beta", [(None, 0.5), (None, 0.0), (7, 0.5), (7, 1.0)])
def test_student_loss_is_the_generalised_jsd_over_the_steps_tokens(topk, beta):
    vocab, temperature, sft_alpha = 40, 0.9, 0.3
    gen = torch.Generator().manual_seed(1)
    batch = rollouts(2, n=4, vocab=vocab)
    teacher_logits = [torch.randn(len(c), vocab, generator=gen) for c in batch.completion_ids]
    teacher_logprobs = [torch.log_softmax(t, -1) for t in teacher_logits]
    if topk:
        tops = [t.topk(topk, dim=-1) for t in teacher_logprobs]
        batch.annotations["teacher_logprobs"] = [t.values for t in tops]
        batch.annotations["teacher_token_ids"] = [t.indices.to(torch.int32) for t in tops]
    else:
        batch.annotations["teacher_logprobs"] = teacher_logprobs
    batch.annotations["from_dataset"] = [True, False, True, False]
    gkd = GKD(beta=beta, temperature=temperature, sft_alpha=sft_alpha)
    rows = gkd.make_experience(batch, pad_token_id=0)
    student_logits = [torch.randn(len(c), vocab, generator=gen, dtype=torch.float64) for c in batch.completion_ids]
    num_tokens = sum(len(c) for c in batch.completion_ids)

    total, expected_jsd, expected_nll = 0.0, 0.0, 0.0
    for micro in split_for_ranks(rows, 2, 1)[0] + split_for_ranks(rows, 2, 1)[1]:
        b = next(i for i, p in enumerate(batch.prompt_ids) if micro["prompt_lens"][0] == len(p)
                 and micro["input_ids"][0, :len(p)].tolist() == p)
        mask = micro["labels"][:, 1:] != -100
        logits = student_logits[b].float().requires_grad_(True)  # [N, V] in the mask's order, as the actor hands it
        token_logprobs = torch.zeros(mask.shape).masked_scatter(
            mask, torch.log_softmax(logits, -1).gather(-1, torch.tensor(batch.completion_ids[b])[:, None])[:, 0])
        loss, metrics = gkd.loss(token_logprobs, {**micro, "logits": logits}, num_tokens)
        loss.backward()
        assert logits.grad is not None and logits.grad.abs().sum() > 0
        total += float(loss.detach())
        for t in range(len(batch.completion_ids[b])):
            s, te = student_logits[b][t].tolist(), teacher_logits[b][t].tolist()
            if topk:
                ids = teacher_logprobs[b][t].topk(topk).indices.tolist()
                s, te = [s[i] for i in ids], [te[i] for i in ids]
            expected_jsd += jsd64(s, te, beta, temperature) / num_tokens
            if batch.annotations["from_dataset"][b]:
                logp = torch.log_softmax(student_logits[b][t], -1)[batch.completion_ids[b][t]]
                expected_nll -= float(logp) / num_tokens
    assert total == pytest.approx(expected_jsd + sft_alpha * expected_nll, rel=1e-4)


def test_steps_train_on_student_samples_with_probability_lmbda():
    sampling = SamplingParams(max_new_tokens=8, temperature=0.9)
    gkd = GKD(lmbda=0.5, seed=41)
    sources = [gkd_data_source(step, lmbda=0.5, seed=41) for step in range(1, 201)]
    assert sources[:2] == ["dataset", "student"] and 0.4 < sources.count("student") / 200 < 0.6
    for step, source in enumerate(sources[:20], start=1):
        assert gkd.step_sampling(step, sampling).from_dataset == (source == "dataset")
    assert gkd.uses_dataset_responses and not GKD(lmbda=1.0).uses_dataset_responses
    assert not any(GKD(lmbda=1.0).step_sampling(s, sampling).from_dataset for s in range(1, 50))


def test_off_policy_rows_are_the_dataset_responses_as_the_template_lays_them_out(tiny_model_dir):
    from swiftray.actors.rollout import dataset_responses
    from swiftray.controller.rl_data import encode_prompts
    from swiftray.data.loader import load_datasets
    from swiftray.data.template import Template
    from swiftray.models.loader import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    template = Template(tokenizer)
    ds = load_datasets(["swiftray/arithmetic#8"], shuffle=False)
    rows = encode_prompts(ds, template, with_responses=True)
    for row, original in zip(rows, ds):
        encoded = template.encode(original["messages"])
        assert encoded["input_ids"][:len(row["prompt_ids"])] == row["prompt_ids"]
        labelled = [tok for tok, lab in zip(encoded["input_ids"], encoded["labels"]) if lab != -100]
        assert row["response_ids"] == labelled  # exactly the tokens SFT trains on
        assert original["messages"][-1]["content"] in tokenizer.decode(row["response_ids"])
    completions = dataset_responses(rows, max_new_tokens=5)
    assert [c.token_ids for c in completions] == [r["response_ids"][:5] for r in rows]
    assert {c.finish_reason for c in completions} == {"length"}
    with pytest.raises(ValueError, match="no dataset response"):
        dataset_responses([{"prompt_ids": [1], "messages": [{"role": "user", "content": "q"}]}], 5)
