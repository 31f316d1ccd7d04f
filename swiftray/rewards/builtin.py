"""Built-in reward functions, compatible with ms-swift's names and defaults (``--reward_funcs``).

Each is a class whose ``__call__(completions, **kwargs)`` returns one float per completion; dataset
columns (``solution`` ...) arrive as keyword arguments, lists aligned with ``completions``. Settings come
from constructor keyword arguments named like ms-swift's flags (``cosine_max_len``, ``soft_cache_length``
...); the registry passes each class the flags its constructor names.

    accuracy       MathAccuracy       math-verify equivalence of the answer with the ``solution`` column
    format         Format             ``<think>...</think> <answer>...</answer>`` and nothing after
    cosine         CosineReward       correctness scaled by completion length (Yeo et al. 2025)
    repetition     RepetitionPenalty  n-gram repetition penalty (Yeo et al. 2025)
    soft_overlong  SoftOverlong       DAPO's soft overlong punishment (Yu et al. 2025)

Lengths, for ``cosine`` and ``soft_overlong``, are in tokens: pass ``completion_lengths`` (ints) or
``completion_ids`` (token id lists; ms-swift's name ``response_token_ids`` works too).
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Sequence
from typing import Any


class ORM:
    """Optional base class for class-style reward functions (ms-swift's ``swift.rewards.ORM``).

    Subclasses implement ``__call__(self, completions, **kwargs) -> list[float | None]``.
    """

    def __init__(self, args: Any = None, **kwargs: Any) -> None:
        self.args = args

    def __call__(self, completions: list[str], **kwargs: Any) -> list[float | None]:
        raise NotImplementedError


class AsyncORM(ORM):
    """Base class for reward functions whose ``__call__`` is ``async`` (I/O bound: remote judges, APIs).

    The registry runs all async rewards of one batch concurrently with ``asyncio.gather``.
    """

    async def __call__(self, completions: list[str], **kwargs: Any) -> list[float | None]:  # type: ignore[override]
        raise NotImplementedError


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _answer_text(text: str) -> tuple[str, bool]:
    """The content of the first ``<answer>`` tag if there is one (and whether there was)."""
    match = _ANSWER_TAG.search(text)
    return (match.group(1).strip(), True) if match else (text, False)


def completion_lengths(kwargs: dict[str, Any], n: int, who: str) -> list[int]:
    """Token lengths of the completions from ``completion_lengths`` / ``completion_ids`` /
    ``response_token_ids``, whichever was passed."""
    if kwargs.get("completion_lengths") is not None:
        lengths = [int(x) for x in kwargs["completion_lengths"]]
    else:
        ids = kwargs.get("completion_ids")
        if ids is None:
            ids = kwargs.get("response_token_ids")
        if ids is None:
            raise ValueError(
                f"reward '{who}' needs completion lengths in tokens: pass completion_lengths or completion_ids"
            )
        lengths = [len(x) for x in ids]
    if len(lengths) != n:
        raise ValueError(f"reward '{who}': {len(lengths)} completion lengths for {n} completions")
    return lengths


class MathAccuracy(ORM):
    """1.0 when the completion's answer is mathematically equal to the ``solution`` column, else 0.0.

    The answer is the content of ``<answer>...</answer>`` when the completion has those tags (parsed with
    math-verify's default extraction: LaTeX, ``\\boxed{}``, or a plain number); otherwise it is taken
    from ``\\boxed{}`` / LaTeX, falling back to the last plain number. The gold answer may be a plain
    number, ``\\boxed{...}`` or text with ``<answer>`` tags. An unparseable gold answer scores 0.0
    (as in ms-swift) and garbage text scores 0.0: this reward never raises.

    Timeouts: math-verify guards parse/verify with ``signal.alarm``, which only works in a process's main
    thread. ``use_timeout=None`` (default) turns the alarm on exactly when called from the main thread
    (a plain Ray actor method runs there) and off elsewhere (then a pathological expression can take as
    long as sympy needs); ``True`` / ``False`` force it.
    """

    def __init__(self, use_timeout: bool | None = None, timeout_seconds: int = 5) -> None:
        import importlib.util

        if importlib.util.find_spec("math_verify") is None:
            raise ImportError("the 'accuracy' reward needs math-verify: pip install 'math-verify[antlr4_13_2]'")
        self.use_timeout = use_timeout
        self.timeout_seconds = timeout_seconds

    def _timeout(self) -> int | None:
        use = self.use_timeout
        if use is None:
            use = threading.current_thread() is threading.main_thread()
        return self.timeout_seconds if use else None

    def __call__(self, completions: list[str], solution: Sequence[str], **kwargs: Any) -> list[float]:
        return [self.score_one(c, s) for c, s in zip(completions, solution, strict=True)]

    def score_one(self, completion: str, solution: str) -> float:
        from latex2sympy2_extended import NormalizationConfig
        from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

        timeout = self._timeout()
        try:
            gold = parse(_answer_text(str(solution))[0], extraction_mode="first_match", parsing_timeout=timeout)
            if not gold:
                return 0.0
            text, tagged = _answer_text(str(completion))
            if tagged:
                answer = parse(text, extraction_mode="first_match", parsing_timeout=timeout)
            else:
                # Untagged prose: \boxed{} first, then well-formed LaTeX, then the last plain number.
                latex = LatexExtractionConfig(
                    normalization_config=NormalizationConfig(
                        nits=False, malformed_operators=False, basic_latex=True, boxed="all", units=True
                    ),
                    boxed_match_priority=0,
                    try_extract_without_anchor=False,
                )
                answer = parse(
                    text,
                    extraction_config=[latex, ExprExtractionConfig()],
                    extraction_mode="first_match",
                    parsing_timeout=timeout,
                )
            return float(verify(gold, answer, timeout_seconds=timeout))
        except Exception:  # math-verify or sympy choking on odd text is a wrong answer, not a crash
            return 0.0


class Format(ORM):
    """1.0 when the completion is ``<think>...</think>``, whitespace, ``<answer>...</answer>`` and nothing
    after it (ms-swift's ``format``); else 0.0."""

    PATTERN = re.compile(r"^<think>.*?</think>\s*<answer>.*?</answer>(?![\s\S])", re.DOTALL | re.MULTILINE)

    def __call__(self, completions: list[str], **kwargs: Any) -> list[float]:
        return [1.0 if self.PATTERN.match(c) else 0.0 for c in completions]


class CosineReward(ORM):
    """Length-scaled correctness (Yeo et al. 2025, arXiv:2502.03373; ms-swift's ``cosine``).

    A correct answer earns from ``cosine_min_len_value_correct`` (length 0) down to
    ``cosine_max_len_value_correct`` (length ``cosine_max_len``) along a half cosine: shorter is better.
    A wrong answer goes from ``cosine_min_len_value_wrong`` up to ``cosine_max_len_value_wrong``: longer
    is less bad. ``cosine_max_len`` defaults to ``max_completion_length``; lengths beyond it count as it.
    """

    def __init__(
        self,
        cosine_min_len_value_wrong: float = -0.5,
        cosine_max_len_value_wrong: float = 0.0,
        cosine_min_len_value_correct: float = 1.0,
        cosine_max_len_value_correct: float = 0.5,
        cosine_max_len: int | None = None,
        max_completion_length: int | None = None,
        accuracy_orm: Any = None,
    ) -> None:
        self.max_len = cosine_max_len or max_completion_length
        if not self.max_len:
            raise ValueError("the 'cosine' reward needs --cosine_max_len or --max_completion_length")
        self.min_len_value_wrong = cosine_min_len_value_wrong
        self.max_len_value_wrong = cosine_max_len_value_wrong
        self.min_len_value_correct = cosine_min_len_value_correct
        self.max_len_value_correct = cosine_max_len_value_correct
        self.accuracy_orm = accuracy_orm or MathAccuracy()

    @staticmethod
    def cosfn(t: float, big_t: float, min_value: float, max_value: float) -> float:
        """max_value at t=0, min_value at t=T, along half a cosine."""
        return max_value - (max_value - min_value) * (1 - math.cos(t * math.pi / big_t)) / 2

    def __call__(self, completions: list[str], solution: Sequence[str], **kwargs: Any) -> list[float]:
        lengths = completion_lengths(kwargs, len(completions), "cosine")
        correct = self.accuracy_orm(completions, solution=solution)
        rewards = []
        for length, acc in zip(lengths, correct):
            if acc >= 1.0:
                at_zero, at_max = self.min_len_value_correct, self.max_len_value_correct
            else:
                at_zero, at_max = self.min_len_value_wrong, self.max_len_value_wrong
            rewards.append(self.cosfn(min(length, self.max_len), self.max_len, at_max, at_zero))
        return rewards


class RepetitionPenalty(ORM):
    """Penalty for repeated word n-grams (Yeo et al. 2025; ms-swift's ``repetition``).

    ``(1 - distinct n-grams / n-grams) * repetition_max_penalty`` over lower-cased whitespace-split
    words; 0.0 for texts shorter than one n-gram.
    """

    def __init__(self, repetition_n_grams: int = 3, repetition_max_penalty: float = -1.0) -> None:
        if repetition_n_grams < 1:
            raise ValueError(f"repetition_n_grams must be >= 1, got {repetition_n_grams}")
        if repetition_max_penalty > 0:
            raise ValueError(f"repetition_max_penalty must be <= 0, got {repetition_max_penalty}")
        self.ngram_size = repetition_n_grams
        self.max_penalty = repetition_max_penalty

    def __call__(self, completions: list[str], **kwargs: Any) -> list[float]:
        rewards = []
        for text in completions:
            words = text.lower().split()
            if len(words) < self.ngram_size:
                rewards.append(0.0)
                continue
            ngrams = list(zip(*[words[i:] for i in range(self.ngram_size)]))
            rewards.append((1 - len(set(ngrams)) / len(ngrams)) * self.max_penalty)
        return rewards


class SoftOverlong(ORM):
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13; ms-swift's ``soft_overlong``).

    With L = length, Lmax = ``soft_max_length`` (default ``max_completion_length``) and
    Lc = ``soft_cache_length``: 0 up to Lmax - Lc, then falling linearly to -1 at Lmax, -1 beyond.
    """

    def __init__(
        self,
        soft_max_length: int | None = None,
        soft_cache_length: int | None = None,
        max_completion_length: int | None = None,
    ) -> None:
        self.soft_max_length = soft_max_length or max_completion_length
        if soft_cache_length is None or not self.soft_max_length:
            raise ValueError(
                "the 'soft_overlong' reward needs --soft_cache_length and --soft_max_length "
                "(or --max_completion_length)"
            )
        if not 0 < soft_cache_length < self.soft_max_length:
            raise ValueError(
                f"soft_cache_length ({soft_cache_length}) must be > 0 and < soft_max_length ({self.soft_max_length})"
            )
        self.soft_cache_length = soft_cache_length

    def __call__(self, completions: list[str], **kwargs: Any) -> list[float]:
        expected = self.soft_max_length - self.soft_cache_length
        rewards = []
        for length in completion_lengths(kwargs, len(completions), "soft_overlong"):
            exceed = length - expected
            rewards.append(max(min(-exceed / self.soft_cache_length, 0.0), -1.0))
        return rewards


BUILTIN_REWARDS: dict[str, type] = {
    "accuracy": MathAccuracy,
    "format": Format,
    "cosine": CosineReward,
    "repetition": RepetitionPenalty,
    "soft_overlong": SoftOverlong,
}
