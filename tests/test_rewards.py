"""The built-in rewards on hand-written cases (ms-swift's semantics and defaults)."""

import math
import threading

import pytest

from swiftray.rewards.builtin import CosineReward, Format, MathAccuracy, RepetitionPenalty, SoftOverlong

SFT_STYLE = "<think>\n23 + 15 = 38\n</think>\n\n<answer>38</answer>"


@pytest.fixture(scope="module")
def accuracy():
    return MathAccuracy()


# ---------------------------------------------------------------- accuracy


@pytest.mark.parametrize(
    "completion, solution, want",
    [
        (SFT_STYLE, "38", 1.0),  # our SFT data format, plain-number gold
        (SFT_STYLE, "39", 0.0),
        ("<think>x</think><answer>38</answer>", "<answer>38</answer>", 1.0),  # gold with tags
        ("<answer>38</answer>", "The sum is \\boxed{38}.", 1.0),  # gold boxed
        ("so the result is \\boxed{38}", "38", 1.0),  # boxed, no tags
        ("so the result is \\boxed{37}", "38", 0.0),
        ("<answer>\\frac{1}{2}</answer>", "0.5", 1.0),  # equivalence, not string equality
        ("<answer>1/2</answer>", "\\boxed{\\frac{1}{2}}", 1.0),
        ("The answer is 38", "38", 1.0),  # plain number without tags
        ("<answer>thirty-eight</answer>", "38", 0.0),
        ("", "38", 0.0),
        ("}}}{{{\\boxed{\\frac{", "38", 0.0),  # malformed LaTeX
        (SFT_STYLE, "no number here", 0.0),  # unparseable gold scores 0, as in ms-swift
    ],
)
def test_accuracy_cases(accuracy, completion, solution, want):
    assert accuracy([completion], solution=[solution]) == [want]


def test_accuracy_batch_and_extra_kwargs(accuracy):
    out = accuracy([SFT_STYLE, "<answer>5</answer>"], solution=["38", "6"], prompts=["a", "b"])
    assert out == [1.0, 0.0]


def test_accuracy_timeout_switches_off_outside_main_thread(accuracy):
    assert accuracy._timeout() == 5  # pytest runs tests in the main thread
    seen = {}

    def worker():
        seen["timeout"] = accuracy._timeout()
        seen["score"] = accuracy([SFT_STYLE], solution=["38"])  # would raise in signal.alarm if left on

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == {"timeout": None, "score": [1.0]}
    assert MathAccuracy(use_timeout=False)._timeout() is None


# ---------------------------------------------------------------- format


@pytest.mark.parametrize(
    "completion, want",
    [
        (SFT_STYLE, 1.0),
        ("<think>a\nb</think><answer>1</answer>", 1.0),
        ("<think>a</think>\n<answer>1</answer>\n", 0.0),  # nothing may follow </answer>, not even a newline
        ("<answer>1</answer>", 0.0),
        ("Sure! <think>a</think><answer>1</answer>", 0.0),
        ("<think>a</think> text <answer>1</answer>", 0.0),
        ("<think>a<answer>1</answer>", 0.0),
    ],
)
def test_format(completion, want):
    assert Format()([completion]) == [want]


# ---------------------------------------------------------------- cosine


def cosine_ref(length: int, big_l: int, at_zero: float, at_max: float) -> float:
    """Yeo et al. eq. 1: r = eta_min + (eta_max - eta_min) * (1 + cos(t pi / T)) / 2."""
    return at_max + (at_zero - at_max) * (1 + math.cos(length * math.pi / big_l)) / 2


def test_cosine_defaults_and_lengths():
    reward = CosineReward(max_completion_length=100)  # cosine_max_len defaults to max_completion_length
    completions = [SFT_STYLE] * 3 + ["<answer>1</answer>"] * 3
    solutions = ["38"] * 6
    out = reward(completions, solution=solutions, completion_lengths=[0, 50, 100, 0, 50, 100])
    want = [cosine_ref(t, 100, 1.0, 0.5) for t in (0, 50, 100)] + [cosine_ref(t, 100, -0.5, 0.0) for t in (0, 50, 100)]
    assert out == pytest.approx(want)
    assert out[:3] == pytest.approx([1.0, 0.75, 0.5]) and out[3:] == pytest.approx([-0.5, -0.25, 0.0])
    # completion_ids give the same lengths; lengths past the maximum count as the maximum
    by_ids = reward([SFT_STYLE], solution=["38"], completion_ids=[[7] * 50])
    assert by_ids == pytest.approx([0.75])
    assert reward([SFT_STYLE], solution=["38"], completion_lengths=[150]) == pytest.approx([0.5])


def test_cosine_settings():
    reward = CosineReward(cosine_max_len=10, max_completion_length=100, cosine_min_len_value_correct=2.0)
    assert reward([SFT_STYLE], solution=["38"], completion_lengths=[0]) == pytest.approx([2.0])
    assert reward.max_len == 10
    with pytest.raises(ValueError, match="cosine_max_len"):
        CosineReward()
    with pytest.raises(ValueError, match="completion_lengths or completion_ids"):
        reward([SFT_STYLE], solution=["38"])


# ---------------------------------------------------------------- repetition


def test_repetition():
    reward = RepetitionPenalty()  # n=3, max penalty -1
    text = "a b c a b c"  # 3-grams: abc bca cab abc -> 3 distinct of 4
    assert reward([text]) == pytest.approx([-(1 - 3 / 4)])
    assert reward(["the cat sat on the mat"]) == [0.0]  # all distinct
    assert reward(["", "two words"]) == [0.0, 0.0]  # shorter than one n-gram
    assert reward(["Go go GO go"]) == pytest.approx([-(1 - 1 / 2)])  # case-insensitive
    assert RepetitionPenalty(repetition_n_grams=1, repetition_max_penalty=-2.0)(["x x x x"]) == pytest.approx(
        [-2.0 * 0.75]
    )
    with pytest.raises(ValueError, match="repetition_max_penalty"):
        RepetitionPenalty(repetition_max_penalty=1.0)


# ---------------------------------------------------------------- soft overlong


def test_soft_overlong():
    reward = SoftOverlong(soft_cache_length=20, max_completion_length=100)  # Lmax=100, punished from 80
    out = reward(["x"] * 5, completion_lengths=[10, 80, 90, 100, 130])
    assert out == pytest.approx([0.0, 0.0, -0.5, -1.0, -1.0])
    assert reward(["x"], completion_ids=[[1] * 95]) == pytest.approx([-0.75])
    assert SoftOverlong(soft_max_length=50, soft_cache_length=10, max_completion_length=100).soft_max_length == 50
    with pytest.raises(ValueError, match="soft_cache_length"):
        SoftOverlong(max_completion_length=100)
    with pytest.raises(ValueError, match="must be > 0 and < soft_max_length"):
        SoftOverlong(soft_cache_length=100, max_completion_length=100)
