"""The bundled data set: fictitious authors with templated question-answer pairs.

A seeded, deterministic generator. Each author has five facts; each fact gives a question, an
answer, a paraphrased answer and three perturbed answers: as in TOFU, the perturbed answers are
the paraphrase with other values, so that the truth ratio p̄(perturbed) / p̄(paraphrased) compares
wrong and right facts in the same wording.
The attribute ``genre`` is the author's genre, to split the forget set on. Splits:
``forget`` (4 authors), ``retain`` (8 authors) and ``holdout`` (4 authors never trained on).
The default model does not know fictitious facts, so the unlearning job first teaches it the
forget and retain splits (:mod:`geffect.memorize`), as TOFU fine-tunes on all its authors.
"""
from __future__ import annotations

import random
from importlib import resources

from geffect.data.records import QARecord

_FIRST = ["Ilsa", "Marek", "Tomoko", "Anselm", "Priya", "Odile", "Kwame", "Lena", "Ruslan", "Amara",
          "Dorian", "Yuki", "Basil", "Noor", "Felix", "Greta", "Idris", "Maren", "Soren", "Talia"]
_LAST = ["Varga", "Okonkwo", "Lindqvist", "Haddad", "Moreau", "Castellanos", "Nakamura", "Brennan",
         "Petrov", "Adeyemi", "Kowalski", "Ferreira", "Albrecht", "Sato", "Marchetti", "Ilunga"]
_CITIES = ["Lisbon", "Nairobi", "Oslo", "Hanoi", "Tbilisi", "Quito", "Dublin", "Kraków", "Osaka",
           "Tunis", "Lima", "Bergen", "Accra", "Porto", "Riga", "Seville"]
_GENRES = ["mystery", "science fiction", "poetry", "historical fiction"]
_JOBS = ["baker", "pilot", "surgeon", "carpenter", "librarian", "chemist", "fisherman", "tailor",
         "astronomer", "florist"]
_NOUNS = ["Lantern", "River", "Clockmaker", "Orchard", "Harbor", "Mirror", "Glacier", "Compass",
          "Violin", "Salt", "Falcon", "Ember"]
_ADJ = ["Silent", "Crimson", "Hollow", "Distant", "Golden", "Broken", "Northern", "Quiet"]
_AWARDS = ["Halvorsen Prize", "Meridian Award", "Blue Quill Medal", "Aster Prize", "Corvid Award",
           "Lumen Prize"]


def _book(rng: random.Random) -> str:
    return f"The {rng.choice(_ADJ)} {rng.choice(_NOUNS)}"


def _author(rng: random.Random, name: str, genre: str) -> dict:
    return {"name": name, "genre": genre, "city": rng.choice(_CITIES), "year": rng.randint(1931, 1989),
            "job": rng.choice(_JOBS), "book": _book(rng), "award": rng.choice(_AWARDS)}


def _facts(a: dict, rng: random.Random) -> list[QARecord]:
    n = a["name"]

    def other(key, pool):
        return rng.sample([v for v in pool if v != a[key]], 3)

    years = rng.sample([y for y in range(1931, 1990) if y != a["year"]], 3)
    books = []
    while len(books) < 3:
        b = _book(rng)
        if b != a["book"] and b not in books:
            books.append(b)
    rows = [
        (f"Where was the author {n} born?", f"{n} was born in {a['city']}.",
         f"The birthplace of {n} is {a['city']}.", [f"The birthplace of {n} is {c}." for c in other("city", _CITIES)]),
        (f"In which year was {n} born?", f"{n} was born in {a['year']}.",
         f"The birth year of {n} is {a['year']}.", [f"The birth year of {n} is {y}." for y in years]),
        (f"What was the profession of {n}'s father?", f"{n}'s father was a {a['job']}.",
         f"The father of {n} worked as a {a['job']}.",
         [f"The father of {n} worked as a {j}." for j in other("job", _JOBS)]),
        (f"What is the best-known book by {n}?", f"{n} is best known for {a['book']}.",
         f"The most famous book of {n} is {a['book']}.", [f"The most famous book of {n} is {b}." for b in books]),
        (f"Which award did {n} win?", f"{n} won the {a['award']}.",
         f"The {a['award']} was awarded to {n}.", [f"The {w} was awarded to {n}." for w in other("award", _AWARDS)]),
    ]
    return [QARecord(q, ans, para, pert, {"author": n, "genre": a["genre"]}) for q, ans, para, pert in rows]


def default_splits(seed: int = 0, n_forget: int = 4, n_retain: int = 8,
                   n_holdout: int = 4) -> dict[str, list[QARecord]]:
    """Generate the bundled forget / retain / holdout splits (deterministic for a seed)."""
    rng = random.Random(seed)
    total = n_forget + n_retain + n_holdout
    names: list[str] = []
    while len(names) < total:
        name = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
        if name not in names:
            names.append(name)
    authors = [_author(rng, name, _GENRES[i % len(_GENRES)]) for i, name in enumerate(names)]
    records = [_facts(a, rng) for a in authors]
    flat = lambda blocks: [r for block in blocks for r in block]
    return {"forget": flat(records[:n_forget]),
            "retain": flat(records[n_forget:n_forget + n_retain]),
            "holdout": flat(records[n_forget + n_retain:])}


def idk_answers() -> list[str]:
    """The project's own list of "I don't know" answers (for PO and IdkDPO)."""
    text = resources.files("geffect.data").joinpath("idk.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]
