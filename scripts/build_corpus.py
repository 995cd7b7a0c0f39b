"""Build the bundled labelled corpus: code, prose, math and multilingual text, offline and seeded.

Writes the training split to build/corpus/train.jsonl (regenerated, never committed) and the
held-out sample to data/sample.jsonl (committed). scripts/train_model.py calls build_corpus().
Code and prose come from the running interpreter's stdlib, so they depend on its version;
math and multilingual text are generated from fixed seeds and are identical on every machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import random
import sys
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TRAIN = REPO / "build" / "corpus" / "train.jsonl"
DEFAULT_SAMPLE = REPO / "data" / "sample.jsonl"

DOMAINS = ("code", "prose", "math", "multilingual")
SEED = 20240917
# One unit in HELD_OUT_MOD goes to the held-out pool: whole files, topics or sentences, so
# the sample never shares a source unit with the training split.
HELD_OUT_MOD = 8
SAMPLE_PER_DOMAIN = 150
SAMPLE_MIN_CHARS, SAMPLE_MAX_CHARS = 200, 700
CHUNK_CHARS = 600
CODE_TRAIN_CHARS = 4_000_000
GENERATED_TRAIN_CHARS = 2_500_000

# Stdlib folders left out of the code domain: tests and vendored packages, charmap tables
# full of non-Latin literals (they belong to no domain), and pydoc_data, which is the prose.
CODE_EXCLUDE = {"site-packages", "test", "tests", "idle_test", "encodings", "pydoc_data", "__pycache__"}


def is_held_out(key: str) -> bool:
    """Stable split decision from a unit's name, independent of iteration order and machine."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % HELD_OUT_MOD == 0


def chunk_lines(text: str, max_chars: int = CHUNK_CHARS) -> Iterator[str]:
    """Cut text at line boundaries into pieces of at most max_chars (long lines are cut)."""
    piece: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        while len(line) > max_chars:
            if piece:
                yield "".join(piece)
                piece, size = [], 0
            yield line[:max_chars]
            line = line[max_chars:]
        if size + len(line) > max_chars and piece:
            yield "".join(piece)
            piece, size = [], 0
        piece.append(line)
        size += len(line)
    if piece:
        yield "".join(piece)


def mostly_ascii(text: str, max_non_ascii: float = 0.02) -> bool:
    return sum(ord(ch) > 127 for ch in text) <= max_non_ascii * max(len(text), 1)


# --- code: Python stdlib sources ---------------------------------------------------------


def code_records() -> Iterator[dict]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p.relative_to(stdlib).as_posix()
        for p in stdlib.rglob("*.py")
        if not CODE_EXCLUDE.intersection(p.relative_to(stdlib).parts)
    )
    for rel in files:
        try:
            text = (stdlib / rel).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        held = is_held_out("code:" + rel)
        for chunk in chunk_lines(text):
            if len(chunk.strip()) >= 40 and mostly_ascii(chunk):
                yield {"text": chunk, "domain": "code", "source": f"stdlib:{rel}", "held_out": held}


# --- prose: pydoc_data topic texts ---------------------------------------------------------


def prose_records() -> Iterator[dict]:
    """Topic texts cut at paragraph boundaries; topics are held out whole.

    Topics overlap (e.g. "augassign" repeats paragraphs of "assignment"), so a paragraph of a
    held-out topic is dropped wherever else it appears, and repeated paragraphs are kept once.
    """
    from pydoc_data.topics import topics

    def paragraphs(name: str) -> list[str]:
        pieces = []
        for para in topics[name].split("\n\n"):
            if para.strip():
                pieces.extend(chunk_lines(para.strip()) if len(para) > CHUNK_CHARS else [para.strip()])
        return pieces

    names = sorted(topics)
    held_topics = {name for name in names if is_held_out("prose:" + name)}
    held_paragraphs = {p for name in held_topics for p in paragraphs(name)}
    seen: set[str] = set()
    for name in names:
        held = name in held_topics
        buf: list[str] = []
        for para in paragraphs(name):
            if para in seen or (not held and para in held_paragraphs):
                continue
            seen.add(para)
            if buf and sum(len(p) + 2 for p in buf) + len(para) > CHUNK_CHARS:
                yield {
                    "text": "\n\n".join(buf),
                    "domain": "prose",
                    "source": f"pydoc_data:{name}",
                    "held_out": held,
                }
                buf = []
            buf.append(para)
        if buf:
            yield {
                "text": "\n\n".join(buf),
                "domain": "prose",
                "source": f"pydoc_data:{name}",
                "held_out": held,
            }


# --- math: seeded arithmetic -----------------------------------------------------------------


def _addition(rng: random.Random) -> str:
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    return f"{a} + {b} = {a + b}"


def _subtraction(rng: random.Random) -> str:
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    return f"{a} - {b} = {a - b}"


def _multiplication(rng: random.Random) -> str:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    return f"{a} * {b} = {a * b}"


def _division(rng: random.Random) -> str:
    b, q = rng.randint(2, 40), rng.randint(1, 60)
    return f"{b * q} / {b} = {q}"


def _linear_equation(rng: random.Random) -> str:
    a, x, b = rng.randint(2, 12), rng.randint(-20, 20), rng.randint(-50, 50)
    sign = "+" if b >= 0 else "-"
    return f"solve {a}x {sign} {abs(b)} = {a * x + b}: x = {x}"


def _parentheses(rng: random.Random) -> str:
    a, b, c = rng.randint(1, 30), rng.randint(1, 30), rng.randint(2, 12)
    return f"({a} + {b}) * {c} = {(a + b) * c}"


def _square(rng: random.Random) -> str:
    a = rng.randint(2, 60)
    return f"{a}^2 = {a * a}"


def _modulo(rng: random.Random) -> str:
    a, b = rng.randint(10, 999), rng.randint(2, 13)
    return f"{a} mod {b} = {a % b}"


MATH_KINDS: tuple[Callable[[random.Random], str], ...] = (
    _addition,
    _subtraction,
    _multiplication,
    _division,
    _linear_equation,
    _parentheses,
    _square,
    _modulo,
)


def math_records(rng: random.Random, total_chars: int) -> Iterator[dict]:
    """Records of newline-separated problems; each problem's text decides its split."""
    produced = 0
    pools: dict[bool, list[str]] = {False: [], True: []}
    target = {False: 0, True: 0}
    while produced < total_chars:
        line = rng.choice(MATH_KINDS)(rng)
        held = is_held_out("math:" + line)
        pools[held].append(line)
        if not target[held]:
            target[held] = rng.randint(150, 600)
        if sum(len(x) + 1 for x in pools[held]) >= target[held]:
            text = "\n".join(pools[held])
            produced += len(text)
            yield {"text": text, "domain": "math", "source": "generated:arithmetic", "held_out": held}
            pools[held], target[held] = [], 0


# --- multilingual: seeded pseudo-text in non-Latin scripts -----------------------------------
# Each script gets a fixed Zipf-weighted lexicon of syllable-built words, so the text has
# word-level regularities a small model can learn, yet depends on no installed data.


def _chars(first: int, last: int) -> list[str]:
    return [chr(c) for c in range(first, last + 1)]


def _syllables_cyrillic() -> list[str]:
    consonants = list("бвгджзклмнпрстфхцчшщ")
    vowels = list("аеиоуыэюя")
    return [c + v for c in consonants for v in vowels]


def _syllables_greek() -> list[str]:
    consonants = list("βγδζθκλμνξπρστφχψ")
    vowels = list("αεηιουωάέίό")
    return [c + v for c in consonants for v in vowels]


def _syllables_arabic() -> list[str]:
    letters = _chars(0x0628, 0x063A) + _chars(0x0641, 0x064A)
    return [a + b for a in letters for b in ("ا", "و", "ي", "")]


def _syllables_hebrew() -> list[str]:
    return _chars(0x05D0, 0x05EA)


def _syllables_devanagari() -> list[str]:
    consonants = _chars(0x0915, 0x0939)
    matras = ["", *_chars(0x093E, 0x094C)]
    return [c + m for c in consonants for m in matras]


def _syllables_hangul() -> list[str]:
    # Compose syllables from jamo indices: 0xAC00 + (lead * 21 + vowel) * 28 + tail.
    return [
        chr(0xAC00 + (lead * 21 + vowel) * 28 + tail)
        for lead in range(19)
        for vowel in range(21)
        for tail in (0, 4, 8, 16)
    ]


def _syllables_han() -> list[str]:
    return _chars(0x4E00, 0x4E00 + 1500)


# name -> (syllable source, word length range, word separator, sentence end)
SCRIPTS: dict[str, tuple[Callable[[], list[str]], tuple[int, int], str, str]] = {
    "cyrillic": (_syllables_cyrillic, (1, 4), " ", "."),
    "greek": (_syllables_greek, (1, 4), " ", "."),
    "arabic": (_syllables_arabic, (2, 4), " ", "."),
    "hebrew": (_syllables_hebrew, (2, 6), " ", "."),
    "devanagari": (_syllables_devanagari, (1, 4), " ", "।"),
    "hangul": (_syllables_hangul, (1, 3), " ", "."),
    "han": (_syllables_han, (1, 2), "", "。"),
}
LEXICON_SIZE = 600


def build_lexicons(rng: random.Random) -> dict[str, tuple[list[str], list[float], tuple[int, int], str, str]]:
    lexicons = {}
    for name, (syllables_of, (lo, hi), sep, end) in SCRIPTS.items():
        syllables = syllables_of()
        words = sorted({"".join(rng.choices(syllables, k=rng.randint(lo, hi))) for _ in range(LEXICON_SIZE)})
        rng.shuffle(words)
        weights = [1.0 / (rank + 1) for rank in range(len(words))]
        lexicons[name] = (words, weights, (lo, hi), sep, end)
    return lexicons


def multilingual_records(rng: random.Random, total_chars: int) -> Iterator[dict]:
    lexicons = build_lexicons(rng)
    names = sorted(lexicons)
    produced = 0
    while produced < total_chars:
        script = rng.choice(names)
        words, weights, _, sep, end = lexicons[script]
        target = rng.randint(150, 600)
        sentences: list[str] = []
        size = 0
        while size < target:
            sentences.append(sep.join(rng.choices(words, weights=weights, k=rng.randint(4, 12))) + end)
            size += len(sentences[-1]) + 1
        text = " ".join(sentences) if sep else "".join(sentences)
        produced += len(text)
        held = is_held_out(f"multilingual:{script}:{text}")
        yield {"text": text, "domain": "multilingual", "source": f"generated:{script}", "held_out": held}


# --- assembly ----------------------------------------------------------------------------------


def split_records(records: Iterator[dict], train_budget: int | None) -> tuple[list[dict], list[dict]]:
    train, held = [], []
    used = 0
    for rec in records:
        if rec.pop("held_out"):
            held.append(rec)
        elif train_budget is None or used < train_budget:
            train.append(rec)
            used += len(rec["text"])
    return train, held


def choose_sample(pool: list[dict], rng: random.Random, n: int) -> list[dict]:
    fitting = [r for r in pool if SAMPLE_MIN_CHARS <= len(r["text"]) <= SAMPLE_MAX_CHARS]
    chosen = rng.sample(fitting, min(n, len(fitting)))
    return [{"text": r["text"], "domain": r["domain"]} for r in chosen]


def build_corpus(
    train_path: Path = DEFAULT_TRAIN, sample_path: Path = DEFAULT_SAMPLE, seed: int = SEED
) -> dict:
    """Write both splits; return a summary (also written next to the training split)."""
    rng = random.Random(seed)
    sources = {
        "code": (code_records(), CODE_TRAIN_CHARS),
        "prose": (prose_records(), None),
        "math": (math_records(random.Random(seed + 1), GENERATED_TRAIN_CHARS), None),
        "multilingual": (multilingual_records(random.Random(seed + 2), GENERATED_TRAIN_CHARS), None),
    }
    train: list[dict] = []
    sample: list[dict] = []
    counts = {}
    for domain in DOMAINS:
        records, budget = sources[domain]
        dom_train, dom_held = split_records(records, budget)
        dom_sample = choose_sample(dom_held, rng, SAMPLE_PER_DOMAIN)
        train.extend(dom_train)
        sample.extend(dom_sample)
        counts[domain] = {
            "train_records": len(dom_train),
            "train_chars": sum(len(r["text"]) for r in dom_train),
        }
    # Safety net: no sample record may repeat a training record verbatim.
    train_texts = {r["text"] for r in train}
    sample = [r for r in sample if r["text"] not in train_texts]
    for domain in DOMAINS:
        counts[domain]["sample_records"] = sum(r["domain"] == domain for r in sample)
    rng.shuffle(train)

    for path, rows in ((train_path, train), (sample_path, sample)):
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    summary = {
        "seed": seed,
        "python_version": platform.python_version(),
        "stdlib": sysconfig.get_paths()["stdlib"],
        "domains": counts,
        "train_sha256": hashlib.sha256(train_path.read_bytes()).hexdigest(),
        "sample_sha256": hashlib.sha256(sample_path.read_bytes()).hexdigest(),
    }
    (train_path.parent / "meta.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-out", type=Path, default=DEFAULT_TRAIN)
    parser.add_argument("--sample-out", type=Path, default=DEFAULT_SAMPLE)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    summary = build_corpus(args.train_out, args.sample_out, args.seed)
    json.dump(summary, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
