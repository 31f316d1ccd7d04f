"""The reward registry, the plug-in loader, and RewardSet: the weighted set of rewards one run scores with.

Writing a reward plug-in (a ``.py`` file passed as ``--external_plugins my_rewards.py``)::

    from swiftray.rewards import ORM, orms, register_reward

    @register_reward("length_ok")              # a plain function ...
    def length_ok(completions, solution, **kwargs):   # `solution`: a dataset column
        return [1.0 if len(c) < 200 else 0.0 for c in completions]

    @register_reward("judge")                  # ... an async function (run with asyncio.gather) ...
    async def judge(completions, **kwargs): ...

    class MyReward(ORM):                       # ... or a class, sync or async __call__
        def __init__(self, my_threshold: float = 0.5):   # filled from the CLI flag of the same name
            self.t = my_threshold
        def __call__(self, completions, **kwargs): ...
    orms["my_reward"] = MyReward               # ms-swift's convention; same dict as REWARD_FUNCS

An ms-swift plug-in file ports by changing its import from ``swift.plugin`` / ``swift.rewards`` to
``swiftray.rewards``; ``orms``, ``ORM`` and ``AsyncORM`` keep their names. Every dataset column arrives as
a keyword argument (a list aligned with ``completions``), with ``prompts``, ``completion_ids``,
``completion_lengths`` (and ms-swift's alias ``response_token_ids``) when the caller provides them. Return
one float per completion, or None where the reward does not apply (it then drops out of the weighted sum).
A NaN or infinite value is refused, naming the function, the sample and the value; with the reward setting
``nonfinite_reward: missing`` it counts as None instead, and ``RewardSet.last_nonfinite`` counts it.

A class is instantiated with the reward settings its ``__init__`` names (all of them if it takes
``**kwargs``); a parameter called ``args`` receives the whole settings object (ms-swift's style).

Threads: the built-in ``accuracy`` uses math-verify's ``signal.alarm`` timeout only on the main thread;
score from a plain (``max_concurrency=1``) actor so that it is on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import importlib.util
import inspect
import logging
import math
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from swiftray.arguments import ArgumentError
from swiftray.rewards.builtin import BUILTIN_REWARDS
from swiftray.rewards.verl_style import from_verl, is_verl_style

logger = logging.getLogger(__name__)

REWARD_FUNCS: dict[str, Callable[..., Any]] = dict(BUILTIN_REWARDS)
orms = REWARD_FUNCS  # ms-swift's name for the same registry: `orms['name'] = MyClass` registers


class RewardFunctionError(RuntimeError):
    """A reward function failed or returned something that is not one number (or None) per completion."""


def register_reward(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register a reward class or function under ``name`` (what ``--reward_funcs`` names)."""

    def decorator(obj: Callable[..., Any]) -> Callable[..., Any]:
        old = REWARD_FUNCS.get(name)
        if old is not None and old is not obj:
            logger.warning("reward %r re-registered: %r replaces %r", name, obj, old)
        REWARD_FUNCS[name] = obj
        return obj

    return decorator


class PluginError(ImportError, ArgumentError):
    """An --external_plugins file that cannot be imported: bad input, so the command line prints one line."""


def _line_in(err: BaseException, path: Path) -> str:
    """" (line N)": where in the plug-in file `err` was raised (a SyntaxError names its own line)."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if f.filename == str(path)]
    return f" (line {frames[-1].lineno})" if frames else ""


def load_external_plugins(paths: Sequence[str | Path]) -> None:
    """Import each plug-in file by path so that its registrations run.

    The file's folder goes on ``sys.path`` so that it can import its neighbours.
    """
    for raw in paths:
        path = Path(raw).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"--external_plugins: no such file: {raw}")
        digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
        module_name = f"swiftray_plugin_{re.sub(r'[^0-9a-zA-Z_]', '_', path.stem)}_{digest}"
        if module_name in sys.modules:  # the same file twice: its registrations already ran
            continue
        if str(path.parent) not in sys.path:
            sys.path.insert(0, str(path.parent))
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise PluginError(f"--external_plugins: cannot import {path} (not a Python file?)")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except ModuleNotFoundError as e:
            del sys.modules[module_name]
            hint = ""
            if e.name and e.name.split(".")[0] == "swift":
                hint = " (an ms-swift plug-in: import ORM, AsyncORM and orms from swiftray.rewards instead)"
            raise PluginError(f"--external_plugins: importing {path} failed: {e}{_line_in(e, path)}{hint}") from e
        except Exception as e:
            del sys.modules[module_name]
            raise PluginError(f"--external_plugins: importing {path} failed: {type(e).__name__}: {e}"
                              f"{_line_in(e, path)}") from e
        verl_score = getattr(module, "compute_score", None)
        if is_verl_style(verl_score) and "compute_score" not in REWARD_FUNCS:
            REWARD_FUNCS["compute_score"] = verl_score  # a verl reward file: --reward_funcs compute_score


# ---------------------------------------------------------------- building the set


def _instantiate(name: str, cls: type, settings: dict[str, Any], args: Any) -> Any:
    """Create ``cls`` with the settings its constructor names (all of them if it takes **kwargs)."""
    params = inspect.signature(cls).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in settings.items() if takes_all or k in params}
    if "args" in params and "args" not in kwargs:
        kwargs["args"] = args if args is not None else SimpleNamespace(**settings)
    missing = [
        p.name
        for p in params.values()
        if p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and p.name not in kwargs
    ]
    if missing:
        raise ValueError(f"reward '{name}' ({cls.__name__}) needs setting(s) {missing}: pass them as flags")
    return cls(**kwargs)


def _is_async(func: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(type(func).__call__)


def _parameters(func: Callable[..., Any]) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):  # builtins and C callables: nothing to inspect
        return []


def _required_kwargs(func: Callable[..., Any]) -> list[str]:
    """Parameters besides ``completions`` that have no default: columns the reward cannot run without."""
    named = [p for p in _parameters(func) if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not any(p.name == "completions" for p in named):
        named = named[1:]  # the completions come first, whatever the parameter is called
    return [p.name for p in named if p.default is p.empty and p.name != "completions"]


def _call(func: Callable[..., Any], completions: list[str], kwargs: dict[str, Any]) -> Any:
    """ms-swift passes completions first, TRL by keyword (``f(prompts, completions, **kw)``): do what fits."""
    if any(p.name == "completions" and p.kind is not p.POSITIONAL_ONLY for p in _parameters(func)):
        return func(completions=completions, **kwargs)
    return func(completions, **kwargs)


def build_reward_funcs(
    names: Sequence[str | Callable[..., Any]],
    weights: Sequence[float] | None = None,
    reward_kwargs: dict[str, Any] | None = None,
    args: Any = None,
) -> RewardSet:
    """Resolve ``--reward_funcs`` (registry names, or callables directly) into a RewardSet.

    ``weights`` (``--reward_weights``) defaults to 1.0 each. ``reward_kwargs`` holds the reward settings
    (``cosine_max_len``, ``max_completion_length`` ...); ``args``, if given, is the object handed to a
    constructor parameter named ``args`` (else a namespace of ``reward_kwargs``).
    """
    settings = dict(reward_kwargs or {})
    nonfinite = settings.get("nonfinite_reward") or "error"
    if nonfinite not in NONFINITE_MODES:
        raise ValueError(f"nonfinite_reward={nonfinite!r}: expected one of {list(NONFINITE_MODES)}")
    if weights is None:
        weights = [1.0] * len(names)
    if len(weights) != len(names):
        raise ValueError(f"--reward_weights has {len(weights)} values for {len(names)} --reward_funcs")
    resolved_names: list[str] = []
    funcs: list[Callable[..., Any]] = []
    for entry in names:
        if isinstance(entry, str):
            if entry not in REWARD_FUNCS:
                raise ValueError(
                    f"unknown reward function {entry!r}; registered: {sorted(REWARD_FUNCS)}. "
                    "Custom rewards are registered by a file passed with --external_plugins."
                )
            name, obj = entry, REWARD_FUNCS[entry]
        elif callable(entry):
            obj = entry
            name = getattr(entry, "__name__", type(entry).__name__)
        else:
            raise TypeError(f"--reward_funcs entries must be names or callables, got {entry!r}")
        if is_verl_style(obj):
            obj = from_verl(obj)
        func = _instantiate(name, obj, settings, args) if inspect.isclass(obj) else obj
        unique, k = name, 1
        while unique in resolved_names:  # the same reward twice keeps both columns apart in the metrics
            unique, k = f"{name}_{k}", k + 1
        resolved_names.append(unique)
        funcs.append(func)
    return RewardSet(resolved_names, funcs, [float(w) for w in weights], nonfinite=nonfinite)


# ---------------------------------------------------------------- scoring


def _run_coroutines(coros: list[Any]) -> list[Any]:
    """Run coroutines concurrently; from inside a running event loop, do so on a helper thread."""

    async def gather() -> list[Any]:
        return list(await asyncio.gather(*coros, return_exceptions=True))

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(gather())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, gather()).result()


def _as_number(value: Any) -> float | None:
    """One reward value as a float (NaN and inf included), None for None; raises TypeError for anything else."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__float__"):
        raise TypeError(value)
    return float(value)


# What a NaN or infinite reward does: stop with an error naming it, or count as missing (None).
NONFINITE_MODES = ("error", "missing")


@dataclass
class RewardSet:
    """Reward functions with their names and weights; ``score`` runs them all on one batch."""

    names: list[str]
    funcs: list[Callable[..., Any]]
    weights: list[float]
    nonfinite: str = "error"  # NONFINITE_MODES
    _async: list[bool] = field(init=False)
    # NaN/inf values per function in the last `score` call, turned into None (nonfinite="missing").
    last_nonfinite: dict[str, int] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._async = [_is_async(f) for f in self.funcs]
        if self.nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite_reward={self.nonfinite!r}: expected one of {list(NONFINITE_MODES)}")

    def score(
        self,
        completions: list[str],
        columns: dict[str, list[Any]] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> tuple[dict[str, list[float | None]], list[float]]:
        """Score a batch: ``(per-function values, weighted total per completion)``.

        ``columns`` are dataset columns, each a list aligned with ``completions``; ``extra`` adds
        ``prompts``, ``completion_ids``, ``completion_lengths`` ... (per-sample lists) or anything else
        (passed unchanged). None values drop out of the total.
        """
        n = len(completions)
        kwargs = self._kwargs(n, columns or {}, extra or {})
        outputs: dict[int, Any] = {}
        for i, func in enumerate(self.funcs):
            self._check_columns(i, kwargs)
            if not self._async[i]:
                try:
                    outputs[i] = _call(func, completions, kwargs)
                except Exception as e:
                    outputs[i] = e
        async_ids = [i for i in range(len(self.funcs)) if self._async[i]]
        if async_ids:
            results = _run_coroutines([_call(self.funcs[i], completions, kwargs) for i in async_ids])
            outputs.update(zip(async_ids, results))

        per_func: dict[str, list[float | None]] = {}
        self.last_nonfinite = {}
        for i, name in enumerate(self.names):
            if isinstance(outputs[i], Exception):
                self._raise_failure(i, outputs[i], completions, kwargs)
            per_func[name] = self._finite(i, self._validate(i, outputs[i], n), completions)

        total, all_none = [], []
        for j in range(n):
            values = [(w, per_func[name][j]) for name, w in zip(self.names, self.weights)]
            present = [w * v for w, v in values if v is not None]
            if self.funcs and not present:
                all_none.append(j)
            total.append(float(sum(present)))
        if all_none:  # as in ms-swift: a total of 0, and a warning, since such samples still train
            logger.warning("every reward function returned None for samples %s; their total reward is 0", all_none)
        return per_func, total

    # -- helpers of score

    @staticmethod
    def _kwargs(n: int, columns: dict[str, list[Any]], extra: dict[str, Any]) -> dict[str, Any]:
        for key, values in columns.items():
            if len(values) != n:
                raise ValueError(f"dataset column {key!r} has {len(values)} values for {n} completions")
        kwargs = {**columns, **extra}
        if "completions" in kwargs:
            raise ValueError("'completions' is reserved for the completions; rename that column")
        if "completion_ids" in kwargs and "response_token_ids" not in kwargs:
            kwargs["response_token_ids"] = kwargs["completion_ids"]  # ms-swift's name for the same thing
        return kwargs

    def _missing_column_error(self, i: int, column: str, kwargs: dict[str, Any]) -> RewardFunctionError:
        return RewardFunctionError(
            f"reward function '{self.names[i]}' needs the column {column!r}, which the dataset lacks "
            f"(available: {sorted(kwargs)})"
        )

    def _check_columns(self, i: int, kwargs: dict[str, Any]) -> None:
        for column in _required_kwargs(self.funcs[i]):
            if column not in kwargs:
                raise self._missing_column_error(i, column, kwargs)

    def _call_one(self, i: int, completion: str, kwargs: dict[str, Any], n: int, j: int) -> None:
        """Re-run reward ``i`` on sample ``j`` alone (only to locate a failure)."""
        sliced = {k: [v[j]] if isinstance(v, (list, tuple)) and len(v) == n else v for k, v in kwargs.items()}
        result = _call(self.funcs[i], [completion], sliced)
        if inspect.isawaitable(result):
            [result] = _run_coroutines([result])
            if isinstance(result, Exception):
                raise result

    def _raise_failure(self, i: int, error: Exception, completions: list[str], kwargs: dict[str, Any]) -> None:
        name = self.names[i]
        if isinstance(error, KeyError) and error.args and isinstance(error.args[0], str):
            if error.args[0] not in kwargs:
                raise self._missing_column_error(i, error.args[0], kwargs) from error
        n = len(completions)
        for j in range(n):  # find the first sample that fails on its own
            try:
                self._call_one(i, completions[j], kwargs, n, j)
            except Exception as sample_error:
                raise RewardFunctionError(
                    f"reward function '{name}' raised on sample {j} "
                    f"(completion {completions[j][:80]!r}): {type(sample_error).__name__}: {sample_error}"
                ) from sample_error
        raise RewardFunctionError(
            f"reward function '{name}' raised on the batch of {n} (no single sample fails alone): "
            f"{type(error).__name__}: {error}"
        ) from error

    def _validate(self, i: int, output: Any, n: int) -> list[float | None]:
        name = self.names[i]
        if hasattr(output, "tolist"):  # numpy array or torch tensor
            output = output.tolist()
        if not isinstance(output, (list, tuple)) or len(output) != n:
            size = f"{len(output)} values" if isinstance(output, (list, tuple)) else type(output).__name__
            raise RewardFunctionError(
                f"reward function '{name}' must return one value per completion ({n}), "
                f"got {size}: {output!r:.200}"
            )
        values = []
        for j, value in enumerate(output):
            try:
                values.append(_as_number(value))
            except Exception:
                raise RewardFunctionError(
                    f"reward function '{name}' returned a non-number for sample {j}: {value!r:.100} "
                    f"({type(value).__name__}); rewards must be floats or None"
                ) from None
        return values

    def _finite(self, i: int, values: list[float | None], completions: list[str]) -> list[float | None]:
        """NaN/inf: an error naming function, sample and value, or (nonfinite="missing") None, counted."""
        bad = [j for j, v in enumerate(values) if v is not None and not math.isfinite(v)]
        if not bad:
            return values
        name, j = self.names[i], bad[0]
        if self.nonfinite == "error":
            raise RewardFunctionError(
                f"reward function '{name}' returned {values[j]} for sample {j} ({_describe(completions[j])})"
                f"{f' and {len(bad) - 1} more sample(s)' if len(bad) > 1 else ''}; rewards must be finite "
                "numbers or None (the reward setting nonfinite_reward: missing counts such values as missing)"
            )
        logger.warning("reward function '%s' returned %s for sample %d (%s) and %d more; counted as missing",
                       name, values[j], j, _describe(completions[j]), len(bad) - 1)
        self.last_nonfinite[name] = len(bad)
        return [None if v is not None and not math.isfinite(v) else v for v in values]


def _describe(completion: str) -> str:
    return f"completion {completion[:80]!r}"


def reward_metrics(
    per_func: dict[str, list[float | None]], total: list[float] | None = None,
    nonfinite: dict[str, int] | None = None,
) -> dict[str, float]:
    """``rewards/<name>/mean`` and ``/std`` per function (None = missing; sample std), and ``reward`` /
    ``reward_std`` of the totals when given. NaN when a function has no values at all.
    ``nonfinite`` (``RewardSet.last_nonfinite``, summed over batches) adds ``rewards/<name>/nonfinite``:
    how many values were NaN or infinite and counted as missing."""

    def mean_std(values: list[float]) -> tuple[float, float]:
        if not values:
            return math.nan, math.nan
        mean = sum(values) / len(values)
        if len(values) < 2:
            return mean, 0.0
        try:
            return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        except OverflowError:  # finite rewards whose squares are not (1e300): the step's loss says the rest
            return mean, math.inf

    metrics: dict[str, float] = {}
    for name, values in per_func.items():
        mean, std = mean_std([v for v in values if v is not None])
        metrics[f"rewards/{name}/mean"] = mean
        metrics[f"rewards/{name}/std"] = std
    for name in per_func if nonfinite is not None else ():
        metrics[f"rewards/{name}/nonfinite"] = float(nonfinite.get(name, 0))
    if total is not None:
        metrics["reward"], metrics["reward_std"] = mean_std(list(total))
    return metrics
