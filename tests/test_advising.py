"""The advising task: a deterministic, consistent knowledge base; data sets that train on it;
held-out questions that share no phrasing with training; and graders that are strict about the
fact but tolerant about its formatting."""

import json
import random
import re
from dataclasses import astuple
from difflib import SequenceMatcher
from itertools import combinations

import pytest

from loraforge.demo.advising import (
    COMPARE_QUESTIONS,
    DIALOGUE_OPENERS,
    EVALUATED_FACTS,
    FOLLOW_UPS,
    HELDOUT_QUESTIONS,
    MONTHS,
    PROGRAMME_QUESTIONS,
    TRAIN_QUESTIONS,
    VISA_OPENERS,
    EvalItem,
    build_knowledge_base,
    euros,
    fact_answer,
    fact_correct,
    heldout_questions,
    is_markdown,
    phase1_examples,
    phase2_dialogues,
    write_datasets,
)


@pytest.fixture(scope="module")
def kb():
    return build_knowledge_base()


@pytest.fixture(scope="module")
def phase1(kb):
    return phase1_examples(kb)


@pytest.fixture(scope="module")
def phase2(kb):
    return phase2_dialogues(kb)


@pytest.fixture(scope="module")
def heldout(kb):
    return heldout_questions(kb)


def turns(records, role):
    return [m["content"] for r in records for m in r["messages"] if m["role"] == role]


# ----------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_data():
    a, b = build_knowledge_base(3), build_knowledge_base(3)
    assert a == b
    assert phase1_examples(a, seed=3) == phase1_examples(b, seed=3)
    assert phase2_dialogues(a, seed=3) == phase2_dialogues(b, seed=3)
    assert heldout_questions(a, seed=3) == heldout_questions(b, seed=3)


def test_different_seed_gives_different_data():
    a, b = build_knowledge_base(0), build_knowledge_base(1)
    assert {u.name for u in a.universities}.isdisjoint(u.name for u in b.universities)
    assert [u.deadline for u in a.universities] != [u.deadline for u in b.universities]
    assert phase1_examples(a, seed=0) != phase1_examples(a, seed=1)


# ----------------------------------------------------------------------------- knowledge base


def test_sizes_and_evaluated_facts(kb, phase1, phase2, heldout):
    assert len(kb.universities) == 12 and len(EVALUATED_FACTS) == 7
    assert len(heldout) == len(kb.universities) * len(EVALUATED_FACTS) == 84
    assert {(i.university, i.fact_type) for i in heldout} == {
        (u.name, f) for u in kb.universities for f in EVALUATED_FACTS}
    # defaults: 6 per fact, 2 overviews, for each university
    assert len(phase1) == 12 * (7 * 6 + 2)
    assert len(phase2) == 48 and len(phase2) < len(phase1)


@pytest.mark.parametrize("seed", range(5))
def test_names_are_distinct_and_not_confusable(seed):
    kb = build_knowledge_base(seed, n_universities=20)
    stems = [u.name.split()[0] for u in kb.universities]
    names = stems + [u.city for u in kb.universities] + [u.scholarship.name.split()[0] for u in kb.universities]
    names += [c.name for c in kb.countries]
    assert len({n.lower()[:3] for n in names}) == len(names)  # no two start alike
    assert len({s.lower()[:2] for s in stems}) == len(stems)  # universities even less so
    for a, b in combinations(kb.universities, 2):
        assert a.name not in b.name and b.name not in a.name


@pytest.mark.parametrize("seed", range(5))
def test_values_are_unique_within_each_fact_type(seed):
    kb = build_knowledge_base(seed)
    for fact_type in EVALUATED_FACTS:
        if fact_type == "visa":  # the country's rule: unique among countries
            values = [c.visa_rule for c in kb.countries]
        else:
            values = [u.fact(fact_type) for u in kb.universities]
        assert len(set(values)) == len(values), fact_type
    amounts = [u.tuition for u in kb.universities] + [u.scholarship.amount for u in kb.universities]
    amounts += [c.visa_funds for c in kb.countries]
    assert len(set(amounts)) == len(amounts)  # no euro amount means two things


def test_country_facts_are_shared_by_its_universities(kb):
    for uni in kb.universities:
        assert uni.country in kb.countries
        if not uni.language.is_english:
            assert uni.language.test == uni.country.language == uni.teaching_language


def test_bad_size_is_refused():
    with pytest.raises(ValueError):
        build_knowledge_base(n_universities=1)
    with pytest.raises(ValueError):
        build_knowledge_base(n_universities=41)


# ----------------------------------------------------------------------------- consistency

DATE = re.compile(r"\b\d{1,2} (?:" + "|".join(MONTHS) + r")\b")
EURO = re.compile(r"€[\d,]*\d")
WEEKS = re.compile(r"\b\d+ weeks\b")
LANGUAGE = re.compile(r"\b(?:IELTS \d\.\d|TOEFL \d+|[ABC][12] \w+)")
BOLD = re.compile(r"\*\*(.+?)\*\*")


def atoms(uni):
    """Every value a training answer may state about `uni`."""
    return {uni.name, uni.city, uni.country.name, *uni.programmes, str(uni.deadline), euros(uni.tuition),
            str(uni.language), uni.scholarship.name, euros(uni.scholarship.amount),
            f"{uni.country.visa_weeks} weeks", euros(uni.country.visa_funds)}


def test_every_stated_value_belongs_to_the_university_in_question(kb, phase1, phase2):
    """A line's values must be those of the universities it names, or, if it names none, of the
    universities its answer names (the heading of a single-university answer)."""
    for answer in turns(phase1 + phase2, "assistant"):
        named = [u for u in kb.universities if u.name in answer]
        assert named, answer
        for line in answer.splitlines():
            scope = [u for u in named if u.name in line] or named
            allowed = set().union(*(atoms(u) for u in scope))
            for pattern in (BOLD, DATE, EURO, WEEKS, LANGUAGE):
                for value in pattern.findall(line):
                    assert value in allowed, (value, line, answer)


def test_phase1_answers_the_asked_fact(kb, phase1):
    """Every evaluated fact is stated at least `per_fact` times (6), in answers to questions that
    name its university."""
    for uni in kb.universities:
        for fact_type in EVALUATED_FACTS:
            value = {"scholarship": euros(uni.scholarship.amount), "programme": uni.programmes[0],
                     "location": uni.city, "visa": euros(uni.country.visa_funds)}.get(fact_type, uni.fact(fact_type))
            hits = [r for r in phase1 if uni.name in r["messages"][0]["content"]
                    and value in r["messages"][1]["content"]]
            assert len(hits) >= 6, (uni.name, fact_type)


def test_training_answers_are_graded_correct(kb, heldout):
    """A model that reproduces any training answer verbatim scores it correct: grader and training
    format agree."""
    rng = random.Random(0)
    for item in heldout:
        uni = kb.university(item.university)
        for _ in range(10):
            assert fact_correct(fact_answer(uni, item.fact_type, rng), item), item.question


def test_comparisons_name_the_right_winner(kb, phase2):
    """"- A is cheaper." must follow from the two values listed above it."""
    rules = {"is cheaper": (min, lambda u: u.tuition),
             "closes later": (max, lambda u: (u.deadline.month, u.deadline.day)),
             "offers more": (max, lambda u: u.scholarship.amount)}
    checked = 0
    for answer in turns(phase2, "assistant"):
        if " vs " not in answer.splitlines()[0]:
            continue
        _, line_a, line_b, verdict = answer.splitlines()
        a, b = (kb.university(line.removeprefix("- ").split(":")[0]) for line in (line_a, line_b))
        phrase = next(p for p in rules if verdict.endswith(p + "."))
        pick, key = rules[phrase]
        assert verdict == f"- {pick(a, b, key=key).name} {phrase}."
        checked += 1
    assert checked >= 5


# ----------------------------------------------------------------------------- held-out phrasing


def training_templates():
    pools = [*TRAIN_QUESTIONS.values(), DIALOGUE_OPENERS, *FOLLOW_UPS.values(), *COMPARE_QUESTIONS.values(),
             PROGRAMME_QUESTIONS, VISA_OPENERS]
    return [t for pool in pools for t in pool]


def skeleton(template):
    return re.sub(r"[^a-z{} ]", "", template.lower()).split()


def test_heldout_templates_are_disjoint_from_training_templates():
    train = training_templates()
    train_skeletons = {tuple(skeleton(t)) for t in train}
    for fact_type, pool in HELDOUT_QUESTIONS.items():
        assert len(pool) >= 4
        for template in pool:
            assert tuple(skeleton(template)) not in train_skeletons, template
            # not merely a near copy either
            closest = max(SequenceMatcher(None, template.lower(), t.lower()).ratio() for t in train)
            assert closest < 0.75, template
    for fact_type in EVALUATED_FACTS:
        assert len(TRAIN_QUESTIONS[fact_type]) >= 6


def test_no_heldout_question_appears_in_training(heldout, phase1, phase2):
    asked = [q.lower() for q in turns(phase1 + phase2, "user")]
    for item in heldout:
        question = item.question.lower()
        assert not any(question in q for q in asked), item.question


@pytest.mark.parametrize("seed", range(3))
def test_heldout_questions_name_their_university(seed):
    kb = build_knowledge_base(seed)
    for item in heldout_questions(kb, seed):
        assert item.university in item.question
        assert item.expected == kb.university(item.university).fact(item.fact_type)


# ----------------------------------------------------------------------------- markdown


def test_every_training_answer_is_markdown(phase1, phase2):
    answers = turns(phase1 + phase2, "assistant")
    assert all(is_markdown(a) for a in answers)
    assert any(a.startswith("###") for a in answers) and any("|---|" in a for a in answers)


@pytest.mark.parametrize("text", [
    "### Deadline",
    "Some text\n## Heading\nmore",
    "- Apply by 15 March.",
    "* one\n* two",
    "+ item",
    "1. First step",
    "2) Second step",
    "   - indented up to three spaces",
    "| Fact | Value |\n|---|---|\n| Deadline | 15 March |",
    "| a | b |\n| :--- | ---: |",
])
def test_markdown_structures_pass(text):
    assert is_markdown(text)


@pytest.mark.parametrize("text", [
    "",
    "The deadline for Kingek College is 15 March.",
    "Applications close on **15 March**, so hurry.",  # emphasis alone is not structure
    "Tuition is high - around €9,800 per year.",
    "#NoSpaceHashtag is not a heading",
    "-no space is not a bullet",
    "**Deadline**: 15 March",
    "| a | b |\nno separator row follows",
    "---",
    "Line one.\nLine two.\n\nA third paragraph.",
])
def test_plain_prose_fails(text):
    assert not is_markdown(text)


# ----------------------------------------------------------------------------- fact grading


def item_for(heldout, fact_type, index=0):
    return [i for i in heldout if i.fact_type == fact_type][index]


def test_every_accepted_form_is_accepted(heldout):
    for item in heldout:
        for form in item.accept:
            answer = f"### Answer\n- It is **{form}**." + "".join(f" ({extra})" for extra in item.require_all)
            assert fact_correct(answer, item), (form, item.question)


def test_formatting_is_tolerated(kb, heldout):
    uni = kb.universities[0]
    deadline = item_for(heldout, "deadline")
    day, month = uni.deadline.day, MONTHS[uni.deadline.month - 1]
    for text in (f"apply by {month.upper()} {day}", f"the {day}th of {month}" if day not in (1, 2, 3) else
                 f"the {day} of {month}", f"**{day}**\u00a0{month}", f"{day}  {month}."):
        assert fact_correct(text, deadline), text

    tuition = item_for(heldout, "tuition")
    n = uni.tuition
    for text in (f"€{n}", f"€{n:,}.", f"{n:,} Euros a year", f"EUR {n:,}", f"**€{n:,}**/year", f"{n} €"):
        assert fact_correct(text, tuition), text

    language = item_for(heldout, "language")
    req = uni.language
    forms = ([f"an {req.test.lower()} score of {req.level}", f"{req.level} on the {req.test}"] if req.is_english
             else [f"{req.test} at {req.level}-level", f"{req.level}-level {req.test.upper()}"])
    for text in forms:
        assert fact_correct(text, language), text


def test_another_universitys_value_is_rejected(kb, heldout):
    for item in heldout:
        for other in kb.universities:
            if other.name == item.university or (
                    item.fact_type == "visa" and other.country == kb.university(item.university).country):
                continue  # a country's universities share its visa rule
            theirs = f"### {item.university}\n- **{other.fact(item.fact_type)}**"
            assert not fact_correct(theirs, item), (item.question, theirs)
            # naming every value in the hope that one is right does not score either
            own = kb.university(item.university).fact(item.fact_type)
            assert not fact_correct(f"- {own}\n- {other.fact(item.fact_type)}", item)


def test_near_misses_are_rejected(kb, heldout):
    uni = kb.universities[0]
    deadline = item_for(heldout, "deadline")
    wrong_day = uni.deadline.day + (1 if uni.deadline.day < 28 else -1)
    assert not fact_correct(f"{wrong_day} {MONTHS[uni.deadline.month - 1]}", deadline)
    assert not fact_correct(f"1{uni.deadline}", deadline)  # "15 March" must not hide in "115 March"

    tuition = item_for(heldout, "tuition")
    assert not fact_correct(f"€{uni.tuition}0", tuition)
    assert not fact_correct(f"{uni.tuition}", tuition)  # a bare number is not a fee

    scholarship = item_for(heldout, "scholarship")
    assert fact_correct(f"The {uni.scholarship.name} pays {euros(uni.scholarship.amount)}.", scholarship)
    assert not fact_correct(f"A scholarship of {euros(uni.scholarship.amount)}.", scholarship)  # no name
    assert not fact_correct(f"The {uni.scholarship.name}.", scholarship)  # no amount


def test_grading_boundaries():
    item = EvalItem(question="?", university="U", fact_type="language", expected="IELTS 6.0",
                    accept=["IELTS 6.0", "IELTS 6"], reject=["IELTS 6.5", "5 March"])
    assert fact_correct("You need IELTS 6.", item)
    assert fact_correct("You need IELTS 6.0 or more", item)
    assert not fact_correct("You need IELTS 6.5", item)
    assert not fact_correct("You need IELTS 60", item)
    assert fact_correct("IELTS 6, apply by 15 March", item)  # "5 March" is not in "15 March"


def test_untrained_style_answers_score_zero(heldout):
    generic = "### Answer\n- Please check the university's website for the latest information."
    assert not any(fact_correct(generic, item) for item in heldout)


# ----------------------------------------------------------------------------- length


def test_sequences_are_short(phase1, phase2):
    answers = turns(phase1 + phase2, "assistant")
    assert max(len(a.split()) for a in answers) < 75  # the overview table of all 7 facts
    assert sum(len(a.split()) for a in answers) / len(answers) < 30
    for question in turns(phase1 + phase2, "user"):
        assert len(question.split()) < 25, question
    for record in phase2:
        user_turns = sum(m["role"] == "user" for m in record["messages"])
        assert 2 <= user_turns <= 3
        assert [m["role"] for m in record["messages"]] == ["user", "assistant"] * user_turns


# ----------------------------------------------------------------------------- files


def test_write_datasets(tmp_path, kb, phase1, phase2, heldout):
    paths = write_datasets(tmp_path / "advising")
    assert set(paths) == {"phase1", "phase2", "heldout"}

    def read(name):
        return [json.loads(line) for line in paths[name].read_text(encoding="utf-8").splitlines()]

    assert read("phase1") == phase1 and read("phase2") == phase2
    rows = read("heldout")
    assert {"question", "expected", "accept", "fact_type"} <= set(rows[0])
    items = [EvalItem(**row) for row in rows]
    assert [astuple(i) for i in items] == [astuple(i) for i in heldout]
    assert "€" in paths["phase1"].read_text(encoding="utf-8")  # written as UTF-8, not \u escapes

