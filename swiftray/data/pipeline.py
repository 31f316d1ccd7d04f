"""Flags to tokenised samples: load, normalise, split, encode with the template (cached by `datasets`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from datasets import Dataset

from swiftray.data.formats import normalize_row
from swiftray.data.loader import load_datasets, split_train_val
from swiftray.data.template import SampleTooLongError, Template

logger = logging.getLogger("swiftray")


def load_train_val(data: Any, *, allow_no_response: bool = False, required_columns: tuple[str, ...] = (),
                   normalize: Callable[..., dict[str, Any]] = normalize_row) -> tuple[Dataset, Dataset | None]:
    """Normalised rows from the run plan's data section (--dataset / --val_dataset / --split_dataset_ratio);
    `normalize` reads a row (preference.normalize_pair_row / normalize_kto_row for preference data)."""
    common = dict(seed=data.seed, columns=dict(data.columns) or None, num_proc=data.num_proc,
                  allow_no_response=allow_no_response, strict=data.strict, normalize=normalize,
                  required_columns=list(required_columns),
                  model_name=list(data.model_name) if data.model_name else None,
                  model_author=list(data.model_author) if data.model_author else None)
    train = load_datasets(list(data.dataset), shuffle=data.shuffle, **common)
    val = load_datasets(list(data.val_dataset), shuffle=False, **common) if data.val_dataset else None
    if val is None and data.split_dataset_ratio > 0:
        train, val = split_train_val(train, data.split_dataset_ratio, seed=data.seed)
    return train, val


def make_template(tokenizer: Any, plan: Any) -> Template:
    """The chat template and loss-mask rules of the run plan's template section."""
    return Template(tokenizer, default_system=plan.system, max_length=plan.max_length,
                    truncation_strategy=plan.truncation_strategy, loss_scale=plan.loss_scale)


def encode_dataset(ds: Dataset, template: Template, *, num_proc: int = 1,
                   name: str = "train") -> list[dict[str, list[int]]]:
    """Tokenise every row through `datasets.map`; rows over max_length are skipped with a logged count."""

    def encode(row: dict[str, Any]) -> dict[str, Any]:
        try:
            out = template.encode(row["messages"])
        except SampleTooLongError:
            return {"input_ids": [], "labels": [], "too_long": True}
        return {"input_ids": out["input_ids"], "labels": out["labels"], "too_long": False}

    encoded = ds.map(encode, num_proc=num_proc if num_proc > 1 else None,
                     remove_columns=ds.column_names, desc=f"tokenising {name}")
    too_long = sum(encoded["too_long"])
    if too_long:
        logger.warning("skipped %d of %d %s samples longer than --max_length %s "
                       "(--truncation_strategy delete; use left or right to keep them)",
                       too_long, len(encoded), name, template.max_length)
    no_loss = 0
    samples = []
    for row in encoded:
        if row["too_long"]:
            continue
        if all(label == -100 for label in row["labels"]):
            no_loss += 1  # nothing to learn from: every label masked by --loss_scale
            continue
        samples.append({"input_ids": row["input_ids"], "labels": row["labels"]})
    if no_loss:
        logger.warning("skipped %d %s samples with no loss tokens under --loss_scale", no_loss, name)
    return samples
