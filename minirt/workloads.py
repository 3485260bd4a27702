"""Fixed prompts for equivalence measurements: the seed paper's three, and a multi-needle haystack.

The prompts are fixed before measuring and are not tuned to make sparse and full agree.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

FILLER = [
    "The river runs slowly past the old mill, and in summer the water is warm enough to swim.",
    "Most mornings the market opens at seven, when the first carts of vegetables arrive from the farms.",
    "A good loaf of bread needs flour, water, salt, yeast and, above all, patience.",
    "The library on the hill keeps its oldest maps in a cool room without windows.",
    "Trains to the coast leave every hour, though on Sundays the timetable is thinner.",
    "In autumn the leaves of the maple trees turn red long before the oaks change colour.",
    "The committee met twice last year to discuss the repair of the bridge over the canal.",
    "Children in the village learn to sail on the lake before they learn to ride a bicycle.",
    "The museum's new wing displays pottery found during the construction of the highway.",
    "Rain is common in the valley in spring, so most houses have steep roofs and wide gutters.",
    "The bakery on the corner sells a famous almond cake that sells out before noon.",
    "Every winter a few families of swans return to the pond behind the town hall.",
    "The old lighthouse has not been used for decades, but it is still painted every summer.",
    "Farmers in the region grow wheat, barley and sunflowers, rotating the fields each year.",
    "The town's clock tower was rebuilt after a storm damaged its roof a century ago.",
    "On clear nights the observatory opens its doors to visitors who want to see the planets.",
    "A narrow path leads from the church to the cliffs, where seabirds nest in the rocks.",
    "The annual fair brings musicians, jugglers and food stalls to the central square.",
    "Fishing boats return in the late afternoon, followed by gulls hoping for scraps.",
    "The school's garden grows tomatoes, beans and herbs that are used in the cafeteria.",
    "Old stone walls divide the pastures, and sheep graze between them all year round.",
    "The local newspaper is printed twice a week and delivered by bicycle.",
    "A small ferry carries cars and passengers across the bay when the weather allows.",
    "The hiking club maintains the trails and repaints the markers every spring.",
]


def filler(n_sentences: int, offset: int = 0) -> str:
    return " ".join(FILLER[(offset + i) % len(FILLER)] for i in range(n_sentences))


# The seed paper's prompts: retrieval, code completion, narrative continuation.
PAPER_PROMPTS = {
    "retrieval": "The secret code is PHOENIX. Remember it. " + filler(24)
                 + " Question: What is the secret code? Answer: The secret code is",
    "code": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "narrative": "Once upon a time, in a small village by the sea, there lived an old fisherman who",
}


@dataclass(frozen=True)
class Needle:
    fact: str
    question: str
    answer: str


NEEDLES = [
    Needle("Alice's favorite color is BLUE.", "What is Alice's favorite color?", "BLUE"),
    Needle("Bob works as a PILOT.", "What does Bob work as?", "PILOT"),
    Needle("The meeting is at 3PM.", "What time is the meeting?", "3PM"),
    Needle("The password is TIGER.", "What is the password?", "TIGER"),
    Needle("Charlie lives in TOKYO.", "Where does Charlie live?", "TOKYO"),
]


def haystack(sentences_between: int = 16) -> str:
    """The five needle facts with `sentences_between` filler sentences before each and after the last."""
    parts = []
    for i, needle in enumerate(NEEDLES):
        parts += [filler(sentences_between, offset=i * 5), needle.fact]
    parts.append(filler(sentences_between, offset=3))
    return " ".join(parts)


PROMPTS = Path(__file__).resolve().parents[1] / "prompts"
# Long texts shipped in prompts/ (see prompts/README.md): Python source and English prose.
LONG_TEXTS = {"code": ("long_code.txt", "code.txt"), "prose": ("prose.txt", "code.txt")}


def long_prompt(tokenizer, kind: str, n_tokens: int, shorter: bool = False) -> list[int]:
    """The first n_tokens tokens of the long `kind` text (its files joined in order); all of it if
    shorter (else an error)."""
    text = "\n\n".join((PROMPTS / name).read_text() for name in LONG_TEXTS[kind])
    ids = tokenizer.encode(text)
    if len(ids) < n_tokens and not shorter:
        raise ValueError(f"the {kind} text has {len(ids)} tokens, fewer than the {n_tokens} asked for")
    return ids[:n_tokens]


def _filler_tokens(tokenizer, n_tokens: int, offset: int = 0) -> str:
    """Filler sentences of at most about n_tokens tokens (sentence lengths measured one by one)."""
    sentences, total = [], 0
    while True:
        sentence = FILLER[(offset + len(sentences)) % len(FILLER)]
        total += len(tokenizer.encode(" " + sentence, add_special_tokens=False))
        if total > n_tokens:
            return " ".join(sentences)
        sentences.append(sentence)


def spread(tokenizer, n_tokens: int, facts: list[str], depths: list[float]) -> str:
    """About n_tokens of filler with each fact inserted at its depth (0..1, increasing)."""
    parts, done = [], 0.0
    for fact, depth in zip(facts, depths):
        parts += [_filler_tokens(tokenizer, int((depth - done) * n_tokens), offset=len(parts)), fact]
        done = depth
    parts.append(_filler_tokens(tokenizer, int((1 - done) * n_tokens), offset=len(parts)))
    return " ".join(p for p in parts if p)


# Pass keys fixed before measuring (one per depth), not tuned to any model.
PASSKEY_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
PASSKEYS = ("68231", "40917", "85564", "13729", "57302")


def passkey_prompt(tokenizer, n_tokens: int, depth: float, key: str) -> list[int]:
    """A chat prompt of about n_tokens: filler with the pass key stated at `depth`, then the question."""
    doc = spread(tokenizer, n_tokens - 100, [f"The pass key is {key}. Remember it. {key} is the pass key."], [depth])
    question = "What is the pass key? Answer with the number only."
    return tokenizer.encode_chat([{"role": "user", "content": f"{doc}\n\nQuestion: {question}"}])


def haystack_prompts(tokenizer, n_tokens: int) -> list[list[int]]:
    """The five needles at depths 10%..90% of about n_tokens of filler; one chat prompt per needle's
    question (they share everything up to the question)."""
    doc = spread(tokenizer, n_tokens - 100, [n.fact for n in NEEDLES], [0.1, 0.3, 0.5, 0.7, 0.9])
    return [tokenizer.encode_chat([{"role": "user", "content": f"{doc}\n\nQuestion: {n.question} Answer with one word."}])
            for n in NEEDLES]
