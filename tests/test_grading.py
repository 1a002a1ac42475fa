import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from nabla.errors import ConfigurationError, DataError
from nabla.eval import grading
from nabla.eval.datasets import (
    PROMPT_TEMPLATE,
    DatasetSpec,
    dataset_purpose,
    format_question,
    load_dataset,
    load_jsonl,
    require_training_split,
)
from nabla.eval.grading import answer_key, answers_match, extract_answer, grade, is_correct, last_boxed


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("so the total is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("first \\boxed{3}, then \\boxed{\\sqrt{\\frac{4}{9}}}", "\\sqrt{\\frac{4}{9}}"),
        ("\\boxed{\\boxed{5}}", "5"),
        ("\\fbox{12}", "12"),
        ("\\boxed{4} and a cut-off \\boxed{7", "4"),
        ("Natalia sold 48+24 = 72 clips.\n#### 72", "72"),
        ("#### 1,250", "1250"),
        ("The answer is 72 apples.", "72"),
        ("Therefore the final answer is $\\frac{3}{4}$.", "\\frac{3}{4}"),
        ("she has 3 apples, then 1,250 pears, then -4.5", "-4.5"),
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


def test_last_boxed_keeps_nested_braces():
    assert last_boxed("x \\boxed{\\left(3, \\frac{\\pi}{2}\\right)} y") == "\\left(3, \\frac{\\pi}{2}\\right)"
    assert last_boxed("nothing boxed") is None


@pytest.mark.parametrize(
    ("gold", "response", "expected"),
    [
        ("0.5", "\\boxed{\\frac{1}{2}}", True),  # fraction vs decimal
        ("\\frac{1}{2}", "\\boxed{0.5}", True),
        ("1/3", "\\boxed{0.333333}", True),
        ("\\frac{3}{4}", "\\boxed{\\dfrac{3}{4}}", True),
        ("72", "#### 72", True),
        ("72", "the answer is 72.0", True),
        ("2125", "\\boxed{2,125}", True),
        ("145", "I think it is \\boxed{146}", False),
        ("1/3", "\\boxed{0.33}", False),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(3, \\frac{\\pi}{2})}", True),
        ("5", "I do not know", False),
    ],
)
def test_is_correct(gold, response, expected):
    assert is_correct(gold, response) is expected


def test_unparsable_gold_is_skipped_not_crashed():
    result = grade("Mrs. Hilt", "\\boxed{Mrs. Hilt}")
    assert result.correct is None and result.status == "gold_unparsable"
    assert grade("", "\\boxed{3}").correct is None
    assert answers_match("Mrs. Hilt", None) is None


def test_grade_statuses():
    assert grade("5", "\\boxed{5}").status == "correct"
    assert grade("5", "\\boxed{6}").status == "wrong"
    assert grade("5", "no idea").status == "no_answer"
    assert grade("5", "\\boxed{" + "1+" * 400 + "1}").status == "wrong"  # over-long answers are not parsed


def test_answer_keys_group_equal_answers():
    assert answer_key("72.0") == answer_key("72") == answer_key("$72$") == answer_key("\\$72") == "72"
    assert answer_key("\\frac{1}{2}") == answer_key("0.5") == answer_key("1/2") == "1/2"
    assert answer_key("1,000") == "1000"
    assert answer_key("\\left(1, 2\\right)") == answer_key("(1,2)")
    assert answer_key("3") != answer_key("4")
    assert answer_key(None) is None


def test_grading_from_worker_threads_matches_the_main_thread():
    cases = [("0.5", "\\boxed{\\frac12}"), ("72", "#### 73"), ("Mrs. Hilt", "x"), ("\\frac{2}{3}", "\\boxed{4/6}")]
    expected = [grade(g, r) for g, r in cases]
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda case: grade(*case), cases * 3)) == expected * 3


def _slow_verify(gold, answer):
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:  # short sleeps: interruptible, and cheap once a worker thread is abandoned
        time.sleep(0.01)
    return True


@pytest.mark.parametrize("where", ["main", "worker"])
def test_grading_is_bounded_in_time(monkeypatch, where):
    monkeypatch.setattr(grading, "_verify", _slow_verify)
    outcome = {}

    def call():
        started = time.monotonic()
        outcome["grade"] = grade("\\frac{1}{2}", "\\boxed{x^2}", timeout_s=0.3)
        outcome["elapsed"] = time.monotonic() - started

    if where == "main":
        call()
    else:
        thread = threading.Thread(target=call)
        thread.start()
        thread.join()
    assert outcome["grade"].status == "timeout" and outcome["grade"].correct is False
    assert outcome["elapsed"] < 3


# ---------------------------------------------------------------------------------------------- datasets
def test_load_dataset_slices_with_stable_ids():
    problems = load_dataset("svamp", "test", limit=3, offset=2)
    assert [p.id for p in problems] == ["svamp/test/2", "svamp/test/3", "svamp/test/4"]
    assert all(p.source == "svamp/test" and p.question and p.answer for p in problems)
    assert load_dataset("svamp", "test", limit=1, offset=3)[0] == problems[1]


def test_gold_answers_are_clean_and_gradable():
    assert load_dataset("svamp", "test", limit=1)[0].answer == "145"
    gsm = load_dataset("gsm8k", "train", limit=50)
    assert gsm[0].answer == "72" and all("," not in p.answer for p in gsm)
    math500 = load_dataset("math500", "test", limit=5)
    assert math500[0].source == "math_oai/test" and all(grading.gold_parses(p.answer) for p in math500)
    assert load_dataset("math", "test", limit=1)[0].answer == "2"
    assert load_dataset("asdiv", "test", limit=1)[0].answer == "9"  # "9 (apples)" without its unit
    addsub = load_dataset("mawps", "addsub", limit=2)
    assert [p.answer for p in addsub] == ["43", "26"]


def test_evaluation_sets_refuse_training():
    evaluation = [("svamp", "test"), ("math_oai", "test"), ("gsm8k", "test"), ("math", "test"), ("asdiv", "test")]
    for name, split in evaluation:
        assert dataset_purpose(name, split) == "evaluation"
        with pytest.raises(DataError, match="must not be trained"):
            require_training_split(name, split)
    for name, split in [("gsm8k", "train"), ("math", "train"), ("mawps", "singleop"), ("mawps", "multiarith")]:
        assert dataset_purpose(name, split) == "training"
        require_training_split(name, split)


def test_unknown_names_are_one_line_errors():
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("aime", "test")
    with pytest.raises(DataError, match="no split"):
        load_dataset("svamp", "train")


def test_load_jsonl_with_custom_fields(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [{"q": "what is 2 plus 3 ?", "a": 5, "key": "x1"}, {"q": "what is 1 plus 1 ?", "a": "2", "key": "x2"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    problems = load_jsonl(path, question_field="q", answer_field="a", id_field="key")
    assert [(p.id, p.answer, p.source) for p in problems] == [("x1", "5", "mine"), ("x2", "2", "mine")]
    spec = DatasetSpec(name="jsonl", path=str(path), question_field="q", answer_field="a")
    assert [p.id for p in spec.load(limit=1, offset=1)] == ["1"]
    with pytest.raises(DataError, match="no field 'problem'"):
        load_jsonl(path)


def test_prompt_template_is_filled_verbatim():
    assert format_question("What is 2+2?") == PROMPT_TEMPLATE.replace("{question}", "What is 2+2?")
    assert "\\boxed{}" in format_question("q")
    assert format_question("q", "Q: {question}\\nA: \\boxed{}") == "Q: q\\nA: \\boxed{}"
    with pytest.raises(ConfigurationError):
        format_question("q", "no placeholder")
