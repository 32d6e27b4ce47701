"""The demo's held-out scenario (issue 25): a quarter of the values edited after training and graded
for staleness, universities added after training, and the "I don't know" questions on names that
no training row holds. Pure functions on the generated knowledge base: no model."""

import random

import pytest

from loraforge.core.errors import LoraforgeError
from loraforge.demo import DemoSettings, build_scenario
from loraforge.demo.advising import (
    EVALUATED_FACTS,
    NO_SCHOLARSHIP,
    EvalItem,
    add_universities,
    build_knowledge_base,
    edit_values,
    euros,
    fact_answer,
    grade,
    is_refusal,
    is_stale,
    phase1_examples,
    phase2_dialogues,
    refusal_examples,
    unknown_topic_answer,
    unknown_university_answer,
)
from loraforge.demo.rag import PageIndex, packed_rows


@pytest.fixture(scope="module")
def scenario():
    return build_scenario(build_knowledge_base(0, n_universities=19, no_scholarship=2), DemoSettings())


def test_sizes_meet_the_issue(scenario):
    assert len(scenario.facts) == 19 * 7 >= 128
    assert {i.fact_type for i in scenario.facts} == set(EVALUATED_FACTS)
    assert len(scenario.updated) == round(0.25 * 19 * 7)
    assert len(scenario.new) == 4 * 7
    assert len(scenario.unknown) >= 24


@pytest.mark.parametrize("seed", range(4))
def test_a_quarter_of_the_values_is_edited(seed):
    kb = build_knowledge_base(seed, n_universities=12)
    edited, edits = edit_values(kb, 0.25, seed)
    assert len(edits) == len(set(edits)) == round(0.25 * 12 * 7)
    for old, new in zip(kb.universities, edited.universities):
        for fact_type in EVALUATED_FACTS:
            changed = old.fact(fact_type) != new.fact(fact_type)
            assert changed == ((old.name, fact_type) in edits), (old.name, fact_type)
    for fact_type in ("deadline", "tuition", "language", "scholarship"):
        values = [u.fact(fact_type) for u in edited.universities if u.fact(fact_type) != NO_SCHOLARSHIP]
        assert len(set(values)) == len(values)  # still gradable: no two universities share a value
        old_values = {u.fact(fact_type) for u in kb.universities}
        for name, edited_type in edits:
            if edited_type == fact_type:
                assert edited.university(name).fact(fact_type) not in old_values  # never a value kb held


def test_stale_answers_are_detected_and_graded_wrong(scenario):
    rng = random.Random(0)
    for item in scenario.updated:
        old, new = scenario.kb.university(item.university), scenario.after.university(item.university)
        old_answer, new_answer = fact_answer(old, item.fact_type, rng), fact_answer(new, item.fact_type, rng)
        assert is_stale(old_answer, item) and not grade(old_answer, item), item
        assert grade(new_answer, item) and not is_stale(new_answer, item), item
        assert not grade(new_answer + "\n" + old_answer, item)  # both values: wrong, and stale
        assert is_stale(new_answer + "\n" + old_answer, item)


def _withdrawn(scenario):
    return [i for i in scenario.updated if i.fact_type == "scholarship"
            and scenario.after.university(i.university).scholarship is None]


def test_default_scenario_withdraws_a_scholarship_and_its_page_says_none(scenario):
    withdrawn = _withdrawn(scenario)
    scholarship_edits = [e for e in scenario.edits if e[1] == "scholarship"]
    assert 1 <= len(withdrawn) < len(scholarship_edits)  # some withdrawn, the others a new amount
    never = {u.name for u in scenario.kb.universities if u.scholarship is None}
    assert len(never) == 2 and never.isdisjoint(i.university for i in withdrawn)  # none to withdraw there
    index = PageIndex(scenario.after)
    for item in withdrawn:
        old = scenario.kb.university(item.university).scholarship
        page = index.pages[[u.name for u in scenario.after.universities].index(item.university)]
        assert "- Scholarship: none offered" in page and old.name not in page and euros(old.amount) not in page
        assert item.expected == NO_SCHOLARSHIP and item.absent


def test_a_withdrawn_scholarship_is_graded_on_the_denial(scenario):
    item = _withdrawn(scenario)[0]
    uni, old = item.university, scenario.kb.university(item.university).scholarship
    for answer in (f"### Scholarship at {uni}\n- {uni} offers **no scholarship**.",
                   f"{uni} no longer offers a scholarship.", f"{uni} doesn’t offer any scholarships.",
                   f"The scholarship at {uni} has been withdrawn.", "**Scholarship:** none offered"):
        assert grade(answer, item) and not is_stale(answer, item), answer
    for answer in (f"The **{old.name}** is worth **{euros(old.amount)}** a year.",  # the old value
                   f"{uni} has no scholarship any more; it was {euros(old.amount)}.",  # denies and states it
                   f"The {old.name} was withdrawn.",  # the old name
                   ):
        assert not grade(answer, item) and is_stale(answer, item), answer
    rival = next(u.scholarship for u in scenario.kb.universities if u.scholarship and u.name != uni)
    for answer in ("No scholarship, but a grant of €2,500 a year.",  # an amount after all
                   f"No scholarship here; try the {rival.name}.",  # another university's
                   f"Is there a scholarship at {uni}? Please check the website.",  # no denial
                   "I don't know."):
        assert not grade(answer, item), answer


def test_training_never_holds_a_withdrawn_scholarship(scenario):
    text, rows = _training_text(scenario)
    for item in _withdrawn(scenario):
        old = scenario.kb.university(item.university).scholarship
        assert old.name in text  # trained on its scholarship as it was
    never = [u for u in scenario.kb.universities if u.scholarship is None]
    assert "Scholarship: none offered" in text  # the form, on the pages of universities that never had one
    for uni in never:
        assert any(f"{uni.name} offers **no scholarship**" in m["content"] or
                   f"**no scholarship** at {uni.name}" in m["content"] for r in rows for m in r["messages"])


def test_new_universities_are_graded_on_their_own_values(scenario):
    trained = {u.name for u in scenario.kb.universities}
    rng = random.Random(0)
    assert all(i.university not in trained for i in scenario.new)
    for item in scenario.new:
        assert grade(fact_answer(scenario.after.university(item.university), item.fact_type, rng), item)


def test_refusal_grading():
    item = EvalItem(question="?", university="Zork University", fact_type="deadline", expected="I don't know",
                    accept=[], reject=["Tamir", "Marine Robotics"], kind="unknown")
    rng = random.Random(0)
    assert grade(unknown_university_answer({"uni": "Zork University"}, rng), item)
    assert grade("### Zork\n- I do not know: it is not in my knowledge base.", item)
    assert not grade("### Zork\n- I don't know, but probably 15 March.", item)  # a value stated
    assert not grade("I don't know; try Tamir.", item)  # a knowledge-base value stated
    assert not grade("### Zork University\n- Apply by **15 March**.", item)  # a confident guess
    assert not grade("### Zork University\n- Please check the website.", item)  # no value, but no "I don't know"
    kb = build_knowledge_base(0, n_universities=3)
    topic = EvalItem(question="?", university=kb.universities[0].name, fact_type="founding year",
                     expected="I don't know", accept=[], kind="unknown")
    assert is_refusal(unknown_topic_answer(kb.universities[0], "founding year", rng), topic)


def _training_text(scenario, settings=DemoSettings()):
    index = PageIndex(scenario.kb, settings.rag_k)
    rows = packed_rows(index, 320, 0, settings.facts_per_row, scenario.train_unknown)
    rows += phase1_examples(scenario.kb) + phase2_dialogues(scenario.kb)
    rows += refusal_examples(scenario.kb, scenario.train_unknown)
    return "\n".join(m["content"] for r in rows for m in r["messages"]), rows


def test_heldout_unknown_and_new_names_never_appear_in_training(scenario):
    text, rows = _training_text(scenario)
    held_out = {i.university for i in scenario.unknown if i.fact_type in EVALUATED_FACTS}
    assert len(held_out) == 16
    train_names = {f["uni"] for f in scenario.train_unknown}
    assert held_out.isdisjoint(train_names)
    for name in held_out | {i.university for i in scenario.new}:
        assert name not in text, name
        assert name.split()[0] not in text, name  # not even the invented stem
    assert any(name in text for name in train_names)  # training does carry refusals, on other names
    assert any("I don't know" in m["content"] for r in rows for m in r["messages"] if m["role"] == "assistant")


def test_heldout_unknown_topics_are_not_trained(scenario):
    text, _ = _training_text(scenario)
    topic_questions = [i.question for i in scenario.unknown if i.fact_type not in EVALUATED_FACTS]
    assert len(topic_questions) == 8
    for question in topic_questions:
        assert question not in text


def test_packed_rows_carry_pages_then_several_questions(scenario):
    index = PageIndex(scenario.kb, 2)
    rows = packed_rows(index, 40, 0, 4, scenario.train_unknown)
    assert len(rows) == 40
    pages = []
    for row in rows:
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["user", "assistant"] * 4
        assert row["messages"][0]["content"].startswith("Knowledge base:\n\n## ")
        pages.append(row["messages"][0]["content"].count("\n## "))
        assert not any(m["content"].startswith("Knowledge base") for m in row["messages"][1:])
    assert set(pages) == {1, 2}  # one or two pages: the wrong one among them in the rows with two


def test_packed_rows_ask_an_absent_scholarship_first_and_twice_as_often(scenario):
    """The rarest answer (no scholarship) is a first question twice as often as another fact, and a
    row whose pages show it asks it before any other follow-up about those pages."""
    index = PageIndex(scenario.kb, 2)
    absent = [u for u in scenario.kb.universities if u.scholarship is None]
    assert len(absent) == 2
    pairs = 19 * 7 + len(absent)  # one round of first questions
    rows = packed_rows(index, pairs, 0, 5, scenario.train_unknown, unknown_share=0.0, topic_share=0.0)
    none_answers = [sum(NO_SCHOLARSHIP in m["content"] for m in r["messages"][1::2]) for r in rows]
    firsts = sum(NO_SCHOLARSHIP in r["messages"][1]["content"] for r in rows)
    assert firsts == 2 * len(absent)
    for row, count in zip(rows, none_answers):
        shown = [u for u in absent if f"## {u.name}\n" in row["messages"][0]["content"]]
        assert count == len(shown)  # each absence on the pages asked once, and early
        if shown and NO_SCHOLARSHIP not in row["messages"][1]["content"]:
            assert NO_SCHOLARSHIP in row["messages"][3]["content"]


@pytest.mark.parametrize("seed", range(4))
def test_added_universities_are_unlike_the_trained_ones(seed):
    kb = build_knowledge_base(seed, n_universities=32)  # `--universities 32`, the large table
    extended = add_universities(kb, 4, seed)
    assert extended.universities[:32] == kb.universities
    for fact_type in ("deadline", "tuition", "language", "scholarship", "programme", "location"):
        values = [u.fact(fact_type) for u in extended.universities]
        assert len(set(values)) == len(values), fact_type
    stems = [u.name.split()[0].lower() for u in extended.universities]
    assert len({s[:2] for s in stems}) == len(stems)  # no new name starts like a trained one


def test_phase_steps_default_by_mode_and_refuse_what_cannot_train():
    assert DemoSettings().steps() == (36, 0)  # retrieval: no phase 2 unless asked
    assert DemoSettings(rag=False).steps() == (270, 12)
    assert DemoSettings(phase2_steps=4).steps() == (36, 4)
    with pytest.raises(LoraforgeError, match="--phase1-steps must be at least 1 .* got 0 and 0"):
        DemoSettings(phase1_steps=0).steps()
    with pytest.raises(LoraforgeError, match="got 36 and -1"):
        DemoSettings(phase2_steps=-1).steps()
