"""Free-text Face-LLaVA answers to labels, for `facellava eval`.

Face-LLaVA answers in sentences with reasons ("The person appears happy: the cheeks are raised..."), so every
task needs a parser from text to the benchmark's label. The vocabularies are tables; the rules shared by all
parsers are few: words are matched case-insensitively on word boundaries, a mention is negated when a negator
("not", "no", "n't", "without", "neither", "nor", "never", "hardly", "lack of") stands within the three words
before it, and hedges ("seems", "might", "possibly") are ignored, so a hedged mention still counts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# --- the benchmarks' label sets -----------------------------------------------------------------------------

EMOTIONS = ("neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger")  # DFEW, RAF-DB (7 classes)
EMOTION_WORDS: dict[str, tuple[str, ...]] = {
    "neutral": ("neutral", "calm", "expressionless", "blank expression", "no particular emotion", "no emotion",
                "impassive", "composed"),
    "happiness": ("happy", "happiness", "joy", "joyful", "glad", "cheerful", "delighted", "pleased", "content",
                  "amused", "elated", "smiling happily"),
    "sadness": ("sad", "sadness", "sorrow", "sorrowful", "unhappy", "upset", "depressed", "gloomy", "melancholy",
                "grief", "downcast", "tearful"),
    "surprise": ("surprise", "surprised", "astonished", "astonishment", "shocked", "shock", "amazed",
                 "amazement", "startled"),
    "fear": ("fear", "fearful", "afraid", "scared", "frightened", "terrified", "anxious", "anxiety", "panic",
             "alarmed"),
    "disgust": ("disgust", "disgusted", "repulsed", "revolted", "repugnance", "aversion", "grossed out"),
    "anger": ("anger", "angry", "furious", "irritated", "annoyed", "mad", "rage", "enraged", "irate", "hostile",
              "frustrated", "frustration"),
}

# FACS action units seen in DISFA and BP4D, with their names
ACTION_UNIT_NAMES: dict[int, tuple[str, ...]] = {
    1: ("inner brow raiser", "inner brow raise"),
    2: ("outer brow raiser", "outer brow raise"),
    4: ("brow lowerer", "brow lowering", "lowered brows"),
    5: ("upper lid raiser",),
    6: ("cheek raiser", "raised cheeks", "cheeks raised"),
    7: ("lid tightener",),
    9: ("nose wrinkler", "wrinkled nose"),
    10: ("upper lip raiser",),
    12: ("lip corner puller", "lip corners pulled"),
    14: ("dimpler",),
    15: ("lip corner depressor",),
    17: ("chin raiser",),
    20: ("lip stretcher",),
    23: ("lip tightener",),
    24: ("lip pressor",),
    25: ("lips part", "lips parted", "parted lips"),
    26: ("jaw drop", "dropped jaw"),
}

# CelebA's 40 attributes with the words an answer uses for them
ATTRIBUTE_WORDS: dict[str, tuple[str, ...]] = {
    "5_o_Clock_Shadow": ("5 o'clock shadow", "five o'clock shadow", "stubble"),
    "Arched_Eyebrows": ("arched eyebrows", "arched brows"),
    "Attractive": ("attractive", "beautiful", "handsome", "good-looking"),
    "Bags_Under_Eyes": ("bags under the eyes", "bags under eyes", "under-eye bags"),
    "Bald": ("bald",),
    "Bangs": ("bangs", "fringe"),
    "Big_Lips": ("big lips", "full lips", "large lips"),
    "Big_Nose": ("big nose", "large nose"),
    "Black_Hair": ("black hair",),
    "Blond_Hair": ("blond hair", "blonde hair", "blond", "blonde"),
    "Blurry": ("blurry", "blurred"),
    "Brown_Hair": ("brown hair",),
    "Bushy_Eyebrows": ("bushy eyebrows", "thick eyebrows"),
    "Chubby": ("chubby",),
    "Double_Chin": ("double chin",),
    "Eyeglasses": ("eyeglasses", "glasses", "spectacles"),
    "Goatee": ("goatee",),
    "Gray_Hair": ("gray hair", "grey hair", "white hair"),
    "Heavy_Makeup": ("heavy makeup", "heavy make-up"),
    "High_Cheekbones": ("high cheekbones",),
    "Male": ("male", "man", "boy", "gentleman"),
    "Mouth_Slightly_Open": ("mouth slightly open", "slightly open mouth", "mouth open", "open mouth"),
    "Mustache": ("mustache", "moustache"),
    "Narrow_Eyes": ("narrow eyes",),
    "No_Beard": ("clean-shaven", "clean shaven", "no beard"),
    "Oval_Face": ("oval face",),
    "Pale_Skin": ("pale skin", "pale"),
    "Pointy_Nose": ("pointy nose", "pointed nose"),
    "Receding_Hairline": ("receding hairline",),
    "Rosy_Cheeks": ("rosy cheeks",),
    "Sideburns": ("sideburns",),
    "Smiling": ("smiling", "smile", "smiles"),
    "Straight_Hair": ("straight hair",),
    "Wavy_Hair": ("wavy hair",),
    "Wearing_Earrings": ("earrings",),
    "Wearing_Hat": ("hat", "cap"),
    "Wearing_Lipstick": ("lipstick",),
    "Wearing_Necklace": ("necklace",),
    "Wearing_Necktie": ("necktie", "tie"),
    "Young": ("young", "youthful"),
}

DEEPFAKE_WORDS: dict[str, tuple[str, ...]] = {
    "real": ("real", "authentic", "genuine", "original", "unaltered", "unmanipulated", "natural", "legitimate"),
    "fake": ("fake", "fakery", "deepfake", "manipulated", "manipulation", "forged", "forgery", "synthetic",
             "altered", "alteration", "doctored", "tampered", "tampering", "fabricated", "face swap",
             "face-swapped", "generated", "artificial", "artifacts", "artefacts", "blending"),
}

NEGATORS = ("not", "no", "never", "without", "neither", "nor", "hardly", "lack", "lacks", "absence", "absent",
            "isn't", "aren't", "doesn't", "don't", "wasn't", "cannot", "can't", "nothing")
NEGATION_WINDOW = 3  # words before a mention

# words, and punctuation that ends a clause: negation does not reach across a clause boundary
_WORD = re.compile(r"[a-z0-9]+(?:['’-][a-z0-9]+)*|[.,;:!?()]")
_BOUNDARY = set(".,;:!?()")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower().replace("’", "'"))


def _phrase_positions(words: list[str], phrase: str) -> list[int]:
    target = _words(phrase)
    n = len(target)
    return [i for i in range(len(words) - n + 1) if words[i:i + n] == target]


def _negated(words: list[str], position: int) -> bool:
    before = words[max(0, position - NEGATION_WINDOW):position]
    for i in range(len(before) - 1, -1, -1):
        if before[i] in _BOUNDARY:
            before = before[i + 1:]
            break
    # "not only" and "no doubt" affirm rather than negate
    if any(a in ("not", "no") and b in ("only", "doubt") for a, b in zip(before, before[1:], strict=False)):
        return False
    return any(w in NEGATORS or w.endswith("n't") for w in before)


def _negated_after(words: list[str], end: int) -> bool:
    """'AU4 is absent', 'glasses are not visible': a negation right after a mention (only in these forms, so
    that 'happy, not sad' keeps 'happy')."""
    after = words[end:end + 2]
    if after[:1] and after[0] in ("absent", "inactive", "missing"):
        return True
    return len(after) == 2 and after[0] in ("is", "are", "was", "were") and after[1] in (
        "not", "absent", "inactive", "missing", "never")


def mentions(text: str, vocabulary: dict[str, Iterable[str]]) -> list[tuple[int, str, bool]]:
    """Every mention of a vocabulary entry in `text`: (word position, label, negated), in reading order.
    Where phrases overlap (e.g. 'upper lip raiser' and 'lip raiser'), the longest one wins."""
    words = _words(text)
    found: dict[int, tuple[int, str]] = {}
    for label, phrases in vocabulary.items():
        for phrase in phrases:
            length = len(_words(phrase))
            for position in _phrase_positions(words, phrase):
                if position not in found or found[position][0] < length:
                    found[position] = (length, label)
    covered: set[int] = set()
    result = []
    for position in sorted(found, key=lambda p: (-found[p][0], p)):
        length, label = found[position]
        span = set(range(position, position + length))
        if span & covered:
            continue
        covered |= span
        negated = _negated(words, position) or _negated_after(words, position + length)
        result.append((position, label, negated))
    return sorted(result)


def parse_emotion(text: str) -> str | None:
    """The first emotion the answer affirms, as one of EMOTIONS; None when it affirms none."""
    for _, label, negated in mentions(text, EMOTION_WORDS):
        if not negated:
            return label
    return None


_AU_CODE = re.compile(r"\baus?\s*[-#:]?\s*(\d{1,2})\b")
_AU_LIST = re.compile(r"\b(?:aus|action units?)\s*((?:\d{1,2}\s*(?:,|and|&|\s)\s*)*\d{1,2})\b")


def parse_action_units(text: str) -> set[int]:
    """The action units the answer affirms: codes ("AU1, AU12", "AU 06", "AUs 1, 2 and 4") and FACS names
    ("lip corner puller"); an AU only ever mentioned negated ("no AU4", "AU9 is absent") is left out."""
    lowered = text.lower()
    words = _words(lowered)
    notes: list[tuple[int, bool]] = []  # (AU, negated) for every mention
    for pattern in (_AU_CODE, _AU_LIST):
        for match in pattern.finditer(lowered):
            start, end = len(_words(lowered[:match.start()])), len(_words(lowered[:match.end()]))
            negated = _negated(words, start) or _negated_after(words, end)
            notes += [(int(code), negated) for code in re.findall(r"\d{1,2}", match.group(1))]
    notes += [(au, negated) for _, au, negated in mentions(text, ACTION_UNIT_NAMES)]
    return {au for au, negated in notes if not negated and au in ACTION_UNIT_NAMES}


_NUMBER_WORDS = {"ten": 10, "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70,
                 "eighty": 80, "ninety": 90}
_DECADE_WORDS = {"twenties": 20, "thirties": 30, "forties": 40, "fifties": 50, "sixties": 60,
                 "seventies": 70, "eighties": 80, "nineties": 90}
_PART_OF_DECADE: dict[str | None, int] = {"early": 2, "mid": 5, "middle": 5, "late": 8}
_RANGE = re.compile(r"\b(\d{1,3})\s*(?:-|–|to|and)\s*(\d{1,3})\b")
_DECADE = re.compile(r"\b(early|mid|middle|late)?[-\s]*(\d0)'?s\b")
_DECADE_WORD = re.compile(r"\b(early|mid|middle|late)?[-\s]*(" + "|".join(_DECADE_WORDS) + r")\b")
_AGE_NUMBER = re.compile(r"\b(\d{1,3})(?:\s*(?:years?|yrs?|-year)|\s*y/?o\b)")
_ANY_NUMBER = re.compile(r"\b(\d{1,3})\b")


def parse_age(text: str) -> float | None:
    """An age in years: "about 35 years old" -> 35, "between 30 and 40" / "30-40" -> 35, "in her 30s" /
    "thirties" -> 35, "early/mid/late 20s" -> 22/25/28; else a lone plausible number. None when none."""
    lowered = text.lower().replace("twenty-", "twenty ")
    for match in _RANGE.finditer(lowered):
        low, high = int(match.group(1)), int(match.group(2))
        if 0 < low < high <= 110 and high - low <= 30:
            return (low + high) / 2
    if re.search(r"\bteens?\b|\bteenager\b", lowered):
        return 16.0
    for pattern, decade_of in ((_DECADE, int), (_DECADE_WORD, _DECADE_WORDS.get)):
        match = pattern.search(lowered)
        if match:
            return float(decade_of(match.group(2)) + _PART_OF_DECADE.get(match.group(1), 5))
    match = _AGE_NUMBER.search(lowered)
    if match and 0 < int(match.group(1)) <= 110:
        return float(match.group(1))
    words = _words(lowered)
    for i, word in enumerate(words):  # "twenty five" / "thirty"
        if word in _NUMBER_WORDS:
            units = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
                     "nine": 9}
            extra = units.get(words[i + 1], 0) if i + 1 < len(words) else 0
            return float(_NUMBER_WORDS[word] + extra)
    numbers = [int(n) for n in _ANY_NUMBER.findall(lowered) if 0 < int(n) <= 110]
    return float(numbers[0]) if len(numbers) == 1 else None


def parse_attributes(text: str) -> dict[str, bool]:
    """CelebA attributes: True for affirmed mentions, False for negated or absent ones (every attribute keyed).
    "woman"/"female" affirm not-Male; "beard" affirms not-No_Beard."""
    result = dict.fromkeys(ATTRIBUTE_WORDS, False)
    for _, attribute, negated in mentions(text, ATTRIBUTE_WORDS):
        result[attribute] = not negated if not result[attribute] else True
    opposites = {"Male": ("woman", "female", "girl", "lady"), "No_Beard": ("beard", "bearded")}
    for attribute, phrases in opposites.items():
        for _, _, negated in mentions(text, {attribute: phrases}):
            if not negated:
                result[attribute] = False
            elif attribute == "No_Beard":
                result[attribute] = True
    return result


def parse_deepfake(text: str) -> str | None:
    """'real' or 'fake' from the first decisive mention; a negated one flips ("not manipulated" -> real)."""
    for _, label, negated in mentions(text, DEEPFAKE_WORDS):
        if negated:
            return "fake" if label == "real" else "real"
        return label
    return None


# --- the official task prompts ----------------------------------------------------------------------------------

# The first prompt of each of the official evaluation lists, and the medium its benchmarks use. Emotion is asked
# of videos in DFEW/Crema-D and of images in RAF-DB; the prompt is the same either way.
TASK_PROMPTS: dict[str, str] = {
    "emotion": "What emotion is shown in the video?",
    "action_units": "Identify the active facial action units in the provided image.",
    "age": "Guess the age of the individual shown in the picture; justify your answer.",
    "attributes": "Analyze the facial characteristics shown in the picture.",
    "deepfake": "Is the video authentic, or is it a fake?",
}
TASK_MODALITIES: dict[str, tuple[str, ...]] = {
    "emotion": ("video", "image"),
    "action_units": ("image",),
    "age": ("image",),
    "attributes": ("image",),
    "deepfake": ("video", "image"),
}
