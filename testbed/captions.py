"""Caption text: the noisy web alt-texts and the dense synthetic captions of the testbed.

This is where the phenomenon the project studies is planted. Alt-texts are short and noisy but
often name the species (sometimes the wrong one); ``altogether`` captions are dense and aligned and
keep the species name when the alt-text had it right; ``scratch`` captions are dense but only ever
use generic category names and sometimes hallucinate a colour or count. All choices come from the
``random.Random`` passed in, in a fixed order, so captions are reproducible from the seed.
"""

from __future__ import annotations

import random
from typing import NamedTuple

from testbed.world import CATEGORY_PLURALS, COLORS, CONCEPTS, COUNT_WORDS, TAXONOMY, Concept, marking_tone

_FIRST = ("John", "Maria", "Ken", "Ana", "Luis", "Emma", "Raj", "Sofia", "Tom", "Yuki", "Omar", "Lena")
_SURNAMES = ("Smith", "Garcia", "Tanaka", "Novak", "Okafor", "Larsen", "Rossi", "Dubois", "Kim", "Murphy")
_SITES = ("naturepix.net", "wildshots.org", "photostock.example", "myblog.example", "imgshare.example")
_TOWNS = ("Lisbon", "Austin", "Kyoto", "Oslo", "Nairobi", "Perth", "Quebec", "Porto")
_FILLERS = ("photo", "image", "hd", "pic", "jpg", "download")
_UNRELATED = (
    "home decor ideas",
    "best deals today",
    "cheap flights and hotels",
    "wedding dress inspiration",
    "kitchen renovation before after",
    "funny cat memes",
    "vintage car show",
    "top ten travel tips",
)


def _date(r: random.Random) -> str:
    return f"{r.randint(1, 28):02d}/{r.randint(1, 12):02d}/{r.randint(1998, 2023)}"


def alt_text(r: random.Random, kind: str, name: str | None, color: str) -> str:
    """Short noisy web alt-text. ``name`` is the (correct or wrong) species, or None for kind 'none'."""
    first, sur, site = r.choice(_FIRST), r.choice(_SURNAMES), r.choice(_SITES)
    d4, year = f"{r.randint(0, 9999):04d}", str(r.randint(1998, 2023))
    if name is not None:
        n = name.title() if r.random() < 0.3 else name
        if r.random() < 0.15:  # a color word in ~15% of alt-texts (usually the true one)
            n = f"{color if r.random() < 0.85 else r.choice(tuple(COLORS))} {n}"
        templates = (
            f"{n}, {_date(r)}",
            f"IMG_{d4} {n} by {first[0]}. {sur}",
            f"{n} best price free shipping",
            f"{n} stock photo",
            f"beautiful {n} in the wild",
            f"{n} - {sur} Photography",
            f"my {n} {year}",
            f"{n} wallpaper hd download",
            f"{n} | {site}",
            f"close up of a {n}",
            f"{n} seen near {r.choice(_TOWNS)}",
            f"DSC_{d4} {n}",
            f"{n} (photo: {first} {sur})",
        )
    else:
        templates = (
            f"DSC_{d4}.JPG uploaded {_date(r)}",
            f"IMG_{d4}.jpg - {site}",
            f"photo by {first} {sur}",
            f"stock photo royalty free image {r.randint(100000, 999999)}",
            f"{_date(r)} summer trip day {r.randint(1, 9)}",
            "best deals today free shipping",
            f"click to enlarge image {r.randint(10, 99)}",
            f"untitled image {r.randint(100, 999)} by {sur}",
            f"{r.choice(_UNRELATED)} {year}",
            f"{first}'s weekend in {r.choice(_TOWNS)}",
            f"copyright {year} {first} {sur} all rights reserved",
            f"{r.choice(_UNRELATED)} stock photo",
        )
        text = r.choice(templates)
        if r.random() < 0.15:
            text = f"{color} {text}" if r.random() < 0.5 else f"{text} {color}"
        templates = (text,)
    words = r.choice(templates).split()
    while len(words) < 3:
        words.append(r.choice(_FILLERS))
    return " ".join(words[:12])


_PATTERN_WITH = {
    "solid": ("with a plain, unmarked body", "with no markings at all", "in one solid color"),
    "hstripes": ("with {m} horizontal stripes", "striped horizontally with {m} bands"),
    "vstripes": ("with {m} vertical stripes", "striped vertically with {m} bands"),
    "dots": ("covered in small {m} dots", "with a pattern of {m} dots"),
    "checker": ("with a {m} checkered pattern", "marked with a {m} checkerboard pattern"),
    "hollow": ("drawn as a hollow outline", "shown only as a hollow outline with an empty middle"),
    "center_dot": ("with a single {m} dot in the middle", "marked by one {m} spot at the center"),
    "cross": ("marked with a {m} cross", "with a {m} cross through the middle"),
}
_POSITION = {
    "left": ("on the left side of the frame", "toward the left of the image"),
    "right": ("on the right side of the frame", "toward the right of the image"),
    "top": ("near the top of the image", "in the upper part of the frame"),
    "bottom": ("near the bottom of the picture", "in the lower part of the frame"),
    "center": ("in the center of the frame", "right in the middle of the image"),
    None: ("spread across the frame", "scattered around the image"),
}
_BACKGROUND = {
    "grass": ("a grassy background", "a patch of grass", "a lawn"),
    "sand": ("a sandy background", "sand", "a stretch of sandy ground"),
    "sky": ("a clear sky", "an open sky background", "the sky"),
    "water": ("water", "a rippling water surface", "a background of water"),
    "snow": ("snow", "a snowy background", "a field of snow"),
}
_EXTRAS = (
    "Nothing else is visible in the scene.",
    "The picture is small and slightly soft, like a web thumbnail.",
    "The lighting is even and the colors are clear.",
    "The background has a subtle, natural texture.",
    "The composition is simple and uncluttered.",
)


def dense_caption(
    r: random.Random, concept: Concept, color: str, count: int, position: str | None, background: str, use_name: bool
) -> str:
    """Dense aligned caption (25-45 words): count, color, object, pattern, position, background.

    ``use_name`` puts the species name in the main sentence; otherwise only the generic category
    appears (as a captioner that does not know the long-tail concept would write).
    """
    cat = concept.category
    cat_n = cat if count == 1 else CATEGORY_PLURALS[cat]
    noun = (concept.name if count == 1 else concept.plural) if use_name else cat_n
    mark = marking_tone(COLORS[color])
    cnt = r.choice(("a single", "one")) if count == 1 else COUNT_WORDS[count - 1]
    be, pron = ("is", "It") if count == 1 else ("are", "They")
    pat = r.choice(_PATTERN_WITH[concept.pattern]).format(m=mark)
    pos = r.choice(_POSITION[position if count == 1 else None])
    bg = r.choice(_BACKGROUND[background])
    shape = TAXONOMY[cat][0]
    mains = (
        (f"A photo of {cnt} {color} {noun} {pat} {pos}, set against {bg}.", True),
        (f"{cnt.capitalize()} {color} {noun} {be} {pos}, shown against {bg}, {pat}.", True),
        (f"This image shows {cnt} {color} {noun} {pos} on {bg}.", False),
        (f"In this picture, {cnt} {color} {noun} {be} {pos} with {bg} behind {'it' if count == 1 else 'them'}.", False),
        (f"Close-up view of {cnt} {color} {noun} {pat}, {pos}, over {bg}.", True),
    )
    main, has_pattern = r.choice(mains)
    sentences = [main]
    if not has_pattern:
        sentences.append(f"{pron} {be} {color}, {pat}.")
    if count == 1:
        shape_s = f"The {cat_n} has {'an' if shape[0] in 'aeiou' else 'a'} {shape} body that stands out clearly."
        count_s = f"There is exactly one {cat_n} in the scene and nothing else."
    else:
        shape_s = f"The {cat_n} have {shape} bodies that stand out clearly."
        count_s = f"There are exactly {COUNT_WORDS[count - 1]} {cat_n} in the scene, all of the same kind."
    optional = [
        shape_s,
        count_s,
        f"The rest of the frame is {bg}, with no other objects.",
        *r.sample(_EXTRAS, 2),
    ]
    r.shuffle(optional)
    target = r.randint(27, 42)
    n_words = sum(len(s.split()) for s in sentences)
    for s in optional:
        if n_words >= target:
            break
        if n_words + len(s.split()) <= 45:
            sentences.append(s)
            n_words += len(s.split())
    return " ".join(sentences)


class TrainCaptions(NamedTuple):
    """The captions of one training sample: its alt-text (and what kind it is) and two dense captions."""

    kind: str  # "correct", "wrong" or "none": whether the alt-text names the true species
    alt: str
    altogether: str
    scratch: str


def train_captions(
    r: random.Random, concept: Concept, color: str, count: int, position: str | None, background: str
) -> TrainCaptions:
    """Alt-text, ``altogether`` and ``scratch`` captions for one training scene.

    55% of alt-texts name the species, 15% a wrong one (half the time from the same category), the
    rest none; ``altogether`` keeps the name for 90% of correct alt-texts; ``scratch`` never names
    the species and hallucinates one detail (colour or count) 20% of the time.
    """
    u = r.random()
    kind = "correct" if u < 0.55 else ("wrong" if u < 0.70 else "none")
    if kind == "correct":
        alt_name: str | None = concept.name
    elif kind == "wrong":
        pool = [c for c in CONCEPTS if c.index != concept.index]
        if r.random() < 0.5:
            pool = [c for c in pool if c.category == concept.category]
        alt_name = r.choice(pool).name
    else:
        alt_name = None
    alt = alt_text(r, kind, alt_name, color)
    keep = kind == "correct" and r.random() < 0.9
    dense = dense_caption(r, concept, color, count, position, background, use_name=keep)
    h_color, h_count = color, count
    if r.random() < 0.2:  # scratch captioner hallucinates one detail
        if r.random() < 0.5:
            h_color = r.choice([c for c in COLORS if c != color])
        else:
            h_count = r.choice([c for c in (count - 1, count + 1) if 1 <= c <= 4])
    h_position = position if h_count == 1 else None
    if h_count == 1 and h_position is None:
        h_position = "center"
    scratch = dense_caption(r, concept, h_color, h_count, h_position, background, use_name=False)
    return TrainCaptions(kind, alt, dense, scratch)
