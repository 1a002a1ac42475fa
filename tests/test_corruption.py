"""Synthetic process supervision for natural-language solutions (nabla.rewardtrain.corruption)."""

from __future__ import annotations

import random

import pytest

from nabla import ConfigurationError
from nabla.eval.grading import is_correct
from nabla.rewardtrain.corruption import KINDS, corrupt, corruptions_of, with_corruptions
from nabla.rewardtrain.settings import TrainSettings

QUESTION = "Joan found 70 seashells on the beach. She gave Sam 27 of her seashells. How many seashells are left?"
RIGHT = "Joan has 70 - 27 = 43 seashells left.\nThe answer is \\boxed{43}."


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", KINDS)
def test_each_corruption_changes_the_response_where_it_says_and_is_graded_wrong(kind, seed):
    corruption = corrupt(RIGHT, QUESTION, kind, random.Random(seed))
    if corruption is None:  # e.g. 70 / 27 has no short spelling: that draw does not apply
        assert kind == "wrong_operator"
        return
    assert corruption.kind == kind and corruption.text != RIGHT
    assert corruption.text[: corruption.error_at] == RIGHT[: corruption.error_at]  # right up to the first error
    assert corruption.text[corruption.error_at :] != RIGHT[corruption.error_at :]
    assert is_correct("43", corruption.text) is False


def test_equation_corruptions_carry_the_new_result_to_the_final_answer():
    result = corrupt(RIGHT, QUESTION, "wrong_result", random.Random(0))
    new = result.text.split("= ")[1].split(" ")[0]
    assert new != "43" and result.text.endswith(f"\\boxed{{{new}}}.")
    operand = corrupt(RIGHT, QUESTION, "wrong_operand", random.Random(0))
    a, _, b, _, c = operand.text.split(" has ")[1].split(" seashells")[0].split(" ")
    assert int(a) - int(b) == int(c) and operand.text.endswith(f"\\boxed{{{c}}}.")  # right arithmetic, wrong quantity
    box = corrupt(RIGHT, QUESTION, "wrong_box", random.Random(0))
    assert box.text.startswith("Joan has 70 - 27 = 43") and "\\boxed{43}" not in box.text
    assert corrupt(RIGHT, QUESTION, "truncated", random.Random(0)).text == "Joan has 70 - 27 ="


def test_kinds_that_do_not_apply_give_none_and_unknown_kinds_are_refused():
    assert corrupt("I do not know.", QUESTION, "wrong_result", random.Random(0)) is None
    assert corrupt("70 - 27 = 43", QUESTION, "wrong_box", random.Random(0)) is None
    with pytest.raises(ConfigurationError, match="unknown corruption kind"):
        corrupt(RIGHT, QUESTION, "typo", random.Random(0))


def test_corruptions_are_distinct_seeded_and_never_graded_right():
    first = corruptions_of(RIGHT, QUESTION, "43", 3, seed=5)
    assert first == corruptions_of(RIGHT, QUESTION, "43", 3, seed=5)
    assert len(first) == 3 and len({c.text for c in first}) == 3 and len({c.kind for c in first}) == 3
    # a corruption the grader calls right is dropped: a wrong box equal to the gold is not a wrong answer
    lucky = "Joan has 70 - 27 = 44 seashells left.\nThe answer is \\boxed{44}."
    assert all(is_correct("43", c.text) is False for c in corruptions_of(lucky, QUESTION, "43", 5, seed=0))


def test_with_corruptions_adds_wrong_versions_of_right_training_responses_only():
    def record(heldout: bool) -> dict:
        responses = [
            {"text": RIGHT, "token_ids": [1, 2], "finish_reason": "eos", "correct": True},
            {"text": "The answer is \\boxed{97}.", "token_ids": [3], "finish_reason": "eos", "correct": False},
        ]
        return {"id": f"p{heldout}", "prompt": QUESTION, "answer": "43", "heldout": heldout, "responses": responses}

    def encode(text: str, ended: bool) -> list[int]:
        return [len(text)] + ([0] if ended else [])

    records, counts = with_corruptions([record(False), record(True)], 2, seed=0, encode=encode)
    train, heldout = records
    assert heldout == record(True)  # evaluation reads the policy's own responses only
    extra = train["responses"][2:]
    assert len(extra) == 2 == sum(counts.values())
    assert train["responses"][:2] == record(False)["responses"]
    for response in extra:
        assert response["correct"] is False and response["corruption"] in KINDS
        assert response["token_ids"][-1:] == ([0] if response["corruption"] != "truncated" else [])
    assert with_corruptions([record(False)], 0, 0, encode)[0] == [record(False)]


def test_corruption_settings_are_checked():
    assert TrainSettings(corruptions_per_response=2).corruption_kinds == list(KINDS)
    with pytest.raises(ConfigurationError, match="corruptions_per_response"):
        TrainSettings(corruptions_per_response=-1)
    with pytest.raises(ConfigurationError, match="corruption_kinds"):
        TrainSettings(corruptions_per_response=1, corruption_kinds=["typo"])
