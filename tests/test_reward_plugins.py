"""Reward plug-ins loaded from files, RewardSet scoring, weights, None handling and error messages."""

import asyncio
import math
import textwrap

import pytest

from swiftray.rewards import (
    REWARD_FUNCS,
    RewardFunctionError,
    build_reward_funcs,
    load_external_plugins,
    orms,
    reward_metrics,
)

PLUGIN = '''
import asyncio
from swiftray.rewards import ORM, AsyncORM, orms, register_reward


class MsSwiftStyle(ORM):
    """ms-swift style: settings through `args`, registered through `orms[...]`."""

    def __call__(self, completions, solution, **kwargs):
        return [1.0 if c.strip() == s else self.args.miss_value for c, s in zip(completions, solution)]


orms["ms_style"] = MsSwiftStyle


class Threshold:
    """A class taking one named setting."""

    def __init__(self, min_chars: int = 3):
        self.min_chars = min_chars

    def __call__(self, completions, **kwargs):
        return [float(len(c) >= self.min_chars) for c in completions]


orms["threshold"] = Threshold


@register_reward("plain")
def plain(completions, solution, **kwargs):
    return [float(len(c) == len(s)) for c, s in zip(completions, solution)]


@register_reward("async_fn")
async def async_fn(completions, difficulty, **kwargs):
    await asyncio.sleep(0)
    return [float(d) for d in difficulty]


@register_reward("async_cls")
class AsyncClass(AsyncORM):
    async def __call__(self, completions, **kwargs):
        await asyncio.sleep(0)
        return [0.5 if p.startswith("Q") else None for p in kwargs["prompts"]]


@register_reward("trl_style")
def trl_style(prompts, completions, completion_ids, **kwargs):
    return [float(len(ids)) for ids in completion_ids]
'''

COMPLETIONS = ["38", "7", "abcd"]
COLUMNS = {"solution": ["38", "8", "abc"], "difficulty": [1, 2, 3]}
EXTRA = {"prompts": ["Q1", "Q2", "other"], "completion_ids": [[1, 2], [3], [4, 5, 6]]}


@pytest.fixture(autouse=True)
def clean_registry():
    saved = dict(REWARD_FUNCS)
    yield
    REWARD_FUNCS.clear()
    REWARD_FUNCS.update(saved)


def write(tmp_path, source, name="plugin.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


@pytest.fixture
def plugin(tmp_path):
    load_external_plugins([str(write(tmp_path, PLUGIN))])


def test_orms_is_the_registry_and_has_builtins():
    assert orms is REWARD_FUNCS
    assert {"accuracy", "format", "cosine", "repetition", "soft_overlong"} <= set(orms)


@pytest.mark.parametrize(
    "name, want",
    [
        ("ms_style", [1.0, -1.0, -1.0]),  # miss_value from the settings, via args
        ("threshold", [0.0, 0.0, 1.0]),  # min_chars from the settings, by name
        ("plain", [1.0, 1.0, 0.0]),  # receives the solution column
        ("async_fn", [1.0, 2.0, 3.0]),  # async function, receives the difficulty column
        ("async_cls", [0.5, 0.5, None]),  # async class, receives prompts from extra
        ("trl_style", [2.0, 1.0, 3.0]),  # TRL signature: completions passed by keyword
    ],
)
def test_each_plugin_style(plugin, name, want):
    rewards = build_reward_funcs([name], None, {"miss_value": -1.0, "min_chars": 4, "unused_flag": 1})
    per_func, total = rewards.score(COMPLETIONS, COLUMNS, EXTRA)
    assert per_func == {name: want}
    assert total == [0.0 if v is None else v for v in want]


def test_builtin_accuracy_and_format_together():
    rewards = build_reward_funcs(["accuracy", "format"], [1.0, 0.5], {})
    completions = ["<think>\n23 + 15 = 38\n</think>\n\n<answer>38</answer>", "<answer>38</answer>", "junk"]
    per_func, total = rewards.score(completions, {"solution": ["38", "38", "38"]}, {})
    assert per_func == {"accuracy": [1.0, 1.0, 0.0], "format": [1.0, 0.0, 0.0]}
    assert total == [1.5, 1.0, 0.0]


def test_weights_and_none_in_weighted_sum(plugin):
    rewards = build_reward_funcs(["async_cls", "async_fn", "plain"], [2.0, -1.0, 0.25], {})
    per_func, total = rewards.score(COMPLETIONS, COLUMNS, EXTRA)
    assert per_func["async_cls"] == [0.5, 0.5, None]
    # sample 2: async_cls is None and drops out; the others still count
    assert total == pytest.approx([2 * 0.5 - 1.0 + 0.25, 2 * 0.5 - 2.0 + 0.25, -3.0 + 0.0])


def test_all_none_gives_zero_total(plugin, caplog):
    rewards = build_reward_funcs(["async_cls"], [3.0], {})
    _, total = rewards.score(["a"], {}, {"prompts": ["nope"]})
    assert total == [0.0]
    assert "returned None for samples [0]" in caplog.text


def test_reward_metrics_treat_none_as_missing():
    metrics = reward_metrics({"a": [1.0, None, 3.0], "b": [None, None], "c": [2.0]}, total=[1.0, 2.0, 3.0])
    assert metrics["rewards/a/mean"] == 2.0
    assert metrics["rewards/a/std"] == pytest.approx(math.sqrt(2.0))  # sample std of [1, 3]
    assert math.isnan(metrics["rewards/b/mean"]) and math.isnan(metrics["rewards/b/std"])
    assert metrics["rewards/c/std"] == 0.0
    assert metrics["reward"] == 2.0 and metrics["reward_std"] == pytest.approx(1.0)


def test_callables_and_duplicate_names():
    def double(completions, **kwargs):
        return [2.0] * len(completions)

    rewards = build_reward_funcs([double, double], [1.0, 1.0], {})
    per_func, total = rewards.score(["x"], {}, {})
    assert list(per_func) == ["double", "double_1"] and total == [4.0]


def test_score_inside_a_running_event_loop(plugin):
    rewards = build_reward_funcs(["async_fn"], None, {})

    async def main():
        return rewards.score(COMPLETIONS, COLUMNS, EXTRA)

    assert asyncio.run(main())[0] == {"async_fn": [1.0, 2.0, 3.0]}


def test_completion_ids_reach_ms_swift_name(tmp_path):
    write(tmp_path, 'from swiftray.rewards import orms\norms["n"] = lambda completions, **kw: '
          '[float(len(x)) for x in kw["response_token_ids"]]\n', "lam.py")
    load_external_plugins([tmp_path / "lam.py"])
    assert build_reward_funcs(["n"], None, {}).score(["a"], {}, {"completion_ids": [[1, 2, 3]]})[1] == [3.0]


# ---------------------------------------------------------------- error messages


ERRORS = '''
from swiftray.rewards import register_reward


@register_reward("flaky")
def flaky(completions, **kwargs):
    return [1.0 / (c != "boom") for c in completions]


@register_reward("short")
def short(completions, **kwargs):
    return [1.0]


@register_reward("texty")
def texty(completions, **kwargs):
    return ["1.0" for c in completions]


@register_reward("needs_col")
def needs_col(completions, answer_key, **kwargs):
    return [0.0 for c in completions]


@register_reward("looks_up_col")
def looks_up_col(completions, **kwargs):
    return [float(x) for x in kwargs["answer_key"]]


@register_reward("async_boom")
async def async_boom(completions, **kwargs):
    if "boom" in completions:
        raise RuntimeError("remote judge down")
    return [0.0] * len(completions)
'''


@pytest.fixture
def errors(tmp_path):
    load_external_plugins([write(tmp_path, ERRORS, "errors.py")])


@pytest.mark.parametrize("name", ["flaky", "async_boom"])
def test_raising_reward_names_function_and_sample(errors, name):
    rewards = build_reward_funcs(["format", name], None, {})
    with pytest.raises(RewardFunctionError, match=rf"'{name}' raised on sample 2 .*'boom'.*(ZeroDivision|remote judge)"):
        rewards.score(["a", "b", "boom", "boom"], {}, {})


def test_wrong_count(errors):
    with pytest.raises(RewardFunctionError, match=r"'short' must return one value per completion \(2\), got 1 values"):
        build_reward_funcs(["short"], None, {}).score(["a", "b"], {}, {})


def test_non_number(errors):
    with pytest.raises(RewardFunctionError, match=r"'texty' returned a non-number for sample 0: '1.0' \(str\)"):
        build_reward_funcs(["texty"], None, {}).score(["a"], {}, {})


@pytest.mark.parametrize("name", ["needs_col", "looks_up_col"])
def test_missing_column(errors, name):
    with pytest.raises(RewardFunctionError, match=rf"'{name}' needs the column 'answer_key', which the dataset lacks"):
        build_reward_funcs([name], None, {}).score(["a"], {"solution": ["1"]}, {})


def test_misaligned_column():
    with pytest.raises(ValueError, match="column 'solution' has 1 values for 2 completions"):
        build_reward_funcs(["format"], None, {}).score(["a", "b"], {"solution": ["1"]}, {})


def test_build_errors():
    with pytest.raises(ValueError, match=r"unknown reward function 'nope'.*--external_plugins"):
        build_reward_funcs(["nope"], None, {})
    with pytest.raises(ValueError, match="2 values for 1 --reward_funcs"):
        build_reward_funcs(["format"], [1.0, 2.0], {})
    with pytest.raises(ValueError, match="soft_cache_length"):
        build_reward_funcs(["soft_overlong"], None, {"max_completion_length": 100})


def test_plugin_loading_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file: .*missing.py"):
        load_external_plugins([str(tmp_path / "missing.py")])
    broken = write(tmp_path, "x = 1\nraise RuntimeError('bad plugin')\n", "broken.py")
    with pytest.raises(ImportError, match=r"broken.py failed: RuntimeError: bad plugin"):
        load_external_plugins([broken])
    ported = write(tmp_path, "from swift.plugin import ORM, orms\n", "ported.py")
    with pytest.raises(ImportError, match="import ORM, AsyncORM and orms from swiftray.rewards"):
        load_external_plugins([ported])


def test_plugin_can_import_its_neighbour(tmp_path):
    write(tmp_path, "VALUE = 0.25\n", "helpers_for_plugin.py")
    write(tmp_path, "from helpers_for_plugin import VALUE\nfrom swiftray.rewards import orms\n"
          "orms['quarter'] = lambda completions, **kw: [VALUE] * len(completions)\n", "uses_helper.py")
    load_external_plugins([tmp_path / "uses_helper.py"])
    assert build_reward_funcs(["quarter"], None, {}).score(["a"], {}, {})[1] == [0.25]
