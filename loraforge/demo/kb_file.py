"""A knowledge base as a JSON file: what `loraforge demo --kb FILE.json` reads and what every demo
run writes (out/data/kb.json, the generator's knowledge base in the same schema).

Schema (every key required; amounts are whole euros per year)::

    {"countries": [{"name": "Velornia", "language": "Velornian", "visa_weeks": 6, "visa_funds": 9250}],
     "universities": [{"name": "Brasol University", "city": "Tamir", "country": "Velornia",
                       "programmes": ["Marine Robotics", "Food Science"],
                       "deadline": {"day": 15, "month": 3}, "tuition": 9800,
                       "language": {"test": "IELTS", "level": "6.5"},
                       "scholarship": {"name": "Kelvar Merit Award", "amount": 3000}}]}

`language.test` is IELTS, TOEFL or the country's own language (then `level` is a CEFR level, B2).
`"scholarship": null` is a university that offers no scholarship (its page says "Scholarship: none
offered"; the key is still required, so a forgotten scholarship is not read as none); files written
before null was allowed read as before. Each university's country names an entry of `countries`.
Grading counts an answer wrong when it states another university's value of the asked fact, so
within each fact type the values (deadline, tuition, language requirement, scholarship name and
amount; several universities may have none) and the programmes must be unique, and there must be
at least two universities (phase 2 compares two).
"""

from __future__ import annotations

import calendar
import json
from pathlib import Path
from typing import Any

from loraforge.core.errors import DataError
from loraforge.core.files import atomic_write_text
from loraforge.demo.advising import Country, Date, KnowledgeBase, LanguageRequirement, Scholarship, University


def kb_to_json(kb: KnowledgeBase) -> dict[str, Any]:
    return {
        "countries": [{"name": c.name, "language": c.language, "visa_weeks": c.visa_weeks, "visa_funds": c.visa_funds}
                      for c in kb.countries],
        "universities": [{
            "name": u.name, "city": u.city, "country": u.country.name, "programmes": list(u.programmes),
            "deadline": {"day": u.deadline.day, "month": u.deadline.month}, "tuition": u.tuition,
            "language": {"test": u.language.test, "level": u.language.level},
            "scholarship": {"name": u.scholarship.name, "amount": u.scholarship.amount} if u.scholarship else None,
        } for u in kb.universities],
    }


def write_kb(kb: KnowledgeBase, path: str | Path) -> Path:
    atomic_write_text(path, json.dumps(kb_to_json(kb), indent=2, ensure_ascii=False) + "\n")
    return Path(path)


class _Reader:
    """Reads one file, naming the key path (universities[3].deadline.day) of anything malformed."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, where: str, message: str) -> DataError:
        return DataError(self.path, None, f"{where}: {message} (schema: loraforge.demo.kb_file)")

    def get(self, obj: Any, key: str, kind: type, where: str) -> Any:
        if not isinstance(obj, dict):
            raise self.fail(where, f"expected an object, got {type(obj).__name__}")
        if key not in obj:
            raise self.fail(f"{where}.{key}" if where else key, "missing")
        value = obj[key]
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)) or not isinstance(value, kind):
            raise self.fail(f"{where}.{key}" if where else key, f"expected {kind.__name__}, got {value!r}")
        if kind is str and not value.strip():
            raise self.fail(f"{where}.{key}", "empty")
        if kind is int and value <= 0:
            raise self.fail(f"{where}.{key}", f"must be positive, got {value}")
        return value


def load_kb(path: str | Path, seed: int = 0) -> KnowledgeBase:
    """The knowledge base in `path`; a malformed one raises DataError naming the key and the entry."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(path, None, f"not a readable JSON file: {e}") from None
    r = _Reader(path)
    countries: dict[str, Country] = {}
    for i, c in enumerate(r.get(data, "countries", list, "")):
        where = f"countries[{i}]"
        country = Country(r.get(c, "name", str, where), r.get(c, "language", str, where),
                          r.get(c, "visa_weeks", int, where), r.get(c, "visa_funds", int, where))
        if country.name in countries:
            raise r.fail(f"{where}.name", f"{country.name!r} appears twice")
        countries[country.name] = country
    universities = []
    for i, u in enumerate(r.get(data, "universities", list, "")):
        where = f"universities[{i}]"
        name = r.get(u, "name", str, where)
        where = f"{where} ({name})"
        country = r.get(u, "country", str, where)
        if country not in countries:
            raise r.fail(f"{where}.country", f"{country!r} is not in countries")
        programmes = r.get(u, "programmes", list, where)
        if len(programmes) != 2 or not all(isinstance(p, str) and p.strip() for p in programmes):
            raise r.fail(f"{where}.programmes", f"expected two programme names, got {programmes!r}")
        deadline = r.get(u, "deadline", dict, where)
        day, month = r.get(deadline, "day", int, f"{where}.deadline"), r.get(deadline, "month", int, f"{where}.deadline")
        if month > 12 or day > calendar.monthrange(2001, month)[1]:
            raise r.fail(f"{where}.deadline", f"no such date: day {day} of month {month}")
        language = r.get(u, "language", dict, where)
        test, level = r.get(language, "test", str, f"{where}.language"), r.get(language, "level", str, f"{where}.language")
        if test not in ("IELTS", "TOEFL") and test != countries[country].language:
            raise r.fail(f"{where}.language.test", f"{test!r} is neither IELTS, TOEFL nor {countries[country].language}")
        found, scholarship = u.get("scholarship", {}), None  # {}: a missing key, which r.get names
        if found is not None:  # null: offers no scholarship
            if not isinstance(found, dict):
                raise r.fail(f"{where}.scholarship", f"expected an object or null (none), got {found!r}")
            found = r.get(u, "scholarship", dict, where)
            scholarship = Scholarship(r.get(found, "name", str, f"{where}.scholarship"),
                                      r.get(found, "amount", int, f"{where}.scholarship"))
        universities.append(University(
            name=name, city=r.get(u, "city", str, where), country=countries[country],
            programmes=(programmes[0], programmes[1]), deadline=Date(day, month),
            tuition=r.get(u, "tuition", int, where), language=LanguageRequirement(test, level),
            scholarship=scholarship))
    if len(universities) < 2:
        raise r.fail("universities", f"at least two needed (phase 2 compares two), got {len(universities)}")
    _check_unique(r, universities)
    return KnowledgeBase(seed=seed, countries=tuple(countries.values()), universities=tuple(universities))


def _check_unique(r: _Reader, universities: list[University]) -> None:
    # A value two universities share could not be graded: stating it names the other one's value too.
    keys = {"name": lambda u: [u.name], "deadline": lambda u: [u.deadline], "tuition": lambda u: [u.tuition],
            "language": lambda u: [u.language],
            "scholarship.name": lambda u: [u.scholarship.name] if u.scholarship else [],
            "scholarship.amount": lambda u: [u.scholarship.amount] if u.scholarship else [],
            "programmes": lambda u: list(u.programmes)}
    for key, values in keys.items():
        seen: dict[Any, str] = {}
        for i, u in enumerate(universities):
            for value in values(u):
                if value in seen:
                    raise r.fail(f"universities[{i}] ({u.name}).{key}",
                                 f"{value} is also {seen[value]}'s; values must be unique within a fact type")
                seen[value] = u.name
