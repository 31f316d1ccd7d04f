"""What a dataset-fed algorithm's rows are, and how they become each optimizer step's micro-batches.

An algorithm names its kind (`Algorithm.dataset_kind`); the dataset loop (controller/sft.py) asks the
kind to read, encode and batch the rows:

    kind    rows (normalize)                         one unit                 rows of a micro-batch of B
    sft     SFT formats (formats.normalize_row)      a sample (or a pack)     B
    pairs   preference pairs (normalize_pair_row)    (chosen, rejected)       2B: chosen_0, rejected_0, ...
    kto     KTO rows with `label`                    an example               2B: example_0, its KL row, ...

`--per_device_train_batch_size` counts units, as in ms-swift and TRL (a DPO batch of 4 is 4 pairs). A
pair's rows, and a KTO example's, share their prompt, so prompt sharing computes it once, and they always
travel in one micro-batch. Every micro-batch of a step carries the step's global counts (`num_pairs_global`,
`num_chosen_tokens_global`, `num_examples_global`), which the losses divide by.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from datasets import Dataset

from swiftray.data.batching import GroupBatcher, StepBatcher, eval_batches, group_eval_batches
from swiftray.data.formats import normalize_row
from swiftray.data.packing import IGNORE_INDEX
from swiftray.data.pipeline import encode_dataset
from swiftray.data.preference import (
    add_kto_kl_completions,
    encode_preference_dataset,
    kto_batch,
    normalize_kto_row,
    normalize_pair_row,
    preference_batch,
)
from swiftray.data.template import Template


def _trained(labels: list[int]) -> int:
    return sum(1 for label in labels if label != IGNORE_INDEX)


class SFTData:
    """Supervised samples: one row each (packed with --packing)."""

    name = "sft"
    normalize: Callable[..., dict[str, Any]] = staticmethod(normalize_row)

    def encode(self, ds: Dataset, template: Template, *, num_proc: int, name: str) -> list[dict[str, Any]]:
        return encode_dataset(ds, template, num_proc=num_proc, name=name)

    def prepare(self, samples: list[dict[str, Any]], batch: Any, max_length: int | None) -> list[dict[str, Any]]:
        """The samples as the batcher and annotators see them (KTO adds each example's KL completion)."""
        return samples

    def batcher(self, samples: list[dict[str, Any]], batch: Any, *, pad_token_id: int, seed: int, shuffle: bool,
                packing: bool, max_length: int | None, attn_impl: str | None) -> StepBatcher:
        return StepBatcher(samples, micro_batch_size=batch.micro_batch_size, world_size=batch.world_size,
                           accumulation=batch.accumulation, pad_token_id=pad_token_id, seed=seed, shuffle=shuffle,
                           packing=packing, max_length=max_length, attn_impl=attn_impl)

    def eval_batches(self, samples: list[dict[str, Any]], batch: Any, pad_token_id: int) -> list[list[dict]]:
        return eval_batches(samples, batch_size=batch.eval_batch_size, world_size=batch.world_size,
                            pad_token_id=pad_token_id)


class PairData(SFTData):
    """Preference pairs (DPO, ORPO, SimPO, CPO, RM): rows chosen, rejected, chosen, rejected, ..."""

    name = "pairs"
    normalize = staticmethod(normalize_pair_row)

    @staticmethod
    def collate(samples: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
        return preference_batch(samples, pad_token_id)

    @staticmethod
    def step_counts(samples: list[dict[str, Any]]) -> dict[str, int]:
        return {"num_pairs_global": len(samples),
                "num_chosen_tokens_global": sum(_trained(s["chosen_labels"]) for s in samples)}

    def encode(self, ds: Dataset, template: Template, *, num_proc: int, name: str) -> list[dict[str, Any]]:
        return encode_preference_dataset(ds, template, kind=self.name, num_proc=num_proc, name=name)

    def batcher(self, samples: list[dict[str, Any]], batch: Any, *, pad_token_id: int, seed: int, shuffle: bool,
                packing: bool, max_length: int | None, attn_impl: str | None) -> StepBatcher:
        # --packing does not apply: a group's rows already share their prompt (prompt sharing).
        return GroupBatcher(samples, collate_fn=self.collate, step_counts=self.step_counts,
                            micro_batch_size=batch.micro_batch_size, world_size=batch.world_size,
                            accumulation=batch.accumulation, pad_token_id=pad_token_id, seed=seed, shuffle=shuffle,
                            max_length=max_length, attn_impl=attn_impl)

    def eval_batches(self, samples: list[dict[str, Any]], batch: Any, pad_token_id: int) -> list[list[dict]]:
        return group_eval_batches(samples, batch_size=batch.eval_batch_size, world_size=batch.world_size,
                                  pad_token_id=pad_token_id, collate_fn=self.collate, step_counts=self.step_counts)


class KTOData(PairData):
    """KTO examples (a completion labelled desirable or not): rows example, its KL completion, ...

    Each example's KL completion (for KTO's reference point) is another example's, rotated within runs
    of one optimizer step's examples (the global batch, as ms-swift does) once, before training, so that
    it is the same every epoch and can be scored once with --precompute_ref_log_probs."""

    name = "kto"
    normalize = staticmethod(normalize_kto_row)

    @staticmethod
    def collate(samples: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
        return kto_batch(samples, pad_token_id)

    @staticmethod
    def step_counts(samples: list[dict[str, Any]]) -> dict[str, int]:
        return {"num_examples_global": len(samples)}

    def prepare(self, samples: list[dict[str, Any]], batch: Any, max_length: int | None) -> list[dict[str, Any]]:
        if batch.samples_per_optimizer_step < 2:
            from swiftray.arguments import ArgumentError

            raise ArgumentError("KTO: a step of 1 example has no other completion for the KL estimate; raise "
                                "--per_device_train_batch_size (or --gradient_accumulation_steps) so that a step "
                                "holds at least 2")
        return add_kto_kl_completions(samples, batch.samples_per_optimizer_step, max_length)


DATASET_KINDS: dict[str, SFTData] = {"sft": SFTData(), "pairs": PairData(), "kto": KTOData()}


def dataset_kind(name: str) -> SFTData:
    if name not in DATASET_KINDS:
        raise ValueError(f"dataset_kind {name!r}: expected one of {', '.join(DATASET_KINDS)}")
    return DATASET_KINDS[name]
