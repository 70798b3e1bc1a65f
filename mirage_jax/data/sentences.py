"""Deterministic English sentences for the synthetic A-roll corpus.

Why a built-in grammar: the corpus needs thousands of distinct, speakable sentences of a
controllable length (a 2 s clip holds about five words) with no download. A few hundred
common words fill a dozen templates; the words are chosen so that bilabial sounds
(p, b, m), which give the clearest lip-sync signal, are frequent.
"""
from __future__ import annotations

import numpy as np

NAMES = """Anna Ben Bob Clara David Emma Frank Grace Henry Ivy Jack James Kate Liam Lucy Mark
Maya Mike Nina Oliver Paul Peter Rosa Sam Sarah Tom Victor Wendy Zoe Molly Max Ruby Philip
Bella Martin Amber Simon Pam Robert Mia""".split()

NOUNS = """apple book ball bag bottle box bread bike boat bird bus cake car cat chair coat cup
desk dog door drum egg farm fish flower game garden gift hat horse house key kite lamp letter
map melon mirror moon mountain movie nail note orange paper park pen pencil phone piano
picture pillow plant plate pocket poem pot puppy river road robot room rope shirt shoe song
spoon stone story table teacher ticket train tree truck window basket bucket button camera
candle cookie lemon market meadow pumpkin rabbit ribbon sandwich summer umbrella wagon
blanket helmet magnet muffin parcel pebble planet puzzle""".split()

ADJECTIVES = """big small red blue green yellow purple brown happy sleepy busy empty heavy
light old new warm cold soft bright dark quiet loud tiny huge pretty simple famous funny
lovely smooth sharp broken hungry lucky proper pink tall short clever gentle humble
polite brave calm""".split()

# (base, past) pairs of transitive verbs.
VERBS = [tuple(p.split(":")) for p in """buy:bought make:made paint:painted bring:brought
move:moved open:opened close:closed wash:washed fix:fixed find:found keep:kept pick:picked
push:pushed pull:pulled drop:dropped carry:carried build:built borrow:borrowed bake:baked
pack:packed stamp:stamped wrap:wrapped map:mapped mop:mopped grab:grabbed hold:held
take:took want:wanted love:loved miss:missed need:needed see:saw watch:watched clean:cleaned
sell:sold share:shared show:showed hide:hid print:printed repair:repaired
return:returned remember:remembered""".split()]

PLACES = """park beach market museum library garden bakery harbor station office school
kitchen barn pool zoo village""".split()
MOTION = [tuple(p.split(":")) for p in """walk:walked run:ran go:went drive:drove move:moved
hurry:hurried come:came ride:rode""".split()]
ADVERBS = """quickly slowly again today together outside quietly happily carefully early
later badly gladly""".split()
TIMES = ["today", "tomorrow", "at noon", "last night", "this morning", "every day",
         "on Monday", "in May", "by myself", "at home", "before lunch", "after dinner"]
PRONOUNS = "I we you they he she".split()
NUMBERS = "two three four five six seven ten twelve".split()


def _templates(rng: np.random.Generator) -> list[str]:
    """One candidate per template, filled with random words."""
    c = lambda xs: xs[rng.integers(len(xs))]  # noqa: E731
    v, v2, mv = c(VERBS), c(VERBS), c(MOTION)
    n, n2, a, name = c(NOUNS), c(NOUNS), c(ADJECTIVES), c(NAMES)
    return [
        f"{name} {v[1]} the {n}.",
        f"The {a} {n} is {c(ADJECTIVES)}.",
        f"Please {v[0]} the {n}.",
        f"{c(PRONOUNS).capitalize()} {v[1]} a {a} {n} {c(TIMES)}.",
        f"{name} {mv[1]} to the {c(PLACES)}.",
        f"My {n} is {a}.",
        f"Did you {v[0]} the {a} {n}?",
        f"We {v[0]} {c(NUMBERS)} {n}s {c(TIMES)}.",
        f"{a.capitalize()} {n}s {mv[0]} {c(ADVERBS)}.",
        f"Maybe {name} can {v[0]} the {n} {c(TIMES)}.",
        f"{name} and {c(NAMES)} {v[1]} the {n} and the {n2}.",
        f"The {n} by the {n2} {v2[1]} a {a} {c(NOUNS)}.",
        f"{c(PRONOUNS).capitalize()} {mv[1]} {c(ADVERBS)}.",
        f"Bring me the {a} {n}, {name}.",
    ]


def sentence(rng: np.random.Generator, max_words: int | None = None) -> str:
    """A random sentence with at most `max_words` words (truncated as a last resort)."""
    if max_words is not None and max_words < 1:
        raise ValueError(f"sentence(): max_words must be >= 1, got {max_words}")
    cands = _templates(rng)
    order = rng.permutation(len(cands))
    for i in order:
        if max_words is None or len(cands[i].split()) <= max_words:
            return cands[i]
    words = cands[order[0]].split()[:max_words]
    return " ".join(words).rstrip(",.?") + "."


def sentences(n: int, seed: int = 0, max_words: int | None = None) -> list[str]:
    """`n` sentences drawn deterministically from `seed` (repeats are possible but rare)."""
    rng = np.random.default_rng(seed)
    return [sentence(rng, max_words) for _ in range(n)]
