"""Official VQA accuracy: `vqa_accuracy` against a transcription of the official evaluator.

`OfficialVQAEval` below re-states, rule for rule, the per-question part of
the VQA API's evaluator (GT-Vision-Lab/VQA,
PythonEvaluationTools/vqaEvaluation/vqaEval.py, commit a013f00: `__init__`'s
tables, `evaluate`'s loop body, `processPunctuation`, `processDigitArticle`),
kept in its shape on purpose (mutable answer dicts, verbatim tables, the
`count=re.UNICODE` slip) so it can be read side by side with the original.
Only the Python 2 -> 3 spelling changed: `re.ASCII` keeps Python 2's ASCII
`\\d`. Thousands of generated questions must score identically (bit for bit)
under both; hand-computed cases pin the numbers.
"""

import random
import re

import pytest

from vlm_jax.eval import (
    mean_vqa_accuracy,
    normalize_answer,
    vqa_accuracy,
    vqa_accuracy_by_type,
    vqa_exact_match,
)

# ---------------------------------------------------------------------------
# The reference: the official per-question rules, transcribed.
# ---------------------------------------------------------------------------


class OfficialVQAEval:
  """vqaEval.py's VQAEval, reduced to scoring one question."""

  def __init__(self):
    self.contractions = {
      "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
      "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
      "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
      "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
      "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
      "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
      "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
      "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
      "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
      "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
      "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
      "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
      "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
      "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
      "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
      "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
      "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's",
      "somethingd": "something'd", "somethingd've": "something'd've",
      "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
      "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
      "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
      "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
      "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
      "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
      "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
      "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
      "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
      "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
      "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
      "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
      "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
      "youll": "you'll", "youre": "you're", "youve": "you've",
    }
    self.manualMap = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                      "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
    self.articles = ["a", "an", "the"]
    self.periodStrip = re.compile(r"(?!<=\d)(\.)(?!\d)", re.ASCII)
    self.commaStrip = re.compile(r"(\d)(\,)(\d)", re.ASCII)
    self.punct = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                  "@", "`", ",", "?", "!"]

  def processPunctuation(self, inText):
    outText = inText
    for p in self.punct:
      if (p + " " in inText or " " + p in inText) or (re.search(self.commaStrip, inText) is not None):
        outText = outText.replace(p, "")
      else:
        outText = outText.replace(p, " ")
    outText = self.periodStrip.sub("", outText, re.UNICODE)  # sic: re.UNICODE lands on `count`
    return outText

  def processDigitArticle(self, inText):
    outText = []
    tempText = inText.lower().split()
    for word in tempText:
      word = self.manualMap.setdefault(word, word)
      if word not in self.articles:
        outText.append(word)
    for wordId, word in enumerate(outText):
      if word in self.contractions:
        outText[wordId] = self.contractions[word]
    return " ".join(outText)

  def evaluate_question(self, res_answer, gt_answers):
    """`evaluate`'s loop body for one question: (accuracy, #humans equal to the final answer)."""
    answers = [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
               for i, a in enumerate(gt_answers)]
    for ansDic in answers:
      ansDic["answer"] = ansDic["answer"].replace("\n", " ")
      ansDic["answer"] = ansDic["answer"].replace("\t", " ")
      ansDic["answer"] = ansDic["answer"].strip()
    resAns = res_answer
    resAns = resAns.replace("\n", " ")
    resAns = resAns.replace("\t", " ")
    resAns = resAns.strip()
    gtAcc = []
    gtAnswers = [ans["answer"] for ans in answers]
    if len(set(gtAnswers)) > 1:
      for ansDic in answers:
        ansDic["answer"] = self.processPunctuation(ansDic["answer"])
        ansDic["answer"] = self.processDigitArticle(ansDic["answer"])
      resAns = self.processPunctuation(resAns)
      resAns = self.processDigitArticle(resAns)
    for gtAnsDatum in answers:
      otherGTAns = [item for item in answers if item != gtAnsDatum]
      matchingAns = [item for item in otherGTAns if item["answer"] == resAns]
      acc = min(1, float(len(matchingAns)) / 3)
      gtAcc.append(acc)
    avgGTAcc = float(sum(gtAcc)) / len(gtAcc)
    return avgGTAcc, sum(item["answer"] == resAns for item in answers)

  def normalize(self, text):
    """What the script makes of one answer when it does process answers."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return self.processDigitArticle(self.processPunctuation(text))


OFFICIAL = OfficialVQAEval()

# ---------------------------------------------------------------------------
# Generated answers: the surface forms the official processing cares about.
# ---------------------------------------------------------------------------

_NUMBER_WORDS = ["none", "zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                 "nine", "ten", "eleven"]
_CONTRACTION_FORMS = sorted({w for k, v in OFFICIAL.contractions.items()
                             for w in (k, v, k.replace("'", ""), v.replace("'", ""))})
_PLAIN = ["yes", "no", "red", "blue", "cat", "dog", "tennis", "frisbee", "left", "2", "3", "10", "0",
          "2.5", "1,000", "1,5", "3.", "e.g.", "...", "o'clock", "i'm", "let's", "lets", "im", "ive"]
_PUNCT_TOKENS = ["red-blue", "yes!", "(2)", "a/b", '"quoted"', "x_y", "c++", "<3", "@home", "`tick`",
                 "well,", "why?", "[x]", "{y}", "a=b", "back\\slash", "semi;colon", "-", "!", "?"]
_ARTICLE_FORMS = ["a", "an", "the", "A", "The", "AN"]
_SEPARATORS = [" ", " ", " ", "  ", "\t", " \n "]


def _token(rng):
  pool = rng.choice([_PLAIN, _NUMBER_WORDS, _CONTRACTION_FORMS, _PUNCT_TOKENS, _ARTICLE_FORMS])
  return rng.choice(pool)


def _base(rng):
  """A canonical answer: 1-3 tokens."""
  return [_token(rng) for _ in range(rng.choice([1, 1, 1, 2, 2, 3]))]


def _variant(rng, words):
  """One human's (or model's) spelling of `words`: case, articles, digits, apostrophes, marks, spaces."""
  out = []
  for w in words:
    r = rng.random()
    if r < 0.15:
      w = w.upper() if rng.random() < 0.5 else w.capitalize()
    elif r < 0.25 and w in OFFICIAL.manualMap:
      w = OFFICIAL.manualMap[w]
    elif r < 0.35 and w.isdigit() and int(w) <= 10:
      w = _NUMBER_WORDS[int(w)]
    elif r < 0.45:
      w = w.replace("'", "")
    elif r < 0.50:
      w = OFFICIAL.contractions.get(w, w)
    if rng.random() < 0.1:
      out.append(rng.choice(_ARTICLE_FORMS))
    out.append(w)
  text = ""
  for i, w in enumerate(out):
    text += (rng.choice(_SEPARATORS) if i else "") + w
  r = rng.random()
  if r < 0.15:
    text += "."
  elif r < 0.25:
    text += rng.choice(["!", " ?", "?", ",", " .", "..."])
  if rng.random() < 0.2:
    text = rng.choice([" ", "\t", "\n", "  "]) + text + rng.choice([" ", "\n", "\t ", ""])
  return text


def _question(rng):
  """(prediction, 10 human answers): k humans spell the prediction's answer, the others another one."""
  truth, other = _base(rng), _base(rng)
  pred = _variant(rng, truth) if rng.random() < 0.8 else " ".join(truth)
  kind = rng.random()
  if kind < 0.2:  # one distinct human answer, repeated: the script compares unprocessed strings
    human = rng.choice([pred.strip(), _variant(rng, truth), " ".join(truth), _variant(rng, other)])
    return pred, [human] * 10
  k = rng.randint(0, 10)
  faithful = kind < 0.5  # half the time the k humans all write the answer the same way
  shared = _variant(rng, truth)
  humans = [shared if faithful else _variant(rng, truth) for _ in range(k)]
  humans += [_variant(rng, other) if rng.random() < 0.7 else _variant(rng, _base(rng)) for _ in range(10 - k)]
  rng.shuffle(humans)
  return pred, humans


def test_generated_questions_score_as_the_official_script():
  rng = random.Random(20240611)
  matched_counts, processed, unprocessed, values = set(), 0, 0, set()
  for _ in range(6000):
    pred, humans = _question(rng)
    want, matched = OFFICIAL.evaluate_question(pred, list(humans))
    got = vqa_accuracy(pred, humans)
    assert got == want, (pred, humans)
    matched_counts.add(matched)
    values.add(round(want, 6))
    if len({h.replace("\n", " ").replace("\t", " ").strip() for h in humans}) > 1:
      processed += 1
    else:
      unprocessed += 1
  # The cases reach every agreement level and both branches of the script.
  assert matched_counts == set(range(11))
  assert {0.0, 0.3, 0.6, 0.9, 1.0} <= values
  assert processed > 3000 and unprocessed > 500


def test_generated_strings_normalise_as_the_official_script():
  rng = random.Random(7)
  texts = [_variant(rng, _base(rng)) for _ in range(5000)]
  texts += _CONTRACTION_FORMS + [t.upper() for t in _CONTRACTION_FORMS] + _PUNCT_TOKENS + _NUMBER_WORDS
  texts += ["3 oclock", "3 o'clock", "." * 40 + "x", "a." * 40, "1,000 - 2", "x -y", "٣.a", "٣,٣ a-b"]
  for t in texts:
    assert normalize_answer(t) == OFFICIAL.normalize(t), t


# ---------------------------------------------------------------------------
# Hand-computed numbers.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("k, expected", [
    (0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (5, 1.0), (9, 1.0), (10, 1.0)])
def test_agreement_levels(k, expected):
  # k humans say "yes": each of the 10 leave-one-out subsets scores min(matches among the other 9 / 3, 1).
  # k = 3: 7 subsets see 3 (-> 1) and 3 see 2 (-> 2/3): (7 + 2) / 10 = 0.9.
  humans = ["yes"] * k + ["no"] * (10 - k)
  assert vqa_accuracy("yes", humans) == pytest.approx(expected)
  assert OFFICIAL.evaluate_question("yes", humans)[0] == pytest.approx(expected)


def test_processing_cases():
  others = ["4 o'clock"] * 7
  assert vqa_accuracy("3 oclock", ["3 o'clock"] * 3 + others) == pytest.approx(0.9)
  assert vqa_accuracy("Two.", ["2"] * 2 + ["3"] * 8) == pytest.approx(0.6)
  assert vqa_accuracy("the Dog", ["a dog", "dog", "DOG!", "cat"] + ["cat"] * 6) == pytest.approx(0.9)
  # "im" is not in the (effective) contractions table, "i'm" is what humans wrote.
  assert vqa_accuracy("im", ["i'm"] * 4 + ["no"] * 6) == 0.0
  assert vqa_accuracy("I'm", ["i'm"] * 4 + ["no"] * 6) == 1.0
  # 5 answers, 2 match: 3 subsets see 2 (2/3 each), 2 see 1 (1/3 each): (2 + 2/3) / 5.
  assert vqa_accuracy("red", ["red", "red", "blue", "blue", "blue"]) == pytest.approx(8 / 15)


def test_single_distinct_answer_is_compared_unprocessed():
  assert vqa_accuracy("yes", ["yes"] * 10) == 1.0
  assert vqa_accuracy(" yes\n", ["yes\t"] * 10) == 1.0  # whitespace is always cleaned
  assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0  # no lower-casing: the humans agree
  assert vqa_accuracy("yes.", ["yes"] * 10) == 0.0
  assert vqa_accuracy("Yes", ["yes"] * 9 + ["Yes"]) == 1.0  # two distinct answers: processed


def test_corpus_mean_and_by_type():
  preds = ["yes", "2", "red"]
  humans = [["yes"] * 3 + ["no"] * 7, ["two"] * 10, ["red"] * 1 + ["blue"] * 9]
  # 0.9; "2" vs ten "two" (one distinct answer, unprocessed): 0.0; 0.3.
  assert mean_vqa_accuracy(preds, humans) == pytest.approx(0.4)
  assert vqa_accuracy_by_type(preds, humans, ["yes/no", "number", "other"]) == pytest.approx(
      {"number": 0.0, "other": 0.3, "yes/no": 0.9})
  assert vqa_accuracy_by_type(preds, humans, ["a", "a", "b"]) == pytest.approx({"a": 0.45, "b": 0.3})


def test_bad_inputs_raise():
  with pytest.raises(TypeError):
    vqa_accuracy("yes", "yes")
  with pytest.raises(ValueError):
    vqa_accuracy("yes", ["yes"])  # one answer: no leave-one-out subset can match
  with pytest.raises(ValueError):
    mean_vqa_accuracy(["yes"], [])
  with pytest.raises(ValueError):
    vqa_accuracy_by_type(["yes"], [["yes", "no"]], ["a", "b"])


def test_exact_match_is_a_different_metric():
  # Exact match: any reference, always processed. Official: weighs agreement, processes only on disagreement.
  assert vqa_exact_match(["yes"], [["yes"] + ["no"] * 9]) == 1.0
  assert vqa_accuracy("yes", ["yes"] + ["no"] * 9) == pytest.approx(0.3)
  assert vqa_exact_match(["Yes"], [["yes"] * 10]) == 1.0
  assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0
