"""Load ``--dataset`` specs into one normalised ``datasets.Dataset``.

A spec is ms-swift's ``path[:subset][#N]``: a local ``.json``/``.jsonl``/``.csv``/``.parquet``
file, a folder written by ``datasets.save_to_disk`` (the subset picks the split) or a built-in
name (``swift/self-cognition``, ``swiftray/arithmetic``; the subset picks the variant, several
may be joined by ``/``). ``#N`` samples N rows: fewer than the dataset holds gives a seeded
random subset, more gives the whole set repeated ``N // size`` times plus a seeded random
remainder.

Each dataset is normalised row by row (:func:`swiftray.data.formats.normalize_row`) before it
is sampled, so that errors point at the file's own lines; then all are concatenated, with the
columns one dataset lacks filled with None.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import datasets
import numpy as np

from swiftray.data.builtin import builtin_names, is_builtin, load_builtin
from swiftray.data.formats import FORMAT_COLUMNS, DatasetFormatError, location, normalize_row
from swiftray.data.preference import PREFERENCE_COLUMNS

logger = logging.getLogger("swiftray")

_ERROR = "__swiftray_error__"
_REASON = "__swiftray_error_reason__"
_FILE_KINDS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class DatasetSpec:
    """One parsed ``--dataset`` value."""

    path: str
    subsets: list[str] | None = None
    sample: int | None = None


def parse_dataset_spec(spec: str) -> DatasetSpec:
    """``path[:subset[/subset2]][#N]`` -> DatasetSpec. An existing path is never split at ':'."""
    body, sample = spec.strip(), None
    match = re.fullmatch(r"(.*)#(\d+)", body)
    if match:
        body, sample = match.group(1), int(match.group(2))
        if sample <= 0:
            raise ValueError(f"dataset spec {spec!r}: '#N' must be a positive row count, got {sample}")
    subsets = None
    if not os.path.exists(body) and ":" in body:
        body, subset_part = body.rsplit(":", 1)
        subsets = [s for s in subset_part.split("/") if s]
    if not body:
        raise ValueError(f"dataset spec {spec!r} has no path or name")
    return DatasetSpec(body, subsets or None, sample)


# --------------------------------------------------------------------------- reading sources


def _read_text(path: str) -> str:
    """A text data file as UTF-8 (a BOM allowed); a byte that is not UTF-8 is named with its line."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DatasetFormatError(
            f"{path} line {line}: byte {raw[e.start:e.start + 1]!r} is not UTF-8 ({e.reason}); expected a UTF-8 "
            "text file", "not UTF-8",
        ) from None


def _check_json_file(path: str, strict: bool) -> tuple[str, list[int] | None, list[str]]:
    """Validate a .json/.jsonl file ourselves, since ``datasets``' parse errors name no line.

    Returns the file to load (a cleaned copy when bad lines were skipped), the 1-based line of
    each row (None for a JSON list) and where each skipped malformed line is.
    """
    text = _read_text(path)
    if path.endswith(".json") and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetFormatError(
                f"{path} line {e.lineno}, column {e.colno}: malformed JSON: {e.msg}", "malformed JSON"
            ) from e
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise DatasetFormatError(
                    f"{location(path, i)}, field '<row>': expected a JSON object per row, "
                    f"got {type(row).__name__}",
                    "malformed JSON",
                )
        if not rows:
            raise DatasetFormatError(f"{path}: the file holds no rows", "empty file")
        return path, None, []

    if path.endswith(".json") and len(text.strip().splitlines()) > 1:
        try:  # a pretty-printed single object would otherwise read as a malformed line 1
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, dict):
            raise DatasetFormatError(
                f"{path} line 1, field '<file>': one JSON object spans the file; expected a JSON list of "
                "rows or one JSON object per line",
                "malformed JSON",
            )
    good_lines, kept, bad = [], [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            problem = None if isinstance(row, dict) else f"expected a JSON object, got {type(row).__name__}"
        except json.JSONDecodeError as e:
            problem = f"malformed JSON at column {e.colno}: {e.msg}"
        if problem is not None:
            if strict:
                raise DatasetFormatError(
                    f"{path} line {lineno}, field '<line>': {problem}; expected one JSON object per line",
                    "malformed JSON",
                )
            bad.append(f"{path} line {lineno}: {problem}")
            continue
        good_lines.append(lineno)
        kept.append(line)
    if not kept:
        detail = f" ({len(bad)} malformed lines; first: {bad[0]})" if bad else ""
        raise DatasetFormatError(f"{path}: the file holds no {'valid ' if bad else ''}rows{detail}", "empty file")
    if bad:
        clean = os.path.join(tempfile.mkdtemp(prefix="swiftray-data-"), "clean.jsonl")
        with open(clean, "w", encoding="utf-8") as f:
            f.write("\n".join(kept) + "\n")
        path = clean
    return path, good_lines, bad


def _load_file(path: str, kind: str, shown_as: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(kind, data_files=path, split="train")
    except Exception as e:  # datasets' own messages rarely name the file; add it
        raise DatasetFormatError(f"{shown_as}: could not be read as {kind}: {e}", "unreadable file") from e


def _load_saved(path: str, subsets: list[str] | None) -> datasets.Dataset:
    loaded = datasets.load_from_disk(path, keep_in_memory=True)
    if isinstance(loaded, datasets.Dataset):
        if subsets:
            raise ValueError(f"{path}: a saved Dataset has no splits, but subsets {subsets} were asked for")
        return loaded
    splits = list(loaded.keys())
    chosen = subsets or (["train"] if "train" in splits else splits[:1] if len(splits) == 1 else None)
    if chosen is None:
        raise ValueError(f"{path}: holds splits {splits}; pick one with '{path}:SPLIT'")
    missing = [s for s in chosen if s not in splits]
    if missing:
        raise ValueError(f"{path}: no split {missing}; it holds {splits}")
    return datasets.concatenate_datasets([loaded[s] for s in chosen])


def _load_source(spec: DatasetSpec, strict: bool, model_name, model_author):
    """-> (raw dataset, 1-based line per row or None, where each skipped malformed line is)."""
    path = spec.path
    if os.path.isfile(path):
        ext = os.path.splitext(path)[1].lower()
        if ext not in _FILE_KINDS:
            raise ValueError(f"{path}: unsupported file type {ext!r}; expected one of {sorted(_FILE_KINDS)}")
        if spec.subsets:
            raise ValueError(f"{path}: a single file has no subsets, but {spec.subsets} were asked for")
        if _FILE_KINDS[ext] == "json":
            to_load, lines, bad = _check_json_file(path, strict)
            ds = _load_file(to_load, "json", path)
            if to_load != path:  # the cleaned copy lives on in datasets' cache; drop ours
                shutil.rmtree(os.path.dirname(to_load), ignore_errors=True)
            return ds, lines, bad
        return _load_file(path, _FILE_KINDS[ext], path), None, []
    if os.path.isdir(path):
        if not any(os.path.exists(os.path.join(path, f)) for f in ("dataset_info.json", "dataset_dict.json")):
            raise ValueError(f"{path}: a folder must be written by datasets' save_to_disk")
        return _load_saved(path, spec.subsets), None, []
    if is_builtin(path):
        rows = load_builtin(path, spec.subsets, model_name=model_name, model_author=model_author)
        return datasets.Dataset.from_list(rows), None, []
    raise ValueError(
        f"dataset {path!r} not found: not a file, a save_to_disk folder, or a built-in "
        f"({', '.join(builtin_names())}); no hub is reachable, so use local files"
    )


# --------------------------------------------------------------------------- normalising


def _normalize_one(
    row: dict,
    index: int,
    *,
    source: str,
    lines: list[int] | None,
    allow_no_response: bool,
    required_columns: tuple[str, ...],
    normalize: Callable[..., dict[str, Any]] = normalize_row,
) -> dict:
    """datasets.map worker: never raises, so that errors survive num_proc > 1 intact."""
    line = lines[index] if lines is not None else None
    try:
        out = normalize(row, source=source, index=index, line=line, allow_no_response=allow_no_response)
        for col in required_columns:
            if col in row and col not in out:
                out[col] = row[col]  # a reward needs it even though the format also read it
            if out.get(col) is None:
                raise DatasetFormatError(
                    f"{location(source, index, line)}, field '{col}': missing required column '{col}' "
                    f"(a reward or trainer reads it); use --columns to rename an existing column",
                    "missing column",
                )
        error, reason = "", ""
    except DatasetFormatError as e:
        # A well-typed placeholder keeps Arrow's inferred schema stable; the row is dropped later.
        out, error, reason = {"messages": [{"role": "user", "content": ""}]}, e.message, e.reason
        for key in getattr(normalize, "added_columns", ()):  # every row must carry the same keys
            out[key] = None
    for key in row:  # map keeps columns the worker leaves out: blank the ones a format consumed
        out.setdefault(key, None)
    out[_ERROR], out[_REASON] = error, reason
    return out


def _skip_summary(source: str, reasons: Counter, where: list[str]) -> str:
    """How many rows were skipped and why, and where the first few are (file, line, field)."""
    detail = ", ".join(f"{n} {r}" for r, n in reasons.most_common())
    shown = "; ".join(where[:3]) + (f"; and {len(where) - 3} more" if len(where) > 3 else "")
    return (f"skipped {sum(reasons.values())} rows of {source} ({detail}): {shown}. "
            "Pass --strict true to stop at the first bad row instead")


def _normalize(
    ds: datasets.Dataset,
    *,
    source: str,
    lines: list[int] | None,
    bad_lines: list[str],
    strict: bool,
    allow_no_response: bool,
    required_columns: tuple[str, ...],
    num_proc: int,
    normalize: Callable[..., dict[str, Any]] = normalize_row,
) -> datasets.Dataset:
    fn = partial(
        _normalize_one,
        source=source,
        lines=lines,
        allow_no_response=allow_no_response,
        required_columns=required_columns,
        normalize=normalize,
    )
    procs = max(1, min(num_proc, len(ds) // 64))  # worker start-up outweighs tiny shards
    # In-memory sources (built-ins, save_to_disk folders) stay in memory: no cache files in user folders.
    mapped = ds.map(
        fn,
        with_indices=True,
        num_proc=procs if procs > 1 else None,
        keep_in_memory=ds.cache_files == [],
        desc=f"normalising {os.path.basename(source)}",
    )
    reasons = mapped[_REASON]
    bad = [i for i, r in enumerate(reasons) if r]
    if bad and strict:
        raise DatasetFormatError(mapped[bad[0]][_ERROR], reasons[bad[0]])
    skipped = Counter(reasons[i] for i in bad)
    if bad_lines:
        skipped["malformed JSON"] += len(bad_lines)
    where = list(bad_lines) + [mapped[i][_ERROR] for i in bad[:3]]
    if bad:
        bad_set = set(bad)
        mapped = mapped.select([i for i in range(len(mapped)) if i not in bad_set])
    if skipped:
        if len(mapped) == 0:
            raise DatasetFormatError(
                f"all rows of {source} are bad: {_skip_summary(source, skipped, where)}", "empty file"
            )
        logger.warning(_skip_summary(source, skipped, where))
    mapped = mapped.remove_columns([_ERROR, _REASON])
    # A format column that every row consumed is now all None: drop it.
    empty = [
        c
        for c in (*FORMAT_COLUMNS, *PREFERENCE_COLUMNS)
        if c in mapped.column_names and c != "messages" and all(v is None for v in mapped[c])
    ]
    mapped = mapped.remove_columns(empty)
    return mapped.select_columns(["messages"] + [c for c in mapped.column_names if c != "messages"])


# --------------------------------------------------------------------------- sampling, joining


def sample_rows(
    ds: datasets.Dataset, n: int | None, rng: np.random.RandomState, shuffle: bool = True
) -> datasets.Dataset:
    """``#N``: repeat the whole set ``n // len`` times, then add ``n % len`` rows drawn without
    replacement (seeded); with ``shuffle=False`` the remainder is the first rows instead."""
    if n is None:
        return ds
    repeats, remainder = divmod(n, len(ds))
    index = np.tile(np.arange(len(ds)), repeats)
    if remainder:
        extra = rng.permutation(len(ds))[:remainder] if shuffle else np.arange(remainder)
        index = np.concatenate([index, extra])
    return ds.select(index.tolist())


def _concatenate(parts: list[datasets.Dataset], names: list[str]) -> datasets.Dataset:
    if len(parts) == 1:
        return parts[0]
    all_columns = list(dict.fromkeys(c for ds in parts for c in ds.column_names))
    filled = []
    for ds in parts:
        for col in all_columns:
            if col not in ds.column_names:
                ds = ds.add_column(col, [None] * len(ds))  # null type: aligns with any other type
        filled.append(ds.select_columns(all_columns))
    try:
        return datasets.concatenate_datasets(filled)
    except ValueError as e:
        clashes = [
            f"{c}: " + " vs ".join(f"{n}={ds.features[c]}" for n, ds in zip(names, filled))
            for c in all_columns
            if len({str(ds.features[c]) for ds in filled if str(ds.features[c]) != "Value('null')"}) > 1
        ]
        raise ValueError(f"datasets cannot be joined, column types differ: {'; '.join(clashes) or e}") from e


def load_datasets(
    specs: list[str],
    *,
    seed: int = 42,
    columns: dict | str | None = None,
    num_proc: int = 1,
    shuffle: bool = True,
    allow_no_response: bool = False,
    strict: bool = True,
    required_columns: list[str] = (),
    model_name: list[str] | None = None,
    model_author: list[str] | None = None,
    normalize: Callable[..., dict[str, Any]] = normalize_row,
) -> datasets.Dataset:
    """Load, normalise, sample and concatenate ``specs``; see the module docstring.

    ``columns`` renames raw columns first ({"old": "new"} or its JSON string). ``strict=False``
    drops bad rows and logs a count per reason instead of raising. ``required_columns`` makes a
    row without that column an error. ``model_name``/``model_author`` fill self-cognition.
    ``normalize`` reads one row (``formats.normalize_row``; ``preference.normalize_pair_row`` or
    ``normalize_kto_row`` for preference data).
    """
    if isinstance(specs, str):
        specs = [specs]
    if isinstance(required_columns, str):
        required_columns = [required_columns]
    if not specs:
        raise ValueError("no dataset given")
    if isinstance(columns, str):
        try:
            columns = json.loads(columns)
        except json.JSONDecodeError as e:
            raise ValueError(f'--columns must be a JSON object like \'{{"old": "new"}}\': {e}') from e
    if columns is not None and not isinstance(columns, dict):
        raise ValueError(f"--columns must map old names to new names, got {columns!r}")
    rng = np.random.RandomState(seed)
    parts = []
    for spec_text in specs:
        spec = parse_dataset_spec(spec_text)
        raw, lines, bad_lines = _load_source(spec, strict, model_name, model_author)
        if columns:
            raw = raw.rename_columns(
                {old: new for old, new in columns.items() if old in raw.column_names and old != new}
            )
        ds = _normalize(
            raw,
            source=spec.path,
            lines=lines,
            bad_lines=bad_lines,
            strict=strict,
            allow_no_response=allow_no_response,
            required_columns=tuple(required_columns),
            num_proc=num_proc,
            normalize=normalize,
        )
        parts.append(sample_rows(ds, spec.sample, rng, shuffle))
    ds = _concatenate(parts, [parse_dataset_spec(s).path for s in specs])
    return ds.shuffle(seed=seed) if shuffle else ds


def split_train_val(
    ds: datasets.Dataset, split_dataset_ratio: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Hold out ``split_dataset_ratio`` of the rows (at least one) as a validation set."""
    if not split_dataset_ratio or split_dataset_ratio <= 0:
        return ds, None
    if split_dataset_ratio >= 1:
        raise ValueError(f"split_dataset_ratio must be below 1, got {split_dataset_ratio}")
    n_val = max(1, int(round(len(ds) * split_dataset_ratio)))
    if n_val >= len(ds):
        raise ValueError(f"split_dataset_ratio={split_dataset_ratio} leaves no training rows of {len(ds)}")
    parts = ds.train_test_split(test_size=n_val, seed=seed, shuffle=True)
    return parts["train"], parts["test"]
