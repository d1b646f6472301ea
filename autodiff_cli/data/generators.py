"""Small synthetic datasets written here, for tests, demos and offline runs."""
from __future__ import annotations

import operator
import random
from collections.abc import Callable

from autodiff_cli.errors import DataError

# (singular, plural) nouns per category. Written for this project; words appear in one category only.
CATEGORIES: dict[str, list[tuple[str, str]]] = {
    "fruits": [
        ("apple", "apples"), ("pear", "pears"), ("cherry", "cherries"), ("mango", "mangoes"),
        ("kiwi", "kiwis"), ("lemon", "lemons"), ("fig", "figs"), ("apricot", "apricots"),
        ("lime", "limes"), ("melon", "melons"), ("papaya", "papayas"), ("grapefruit", "grapefruits"),
    ],
    "vegetables": [
        ("carrot", "carrots"), ("turnip", "turnips"), ("leek", "leeks"), ("radish", "radishes"),
        ("beet", "beets"), ("eggplant", "eggplants"), ("zucchini", "zucchinis"), ("parsnip", "parsnips"),
        ("head of lettuce", "heads of lettuce"), ("sweet potato", "sweet potatoes"), ("artichoke", "artichokes"),
        ("ear of corn", "ears of corn"),
    ],
    "musical instruments": [
        ("guitar", "guitars"), ("violin", "violins"), ("cello", "cellos"), ("harp", "harps"),
        ("banjo", "banjos"), ("oboe", "oboes"), ("saxophone", "saxophones"), ("harmonica", "harmonicas"),
        ("tuba", "tubas"), ("ukulele", "ukuleles"), ("xylophone", "xylophones"), ("bassoon", "bassoons"),
    ],
    "animals": [
        ("goat", "goats"), ("rabbit", "rabbits"), ("mouse", "mice"), ("duck", "ducks"),
        ("pig", "pigs"), ("sheep", "sheep"), ("horse", "horses"), ("frog", "frogs"),
        ("owl", "owls"), ("hamster", "hamsters"), ("goose", "geese"), ("donkey", "donkeys"),
    ],
    "objects": [
        ("lamp", "lamps"), ("stool", "stools"), ("kettle", "kettles"), ("sofa", "sofas"),
        ("toaster", "toasters"), ("bookshelf", "bookshelves"), ("umbrella", "umbrellas"), ("mirror", "mirrors"),
        ("blender", "blenders"), ("wardrobe", "wardrobes"), ("iron", "irons"), ("armchair", "armchairs"),
    ],
}

# "objects" counts every item, so its questions have no distractors (anything would be an object).
ALL_INCLUSIVE = "objects"
A_BEFORE_VOWEL = {"ukulele"}  # spelled with a vowel, said with a consonant ("a ukulele")
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
COUNT_WEIGHTS = {1: 6, 2: 2, 3: 1, 4: 1}  # mostly single items, as in the BBH task


def _phrase(singular: str, plural: str, count: int) -> str:
    if count == 1:
        article = "an" if singular[0] in "aeiou" and singular not in A_BEFORE_VOWEL else "a"
        return f"{article} {singular}"
    return f"{NUMBER_WORDS[count]} {plural}"


def _join(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    if len(phrases) == 2:
        return f"{phrases[0]} and {phrases[1]}"
    return ", ".join(phrases[:-1]) + f", and {phrases[-1]}"


def _draw_count(rng: random.Random) -> int:
    return rng.choices(list(COUNT_WEIGHTS), weights=list(COUNT_WEIGHTS.values()))[0]


def object_counting_question(rng: random.Random) -> tuple[str, int]:
    """One question and its answer: some items of the asked category, maybe mixed with distractors."""
    category = rng.choice(sorted(CATEGORIES))
    targets = rng.sample(CATEGORIES[category], rng.randint(1, 7))
    distractors: list[tuple[str, str]] = []
    if category != ALL_INCLUSIVE:
        others = [item for name, items in sorted(CATEGORIES.items()) if name != category for item in items]
        distractors = rng.sample(others, rng.randint(0, 4))
    items = [(noun, _draw_count(rng), True) for noun in targets]
    items += [(noun, _draw_count(rng), False) for noun in distractors]
    rng.shuffle(items)
    answer = sum(count for _, count, counted in items if counted)
    listing = _join([_phrase(s, p, count) for (s, p), count, _ in items])
    return f"I have {listing}. How many {category} do I have?", answer


def object_counting(n: int, seed: int, id_prefix: str = "gen-oc") -> list[dict]:
    """`n` BBH-style counting questions; row i depends only on (seed, i), so ids and prefixes are stable."""
    rows = []
    for i in range(n):
        # A string seed is hashed deterministically (not with PYTHONHASHSEED), so this is stable across runs.
        question, answer = object_counting_question(random.Random(f"object_counting:{seed}:{i}"))
        rows.append({"id": f"{id_prefix}-{seed}-{i}", "question": question, "answer": str(answer)})
    return rows


ARITHMETIC = {"plus": operator.add, "minus": operator.sub, "times": operator.mul}


def arithmetic_question(rng: random.Random) -> tuple[str, int]:
    """"What is 17 plus 25?": two small whole numbers, never a negative result."""
    op = rng.choice(sorted(ARITHMETIC))
    top = 12 if op == "times" else 60
    a, b = rng.randint(2, top), rng.randint(2, top)
    if op == "minus" and b > a:
        a, b = b, a
    return f"What is {a} {op} {b}?", ARITHMETIC[op](a, b)


def counting_or_arithmetic(n: int, seed: int, id_prefix: str = "gen-ca") -> list[dict]:
    """`n` questions for a router: even rows count objects (as `object_counting`), odd rows are arithmetic.
    `kind` says which, for checks and reports; a pipeline should not read it (its classifier decides).
    Row i depends only on (seed, i), like `object_counting`."""
    rows = []
    for i in range(n):
        rng = random.Random(f"counting_or_arithmetic:{seed}:{i}")
        kind = "counting" if i % 2 == 0 else "arithmetic"
        question, answer = (object_counting_question if kind == "counting" else arithmetic_question)(rng)
        rows.append({"id": f"{id_prefix}-{seed}-{i}", "question": question, "answer": str(answer), "kind": kind})
    return rows


GENERATORS: dict[str, Callable[..., list[dict]]] = {"object_counting": object_counting,
                                                    "counting_or_arithmetic": counting_or_arithmetic}


def generate(name: str, n: int, seed: int) -> list[dict]:
    """Rows from a registered generator; a DataError for an unknown name or a bad size."""
    if name not in GENERATORS:
        raise DataError(
            key="generator", expected=f"one of {', '.join(GENERATORS)}", got=repr(name)
        )
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DataError(key="generator.n", expected="a positive number of examples", got=repr(n))
    return GENERATORS[name](n, seed)
