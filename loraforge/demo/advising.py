"""Study-abroad advising: an invented knowledge base and the data sets of the `make demo` task.

The demo re-enacts, offline and on a CPU, a paper that turned an instruction model into a
study-abroad advisor with LoRA. Real admission facts would be partly known to the base model
and would go stale, so everything here is invented: universities with made-up names in made-up
cities and countries, each with a deadline, a tuition fee, a language requirement, a scholarship
(or none: :data:`NO_SCHOLARSHIP`), flagship programmes and the visa rule of its country. Before training the model cannot know any
of it (fact accuracy near 0); after training it should.

Everything is generated from a seed with no network access, and a seed always gives the same
knowledge base and the same data sets.

Two training phases, as in the paper (chat records ``{"messages": [...]}``, answers in Markdown):

* **Phase 1** (:func:`phase1_examples`): many single questions and answers, one fact each, asked
  in varied training phrasings, plus overview questions answered with a small Markdown table of
  one university's facts (more exposures of every fact, in a second layout).
* **Phase 2** (:func:`phase2_dialogues`): fewer multi-turn advising dialogues (2-3 user turns):
  one university asked about fact after fact, two universities compared, a programme leading to
  a university, a visa question leading to costs. Every assistant turn names the university it
  talks about, so each turn is self-contained.

Sequences are kept short on purpose (one-sentence questions, answers of a heading and one
bullet) because the demo trains on a 2-core CPU in minutes.

**Grading** (:func:`heldout_questions`, :func:`fact_correct`, :func:`is_markdown`): one held-out
question for every (university, evaluated fact type), phrased from templates that no training
record uses. An answer is *fact-correct* when it states the asked value in an accepted surface
form (``15 March`` / ``March 15`` / ``15th March``; ``€9,800`` / ``9800 euros``; ...), also
names the scholarship when a scholarship is asked (or, for a university with none, says so:
:data:`NO_SCHOLARSHIP_FORMS`), and states no other university's value of
that fact type, so listing every deadline does not score. Separately, an answer is *Markdown*
when it has a heading, a list item or a table (the exact rule is in :func:`is_markdown`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Every fact type of a university, each trained and graded (heldout_questions). Only the first four
# belong to one university alone and can change from one term to the next (edit_values); location and
# programmes are fixed, and the visa rule is its country's.
EVALUATED_FACTS = ("deadline", "tuition", "language", "scholarship", "programme", "location", "visa")
EDITABLE_FACTS = ("deadline", "tuition", "language", "scholarship")
# A university may offer no scholarship (a user's knowledge base, `build_knowledge_base(no_scholarship=)`,
# or one withdrawn by `edit_values`): its fact is this value, its page says "Scholarship: none offered".
NO_SCHOLARSHIP = "no scholarship"
# One scholarship edit in this many withdraws the scholarship instead of changing its amount.
WITHDRAW_EVERY = 4

MONTHS = ("January", "February", "March", "April", "May", "June",
          "July", "August", "September", "October", "November", "December")
# Deadlines fall in January-July, so "later" in a comparison is plain calendar order, and on days
# that exist in every month.
DEADLINE_MONTHS = range(1, 8)
DEADLINE_DAYS = (1, 5, 10, 15, 20, 25, 28)

IELTS_BANDS = ("5.5", "6.0", "6.5", "7.0", "7.5", "8.0")
TOEFL_SCORES = ("75", "80", "85", "90", "95", "100", "105", "110")
CEFR_LEVELS = ("B1", "B2", "C1", "C2")
ENGLISH_TESTS = ("IELTS", "TOEFL")

UNIVERSITY_STYLES = ("{} University", "{} Institute of Technology", "{} College", "{} Polytechnic",
                     "{} Academy", "{} School of Sciences")
SCHOLARSHIP_KINDS = ("Merit Award", "Excellence Grant", "Global Scholarship", "Horizon Fellowship",
                     "Pioneer Bursary", "Bridge Scholarship")
PROGRAMMES = (
    "Marine Robotics", "Glacial Hydrology", "Urban Forestry", "Computational Linguistics",
    "Space Systems Engineering", "Sustainable Architecture", "Food Science", "Game Design",
    "Volcanology", "Public Health", "Quantum Materials", "Wine Chemistry", "Renewable Energy",
    "Medieval History", "Data Journalism", "Coastal Ecology", "Industrial Design", "Arctic Studies",
    "Sports Medicine", "Textile Engineering", "Musical Acoustics", "Behavioural Economics",
    "Bioinformatics", "Aerospace Medicine", "Film Restoration", "Desert Agriculture", "Cybersecurity",
    "Maritime Law", "Neuroscience", "Translation Studies", "Sound Design", "Tropical Medicine",
    "Rail Engineering", "Museum Studies", "Seismology", "Water Management", "Veterinary Science",
    "Fashion Management", "Robotic Surgery", "Mountain Tourism", "Polar Engineering", "Soil Science",
    "Digital Humanities", "Ocean Acoustics", "Forensic Chemistry", "Space Law", "Urban Planning",
    "Nuclear Engineering", "Classical Archaeology", "Climate Policy", "Animation", "Dance Therapy",
    "Biomedical Optics", "Supply Chain Management", "Agricultural Robotics", "Linguistic Anthropology",
    "Materials Recycling", "Hydrogen Systems", "Choral Conducting", "Paper Conservation", "Avalanche Science",
    "Coral Biology", "Wind Engineering", "Hospitality Management", "Financial Mathematics", "Speech Therapy",
    "Cartography", "Brewing Science", "Glass Design", "Forest Ecology", "Satellite Geodesy",
    "Peace Studies", "Ethnomusicology", "Bridge Engineering", "Fisheries Science", "Typography",
    "Lighthouse Engineering", "Comparative Law", "Perfumery", "Quantum Computing",
)
MAX_UNIVERSITIES = len(PROGRAMMES) // 2  # two flagship programmes each, none shared

# Syllables for invented names. Single-consonant onsets only after the first syllable keep names
# pronounceable (and short in tokens).
_ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "st", "th")
_INNER_ONSETS = ("b", "d", "g", "k", "l", "m", "n", "r", "s", "t", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u")
_INNER_CODAS = ("", "", "n", "r", "l", "s")
_FINAL_CODAS = ("", "n", "r", "l", "th", "s", "k", "m", "nd", "st")


# --------------------------------------------------------------------------- knowledge base


@dataclass(frozen=True)
class Date:
    day: int
    month: int  # 1-12

    def __str__(self) -> str:
        return f"{self.day} {MONTHS[self.month - 1]}"


@dataclass(frozen=True)
class LanguageRequirement:
    test: str  # "IELTS", "TOEFL" or a local language such as "Velorian"
    level: str  # an IELTS band ("6.5"), a TOEFL score ("90") or a CEFR level ("B2")

    @property
    def is_english(self) -> bool:
        return self.test in ENGLISH_TESTS

    def __str__(self) -> str:
        return f"{self.test} {self.level}" if self.is_english else f"{self.level} {self.test}"


@dataclass(frozen=True)
class Scholarship:
    name: str
    amount: int  # euros per year

    def __str__(self) -> str:
        return f"{self.name} ({euros(self.amount)})"


@dataclass(frozen=True)
class Country:
    name: str
    language: str  # also the teaching language of universities that ask for a local-language level
    visa_weeks: int  # how long a student visa takes to process
    visa_funds: int  # euros a student must show in a bank account for the visa

    @property
    def visa_rule(self) -> str:
        return f"{self.visa_weeks} weeks to process; show {euros(self.visa_funds)} in a bank account"


@dataclass(frozen=True)
class University:
    name: str
    city: str
    country: Country
    programmes: tuple[str, str]  # flagship programmes, unique to this university
    deadline: Date
    tuition: int  # euros per year
    language: LanguageRequirement
    scholarship: Scholarship | None  # None: offers no scholarship

    @property
    def teaching_language(self) -> str:
        return "English" if self.language.is_english else self.language.test

    def fact(self, fact_type: str) -> str:
        """The canonical value of one fact, as training answers state it."""
        values = {
            "deadline": str(self.deadline),
            "tuition": euros(self.tuition),
            "language": str(self.language),
            "scholarship": str(self.scholarship) if self.scholarship else NO_SCHOLARSHIP,
            "programme": " and ".join(self.programmes),
            "location": f"{self.city}, {self.country.name}",
            "visa": self.country.visa_rule,
        }
        return values[fact_type]

    def fields(self) -> dict[str, str]:
        """Everything an answer or question template may name, by placeholder (sch_name and
        sch_amount only when there is a scholarship: a template that needs them then fails loudly)."""
        sch = {"sch_name": self.scholarship.name, "sch_amount": euros(self.scholarship.amount)} if self.scholarship else {}
        return {
            "uni": self.name, "city": self.city, "country": self.country.name,
            "deadline": str(self.deadline), "tuition": euros(self.tuition), "language": str(self.language),
            "teaching": self.teaching_language, **sch, "p1": self.programmes[0], "p2": self.programmes[1],
            "visa_weeks": str(self.country.visa_weeks), "visa_funds": euros(self.country.visa_funds),
        }


@dataclass(frozen=True)
class KnowledgeBase:
    seed: int
    countries: tuple[Country, ...]
    universities: tuple[University, ...]

    def university(self, name: str) -> University:
        for uni in self.universities:
            if uni.name == name:
                return uni
        raise KeyError(name)


def euros(amount: int) -> str:
    return f"€{amount:,}"


def _edit_distance(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


class _NameMaker:
    """Invents two-syllable names, none confusable with another made by the same maker: each
    starts with its own three letters (so a model sees a different first token or two) and is at
    least three edits away from every other."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.taken: list[str] = []

    def __call__(self, prefixes: set[str] | None = None) -> str:
        """A new name; with `prefixes`, also one whose first two letters are not in it (then added),
        which keeps the names the model must tell apart most (universities) further apart."""
        r = self.rng
        for _ in range(10_000):
            name = (r.choice(_ONSETS) + r.choice(_VOWELS) + r.choice(_INNER_CODAS)
                    + r.choice(_INNER_ONSETS) + r.choice(_VOWELS) + r.choice(_FINAL_CODAS))
            if prefixes is not None and name[:2] in prefixes:
                continue
            if all(name[:3] != t[:3] and _edit_distance(name, t) >= 3 for t in self.taken):
                self.taken.append(name)
                if prefixes is not None:
                    prefixes.add(name[:2])
                return name.capitalize()
        raise ValueError("ran out of distinct names; ask for fewer universities")


def _unique(draw, taken: set):
    """Draw values until one is not in `taken`; every fact value is unique within its type, so
    that stating another university's value can never be graded correct."""
    for _ in range(10_000):
        value = draw()
        if value not in taken:
            taken.add(value)
            return value
    raise ValueError("ran out of distinct values; ask for fewer universities")


class _Draws:
    """The generator's random draws, and every name and value already taken: the universities added
    later (:func:`add_universities`), the edited values (:func:`edit_values`) and the unknown names
    (:func:`unknown_universities`) stay unique within each fact type and unconfusable with `kb`'s."""

    def __init__(self, rng: random.Random, kb: KnowledgeBase | None = None):
        self.rng, self.name = rng, _NameMaker(rng)
        self.amounts: set[int] = set()
        self.weeks: set[int] = set()
        self.dates: set[Date] = set()
        self.requirements: set[LanguageRequirement] = set()
        self.university_prefixes: set[str] = set()
        self.programmes: set[str] = set()
        for uni in kb.universities if kb else ():
            self.take(uni)
        for country in kb.countries if kb else ():
            self.weeks.add(country.visa_weeks)
            self.amounts.add(country.visa_funds)
            self.name.taken.append(country.name.lower())

    def take(self, uni: University) -> None:
        stem = uni.name.split()[0].lower()
        self.name.taken += [stem, uni.city.lower()]
        self.university_prefixes.add(stem[:2])
        self.programmes.update(uni.programmes)
        self.amounts.add(uni.tuition)
        if uni.scholarship:
            self.name.taken.append(uni.scholarship.name.split()[0].lower())
            self.amounts.add(uni.scholarship.amount)
        self.dates.add(uni.deadline)
        self.requirements.add(uni.language)

    def country(self) -> Country:
        stem = self.name()
        name = stem + ("ia" if stem[-1] not in _VOWELS else "nia")
        return Country(name=name, language=name + "n", visa_weeks=_unique(lambda: self.rng.randint(3, 16), self.weeks),
                       visa_funds=_unique(lambda: self.rng.randrange(7_000, 12_500, 250), self.amounts))

    def deadline(self) -> Date:
        return _unique(lambda: Date(self.rng.choice(DEADLINE_DAYS), self.rng.choice(DEADLINE_MONTHS)), self.dates)

    def tuition(self) -> int:
        return _unique(lambda: self.rng.randrange(5_000, 20_000, 100), self.amounts)

    def scholarship_amount(self) -> int:
        return _unique(lambda: self.rng.randrange(1_000, 8_001, 100), self.amounts)

    def language(self, country: Country) -> LanguageRequirement:
        def requirement() -> LanguageRequirement:
            # Mostly an English test; some universities teach in the local language instead (more
            # than one in four once the English values are used up, as values must be unique).
            if self.rng.random() < 0.25:
                return LanguageRequirement(country.language, self.rng.choice(CEFR_LEVELS))
            test = self.rng.choice(ENGLISH_TESTS)
            return LanguageRequirement(test, self.rng.choice(IELTS_BANDS if test == "IELTS" else TOEFL_SCORES))
        return _unique(requirement, self.requirements)

    def university_name(self, own_prefix: bool = True) -> str:
        """`own_prefix`: first two letters no other university of these draws has (see _NameMaker)."""
        return self.rng.choice(UNIVERSITY_STYLES).format(self.name(self.university_prefixes if own_prefix else None))

    def universities(self, countries: list[Country] | tuple[Country, ...], n: int) -> list[University]:
        free = [p for p in PROGRAMMES if p not in self.programmes]
        if 2 * n > len(free):
            raise ValueError(f"only {len(free) // 2} more universities fit the programme pool "
                             f"({len(PROGRAMMES)} programmes, two each), asked for {n}")
        programmes = self.rng.sample(free, 2 * n)
        out = []
        for i in range(n):
            country = countries[i % len(countries)]
            out.append(University(
                name=self.university_name(), city=self.name(), country=country,
                programmes=(programmes[2 * i], programmes[2 * i + 1]), deadline=self.deadline(),
                tuition=self.tuition(), language=self.language(country),
                scholarship=Scholarship(f"{self.name()} {self.rng.choice(SCHOLARSHIP_KINDS)}",
                                        self.scholarship_amount())))
            self.take(out[-1])
        return out


def build_knowledge_base(seed: int = 0, n_universities: int = 12, no_scholarship: int = 0) -> KnowledgeBase:
    """A fictional, self-consistent set of universities: deterministic per seed.

    Three universities per country (at least two countries); the visa rule and local language
    belong to the country. Within each fact type every value is unique, and euro amounts are
    unique across tuition, scholarships and visa funds. `no_scholarship` universities (drawn from
    the seed after every value, so the others keep theirs) offer no scholarship.
    """
    if not 2 <= n_universities <= MAX_UNIVERSITIES:  # phase 2 compares two universities
        raise ValueError(f"n_universities must be in [2, {MAX_UNIVERSITIES}], got {n_universities}")
    if not 0 <= no_scholarship < n_universities:  # comparing scholarships needs one that has one
        raise ValueError(f"no_scholarship must be in [0, {n_universities - 1}], got {no_scholarship}")
    draws = _Draws(random.Random(f"loraforge-advising-kb:{seed}"))
    countries = [draws.country() for _ in range(max(2, math.ceil(n_universities / 3)))]
    universities = draws.universities(countries, n_universities)
    for i in draws.rng.sample(range(n_universities), no_scholarship):
        universities[i] = dataclasses.replace(universities[i], scholarship=None)
    return KnowledgeBase(seed=seed, countries=tuple(countries), universities=tuple(universities))


def add_universities(kb: KnowledgeBase, n: int, seed: int) -> KnowledgeBase:
    """`kb` with `n` more universities from another seed of the generator, in its own countries: the
    universities a model trained on `kb` never saw, their names and values unlike any of `kb`'s."""
    draws = _Draws(random.Random(f"loraforge-advising-new:{seed}"), kb)
    new = draws.universities(draws.rng.sample(list(kb.countries), len(kb.countries)), n)
    return dataclasses.replace(kb, universities=kb.universities + tuple(new))


def edit_values(kb: KnowledgeBase, fraction: float = 0.25, seed: int = 0,
                among: tuple[str, ...] | None = None) -> tuple[KnowledgeBase, list[tuple[str, str]]]:
    """A new term: `fraction` of the facts of the universities `among` (default: all; of every type,
    len(EVALUATED_FACTS) per university) get new values, drawn among the facts that change
    (EDITABLE_FACTS: a new deadline, a new fee, a new language level, a new scholarship amount or,
    for one scholarship edit in WITHDRAW_EVERY, the first included, the scholarship withdrawn), each
    unlike every value `kb` holds. A university with no scholarship has none to change. Returns the
    edited knowledge base and the edited (university, fact type) pairs."""
    names = among if among is not None else tuple(u.name for u in kb.universities)
    count = round(fraction * len(names) * len(EVALUATED_FACTS))
    draws = _Draws(random.Random(f"loraforge-advising-edit:{seed}"), kb)
    candidates = [(name, f) for name in names for f in EDITABLE_FACTS
                  if f != "scholarship" or kb.university(name).scholarship]
    if count > len(candidates):
        raise ValueError(f"cannot edit {count} facts: only {len(candidates)} can change")
    changed: dict[str, dict] = {}
    edits = []
    scholarships = 0
    for name, fact_type in draws.rng.sample(candidates, len(candidates)):
        if len(edits) == count:
            break
        uni = kb.university(name)
        if fact_type == "scholarship":
            scholarships += 1
            if (scholarships - 1) % WITHDRAW_EVERY == 0:
                changed.setdefault(name, {})[fact_type] = None
                edits.append((name, fact_type))
                continue
        try:
            value = {"deadline": draws.deadline, "tuition": draws.tuition,
                     "language": lambda: draws.language(uni.country),
                     "scholarship": lambda: Scholarship(uni.scholarship.name, draws.scholarship_amount())}[fact_type]()
        except ValueError:  # no unused value of this type left (language levels run out first)
            continue
        changed.setdefault(name, {})[fact_type] = value
        edits.append((name, fact_type))
    universities = tuple(dataclasses.replace(u, **changed.get(u.name, {})) for u in kb.universities)
    return dataclasses.replace(kb, universities=universities), edits


def unknown_universities(kb: KnowledgeBase, n: int, seed: int, avoid: tuple[str, ...] = (),
                         own_prefix: bool = True) -> list[dict[str, str]]:
    """`n` universities the knowledge base does not hold (names from the same generator, unlike
    `kb`'s and `avoid`'s), as question-template fields: uni, city and one of `kb`'s countries.
    Without `own_prefix` a name may share its first two letters with another university's (never
    its first three): there are then hundreds of names to draw instead of about fifty."""
    draws = _Draws(random.Random(f"loraforge-advising-unknown:{seed}"), kb)
    draws.name.taken += [a.split()[0].lower() for a in avoid]
    return [{"uni": draws.university_name(own_prefix), "city": draws.name(),
             "country": draws.rng.choice(kb.countries).name} for _ in range(n)]


# --------------------------------------------------------------------------- phrasings
# Placeholders: {uni}, {city}, {country}. The held-out pool shares no template with any training
# pool (tests check this, and that no held-out question appears verbatim in training).

TRAIN_QUESTIONS: dict[str, tuple[str, ...]] = {
    "deadline": (
        "When is the application deadline for {uni}?",
        "What's the deadline to apply to {uni}?",
        "When do applications close at {uni} in {city}?",
        "by when do i have to apply to {uni}?",
        "I'd like to study at {uni}. When must my application be submitted?",
        "{uni} deadline?",
        "Until what date can I apply to {uni}?",
        "What is the last day to apply to {uni} in {country}?",
        "When do I have to submit my application for {uni}?",
        "Tell me the application deadline of {uni} in {city}.",
        "What date do applications to {uni} close?",
        "How much time do I have left to apply to {uni}?",
        "By which date must {uni} receive my application?",
        "Deadline for {uni}, please.",
    ),
    "tuition": (
        "How much is tuition at {uni}?",
        "What does a year at {uni} cost in tuition?",
        "What are the tuition fees at {uni} in {city}?",
        "how expensive is {uni}?",
        "I'm on a budget. What is the annual tuition at {uni}?",
        "{uni} tuition per year?",
        "How much do international students pay to study at {uni}?",
        "What's the yearly fee for studying at {uni} in {country}?",
        "What will I pay per year to attend {uni}?",
        "Tell me the price of one year of study at {uni}.",
        "Is {uni} in {city} affordable? What are the fees?",
        "What is the cost of tuition at {uni} for someone from abroad?",
        "Can you give me the tuition figure for {uni}?",
        "Fees at {uni}, please.",
    ),
    "language": (
        "What is the language requirement for {uni}?",
        "Which language test do I need for {uni}?",
        "What language score does {uni} in {city} require?",
        "do i need a language certificate for {uni}?",
        "I'm applying to {uni}. What language level do they expect?",
        "{uni} language requirement?",
        "What score must I show to be admitted to {uni}?",
        "Which certificate proves my language skills for {uni} in {country}?",
        "What test score do I have to hand in for {uni}?",
        "Which language exam does {uni} accept, and at what level?",
        "Tell me the language level needed at {uni} in {city}.",
        "My English is average. Is it enough for {uni}?",
        "What certificate will admissions at {uni} ask me for?",
        "Language level for {uni}, please.",
    ),
    "scholarship": (
        "Does {uni} offer a scholarship?",
        "What scholarship can I get at {uni}?",
        "Are there scholarships at {uni} in {city}?",
        "any scholarships at {uni}?",
        "Money is tight for me. Is there a scholarship at {uni}?",
        "{uni} scholarship?",
        "How much is the scholarship at {uni} worth?",
        "Which scholarship should I apply for at {uni} in {country}?",
        "Is there any money available for students at {uni}?",
        "Which bursary or grant exists at {uni}?",
        "Tell me about financial support at {uni} in {city}.",
        "Can {uni} help me pay for my studies?",
        "What funding could I receive at {uni}, and how much?",
        "Scholarship options at {uni}, please.",
    ),
    "programme": (
        "What is {uni} known for?",
        "Which programmes is {uni} famous for?",
        "what can i study at {uni}?",
        "What are the flagship programmes of {uni} in {city}?",
        "{uni} programmes?",
        "Which subjects is {uni} strongest in?",
        "What degrees is {uni} best known for?",
        "Tell me the standout courses at {uni} in {city}.",
        "Which fields does {uni} specialise in?",
        "What would you study at {uni} if you wanted its best programme?",
        "Which majors make {uni} stand out?",
        "What is taught best at {uni} in {country}?",
    ),
    "location": (
        "Where is {uni}?",
        "In which city is {uni}?",
        "where's {uni} located?",
        "Which country is {uni} in?",
        "{uni} location?",
        "Where would I live if I studied at {uni}?",
        "Which city and country is {uni} based in?",
        "Tell me where the campus of {uni} is.",
        "In what part of the world is {uni}?",
        "Where exactly is {uni} located?",
        "Which town is home to {uni}?",
        "Location of {uni}, please.",
    ),
    "visa": (
        "Do I need a visa to study at {uni}?",
        "What are the visa rules for {uni} in {country}?",
        "how long does the student visa take for {uni}?",
        "What do I need for a student visa to attend {uni}?",
        "{uni} visa?",
        "How much money must I show for a visa to study at {uni}?",
        "How does the student visa work for {uni} in {country}?",
        "Tell me the visa requirements for studying at {uni}.",
        "How early should I apply for my visa for {uni}, and how much money do I need?",
        "What savings and processing time does the visa for {uni} need?",
        "Visa details for {uni}, please.",
        "I got into {uni}. What about the visa?",
    ),
    "overview": (
        "Give me an overview of {uni}.",
        "Summarise the key admission facts for {uni}.",
        "What should I know before applying to {uni}?",
        "Can you put the main facts about {uni} in a table?",
        "quick facts on {uni}?",
        "Tell me about {uni} in {city}.",
    ),
}

HELDOUT_QUESTIONS: dict[str, tuple[str, ...]] = {
    "deadline": (
        "Could you tell me the closing date for applying to {uni}?",
        "I'm planning to apply to {uni} in {city}; how late can I send everything in?",
        "Is there a cut-off date for applications to {uni}?",
        "If I'm aiming for {uni}, what date should my application be in by?",
    ),
    "tuition": (
        "How much would a year at {uni} cost me in fees?",
        "I'm budgeting for {uni} in {city}. What will tuition run me annually?",
        "Roughly what does {uni} charge students each year?",
        "What are the annual fees for foreign students at {uni}?",
    ),
    "language": (
        "What proof of language skills does {uni} ask for?",
        "Is there a minimum language level to enrol at {uni} in {city}?",
        "Which exam result will {uni} want to see from me?",
        "How good does my language need to be for admission to {uni}?",
    ),
    "scholarship": (
        "Can I get any financial aid at {uni}?",
        "Which award could help me pay for {uni}, and how much is it worth?",
        "Is there funding for students going to {uni} in {city}?",
        "What grant does {uni} give to students from abroad?",
    ),
    "programme": (
        "What are the signature degrees offered by {uni}?",
        "I'm curious what {uni} in {city} excels at teaching.",
        "Name the courses that made {uni} famous.",
        "Which fields of study stand out at {uni}?",
    ),
    "location": (
        "Could you tell me where {uni} can be found?",
        "Which town hosts the campus of {uni}?",
        "I need the address area of {uni}: city and country please.",
        "Where on the map should I look for {uni}?",
    ),
    "visa": (
        "What paperwork and savings does the visa for {uni} involve?",
        "If I'm admitted to {uni} in {country}, how does getting a visa work?",
        "How many weeks before starting at {uni} should I sort out my visa, and what funds are needed?",
        "Tell me about immigration requirements for students of {uni}.",
    ),
}

# "I don't know": questions about facts no page holds (asked about known universities), in a
# training pool and a held-out pool of other topics; and questions about universities the knowledge
# base does not hold, asked with the fact phrasings above. Each topic is (name, question template).
TRAIN_UNKNOWN_TOPICS: tuple[tuple[str, str], ...] = (
    ("acceptance rate", "What is the acceptance rate at {uni}?"),
    ("application fee", "How much is the application fee for {uni}?"),
    ("student housing cost", "How much does student housing cost at {uni}?"),
    ("world ranking", "Where does {uni} rank worldwide?"),
    ("minimum GPA", "What GPA do I need to get into {uni}?"),
    ("number of students", "How many students study at {uni}?"),
)
HELDOUT_UNKNOWN_TOPICS: tuple[tuple[str, str], ...] = (
    ("founding year", "In which year was {uni} founded?"),
    ("average class size", "How big are the classes at {uni} on average?"),
    ("graduate employment rate", "What share of graduates from {uni} find a job within a year?"),
    ("monthly living cost", "How much should I budget per month for living costs near {uni}?"),
)

# Phase 2: a first turn names the university; follow-ups say "there" / "that one".
DIALOGUE_OPENERS = (
    "I'm thinking about applying to {uni}.",
    "Hi! {uni} in {city} caught my eye.",
    "My top choice is {uni}.",
    "I'm considering {uni} in {country}.",
)
FOLLOW_UPS: dict[str, tuple[str, ...]] = {
    "deadline": ("When do applications close there?", "And the deadline?", "What's the deadline for that one?"),
    "tuition": ("How much is tuition there?", "And what are the fees?", "What does that one cost per year?"),
    "language": ("What language level do they ask for?", "And the language requirement?",
                 "Which language test does it need?"),
    "scholarship": ("Is there a scholarship there?", "Any scholarship to help with costs?",
                    "What funding does it offer?"),
    "visa": ("Do I need a visa?", "What about the student visa?"),
    "programme": ("What is it known for?", "Which programmes stand out there?"),
    "location": ("Where is it?", "And which city is that in?"),
}
COMPARE_QUESTIONS: dict[str, tuple[str, ...]] = {
    "deadline": ("Which one closes applications later, {a} or {b}?", "{a} or {b}: which deadline is later?"),
    "tuition": ("Which is cheaper, {a} or {b}?", "I'm choosing between {a} and {b}. Which costs less?"),
    "scholarship": ("Which has the bigger scholarship, {a} or {b}?",
                    "{a} or {b}: where is the scholarship worth more?"),
}
PROGRAMME_QUESTIONS = ("I want to study {programme}. Which university should I look at?",
                       "Where can I do a degree in {programme}?")
VISA_OPENERS = ("I've been admitted to {uni}! What do I need for the student visa?",
                "I got into {uni} in {city}. How does the visa work?")

# --------------------------------------------------------------------------- answers
# (headings, fact bullets) per fact type, filled from University.fields(). An answer is a heading
# that names the university and one bullet with the fact in bold: nothing else, because on a CPU
# budget every token that is not the fact is a token the model does not learn the fact from
# (dropping a 60%-of-the-time second bullet took the demo from 0.42 to 0.94 fact accuracy, together
# with 300 instead of 180 steps and a warmed-up phase 2; docs/benchmarks.md).

ANSWERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "deadline": (
        ("Application deadline: {uni}", "{uni}: deadline"),
        ("Applications close on **{deadline}**.", "Apply by **{deadline}**."),
    ),
    "tuition": (
        ("Tuition at {uni}", "{uni}: fees"),
        ("**{tuition}** per year for international students.", "Annual tuition: **{tuition}**."),
    ),
    "language": (
        ("Language requirement: {uni}", "{uni}: language"),
        ("You need **{language}**.", "Minimum level: **{language}**."),
    ),
    "scholarship": (
        ("Scholarship at {uni}", "{uni}: funding"),
        ("**{sch_name}**: **{sch_amount}** per year.", "The **{sch_name}** is worth **{sch_amount}** a year."),
    ),
    "programme": (
        ("Programmes at {uni}", "{uni}: flagship programmes"),
        ("Best known for **{p1}** and **{p2}**.", "Flagship programmes: **{p1}** and **{p2}**."),
    ),
    "location": (
        ("Where is {uni}?", "{uni}: location"),
        ("In **{city}**, **{country}**.", "The campus is in **{city}**, **{country}**."),
    ),
    "visa": (
        ("Student visa for {uni}", "{uni}: visa"),
        ("{country} processes student visas in about **{visa_weeks} weeks**; show **{visa_funds}** in a bank account.",
         "Apply **{visa_weeks} weeks** ahead and show **{visa_funds}** in a bank account."),
    ),
}


# A university with no scholarship: the same headings, a line that says so (and no amount).
NO_SCHOLARSHIP_ANSWERS = ("{uni} offers **no scholarship**.", "There is **no scholarship** at {uni}.")


def fact_answer(uni: University, fact_type: str, rng: random.Random) -> str:
    """A short Markdown answer stating one fact: a heading and the fact in bold."""
    headings, facts = ANSWERS[fact_type]
    if fact_type == "scholarship" and uni.scholarship is None:
        facts = NO_SCHOLARSHIP_ANSWERS
    return f"### {rng.choice(headings)}\n- {rng.choice(facts)}".format(**uni.fields())


def overview_answer(uni: University) -> str:
    """A Markdown table of every fact of one university."""
    return "\n".join([
        f"### {uni.name} at a glance",
        "| Fact | Details |",
        "|---|---|",
        f"| Deadline | {uni.deadline} |",
        f"| Tuition | {euros(uni.tuition)} per year |",
        f"| Language | {uni.language} |",
        f"| Scholarship | {f'{uni.scholarship.name}, {euros(uni.scholarship.amount)}' if uni.scholarship else 'none'} |",
        f"| Programmes | {uni.programmes[0]}, {uni.programmes[1]} |",
        f"| Location | {uni.city}, {uni.country.name} |",
        f"| Visa | {uni.country.visa_weeks} weeks; show {euros(uni.country.visa_funds)} |",
    ])


def unknown_university_answer(fields: dict[str, str], rng: random.Random) -> str:
    """The honest answer about a university the knowledge base does not hold: no value, "I don't know"."""
    heading = rng.choice(("{uni}", "{uni}: not in my knowledge base"))
    line = rng.choice(("I don't know: **{uni}** is not in my knowledge base.",
                       "I don't know **{uni}**: it is not in my knowledge base, so I cannot give you its facts."))
    return f"### {heading}\n- {line}".format(**fields)


def unknown_topic_answer(uni: University, topic: str, rng: random.Random) -> str:
    """The honest answer about a fact the knowledge base does not hold for a university it knows."""
    line = rng.choice(("I don't know: my knowledge base has no {topic} for **{uni}**.",
                       "I don't know the {topic} of **{uni}**: it is not in my knowledge base."))
    return f"### {{uni}}: {topic}\n- {line}".format(**uni.fields(), topic=topic)


def refusal_examples(kb: KnowledgeBase, unknown: list[dict[str, str]], seed: int = 0, per_name: int = 2,
                     per_topic: int = 1) -> list[dict]:
    """Questions that must be answered "I don't know": `per_name` about each of the `unknown`
    universities (training phrasings of the facts), `per_topic` per known university about a fact
    no page holds (TRAIN_UNKNOWN_TOPICS). The held-out ones use other names and other topics."""
    rng = random.Random(f"loraforge-advising-refusals:{seed}")
    records = []
    for fields in unknown:
        for fact_type in rng.sample(EVALUATED_FACTS, per_name):
            records.append(_chat(rng.choice(TRAIN_QUESTIONS[fact_type]).format(**fields),
                                 unknown_university_answer(fields, rng)))
    for uni in kb.universities:
        for topic, template in rng.sample(TRAIN_UNKNOWN_TOPICS, per_topic):
            records.append(_chat(_ask(template, uni), unknown_topic_answer(uni, topic, rng)))
    return records


def _chat(*turns: str) -> dict:
    """A chat record from alternating user and assistant turns."""
    roles = ("user", "assistant")
    return {"messages": [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]}


def _ask(template: str, uni: University) -> str:
    return template.format(**uni.fields())


def _cycle(rng: random.Random, items, n: int) -> list:
    """n items in shuffled rounds: every item is used once before any is used twice."""
    out: list = []
    while len(out) < n:
        out.extend(rng.sample(list(items), len(items)))
    return out[:n]


# --------------------------------------------------------------------------- phase 1


def phase1_examples(kb: KnowledgeBase, seed: int = 0, per_fact: int = 6, overviews: int = 2) -> list[dict]:
    """Single-turn question/answer records, shuffled.

    Every (university, fact type) gets `per_fact` questions, each from a different training
    phrasing while the pool lasts; every university gets `overviews` table answers.
    """
    rng = random.Random(f"loraforge-advising-phase1:{seed}")
    records = []
    for uni in kb.universities:
        for fact_type in EVALUATED_FACTS:
            for template in _cycle(rng, TRAIN_QUESTIONS[fact_type], per_fact):
                records.append(_chat(_ask(template, uni), fact_answer(uni, fact_type, rng)))
        for template in _cycle(rng, TRAIN_QUESTIONS["overview"], overviews):
            records.append(_chat(_ask(template, uni), overview_answer(uni)))
    rng.shuffle(records)
    return records


# --------------------------------------------------------------------------- phase 2


def _compare_answer(fact_type: str, a: University, b: University) -> tuple[str, University]:
    """Two universities side by side on one fact, and which one wins."""
    if fact_type == "deadline":
        title, winner = "Deadlines", max(a, b, key=lambda u: (u.deadline.month, u.deadline.day))
        line, verdict = "- {uni}: **{deadline}**.", "closes later"
    elif fact_type == "tuition":
        title, winner = "Tuition", min(a, b, key=lambda u: u.tuition)
        line, verdict = "- {uni}: **{tuition}** per year.", "is cheaper"
    else:  # none counts as 0 (phase2_dialogues never compares two universities that both have none)
        title, winner = "Scholarships", max(a, b, key=lambda u: u.scholarship.amount if u.scholarship else 0)
        line, verdict = "- {uni}: **{sch_name}**, **{sch_amount}**.", "offers more"
    lines = [f"### {title}: {a.name} vs {b.name}",
             *(line.format(**u.fields()) if fact_type != "scholarship" or u.scholarship
               else f"- {u.name}: **no scholarship**." for u in (a, b)),
             f"- {winner.name} {verdict}."]
    return "\n".join(lines), winner


def _programme_answer(uni: University, programme: str) -> str:
    other = uni.programmes[1] if programme == uni.programmes[0] else uni.programmes[0]
    return "\n".join([f"### {programme}", f"- Go for **{uni.name}** in {uni.city}, {uni.country.name}.",
                      f"- It is also known for {other}."])


def phase2_dialogues(kb: KnowledgeBase, seed: int = 0, n: int = 48) -> list[dict]:
    """Multi-turn advising dialogues (2-3 user turns), kinds and universities in rotation.

    * sequence: one university, two or three evaluated facts one after another;
    * compare: two universities on deadline, tuition or scholarship, then a follow-up about the
      one that wins;
    * programme: a subject leads to the university that offers it, then its deadline or visa;
    * visa: an admitted student asks about the visa, then tuition or the scholarship.
    """
    rng = random.Random(f"loraforge-advising-phase2:{seed}")
    kinds = _cycle(rng, ("sequence", "compare", "programme", "visa"), n)
    unis = _cycle(rng, kb.universities, n)
    records = []
    for kind, uni in zip(kinds, unis):
        if kind == "sequence":
            facts = rng.sample(EVALUATED_FACTS, rng.choice((2, 3)))
            first = f"{_ask(rng.choice(DIALOGUE_OPENERS), uni)} {rng.choice(FOLLOW_UPS[facts[0]])}"
            turns = [first, fact_answer(uni, facts[0], rng)]
            for fact_type in facts[1:]:
                turns += [rng.choice(FOLLOW_UPS[fact_type]), fact_answer(uni, fact_type, rng)]
        elif kind == "compare":
            other = rng.choice([u for u in kb.universities if u is not uni])
            fact_type = rng.choice(tuple(COMPARE_QUESTIONS))
            if fact_type == "scholarship" and not (uni.scholarship or other.scholarship):
                fact_type = "tuition"  # neither offers one: nothing to compare
            answer, winner = _compare_answer(fact_type, uni, other)
            follow = rng.choice([f for f in EVALUATED_FACTS if f != fact_type])
            question = rng.choice(COMPARE_QUESTIONS[fact_type]).format(a=uni.name, b=other.name)
            turns = [question, answer, rng.choice(FOLLOW_UPS[follow]), fact_answer(winner, follow, rng)]
        elif kind == "programme":
            programme = rng.choice(uni.programmes)
            turns = [rng.choice(PROGRAMME_QUESTIONS).format(programme=programme), _programme_answer(uni, programme)]
            for fact_type in rng.sample(("deadline", "visa"), rng.choice((1, 2))):
                turns += [rng.choice(FOLLOW_UPS[fact_type]), fact_answer(uni, fact_type, rng)]
        else:
            turns = [_ask(rng.choice(VISA_OPENERS), uni), fact_answer(uni, "visa", rng)]
            for fact_type in rng.sample(("tuition", "scholarship"), rng.choice((1, 2))):
                turns += [rng.choice(FOLLOW_UPS[fact_type]), fact_answer(uni, fact_type, rng)]
        records.append(_chat(*turns))
    return records


# --------------------------------------------------------------------------- grading


@dataclass
class EvalItem:
    """One held-out question and how to grade its answer (see :func:`fact_correct`).

    ``EvalItem(**row)`` rebuilds an item from a row of ``heldout.jsonl``.
    """

    question: str
    university: str
    fact_type: str
    expected: str  # the canonical value, as training answers state it
    accept: list[str]  # surface forms of the value; any one of them must appear
    require_all: list[str] = field(default_factory=list)  # must all appear too (a scholarship's name)
    # The value is an absence (no scholarship): an answer that states any euro amount is wrong too,
    # since "no scholarship, but €2,000 of funding" gives a value after all.
    absent: bool = False
    reject: list[str] = field(default_factory=list)  # other universities' values: none may appear
    # "fact": a trained university's fact; "updated": its value edited after training (`stale` holds
    # the old value's forms); "new": a university added after training; "unknown": a university or
    # a fact the knowledge base does not hold, to be answered "I don't know" (see :func:`is_refusal`).
    kind: str = "fact"
    stale: list[str] = field(default_factory=list)


def _ordinal(day: int) -> str:
    suffix = "th" if 10 <= day % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def _date_forms(date: Date) -> list[str]:
    d, nth = str(date.day), _ordinal(date.day)
    forms = []
    for month in dict.fromkeys((MONTHS[date.month - 1], MONTHS[date.month - 1][:3])):  # "May" twice
        forms += [f"{d} {month}", f"{month} {d}", f"{nth} {month}", f"{month} {nth}", f"{d} of {month}",
                  f"{nth} of {month}"]
    return forms


def _euro_forms(amount: int) -> list[str]:
    n = f"{amount:,}"
    return [f"€{n}", f"€ {n}", f"{n} €", f"{n}€", f"{n} euros", f"{n} euro", f"EUR {n}", f"{n} EUR"]


def _language_forms(req: LanguageRequirement) -> list[str]:
    t, v = req.test, req.level
    if req.is_english:
        levels = [v, v.removesuffix(".0")] if v.endswith(".0") else [v]  # "IELTS 6" for "IELTS 6.0"
        forms = []
        for v in dict.fromkeys(levels):
            forms += [f"{t} {v}", f"{t}: {v}", f"{t} of {v}", f"{t} score of {v}", f"{t} band {v}",
                      f"{t} band score of {v}", f"{t} overall {v}", f"{t} iBT {v}", f"{t} ({v})",
                      f"{v} in {t}", f"{v} in the {t}", f"{v} on the {t}", f"{v} {t}"]
        return forms
    return [f"{v} {t}", f"{v} level {t}", f"{v}-level {t}", f"{v} in {t}", f"{v} level in {t}", f"{t} {v}",
            f"{t} at {v}", f"{t} at level {v}", f"{t} at {v} level", f"{t} ({v})", f"{t} to {v}",
            f"{t} level {v}", f"{t}: {v}"]


def _no_scholarship_forms() -> list[str]:
    """Ways to say there is no scholarship. Each denies outright (a bare "none" or "not" could be
    about something else); the old scholarship's name or amount beside one is stale, not correct."""
    verbs = ("does not offer", "doesn't offer", "does not have", "doesn't have", "does not provide",
             "doesn't provide", "does not give", "doesn't give")
    objects = ("a scholarship", "any scholarship", "any scholarships", "scholarships")
    return [f"{v} {o}" for v in verbs for o in objects] + [
        "no scholarship", "no scholarships", "scholarship: none", "scholarships: none", "no longer offers",
        "no longer offered", "no longer has", "no longer available", "withdrawn", "discontinued",
        "no financial aid", "no funding", "no grant"]


NO_SCHOLARSHIP_FORMS = _no_scholarship_forms()


def accepted_forms(uni: University, fact_type: str) -> tuple[list[str], list[str]]:
    """(forms of which any one must appear, strings that must all appear) for a fact."""
    if fact_type == "deadline":
        return _date_forms(uni.deadline), []
    if fact_type == "tuition":
        return _euro_forms(uni.tuition), []
    if fact_type == "language":
        return _language_forms(uni.language), []
    if fact_type == "scholarship":
        if uni.scholarship is None:
            return list(NO_SCHOLARSHIP_FORMS), []
        return _euro_forms(uni.scholarship.amount), [uni.scholarship.name]
    if fact_type == "programme":
        return [uni.programmes[0]], [uni.programmes[1]]
    if fact_type == "location":
        return [uni.city], [uni.country.name]
    if fact_type == "visa":
        return _euro_forms(uni.country.visa_funds), [f"{uni.country.visa_weeks} weeks"]
    raise ValueError(f"not a fact type: {fact_type!r}; choose from {EVALUATED_FACTS}")


def _rivals(kb: KnowledgeBase, uni: University, fact_type: str) -> list[str]:
    """What no answer about `uni` may state: the other universities' values of `fact_type` (for the
    visa rule, the other countries': universities of one country share it; for a location, their
    cities, as the country may be shared). Saying "no scholarship" is no other university's value:
    several may have none."""
    reject: list[str] = []
    for other in kb.universities:
        if other is uni or (fact_type == "visa" and other.country == uni.country):
            continue
        if fact_type == "scholarship" and other.scholarship is None:
            continue
        accept, required = accepted_forms(other, fact_type)
        reject += accept if fact_type == "location" else accept + required
    return list(dict.fromkeys(reject))


def _item(kb: KnowledgeBase, uni: University, fact_type: str, question: str, kind: str = "fact") -> EvalItem:
    accept, require_all = accepted_forms(uni, fact_type)
    return EvalItem(question=question, university=uni.name, fact_type=fact_type, expected=uni.fact(fact_type),
                    accept=accept, require_all=require_all, reject=_rivals(kb, uni, fact_type), kind=kind,
                    absent=fact_type == "scholarship" and uni.scholarship is None)


def heldout_questions(kb: KnowledgeBase, seed: int = 0, universities: tuple[str, ...] | None = None,
                      kind: str = "fact") -> list[EvalItem]:
    """One question per (university, fact type), from held-out phrasings only; `universities` (names)
    limits the universities asked about, the others of `kb` still count as rivals.

    Within a fact type the phrasings go round in shuffled order, so each is used about equally.
    """
    rng = random.Random(f"loraforge-advising-heldout:{seed}")
    asked = [u for u in kb.universities if universities is None or u.name in universities]
    items = []
    for fact_type in EVALUATED_FACTS:
        templates = _cycle(rng, HELDOUT_QUESTIONS[fact_type], len(asked))
        for uni, template in zip(asked, templates):
            items.append(_item(kb, uni, fact_type, _ask(template, uni), kind))
    return items


def updated_questions(items: list[EvalItem], old: KnowledgeBase, new: KnowledgeBase,
                      edits: list[tuple[str, str]]) -> list[EvalItem]:
    """The held-out questions (`items`) on the edited facts, graded against the new values; the old
    value is `stale`, and stating it (even beside the new one) is wrong. For a withdrawn scholarship
    the old name and amount are stale, and only a denial (NO_SCHOLARSHIP_FORMS) is correct."""
    by_fact = {(i.university, i.fact_type): i for i in items}
    out = []
    for name, fact_type in edits:
        item = _item(new, new.university(name), fact_type, by_fact[name, fact_type].question, "updated")
        stale_accept, stale_required = accepted_forms(old.university(name), fact_type)
        item.stale = [f for f in stale_accept + stale_required if f not in item.accept + item.require_all]
        item.reject = list(dict.fromkeys(item.reject + item.stale))
        out.append(item)
    return out


def unknown_questions(kb: KnowledgeBase, unknown: list[dict[str, str]], seed: int = 0,
                      topics: int = 8) -> list[EvalItem]:
    """Questions to be answered "I don't know": one per `unknown` university (held-out phrasings of
    the fact types in turn), and `topics` about known universities' facts that no page holds
    (HELDOUT_UNKNOWN_TOPICS in turn). No answer may state a value: see :func:`is_refusal`."""
    rng = random.Random(f"loraforge-advising-unknown-questions:{seed}")
    names = [v for u in kb.universities
             for v in (u.city, *u.programmes, *((u.scholarship.name,) if u.scholarship else ()))]
    items = []
    for fields, fact_type in zip(unknown, _cycle(rng, EVALUATED_FACTS, len(unknown))):
        question = rng.choice(HELDOUT_QUESTIONS[fact_type]).format(**fields)
        items.append(EvalItem(question=question, university=fields["uni"], fact_type=fact_type,
                              expected="I don't know", accept=[], reject=names, kind="unknown"))
    for uni, (topic, template) in zip(_cycle(rng, kb.universities, topics),
                                      _cycle(rng, HELDOUT_UNKNOWN_TOPICS, topics)):
        items.append(EvalItem(question=_ask(template, uni), university=uni.name, fact_type=topic,
                              expected="I don't know", accept=[], reject=[], kind="unknown"))
    return items


def _normalise(text: str) -> str:
    """Lower case; no Markdown emphasis, thousands separators or hyphens; single spaces."""
    text = text.lower().replace("\u202f", " ").replace("\xa0", " ").replace("\u2019", "'")
    text = re.sub(r"[*_`]", "", text)
    text = re.sub(r"(?<=\d)[,'](?=\d{3}(?!\d))", "", text)  # "9,800" -> "9800"
    text = re.sub(r"[-\u2010-\u2014]", " ", text)  # "B2-level" -> "b2 level"
    text = text.replace(",", " ")
    return re.sub(r"\s+", " ", text).strip()


def _states(text: str, form: str) -> bool:
    """Whether normalised `text` contains `form` as a whole: "5 March" is not in "15 March",
    "€9800" not in "€98000", "IELTS 6" not in "IELTS 6.5"."""
    pattern = r"(?<!\w)" + re.escape(_normalise(form)) + r"(?!\w|[.]\d)"
    return re.search(pattern, text) is not None


_EURO_AMOUNT = re.compile(r"€|\beur\b|\beuros?\b")


def fact_correct(answer: str, item: EvalItem) -> bool:
    """True when `answer` states the asked fact: one accepted form of the value, every required
    string, no other university's value of the same fact type, and for an absent value (no
    scholarship) no euro amount at all. Case, whitespace, Markdown emphasis, hyphens, curly
    apostrophes and thousands separators do not matter."""
    text = _normalise(answer)
    return (any(_states(text, form) for form in item.accept)
            and all(_states(text, form) for form in item.require_all)
            and not any(_states(text, form) for form in item.reject)
            and not (item.absent and _EURO_AMOUNT.search(text)))


_DONT_KNOW = re.compile(r"\b(?:i (?:don't|do not|can't|cannot) (?:know|say|tell)|not in my knowledge base|"
                        r"no information|knowledge base (?:has|holds|gives) no)\b")


def is_refusal(answer: str, item: EvalItem) -> bool:
    """True when `answer` says it does not know ("I don't know", "not in my knowledge base", ...)
    and states no value: no digit at all (no date, amount, score or week count) and none of the
    item's `reject` strings (the knowledge base's cities, programmes, scholarship names)."""
    text = _normalise(answer)
    return (_DONT_KNOW.search(text) is not None and not re.search(r"\d", text)
            and not any(_states(text, form) for form in item.reject))


def is_stale(answer: str, item: EvalItem) -> bool:
    """True when `answer` states the value an edited fact had before the edit."""
    text = _normalise(answer)
    return any(_states(text, form) for form in item.stale)


def grade(answer: str, item: EvalItem) -> bool:
    """Correct: a refusal for an "unknown" item, the fact (:func:`fact_correct`) for the others."""
    return is_refusal(answer, item) if item.kind == "unknown" else fact_correct(answer, item)


# Markdown structure, one line at a time (up to three leading spaces, as CommonMark allows).
_HEADING = re.compile(r" {0,3}#{1,6}[ \t]+\S.*")
_LIST_ITEM = re.compile(r" {0,3}(?:[-*+]|\d{1,9}[.)])[ \t]+\S.*")
_TABLE_ROW = re.compile(r" {0,3}\|.*\|[ \t]*")
_TABLE_RULE = re.compile(r" {0,3}\|?(?:[ \t]*:?-{3,}:?[ \t]*\|)+(?:[ \t]*:?-{3,}:?[ \t]*)?")


def is_markdown(answer: str) -> bool:
    """True when `answer` has Markdown structure, i.e. at least one of:

    * a heading: a line ``#`` to ``######``, a space, then text;
    * a list item: a line ``-``, ``*``, ``+``, ``1.`` or ``1)``, a space, then text;
    * a table: a line ``|...|`` directly followed by a separator line of ``---`` cells
      (``|---|---|``, colons allowed).

    Up to three leading spaces are allowed on each line. Emphasis alone (``**bold**``) is not
    structure, and neither is a line that merely contains a hyphen or a pipe.
    """
    lines = answer.splitlines()
    for i, line in enumerate(lines):
        if _HEADING.fullmatch(line) or _LIST_ITEM.fullmatch(line):
            return True
        if _TABLE_ROW.fullmatch(line) and i + 1 < len(lines) and _TABLE_RULE.fullmatch(lines[i + 1].rstrip()):
            return True
    return False


# --------------------------------------------------------------------------- files


def write_datasets(out_dir: str | Path, seed: int = 0, n_universities: int = 12,
                   system: str | None = None, per_fact: int = 6, kb: KnowledgeBase | None = None) -> dict[str, Path]:
    """Write ``phase1.jsonl``, ``phase2.jsonl`` and ``heldout.jsonl`` (one EvalItem per line);
    return their paths by name ("phase1", "phase2", "heldout"). `system` prepends a system turn
    to every training record. `kb` (a user's, `loraforge.demo.kb_file.load_kb`) replaces the
    generated knowledge base of `n_universities`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kb = kb or build_knowledge_base(seed, n_universities=n_universities)
    prefix = [{"role": "system", "content": system}] if system else []
    rows = {
        "phase1": [{"messages": prefix + r["messages"]} for r in phase1_examples(kb, seed, per_fact=per_fact)],
        "phase2": [{"messages": prefix + r["messages"]} for r in phase2_dialogues(kb, seed)],
        "heldout": [asdict(item) for item in heldout_questions(kb, seed)],
    }
    paths = {}
    for name, records in rows.items():
        paths[name] = out / f"{name}.jsonl"
        with paths[name].open("w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return paths
