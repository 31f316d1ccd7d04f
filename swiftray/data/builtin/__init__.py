"""Built-in datasets, resolved by name with no network: ``--dataset swift/self-cognition#500``."""

from __future__ import annotations

from collections.abc import Sequence

from swiftray.data.builtin.arithmetic import arithmetic_split, make_arithmetic
from swiftray.data.builtin.arithmetic_pairs import arithmetic_pairs_split
from swiftray.data.builtin.self_cognition import SELF_COGNITION_HELDOUT, make_self_cognition

__all__ = [
    "SELF_COGNITION_HELDOUT",
    "builtin_names",
    "is_builtin",
    "load_builtin",
    "make_arithmetic",
    "make_self_cognition",
    "arithmetic_split",
    "arithmetic_pairs_split",
]

SELF_COGNITION = "swift/self-cognition"
ARITHMETIC = "swiftray/arithmetic"
ARITHMETIC_PAIRS = "swiftray/arithmetic-pairs"
# Other names users know the self-cognition set by (its hub ids).
_ALIASES = {
    "modelscope/self-cognition": SELF_COGNITION,
    "self-cognition": SELF_COGNITION,
    "arithmetic": ARITHMETIC,
    "arithmetic-pairs": ARITHMETIC_PAIRS,
}
_DEFAULT_SUBSET = {SELF_COGNITION: "default", ARITHMETIC: "train", ARITHMETIC_PAIRS: "train"}


def builtin_names() -> list[str]:
    return sorted(_DEFAULT_SUBSET)


def _canonical(name: str) -> str | None:
    name = _ALIASES.get(name, name)
    return name if name in _DEFAULT_SUBSET else None


def is_builtin(name: str) -> bool:
    return _canonical(name) is not None


def load_builtin(
    name: str, subsets: Sequence[str] | None = None, *, model_name=None, model_author=None
) -> list[dict]:
    """Rows of a built-in dataset, one or more subsets joined in order."""
    canonical = _canonical(name)
    if canonical is None:
        raise ValueError(f"no built-in dataset {name!r}; built-ins: {', '.join(builtin_names())}")
    rows: list[dict] = []
    for subset in subsets or [_DEFAULT_SUBSET[canonical]]:
        if canonical == SELF_COGNITION:
            rows += make_self_cognition(subset, model_name=model_name, model_author=model_author)
        elif canonical == ARITHMETIC_PAIRS:
            rows += arithmetic_pairs_split(subset)
        else:
            rows += arithmetic_split(subset)
    return rows
