"""A real multiple-choice task in plain English, built from facts written here: no download.

A pretrained model can partly do it (SmolLM2-135M-Instruct answers about 60-70% of
the held-out items), so an adapter trained on it briefly has real decisions for a merge
to flip, unlike the built-in synthetic task of :mod:`d2merge.tasks`, which only a
model trained from scratch on it can do.

Four families of items, each with four choices scored by log-likelihood:

    The capital of Japan is             Tokyo | Seoul | Lima | Oslo
    The opposite of hot is              cold | tall | early | wet
    The plural of mouse is              mice | mouses | mices | mouse
    7 plus 5 equals                     12 | 11 | 13 | 14

``split("capitals", ...)`` and the other family names give one family alone (what the
test suite trains "an adapter for another task" on). Train and held-out items never
share a fact: the split is made on the facts, then each fact becomes an item.
"""

from __future__ import annotations

import random
from typing import Sequence

from d2merge.errors import D2MergeError
from d2merge.tasks import MCExample

CAPITALS: tuple[tuple[str, str], ...] = (
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"),
    ("Russia", "Moscow"), ("China", "Beijing"), ("Egypt", "Cairo"), ("Greece", "Athens"), ("Norway", "Oslo"),
    ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Poland", "Warsaw"),
    ("Austria", "Vienna"), ("Hungary", "Budapest"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"),
    ("Peru", "Lima"), ("Chile", "Santiago"), ("Argentina", "Buenos Aires"), ("Cuba", "Havana"),
    ("Mexico", "Mexico City"), ("Canada", "Ottawa"), ("Kenya", "Nairobi"), ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"), ("South Korea", "Seoul"), ("Iran", "Tehran"), ("Iraq", "Baghdad"),
    ("Turkey", "Ankara"), ("India", "New Delhi"), ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"),
    ("Switzerland", "Bern"), ("Czechia", "Prague"), ("Romania", "Bucharest"), ("Ukraine", "Kyiv"),
    ("Australia", "Canberra"), ("New Zealand", "Wellington"), ("Brazil", "Brasilia"), ("Colombia", "Bogota"),
    ("Venezuela", "Caracas"), ("Morocco", "Rabat"), ("Nigeria", "Abuja"), ("Ethiopia", "Addis Ababa"),
    ("Pakistan", "Islamabad"), ("Indonesia", "Jakarta"), ("Philippines", "Manila"), ("Iceland", "Reykjavik"),
    ("Scotland", "Edinburgh"), ("England", "London"), ("Wales", "Cardiff"), ("Bulgaria", "Sofia"),
    ("Serbia", "Belgrade"), ("Croatia", "Zagreb"), ("Lebanon", "Beirut"), ("Syria", "Damascus"),
    ("Jordan", "Amman"), ("Israel", "Jerusalem"), ("Saudi Arabia", "Riyadh"), ("Afghanistan", "Kabul"),
    ("Bangladesh", "Dhaka"), ("Nepal", "Kathmandu"), ("Malaysia", "Kuala Lumpur"), ("Singapore", "Singapore"),
    ("Ghana", "Accra"), ("Senegal", "Dakar"), ("Tunisia", "Tunis"), ("Algeria", "Algiers"),
    ("Libya", "Tripoli"), ("Sudan", "Khartoum"), ("Uganda", "Kampala"), ("Tanzania", "Dodoma"),
    ("Zimbabwe", "Harare"), ("Ecuador", "Quito"), ("Bolivia", "La Paz"), ("Uruguay", "Montevideo"),
    ("Paraguay", "Asuncion"), ("Jamaica", "Kingston"), ("Estonia", "Tallinn"), ("Latvia", "Riga"),
    ("Lithuania", "Vilnius"), ("Belarus", "Minsk"), ("Georgia", "Tbilisi"), ("Armenia", "Yerevan"),
    ("Mongolia", "Ulaanbaatar"), ("Cambodia", "Phnom Penh"), ("Laos", "Vientiane"), ("Qatar", "Doha"),
)

OPPOSITES: tuple[tuple[str, str], ...] = (
    ("hot", "cold"), ("big", "small"), ("tall", "short"), ("fast", "slow"), ("happy", "sad"),
    ("light", "dark"), ("open", "closed"), ("early", "late"), ("full", "empty"), ("rich", "poor"),
    ("strong", "weak"), ("young", "old"), ("wet", "dry"), ("hard", "soft"), ("loud", "quiet"),
    ("clean", "dirty"), ("thick", "thin"), ("heavy", "light"), ("easy", "difficult"), ("true", "false"),
    ("up", "down"), ("inside", "outside"), ("first", "last"), ("win", "lose"), ("buy", "sell"),
    ("push", "pull"), ("give", "take"), ("love", "hate"), ("begin", "end"), ("remember", "forget"),
    ("friend", "enemy"), ("day", "night"), ("summer", "winter"), ("north", "south"), ("east", "west"),
    ("above", "below"), ("front", "back"), ("left", "right"), ("question", "answer"), ("war", "peace"),
    ("sweet", "sour"), ("wide", "narrow"), ("deep", "shallow"), ("cheap", "expensive"), ("safe", "dangerous"),
    ("brave", "afraid"), ("noisy", "silent"), ("awake", "asleep"), ("alive", "dead"), ("arrive", "leave"),
)

PLURALS: tuple[tuple[str, str], ...] = (
    ("mouse", "mice"), ("child", "children"), ("man", "men"), ("woman", "women"), ("tooth", "teeth"),
    ("foot", "feet"), ("goose", "geese"), ("person", "people"), ("ox", "oxen"), ("leaf", "leaves"),
    ("knife", "knives"), ("wife", "wives"), ("wolf", "wolves"), ("half", "halves"), ("city", "cities"),
    ("baby", "babies"), ("story", "stories"), ("party", "parties"), ("box", "boxes"), ("bus", "buses"),
    ("church", "churches"), ("dish", "dishes"), ("glass", "glasses"), ("potato", "potatoes"),
    ("tomato", "tomatoes"), ("hero", "heroes"), ("cactus", "cacti"), ("crisis", "crises"),
    ("analysis", "analyses"), ("phenomenon", "phenomena"), ("sheep", "sheep"), ("fish", "fish"),
    ("deer", "deer"), ("day", "days"), ("key", "keys"), ("boy", "boys"), ("car", "cars"), ("book", "books"),
    ("house", "houses"), ("horse", "horses"), ("shelf", "shelves"), ("life", "lives"), ("loaf", "loaves"),
    ("thief", "thieves"), ("lady", "ladies"), ("fly", "flies"), ("watch", "watches"), ("fox", "foxes"),
)

FAMILIES = ("capitals", "opposites", "plurals", "sums")
NUM_CHOICES = 4


def _wrong_plurals(word: str, plural: str) -> list[str]:
    """Plausible wrong plurals: the regular forms a learner would try, never the right one."""
    candidates = [word + "s", word + "es", plural + "s", word, word + "en", plural + "es", word + "ies"]
    return list(dict.fromkeys(c for c in candidates if c != plural))


def _item(family: str, fact: tuple, rng: random.Random, pool: Sequence[tuple]) -> MCExample:
    if family == "capitals":
        country, right = fact
        prompt = f"The capital of {country} is"
        wrong = rng.sample([c for _, c in pool if c != right], NUM_CHOICES - 1)
    elif family == "opposites":
        word, right = fact
        if rng.random() < 0.5:  # both directions: "the opposite of cold is hot" too
            word, right = right, word
        prompt = f"The opposite of {word} is"
        words = {w for pair in pool for w in pair} - {word, right}
        wrong = rng.sample(sorted(words), NUM_CHOICES - 1)
    elif family == "plurals":
        word, right = fact
        prompt = f"The plural of {word} is"
        wrong = rng.sample(_wrong_plurals(word, right)[:5], NUM_CHOICES - 1)
    elif family == "sums":
        a, b = fact
        right_value = a + b
        prompt = f"{a} plus {b} equals"
        offsets = rng.sample([-2, -1, 1, 2, 10], NUM_CHOICES - 1)
        wrong = [str(right_value + o) for o in offsets]
        right = str(right_value)
    else:
        raise D2MergeError(f"unknown task family {family!r}; choose from {', '.join(FAMILIES)}")
    choices = list(wrong)
    answer = rng.randrange(NUM_CHOICES)
    choices.insert(answer, right)
    return MCExample(prompt, tuple(choices), answer)


def _facts(family: str) -> list[tuple]:
    if family == "capitals":
        return list(CAPITALS)
    if family == "opposites":
        return list(OPPOSITES)
    if family == "plurals":
        return list(PLURALS)
    if family == "sums":
        return [(a, b) for a in range(2, 30) for b in range(2, 30) if a <= b]
    raise D2MergeError(f"unknown task family {family!r}; choose from {', '.join(FAMILIES)}")


def split(families: str | Sequence[str] = FAMILIES, *, held_out: int = 200, seed: int = 0
          ) -> tuple[list[MCExample], list[MCExample]]:
    """(train, held-out) items of the chosen families; held-out takes the same share of each family.

    Facts are shuffled with ``seed`` and divided before items are made, so no country,
    word pair or sum appears on both sides. The sums family is capped so that it is at
    most as large as the other families together and does not swamp them.
    """
    if isinstance(families, str):
        families = (families,)
    rng = random.Random(seed)
    per_family = {f: _facts(f) for f in families}
    for facts in per_family.values():
        rng.shuffle(facts)
    if "sums" in per_family and len(per_family) > 1:
        others = sum(len(v) for f, v in per_family.items() if f != "sums")
        per_family["sums"] = per_family["sums"][:others]
    total = sum(len(v) for v in per_family.values())
    if held_out >= total:
        raise D2MergeError(f"held_out {held_out} leaves no training items (the families hold {total} facts)")
    train: list[MCExample] = []
    test: list[MCExample] = []
    cuts = {f: round(held_out * len(v) / total) for f, v in per_family.items()}
    cuts[next(iter(cuts))] += held_out - sum(cuts.values())  # exactly held_out in all
    for family, facts in per_family.items():
        cut = cuts[family]
        pool = _facts(family)
        test += [_item(family, fact, rng, pool) for fact in facts[:cut]]
        train += [_item(family, fact, rng, pool) for fact in facts[cut:]]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test
