"""Regenerate tests/data/tokenizer_corpus.jsonl: the texts the tokenizer parity tests run.

One JSON string per line (so tabs and newlines inside a text survive). Deterministic: the
same file on every run. The texts aim at the places where a tokenizer rewrite goes wrong:
text cleaning (mojibake, HTML entities, ligatures, full-width forms, whitespace runs),
case folding (Greek final sigma, dotted I, long s), the word pattern (contractions,
punctuation runs, digits, CJK, emoji, combining marks), special-token strings glued to
punctuation, and truncation (texts far over 77 tokens).

Run after changing the generator: ``python tests/scripts/make_tokenizer_corpus.py``.
"""

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "data" / "tokenizer_corpus.jsonl"

WORD_LIST = (
    "a photo of the cat dog sitting on red blue green small large circle square triangle "
    "above below next to with and in picture painting drawing sketch bright dark close-up "
    "tokenizer unaffable unbelievably running quickly jumped antidisestablishmentarianism "
    "zebra xylophone quiz naive resume cafe jalapeno hello world it is we are they were"
)
WORDS = WORD_LIST.split()
CONTRACTIONS = [
    "it's",
    "don't",
    "we're",
    "I've",
    "I'm",
    "you'll",
    "he'd",
    "IT'S",
    "DON'T",
    "We'Re",
    "it’s",
    "rock 'n' roll",
    "'s",
    "''",
    "o'clock",
    "it'ſ",
    "'tis",
]
# Fragments that text cleaning rewrites; also mixed into ordinary sentences below.
NOISE = [
    "cafÃ©",
    "doesnâ€™t",
    "&amp;",
    "&amp;amp;",
    "&lt;3",
    "&#39;quoted&#39;",
    "&nbsp;",
    "ﬁ",
    "ＦＵＬＬ",
    "“curly”",
    "\u00a0",
    "\t\t",
    "\n",
    "ΟΔΟΣ",
    "İ",
    "e\u0301",
    "<end_of_text>",
    "!<start_of_text>",
]
# Each entry exercises one known trap; kept verbatim in the corpus.
HANDPICKED = [
    "",
    " ",
    "\t",
    "\n",
    "   \t\n  ",
    ".",
    "!!!",
    "...",
    "?!?!",
    "--- *** ---",
    "a",
    "A",
    "I",
    "0",
    "hello world",
    "Hello, World!",
    "HeLLo WoRLD",
    "hello   world\t\tagain\nand\r\nagain",
    "tabs\there\tand\tthere",
    "non\u00a0breaking\u00a0space",
    "ideographic\u3000space",
    "line\u2028separator and paragraph\u2029separator",
    "zero\u200bwidth\u200cjoiners\u200d",
    "soft\u00adhyphen",
    "control\x00chars\x07and\x1bescape\x7fdel",
    "\x1b[31mred terminal text\x1b[0m",
    "café naïve résumé jalapeño Ångström Straße façade",
    "CAFÉ NAÏVE RÉSUMÉ",
    "ΟΔΟΣ ΣΟΦΟΣ Σ σ ς",
    "İstanbul ıi DİYARBAKIR",
    "ǅungla ǈ ǋ",
    "ﬁne ﬂour ﬀ ﬃ ﬄ",
    "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ １２３",
    "ｶﾀｶﾅ halfwidth",
    "cafÃ© naÃ¯ve â€œquotedâ€\x9d doesnâ€™t",
    "Ã¼ber MÃ¼nchen",
    "“curly quotes” and ‘single’ ones",
    "«guillemets» „low quotes“",
    "&amp; &lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot; &#39;apos&#39; &#x263A;",
    "&amp;amp; double &amp;lt; escaped",
    "&amp;amp;amp; triple",
    "fish &amp; chips &nbsp; &copy; 2024 &euro;5",
    "<b>html</b> <br/> <a href='x'>link</a>",
    "https://example.com/path?query=1&amp;b=2#frag",
    "www.example.org/~user/index.html",
    "mail me at someone@example.com",
    "#hashtag @mention $100 50% 3.14159 1,000,000 2024-01-01 12:30pm",
    "½ ¾ ² ³ ¹ ⅓ Ⅻ ⅻ ① ⑩ ٣٤٥ ४५६ 〇",
    "123456789012345678901234567890",
    "phone: +1 (555) 010-9999",
    "日本語のテキスト",
    "中文文本，标点符号。",
    "한국어 텍스트",
    "混合 mixed テキスト text 한국",
    "Привет, мир! ЁЖИК",
    "Γειά σου Κόσμε",
    "مرحبا بالعالم",
    "שלום עולם",
    "नमस्ते दुनिया",
    "สวัสดีชาวโลก",
    "ሰላም ዓለም",
    "😀 😂 🥲 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇺🇸 🇯🇵",
    "emoji😀glued🎉together",
    "♥ ★ ☺ ✓ ✗ → ← ↑ ↓ ∞ ≠ ≤ ≥ ± × ÷",
    "∀x∈ℝ: x²≥0",
    "e\u0301 combining acute, n\u0303 tilde, a\u030a ring",
    "iota subscript α\u0345 ω\u0345",
    "Zalgo: Z\u0351\u036b\u0343a\u0310\u0352l\u0309g\u0313o",
    "<start_of_text>",
    "<end_of_text>",
    "a <start_of_text> b <end_of_text> c",
    "!<start_of_text>",
    "x<end_of_text>y",
    "<<start_of_text>>",
    "<end_of_text><start_of_text>",
    "(<end_of_text>)",
    "<START_OF_TEXT> upper",
    "<start_of_text",
    "[CLS] hello [SEP] world [PAD] [MASK] [UNK]",
    "[cls] lowercase specials",
    "def f(x): return x**2  # python",
    "if (a && b || !c) { return; }",
    "snake_case_names and camelCaseNames and SCREAMING_CASE",
    "____ underscores ____",
    "a.b.c.d e-f-g h/i/j k\\l",
    "unaffable unbelievable antidisestablishmentarianism",
    "supercalifragilisticexpialidocious" * 3,
    "x" * 120,
    "ab" * 80,
    "1" * 100,
    "!" * 150,
    "😀" * 60,
]


def _random_sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(1, 14))]
    style = rng.random()
    if style < 0.2:
        words = [w.upper() for w in words]
    elif style < 0.4:
        words = [w.capitalize() for w in words]
    elif style < 0.5:
        words = ["".join(c.upper() if rng.random() < 0.5 else c for c in w) for w in words]
    if rng.random() < 0.3:
        words.insert(rng.randrange(len(words) + 1), rng.choice(CONTRACTIONS))
    seps = [" ", " ", " ", "  ", "\t", " \n ", ", ", "; ", " - ", "/"]
    text = words[0] + "".join(rng.choice(seps) + w for w in words[1:])
    return text + rng.choice(["", ".", "!", "?", "...", "!!", "?!", " :)", " :-(", ""])


def _random_soup(rng: random.Random) -> str:
    # Characters drawn from blocks with different word-pattern classes: letters, marks,
    # digits, symbols, CJK, emoji, whitespace.
    blocks = [
        (0x20, 0x7E),
        (0xA0, 0x17F),
        (0x300, 0x36F),
        (0x370, 0x3FF),
        (0x400, 0x4FF),
        (0x590, 0x6FF),
        (0x900, 0x97F),
        (0x2000, 0x206F),
        (0x2100, 0x22FF),
        (0x3040, 0x30FF),
        (0x4E00, 0x4FFF),
        (0xAC00, 0xAD00),
        (0xFF00, 0xFFEF),
        (0x1F300, 0x1F64F),
    ]
    chars = []
    for _ in range(rng.randint(1, 30)):
        lo, hi = rng.choice(blocks)
        chars.append(chr(rng.randint(lo, hi)))
    return "".join(chars)


def _long_text(rng: random.Random) -> str:
    # Well over 77 CLIP tokens and 128 WordPiece tokens, to exercise truncation.
    return " ".join(_random_sentence(rng) for _ in range(rng.randint(8, 25)))


def corpus() -> list[str]:
    rng = random.Random(20240601)
    texts = list(HANDPICKED)
    texts += [_random_sentence(rng) for _ in range(700)]
    texts += [_random_soup(rng) for _ in range(250)]
    texts += [_long_text(rng) for _ in range(60)]
    # Entities and mojibake inside ordinary sentences, not only alone.
    for _ in range(60):
        words = _random_sentence(rng).split(" ")
        words.insert(rng.randrange(len(words) + 1), rng.choice(NOISE))
        texts.append(" ".join(words))
    return texts


def main() -> None:
    OUT.parent.mkdir(exist_ok=True)
    lines = [json.dumps(t, ensure_ascii=False) for t in corpus()]
    # JSON leaves these raw, but str.splitlines (and some editors) break lines at them.
    for sep in ("\x85", "\u2028", "\u2029"):
        lines = [line.replace(sep, f"\\u{ord(sep):04x}") for line in lines]
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} texts, {OUT.stat().st_size} bytes to {OUT}")


if __name__ == "__main__":
    main()
