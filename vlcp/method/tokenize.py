"""NLTK's ``word_tokenize`` (English) as the VLCP reference code uses it, without NLTK.

The reference's Algorithm 2 (``03_distiilation/gen_prototype.py``) keeps ``word.lower()`` of the tokens
with ``word.isalpha()``; ``reference_tokens`` gives exactly that list. The rules are those of nltk 3.9.1
and 3.9.2 (the same tokenizer): the reference downloads ``punkt_tab`` (so nltk >= 3.8.2) and was published
in March 2025, when 3.9.1 was current; nltk 3.10 later changed opening quotes and dashes. NLTK is not a
dependency and its data cannot be downloaded at run time, so both steps are re-implemented here from
NLTK's rules (Apache-2.0):

1. Punkt splits the text into sentences. Only the break decision after a period-final word matters for
   alphabetic tokens (step 2 splits off a sentence's *final* period only: "grass. The" gives "grass" at a
   break and the non-alphabetic "grass." without one). Punkt decides with its English model: the
   abbreviation list, collocations and frequent sentence starters below (from nltk_data's
   ``tokenizers/punkt_tab/english``), and an orthographic table (236 KB: how each of many thousand words
   was seen capitalised) that is not shipped: every word is taken to have the flags most common words
   have there (seen in lower case and capitalised mid-sentence, ``COMMON_WORD``). That differs from NLTK
   only (a) after an abbreviation of the list (``Dr.``, ``St.``, ``ok.``) followed by a capitalised word
   that is not a frequent sentence starter and that the table holds as never capitalised mid-sentence, and
   (b) after a single letter outside the list (``B.``, ``X.``) followed by a capitalised word the table
   never saw in lower case (a name, or a word it lacks) or by a lower-case word it saw only starting
   sentences. ``Punkt(ortho=...)`` takes the real table where one is at hand.
2. The Treebank rules of ``NLTKWordTokenizer`` split each sentence into words: clitics (``dog's`` ->
   ``dog`` ``'s``, ``don't`` -> ``do`` ``n't``), MacIntyre's contractions (``cannot`` -> ``can`` ``not``,
   ``gonna`` -> ``gon`` ``na``), quotes, brackets and punctuation; hyphens stay inside words.
"""
from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Callable

# -- Punkt's English model: nltk_data tokenizers/punkt_tab/english (abbrev_types.txt, collocations.tab,
# sent_starters.txt) as published with nltk 3.9 (". . " is a spaced ellipsis, a token of punkt's).
ABBREVIATIONS = frozenset({". . "}) | frozenset("""
ct m.j t a.c n.h ms p.a.m dr pa p.m u.k st dec u.s.a lt g.k adm p h.m ga tenn yr sen n.c j.j d.h s.g inc vs
s.p.a a.t n feb sr jan s.a.y n.y col g.f c.o.m.b d ft va r.k e.f chg r.i a.g minn a.h k n.j m l.f f.j gen
i.m.s s.a aug j.p okla m.d.c ltd oct s vt r.a j.c ariz w.w b.v ore h w.r e.h mrs cie corp w n.v a.d r.j ok
e.m w.c ill nov u.s prof conn u.s.s.r mg f.g ph.d g calif messrs h.f wash tues sw bros u.n l wis mr sep d.c
ave e.l co s.s reps c r.t h.c r wed a.s v fla jr r.h c.v m.b.a rep a.a e c.i.t l.a b.f j.b d.w j.k ala f
w.va sept mich n.m j.r l.p s.c colo fri a.m g.d kan maj ky a.m.e n.d t.j cos nev""".split())
COLLOCATIONS = frozenset(tuple(pair.split("/")) for pair in """
b/stewart i/toussie j/fialka o/ludcke i/magnin b/wigton b/edelman b/levine b/smith j/walter j/aron
""".split()) | {("##number##", w) for w in """international rj commodities cooper genentech wedgestone pepper
insider aes credit corrections financing henley business pay-fone leisure pegasus dividend review abreast
who letters colgate cbot notable zimmer""".split()}
SENT_STARTERS = frozenset("""most he since so both these it nevertheless this indeed however instead under
similarly some though while when in despite although nonetheless thus there if the nor separately moreover
but they yet many according sales among meanwhile even i""".split())

# Orthographic flags (how punkt saw a word): at a sentence's beginning / middle / unknown, upper / lower case.
BEG_UC, MID_UC, UNK_UC, BEG_LC, MID_LC, UNK_LC = (1 << i for i in range(1, 7))
UPPER, LOWER = BEG_UC | MID_UC | UNK_UC, BEG_LC | MID_LC | UNK_LC
COMMON_WORD = MID_UC | MID_LC  # "front", "brothers", "hope" in the English table


@dataclass(frozen=True)
class Punkt:
    """Punkt's model: ``ortho`` maps a word type to its orthographic flags (the table NLTK loads)."""

    abbreviations: frozenset = ABBREVIATIONS
    collocations: frozenset = COLLOCATIONS
    starters: frozenset = SENT_STARTERS
    ortho: Callable[[str], int] = lambda word_type: COMMON_WORD


ENGLISH = Punkt()

_NON_WORD = r"""(?:[)";}\]*:@'({\[?!])"""
_MULTI = r"(?:-{2,}|\.{2,}|(?:\.\s){2,}\.)"
_PUNKT_WORD = re.compile(rf"""{_MULTI}|(?=[^("`{{\[:;&#*@)}}\]\-,])\S+?(?=\s|$|{_NON_WORD}|{_MULTI}|,(?=$|\s|{_NON_WORD}|{_MULTI}))|\S""")
_CANDIDATE = re.compile(rf"[.?!](?=(?P<after>{_NON_WORD}|\s+(?P<next>\S+)))")
_REALIGN = re.compile(r"""["')\]}]+?(?:\s+|(?=--)|$)""", re.M)
_NUMERIC = re.compile(r"^-?[.,]?\d[\d,.-]*\.?$")
_INITIAL = re.compile(r"[^\W\d]\.$")
_ELLIPSIS = re.compile(r"\.\.+$")


class _Tok:
    """A punkt token: its text, case-folded type (numbers as ##number##) and first-pass annotation."""

    def __init__(self, tok: str, p: Punkt):
        self.tok, self.type = tok, _NUMERIC.sub("##number##", tok.lower())
        self.abbr = self.ellipsis = self.sentbreak = False
        if tok in (".", "?", "!"):
            self.sentbreak = True
        elif _ELLIPSIS.match(tok):
            self.ellipsis = True
        elif tok.endswith(".") and not tok.endswith(".."):
            low = tok[:-1].lower()
            self.abbr = low in p.abbreviations or low.split("-")[-1] in p.abbreviations
            self.sentbreak = not self.abbr

    def type_no_period(self) -> str:
        return self.type[:-1] if len(self.type) > 1 and self.type[-1] == "." else self.type

    def type_no_sentperiod(self) -> str:
        return self.type_no_period() if self.sentbreak else self.type


def _ortho(t: _Tok, p: Punkt):
    """Is t the first word of a sentence: True, False or "unknown" (punkt's orthographic heuristic)."""
    if t.tok in (";", ":", ",", ".", "!", "?"):
        return False
    flags = p.ortho(t.type_no_sentperiod())
    if t.tok[0].isupper() and flags & LOWER and not flags & MID_UC:
        return True
    if t.tok[0].islower() and (flags & UPPER or not flags & BEG_LC):
        return False
    return "unknown"


def _second_pass(t1: _Tok, t2: _Tok, p: Punkt) -> None:
    """Punkt's token-pair reclassification of a period-final t1 given the next token t2."""
    if not t1.tok.endswith("."):
        return
    typ, next_typ, initial = t1.type_no_period(), t2.type_no_sentperiod(), bool(_INITIAL.match(t1.tok))
    if (typ, next_typ) in p.collocations:
        t1.sentbreak, t1.abbr = False, True
        return
    if (t1.abbr or t1.ellipsis) and not initial:
        if _ortho(t2, p) is True or (t2.tok[0].isupper() and next_typ in p.starters):
            t1.sentbreak = True
            return
    if initial or typ == "##number##":
        starts = _ortho(t2, p)
        if starts is False or (starts == "unknown" and initial and t2.tok[0].isupper()
                                and not p.ortho(next_typ) & LOWER):
            t1.sentbreak, t1.abbr = False, True


def punkt_break(context: str, p: Punkt = ENGLISH) -> bool:
    """Whether punkt breaks a sentence in a candidate context (the word before a period, the period and
    what follows it): some token before the last one ends a sentence."""
    toks = [_Tok(t, p) for line in context.split("\n") if line.strip() for t in _PUNKT_WORD.findall(line)]
    for t1, t2 in zip(toks, toks[1:]):
        _second_pass(t1, t2, p)
        if t1.sentbreak:
            return True
    return False


def _contexts(text: str):
    """Each candidate sentence end (., ? or !, followed by a closing mark or by space and a word) with its
    context; as punkt finds them, including which overlapping candidates it drops."""
    prev, prev_span = None, (0, 0)
    for m in _CANDIDATE.finditer(text):
        before = text[prev_span[1]:m.start()]
        space = next((i for i in range(len(before) - 1, -1, -1) if before[i] in string.whitespace), 0)
        start = space + prev_span[1] + 1 if space else prev_span[0]  # 0 also when the space is at 0, as in NLTK
        if prev and prev_span[1] <= start:
            yield prev, text[prev_span[0]:prev_span[1]] + prev.group() + prev.group("after")
        prev, prev_span = m, (start, m.start())
    if prev:
        yield prev, text[prev_span[0]:prev_span[1]] + prev.group() + prev.group("after")


def sentences(text: str, p: Punkt = ENGLISH) -> list[str]:
    """``sent_tokenize(text)``: punkt's sentences, with closing quotes and brackets realigned."""
    spans, last = [], 0
    for m, context in _contexts(text):
        if punkt_break(context, p):
            spans.append((last, m.end()))
            last = m.start("next") if m.group("next") else m.end()
    spans.append((last, len(text.rstrip())))
    out, shift = [], 0
    for (a, b), after in zip(spans, spans[1:] + [None]):
        a += shift
        m = _REALIGN.match(text[after[0]:after[1]]) if after else None
        if m:
            out.append(text[a:after[0] + len(m.group(0).rstrip())])
            shift = m.end()
        else:
            shift = 0
            if text[a:b]:
                out.append(text[a:b])
    return out


# The Treebank rules in order: (pattern, replacement, characters one of which a match needs; "" for none).
# Skipping a rule whose characters are absent changes nothing and saves most of the time.
_PAD = r" \g<0> "
_STARTING_QUOTES = [(r"([«“‘„]|[`]+)", r" \1 ", "«“‘„`"), (r'^"', "``", '"'), ("(``)", r" \1 ", "`"),
                    (r"""([ (\[{<])("|'{2})""", r"\1 `` ", "\"'"), (r"(?i)(')(?!re|ve|ll|m|t|s|d|n)(\w)\b", r"\1 \2", "'")]
_PUNCTUATION = [(r"""([^.])(\.)([\]\)}>"'»”’ ]*)\s*$""", r"\1 \2 \3 ", "."), (r"([:,])([^\d])", r" \1 \2", ":,"),
                (r"([:,])$", r" \1 ", ":,"), (r"\.{2,}", _PAD, "."), (r"[;@#$%&]", _PAD, ";@#$%&"),
                (r"""([^.])(\.)([\]\)}>"']*)\s*$""", r"\1 \2\3 ", "."), (r"[?!]", _PAD, "?!"),
                (r"([^'])' ", r"\1 ' ", "'"), (r"[*]", _PAD, "*"), (r"[\]\[(){}<>]", _PAD, "[](){}<>"), ("--", _PAD, "-")]
_ENDING_QUOTES = [("([»”’])", r" \1 ", "»”’"), ("''", " '' ", "'"), ('"', " '' ", '"'), (r"\s+", " ", ""),
                  (r"([^' ])('[sS]|'[mM]|'[dD]|') ", r"\1 \2 ", "'"),
                  (r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) ", r"\1 \2 ", "'")]
_CONTRACTIONS = [(r"(?i)\b(can)(not)\b", r" \1 \2 "), (r"(?i)\b(d)('ye)\b", r" \1 \2 "), (r"(?i)\b(gim)(me)\b", r" \1 \2 "),
                 (r"(?i)\b(gon)(na)\b", r" \1 \2 "), (r"(?i)\b(got)(ta)\b", r" \1 \2 "), (r"(?i)\b(lem)(me)\b", r" \1 \2 "),
                 (r"(?i)\b(more)('n)\b", r" \1 \2 "), (r"(?i)\b(wan)(na)(?=\s)", r" \1 \2 "),
                 (r"(?i) ('t)(is)\b", r" \1 \2 "), (r"(?i) ('t)(was)\b", r" \1 \2 ")]
_ANY_CONTRACTION = re.compile(r"(?i)cannot|d'ye|gimme|gonna|gotta|lemme|more'n|wanna|'tis|'twas")
_BEFORE = [(re.compile(a), b, c) for a, b, c in _STARTING_QUOTES + _PUNCTUATION]
_AFTER = [(re.compile(a), b, c) for a, b, c in _ENDING_QUOTES]
_SPLIT = [(re.compile(a), b) for a, b in _CONTRACTIONS]


def _apply(rules, text: str) -> str:
    for pattern, repl, needs in rules:
        if not needs or any(c in text for c in needs):
            text = pattern.sub(repl, text)
    return text


def treebank_words(sentence: str) -> list[str]:
    """``NLTKWordTokenizer().tokenize(sentence)`` (nltk 3.9.1, parentheses not converted)."""
    text = _apply(_AFTER, " " + _apply(_BEFORE, sentence) + " ")
    if _ANY_CONTRACTION.search(text):
        for pattern, repl in _SPLIT:
            text = pattern.sub(repl, text)
    return text.split()


def word_tokenize(text: str, p: Punkt = ENGLISH) -> list[str]:
    """``nltk.word_tokenize(text)``: punkt sentences, then the Treebank words of each."""
    return [w for s in sentences(text, p) for w in treebank_words(s)]


def reference_tokens(text: str, p: Punkt = ENGLISH) -> list[str]:
    """The words the reference counts: ``[w.lower() for w in word_tokenize(text) if w.isalpha()]``."""
    return [w.lower() for w in word_tokenize(text, p) if w.isalpha()]
