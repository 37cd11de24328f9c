"""vlcp/method/tokenize.py against the library it ports: NLTK 3.9's Punkt and Treebank tokenizers.

NLTK's own classes are the oracle, given the same model as the port (abbreviations, collocations, sentence
starters and an orthographic table) and no downloaded data. Each hand-made text exercises one of punkt's
rules; its expected split is written out too, so a case also says what the rule does.
"""
import random

import pytest
from nltk.tokenize.destructive import NLTKWordTokenizer
from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

from vlcp.method import tokenize as tk


class _Table(dict):
    """NLTK's ortho_context (a dict of word type -> flags) backed by the port's ``ortho`` function."""

    def __init__(self, ortho):
        super().__init__()
        self.ortho = ortho

    def __missing__(self, word_type):
        return self.ortho(word_type)


def nltk_punkt(p: tk.Punkt) -> PunktSentenceTokenizer:
    params = PunktParameters()
    params.abbrev_types, params.collocations = set(p.abbreviations), set(p.collocations)
    params.sent_starters, params.ortho_context = set(p.starters), _Table(p.ortho)
    return PunktSentenceTokenizer(params)


def table(**flags) -> tk.Punkt:
    """The English model with an orthographic table: the words given, every other word a common one."""
    return tk.Punkt(ortho=lambda w: flags.get(w, tk.COMMON_WORD))


SENTENCE_CASES = [
    # "?" and "!" end sentences mid-text
    ("Why? Then it left! Ok.", ["Why?", "Then it left!", "Ok."]),
    # an ellipsis before a frequent sentence starter ends a sentence
    ("He paused... However it went on.", ["He paused...", "However it went on."]),
    # an abbreviation of the list keeps the sentence, also inside brackets and after a hyphen
    ("Ask (Mr. Smith) now.", ["Ask (Mr. Smith) now."]),
    ("We met ex-dr. Smith there.", ["We met ex-dr. Smith there."]),
    ("Mrs. Smith came.", ["Mrs. Smith came."]),
    # ... unless a frequent sentence starter follows it
    ("Ask the dr. However it rains.", ["Ask the dr.", "However it rains."]),
    # an ordinal number: no break before a word seen in lower case, a break before a capitalised one
    ("On the 5. day it rained.", ["On the 5. day it rained."]),
    ("It cost 5. Then it fell.", ["It cost 5.", "Then it fell."]),
    # collocations of the model: initial + name, number + word
    ("Ask B. Stewart now.", ["Ask B. Stewart now."]),
    ("Ask B. Stewart.", ["Ask B. Stewart."]),
    ("Up 5. Dividend news came.", ["Up 5. Dividend news came."]),
    # punctuation never starts a sentence: a number or an abbreviation before it keeps the sentence
    ("Meet on the 5.; then go.", ["Meet on the 5.; then go."]),
    ("Meet on the 5.: then go.", ["Meet on the 5.: then go."]),
    ("Meet on the 5. , then go.", ["Meet on the 5. , then go."]),
    ("Meet on the 5. . then go.", ["Meet on the 5. .", "then go."]),
    ("Meet on the 5.! then go.", ["Meet on the 5.!", "then go."]),
    ("Meet on the 5.? then go.", ["Meet on the 5.?", "then go."]),
    ("Meet on the 5.!", ["Meet on the 5.!"]),
    ("Meet on the 5.?", ["Meet on the 5.?"]),
    ("Ask Dr.; then go.", ["Ask Dr.; then go."]),
    # an initial that is also an abbreviation of the list ("c"): the starter rule is for non-initials only
    ("Vitamin C. However it helps.", ["Vitamin C. However it helps."]),
    # an ordinary word's period ends a sentence even before a lower-case word
    ("I fed the dog. then it slept.", ["I fed the dog.", "then it slept."]),
    # runs of marks and marks after a space: which overlapping candidates punkt drops
    ("Very bad acting!!! I promise.", ["Very bad acting!!!", "I promise."]),
    ("Why? Mrs. Smith came.", ["Why?", "Mrs. Smith came."]),
    ("Hi !! Yes.", ["Hi !", "!", "Yes."]),
    ("Hi! . Then", ["Hi!", ".", "Then"]),
    ("Hi . Then", ["Hi .", "Then"]),
    ("? Why not. Fine.", ["?", "Why not.", "Fine."]),
    ("I !!! Yes.", ["I !", "!!", "Yes."]),  # a space at index 1 (punkt reads one at index 0 as none)
    (" Mrs. Smith came.", [" Mrs. Smith came."]),
]


@pytest.mark.parametrize("text, expected", SENTENCE_CASES)
def test_sentences_follow_punkt(text, expected):
    assert tk.sentences(text) == expected
    assert nltk_punkt(tk.ENGLISH).tokenize(text) == expected


# -- the orthographic table: how each word was seen (cases a constant table cannot tell apart)
TABLE_CASES = [
    # a lower-case word seen only starting sentences may start one: the initial ends the sentence
    (table(apples=tk.BEG_LC), "Plan J. apples grow.", ["Plan J.", "apples grow."]),
    # a lower-case word never seen, or seen only mid-sentence, does not start one: the initial stays
    (table(zorg=0), "Plan J. zorg grows.", ["Plan J. zorg grows."]),
    (table(zorg=tk.MID_LC), "Plan J. zorg grows.", ["Plan J. zorg grows."]),
    # a lower-case word also seen capitalised does not, even if seen starting sentences in lower case
    (table(zorg=tk.MID_UC | tk.BEG_LC), "Plan J. zorg grows.", ["Plan J. zorg grows."]),
    # a capitalised word never seen: no evidence, the abbreviation keeps the sentence
    (table(zorg=0), "Is it ok. Zorg came.", ["Is it ok. Zorg came."]),
    # a capitalised word seen in lower case and never capitalised mid-sentence starts one
    (table(zorg=tk.MID_LC), "Is it ok. Zorg came.", ["Is it ok.", "Zorg came."]),
    # a non-final abbreviation is looked up with its period ("mr."), as punkt's table keys it
    (table(mr=tk.BEG_UC | tk.MID_LC), "Is it ok. Mr. Smith came.", ["Is it ok. Mr. Smith came."]),
    (table(**{"mr.": tk.BEG_UC | tk.MID_LC}), "Is it ok. Mr. Smith came.", ["Is it ok.", "Mr. Smith came."]),
    # a sentence-final word is looked up without its period
    (table(stewart=tk.MID_LC), "Plan ok. Stewart.", ["Plan ok.", "Stewart."]),
]


@pytest.mark.parametrize("p, text, expected", TABLE_CASES, ids=range(len(TABLE_CASES)))
def test_the_orthographic_table_decides_as_in_punkt(p, text, expected):
    assert tk.sentences(text, p) == expected
    assert nltk_punkt(p).tokenize(text) == expected


def test_any_model_is_read_as_punkt_reads_it():
    # models punkt's trainer would not produce, to pin the port's reading of the model to NLTK's:
    # a lone "." is a sentence end before the abbreviation list is consulted ...
    empty_abbr = tk.Punkt(abbreviations=tk.ABBREVIATIONS | {""})
    assert tk.sentences("Wait . Smith went.", empty_abbr) == ["Wait .", "Smith went."]
    # ... and a lone "." keeps its period as its type (a collocation can name it)
    dot_colloc = tk.Punkt(collocations=tk.COLLOCATIONS | {("dog", ".")})
    assert tk.sentences("The dog. . Then it ran.", dot_colloc) == ["The dog. .", "Then it ran."]
    assert tk.sentences("The dog. . Then it ran.") == ["The dog.", ".", "Then it ran."]
    for p, text in [(empty_abbr, "Wait . Smith went."), (dot_colloc, "The dog. . Then it ran.")]:
        assert nltk_punkt(p).tokenize(text) == tk.sentences(text, p)


@pytest.mark.parametrize("text, expected", [
    ("He paused . . . and went on", False),  # ". . ." is one token, the spaced ellipsis of the list
    ("He paused . .\n. and went on", True),  # not across lines: the first line's "." ends a sentence
    ("He paused . .\n.", True),
    ("He paused . . .\nand went on", False),
    ("Up 5. day one", False),
    ("Up 5. Then one", True),
])
def test_punkt_break_on_any_text(text, expected):
    # punkt_break is punkt's text_contains_sentbreak: a break before the last token, lines read one by one
    assert tk.punkt_break(text) is expected
    assert nltk_punkt(tk.ENGLISH).text_contains_sentbreak(text) is expected


@pytest.mark.parametrize("sentence, expected", [
    ("The dog's\ttail is up.", ["The", "dog", "'s", "tail", "is", "up", "."]),
    ("They're\nhere and don't\tgo.", ["They", "'re", "here", "and", "do", "n't", "go", "."]),
])
def test_treebank_words_read_any_whitespace_as_a_space(sentence, expected):
    assert tk.treebank_words(sentence) == expected
    assert NLTKWordTokenizer().tokenize(sentence) == expected


_POOL = ("dog cat the However In Smith J. B. x. Dr. St. ok. u.s. vs. Mr. 3. 12. 1,000. -5. .5 ## ... .. "
         ". . . -- \" ' ( ) ? ! !!! ?! ; : , . .) .\" Stewart b. 5. Dividend Inc. re-st. e.g. A I 'tis cannot "
         "gonna don't dog's Ok Under 2nd 1st. word.Word X. Mrs. ph.d. ...! ?\" !) Jan.").split()
_JOINS = [" ", " ", " ", "", "\n", "\n\n", "\t", "  ", " \n "]


def test_random_texts_split_as_in_nltk():
    # a broad check of the rules together: texts of tricky tokens, four orthographic tables
    models = [tk.ENGLISH, tk.Punkt(ortho=lambda w: 0), tk.Punkt(ortho=lambda w: tk.UPPER | tk.LOWER),
              tk.Punkt(ortho=lambda w: (sum(map(ord, w)) * 37) % 128 & ~1)]
    oracles, words = [nltk_punkt(p) for p in models], NLTKWordTokenizer()
    rng = random.Random(24)
    for _ in range(300):
        text = "".join(rng.choice(_POOL) + rng.choice(_JOINS) for _ in range(rng.randint(1, 12)))
        for p, oracle in zip(models, oracles):
            assert tk.sentences(text, p) == oracle.tokenize(text), text
        assert tk.word_tokenize(text) == [w for s in oracles[0].tokenize(text) for w in words.tokenize(s)], text
