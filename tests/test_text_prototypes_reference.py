"""Algorithm 2 as the public VLCP reference code computes it (vlcp/method/text_prototypes_reference.py) and
its NLTK tokenizer (vlcp/method/tokenize.py).

The expected token lists follow nltk 3.9.1's word_tokenize (punkt sentences, then the Treebank rules); the
expected picks are derived by hand from gen_prototype.py / find_max_word_sentence, step by step below.
"""
import pytest

from vlcp.method import tokenize as tk
from vlcp.method.text_prototypes_reference import class_prototypes_reference, stop_words
from vlcp.method.tokenize import reference_tokens, sentences, word_tokenize

TOKEN_CASES = [
    # clitics split off: "dog" stays a word, "'s" is not alphabetic
    ("The dog's tail is up.", ["The", "dog", "'s", "tail", "is", "up", "."], ["the", "dog", "tail", "is", "up"]),
    ("I don't know why they're here, aren't they?",
     ["I", "do", "n't", "know", "why", "they", "'re", "here", ",", "are", "n't", "they", "?"],
     ["i", "do", "know", "why", "they", "here", "are", "they"]),
    ("Three dogs' bowls.", ["Three", "dogs", "'", "bowls", "."], ["three", "dogs", "bowls"]),
    # hyphenated words stay one token, hence not alphabetic
    ("A well-lit room with a black-and-white cat.", ["A", "well-lit", "room", "with", "a", "black-and-white", "cat", "."],
     ["a", "room", "with", "a", "cat"]),
    # punkt splits sentences, so every sentence-final period comes off its word
    ("Green grass. The dog sits. It waits!", ["Green", "grass", ".", "The", "dog", "sits", ".", "It", "waits", "!"],
     ["green", "grass", "the", "dog", "sits", "it", "waits"]),
    ("A dog\nin the snow.\n\nA cat.", ["A", "dog", "in", "the", "snow", ".", "A", "cat", "."],
     ["a", "dog", "in", "the", "snow", "a", "cat"]),
    # brackets, colon, semicolon, double quotes (`` and ''), a quote closing after a period
    ('A dog (brown) sits: it waits; then "barks" loudly.',
     ["A", "dog", "(", "brown", ")", "sits", ":", "it", "waits", ";", "then", "``", "barks", "''", "loudly", "."],
     ["a", "dog", "brown", "sits", "it", "waits", "then", "barks", "loudly"]),
    ('He said "hello." Then he left.', ["He", "said", "``", "hello", ".", "''", "Then", "he", "left", "."],
     ["he", "said", "hello", "then", "he", "left"]),
    # MacIntyre's contractions
    ("I cannot stay, gonna go, wanna see.", ["I", "can", "not", "stay", ",", "gon", "na", "go", ",", "wan", "na", "see", "."],
     ["i", "can", "not", "stay", "gon", "na", "go", "wan", "na", "see"]),
    ("'Tis a dog, 'twas a cat.", ["'T", "is", "a", "dog", ",", "'t", "was", "a", "cat", "."],
     ["is", "a", "dog", "was", "a", "cat"]),
    # abbreviations of punkt's English model keep their period (and so drop out); "Louis." ends a sentence
    ("Dr. Smith waves at St. Louis. The end.", ["Dr.", "Smith", "waves", "at", "St.", "Louis", ".", "The", "end", "."],
     ["smith", "waves", "at", "louis", "the", "end"]),
    ("Mr. and Mrs. Smith.", ["Mr.", "and", "Mrs.", "Smith", "."], ["and", "smith"]),
    # nltk 3.9.1 splits an opening single quote only before a one-letter word: "'open" is one token
    ("The sign says 'open' now.", ["The", "sign", "says", "'open", "'", "now", "."], ["the", "sign", "says", "now"]),
    # an em dash joins words in 3.9.1; "..." comes off; a period without a space after it splits nothing
    ("A red\u2014blue flag... and a dog.The cat", ["A", "red\u2014blue", "flag", "...", "and", "a", "dog.The", "cat"],
     ["a", "flag", "and", "a", "cat"]),
    ("It costs $3.88, about 5 euros.", ["It", "costs", "$", "3.88", ",", "about", "5", "euros", "."],
     ["it", "costs", "about", "euros"]),
    ("Caf\u00e9 na\u00efve d\u00e9cor.", ["Caf\u00e9", "na\u00efve", "d\u00e9cor", "."], ["caf\u00e9", "na\u00efve", "d\u00e9cor"]),
    # a single letter outside the abbreviation list, before a capitalised common word, ends a sentence
    ("The letter B. The end.", ["The", "letter", "B", ".", "The", "end", "."], ["the", "letter", "b", "the", "end"]),
    # "ok" is on the list (Oklahoma); "A" is no frequent sentence starter: no break, "ok." drops out (this one
    # rests on the orthographic default, see vlcp/method/tokenize.py)
    ("Is it ok. A cat sits.", ["Is", "it", "ok.", "A", "cat", "sits", "."], ["is", "it", "a", "cat", "sits"]),
]


@pytest.mark.parametrize("text, words, alpha", TOKEN_CASES)
def test_word_tokenize_and_the_alphabetic_tokens(text, words, alpha):
    assert word_tokenize(text) == words
    assert reference_tokens(text) == alpha


def test_sentences_realign_a_closing_quote_and_drop_trailing_space():
    assert sentences('He said "hello." Then he left.  ') == ['He said "hello."', "Then he left."]
    assert sentences("") == []


def test_punkt_uses_an_orthographic_table_where_one_is_given():
    # "J." is an initial: before a word only ever seen capitalised (a name) punkt keeps it in the sentence;
    # the default takes every word to be a common one (seen in lower case too), so it breaks there
    names = tk.Punkt(ortho=lambda w: tk.UPPER if w == "smith" else tk.COMMON_WORD)
    assert sentences("Plan J. Smith waits.") == ["Plan J.", "Smith waits."]
    assert sentences("Plan J. Smith waits.", names) == ["Plan J. Smith waits."]
    assert reference_tokens("Plan J. Smith waits.", names) == ["plan", "smith", "waits"]
    # an abbreviation breaks before a capitalised word seen in lower case but never capitalised mid-sentence
    starter = tk.Punkt(ortho=lambda w: tk.MID_LC | tk.BEG_UC)
    assert sentences("Is it ok. Additionally a cat.", starter) == ["Is it ok.", "Additionally a cat."]
    assert sentences("Is it ok. Additionally a cat.") == ["Is it ok. Additionally a cat."]


def test_nltk_english_stop_words():
    words = stop_words()
    assert len(words) == 179
    assert {"the", "a", "i", "don", "don't", "mightn", "mightn't", "shouldn't", "ain", "ma", "y", "any"} <= words
    visual = {"thick", "thin", "front", "back", "top", "bottom", "side", "full", "empty", "behind", "fire", "two", "three"}
    assert not visual & words
    assert not {w for w in words if w.startswith("#") or w != w.strip() or not w}


def run(captions, members, prompt, beta, top_k):
    return [{k: r[k] for k in ("caption", "member", "score", "fallback", "representative_words", "non_representative")}
            for r in class_prototypes_reference(captions, members, prompt, beta, top_k)]


def test_reference_picks_class_tench():
    """prompt "tench, Tinca tinca", beta 0.5, top_k 2.

    Tokens (alphabetic, lower-cased; stop words in brackets):
      0 [a] tench held [by a] fisherman [in] green reeds
      1 [a] fisherman holds [a] big tench near green reeds
      2 ten small fish lie [on a] wooden dock
      3 [a] man [on a] dock holds [a] small fish
    Captions holding each word: tench 2, fisherman 2, green 2, reeds 2, holds 2, small 2, fish 2, dock 2; the
    rest 1. Threshold 0.5 * 4 = 2.0, count >= 2.0: N = the eight words at exactly beta.
    Cluster 0 walked as [1, 0]: left after N and stop words: big, near (caption 1), held (caption 0), once each;
      most_common(2) keeps the first seen: R_w = {big: 1, near: 1} (an alphabetical tie order gives big, held).
      Scores: caption 1 holds "big" and "near" = 2; caption 0 neither = 0. Pick caption 1.
    Cluster 1 walked as [2, 3]: left: ten, lie, wooden (caption 2), man (caption 3); "ten" is a substring of
      "tench, Tinca tinca" and goes. R_w = {lie: 1, wooden: 1} (with "ten" kept it would be {ten, lie}).
      Scores: caption 2 = 2, caption 3 = 0. Pick caption 2.
    """
    caps = ["A tench held by a fisherman in green reeds.", "A fisherman holds a big tench near green reeds.",
            "Ten small fish lie on a wooden dock.", "A man on a dock holds a small fish."]
    n = ["dock", "fish", "fisherman", "green", "holds", "reeds", "small", "tench"]
    assert run(caps, [[1, 0], [2, 3]], "tench, Tinca tinca", 0.5, 2) == [
        {"caption": caps[1], "member": 1, "score": 2.0, "fallback": False, "representative_words": {"big": 1, "near": 1},
         "non_representative": n},
        {"caption": caps[2], "member": 2, "score": 2.0, "fallback": False, "representative_words": {"lie": 1, "wooden": 1},
         "non_representative": n}]


def test_reference_picks_class_goldfish():
    """prompt "goldfish, Carassius auratus", beta 0.75, top_k 2.

    Tokens less stop words: 0 goldfish red fins red spots; 1 goldfish fins covered green algae;
      2 carassius auratus resting round bowl; 3 goldfish carassius round bowl.
    Captions holding each word: goldfish 3 (0, 1, 3), fins 2, carassius 2, round 2, bowl 2, the rest 1.
    Threshold 0.75 * 4 = 3.0: N = {goldfish}, at exactly beta.
    Cluster 0 walked as [1, 0]: counts in walk order fins 2, covered 1, green 1, algae 1, red 2 (twice in
      caption 0), spots 1: R_w = {fins: 2, red: 2} (fins seen first).
      Scores: caption 1 "...fins covered..." holds "fins" and "red" inside "covered": 2 + 2 = 4; caption 0 also 4,
      not more. Pick caption 1, which wins only by the substring test.
    Cluster 1 walked as [2, 3]: "auratus" is in the prompt and goes; "carassius" is not a substring of the
      prompt's "Carassius" (case-sensitive) and stays: carassius 2, resting 1, round 2, bowl 2:
      R_w = {carassius: 2, round: 2}.
      Scores, on the captions as written: caption 2 "Carassius ... round bowl." holds "round" only = 2;
      caption 3 "... Carassius in a Round bowl." neither = 0. Pick caption 2.
    """
    caps = ["A goldfish with red fins and red spots.", "A goldfish with fins covered in green algae.",
            "Carassius auratus resting in a round bowl.", "The goldfish and a Carassius in a Round bowl."]
    assert run(caps, [[1, 0], [2, 3]], "goldfish, Carassius auratus", 0.75, 2) == [
        {"caption": caps[1], "member": 1, "score": 4.0, "fallback": False, "representative_words": {"fins": 2, "red": 2},
         "non_representative": ["goldfish"]},
        {"caption": caps[2], "member": 2, "score": 2.0, "fallback": False,
         "representative_words": {"carassius": 2, "round": 2}, "non_representative": ["goldfish"]}]


def test_reference_picks_class_border_collie_with_a_cluster_scoring_zero():
    """prompt "Border collie", beta 0.75, top_k 2; captions cleaned first ("collie's" -> "collie").

    Tokens less stop words: 0 border collie ears herds sheep; 1 collie herds sheep hill ("black-and-white" is
      not alphabetic); 2 grass everywhere dogs rest; 3 dogs nap grass grows (punkt splits "everywhere. Dogs"
      and "nap. Grass", so "everywhere" and "nap" come off their periods).
    No word is in 3 captions (threshold 3.0): N is empty.
    Cluster 0 walked as [0, 1]: "collie" is in the prompt; "border" is not (the prompt has "Border"):
      border 1, ears 1, herds 2, sheep 2, hill 1: R_w = {herds: 2, sheep: 2}. Both captions score 4: the first
      walked, caption 0, wins (strict >), returned cleaned.
    Cluster 1 walked as [2, 3]: grass 2, everywhere 1, dogs 2, rest 1, nap 1, grows 1: R_w = {grass: 2, dogs: 2}.
      Both words appear only capitalised ("Grass", "Dogs") and the score test is case-sensitive: every caption
      scores 0, and the reference's prompt is "" (find_max_word_sentence's initial value).
    """
    caps = ["A Border collie's ears are up while it herds sheep.", "A black-and-white collie herds sheep on a hill.",
            "Grass everywhere. Dogs rest.", "Dogs nap. Grass grows."]
    assert run(caps, [[0, 1], [2, 3]], "Border collie", 0.75, 2) == [
        {"caption": "A Border collie ears are up while it herds sheep.", "member": 0, "score": 4.0, "fallback": False,
         "representative_words": {"herds": 2, "sheep": 2}, "non_representative": []},
        {"caption": "", "member": None, "score": 0.0, "fallback": True, "representative_words": {"grass": 2, "dogs": 2},
         "non_representative": []}]


def test_a_word_at_exactly_beta_is_in_n_unless_the_float_product_rounds_up():
    # 25 captions: "dog" in 7, "grass" in 8, "ball" in 5, "park" in all
    caps = [" ".join(w for w, n in (("dog", 7), ("grass", 8), ("ball", 5)) if i < n) + " park" for i in range(25)]
    members = [list(range(25))]
    assert 0.28 * 25 == 7.000000000000001 and 0.2 * 25 == 5.0
    (r,) = class_prototypes_reference(caps, members, "x", 0.28, 5)  # 7 >= 7.000000000000001 is false
    assert r["non_representative"] == ["grass", "park"]
    assert (r["representative_words"], r["member"], r["score"]) == ({"dog": 7, "ball": 5}, 0, 12.0)
    (r,) = class_prototypes_reference(caps, members, "x", 0.2, 5)  # 5 >= 5.0: ball at exactly beta is in N
    assert r["non_representative"] == ["ball", "dog", "grass", "park"]
    assert (r["caption"], r["member"], r["fallback"], r["representative_words"]) == ("", None, True, {})


def test_records_carry_the_mode_and_clean_up_is_optional():
    # cleaned: 'A red ball on the dog bed.', 'A red ball.'; "red" and "ball" are in both (2 >= 1.0 * 2): N, listed
    # though "ball" is also the prompt; R_w = {dog: 1, bed: 1}; caption 0 scores 2
    caps = ['A "red" ball on the dog\'s bed.', "A red ball."]
    (r,) = class_prototypes_reference(caps, [[1, 0]], "ball", 1.0, 3)
    assert r == {"caption": "A red ball on the dog bed.", "member": 0, "score": 2.0, "fallback": False,
                 "representative_words": {"dog": 1, "bed": 1}, "non_representative": ["ball", "red"],
                 "mode": "reference"}
    (r,) = class_prototypes_reference(caps, [[1, 0]], "ball", 1.0, 3, clean_captions=False)
    assert (r["caption"], r["member"], r["score"]) == (caps[0], 0, 2.0)  # same tokens: "dog's" gives "dog", "'s"


def test_no_clusters_and_an_empty_cluster():
    assert class_prototypes_reference(["a dog"], [], "x", 0.5, 2) == []
    (r,) = class_prototypes_reference(["a dog"], [[]], "x", 0.5, 2)
    assert (r["caption"], r["member"], r["fallback"], r["representative_words"], r["non_representative"]) == (
        "", None, True, {}, ["dog"])
