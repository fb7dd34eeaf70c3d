"""Eight small, clearly different synthetic text domains, generated deterministically.

Used by the tiny recipe and the tests: no network, no files shipped, a few hundred KB.
Each generator returns one document (a few hundred characters) from a seeded RNG.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from gain_cli.data.documents import write_documents
from gain_cli.errors import unknown_choice

_WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December"]
_ELEMENTS = [("H", 1.008), ("C", 12.011), ("N", 14.007), ("O", 15.999), ("Na", 22.990), ("S", 32.06),
             ("Cl", 35.45), ("K", 39.098), ("Ca", 40.078), ("Fe", 55.845)]
_PARTIES = ["the Licensor", "the Licensee", "the Contractor", "the Client", "the Tenant", "the Landlord"]
_OBLIG = ["shall indemnify", "shall not disclose", "shall promptly notify", "may terminate", "shall remit payment to"]
_INGR = ["flour", "sugar", "butter", "eggs", "milk", "salt", "onions", "garlic", "tomatoes", "rice", "basil"]
_VERBS = ["Whisk", "Chop", "Fold", "Simmer", "Bake", "Stir", "Season", "Knead"]
_PIECES = ["N", "B", "R", "Q", "K", ""]
_FILES = "abcdefgh"


def _arithmetic(r: random.Random) -> str:
    lines = []
    for _ in range(r.randint(8, 14)):
        a, b = r.randint(2, 999), r.randint(2, 99)
        op = r.choice("+-*")
        val = a + b if op == "+" else a - b if op == "-" else a * b
        lines.append(f"{a} {op} {b} = {val}")
    return "\n".join(lines)


def _dna(r: random.Random) -> str:
    seqs = ["".join(r.choice("ACGT") for _ in range(60)) for _ in range(r.randint(4, 7))]
    return f">seq{r.randint(1, 99999)} chromosome {r.randint(1, 22)}\n" + "\n".join(seqs)


def _code(r: random.Random) -> str:
    name = r.choice(["total", "scale", "merge", "clip", "norm", "count"]) + f"_{r.randint(0, 99)}"
    arg = r.choice(["xs", "items", "values", "data"])
    k = r.randint(2, 9)
    return (f"def {name}({arg}, k={k}):\n"
            f"    \"\"\"Return the {name.split('_')[0]} of {arg}.\"\"\"\n"
            f"    result = 0\n"
            f"    for i, x in enumerate({arg}):\n"
            f"        if i % k == {r.randint(0, k - 1)}:\n"
            f"            result += x * {r.randint(1, 7)}\n"
            f"    return result\n")


def _calendar(r: random.Random) -> str:
    out = []
    for _ in range(r.randint(4, 7)):
        out.append(f"On {r.choice(_WEEKDAYS)} {r.randint(1, 28)} {r.choice(_MONTHS)} {r.randint(1950, 2030)} "
                   f"at {r.randint(0, 23):02d}:{r.choice(['00', '15', '30', '45'])} the meeting was moved to room "
                   f"{r.randint(100, 499)}.")
    return " ".join(out)


def _chemistry(r: random.Random) -> str:
    out = []
    for _ in range(r.randint(4, 7)):
        parts = r.sample(_ELEMENTS, r.randint(2, 3))
        counts = [r.randint(1, 4) for _ in parts]
        formula = "".join(f"{e}{c if c > 1 else ''}" for (e, _), c in zip(parts, counts))
        mass = sum(m * c for (_, m), c in zip(parts, counts))
        out.append(f"The molar mass of {formula} is {mass:.3f} g/mol.")
    return " ".join(out)


def _legal(r: random.Random) -> str:
    out = []
    for i in range(r.randint(3, 5)):
        a, b = r.sample(_PARTIES, 2)
        out.append(f"{i + 1}.{r.randint(1, 9)} Subject to Section {r.randint(2, 19)}, {a} {r.choice(_OBLIG)} "
                   f"{b} within {r.randint(5, 90)} days of the Effective Date, notwithstanding any provision hereof.")
    return "\n".join(out)


def _recipes(r: random.Random) -> str:
    ingr = r.sample(_INGR, 4)
    steps = [f"{r.choice(_VERBS)} the {x} for {r.randint(1, 30)} minutes." for x in ingr]
    amounts = ", ".join(f"{r.randint(1, 500)} g {x}" for x in ingr)
    return f"Ingredients: {amounts}.\n" + "\n".join(f"Step {i + 1}: {s}" for i, s in enumerate(steps))


def _chess(r: random.Random) -> str:
    moves = []
    for n in range(1, r.randint(12, 20)):
        w = f"{r.choice(_PIECES)}{r.choice(_FILES)}{r.randint(1, 8)}"
        b = f"{r.choice(_PIECES)}{r.choice(_FILES)}{r.randint(1, 8)}"
        moves.append(f"{n}. {w} {b}")
    return " ".join(moves) + f" {r.choice(['1-0', '0-1', '1/2-1/2'])}"


GENERATORS: dict[str, Callable[[random.Random], str]] = {
    "arithmetic": _arithmetic,
    "dna": _dna,
    "code": _code,
    "calendar": _calendar,
    "chemistry": _chemistry,
    "legal": _legal,
    "recipes": _recipes,
    "chess": _chess,
}


def generate(domain: str, n_docs: int, seed: int) -> list[str]:
    r = random.Random(f"{domain}:{seed}")
    return [GENERATORS[domain](r) for _ in range(n_docs)]


def build_tiny(root, domains: list[str], train_docs: int = 240, validation_docs: int = 40) -> None:
    """Write `<root>/<domain>/{train,validation}.jsonl` for the requested tiny domains."""
    from pathlib import Path

    root = Path(root)
    for d in domains:
        if d not in GENERATORS:
            raise unknown_choice("tiny domain", d, GENERATORS)
        write_documents(root / d / "train.jsonl", generate(d, train_docs, seed=1))
        write_documents(root / d / "validation.jsonl", generate(d, validation_docs, seed=2))
