"""Answer parsers on real-looking Face-LLaVA answers, and the metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest

from facellava.calibration import answers, metrics

EMOTION_ANSWERS = [
    ("The person in the video appears happy: the cheeks are raised and the lip corners are pulled up.", "happiness"),
    ("The emotion conveyed is sadness; the inner brows are raised and the mouth turns down.", "sadness"),
    ("She is not happy; she seems rather sad.", "sadness"),
    ("The man might be slightly annoyed, possibly angry, given his lowered brows.", "anger"),
    ("Neither happy nor sad: a neutral face with relaxed muscles.", "neutral"),
    ("Happiness is not evident; the wide eyes and open mouth show surprise.", "surprise"),
    ("I cannot see any anger, the person is calm.", "neutral"),
    ("The person is happy, not sad.", "happiness"),
    ("Her nose wrinkles in disgust.", "disgust"),
    ("He looks terrified, with raised upper lids.", "fear"),
    ("The video shows a person talking.", None),
    ("The person does not look happy.", None),
]

AU_ANSWERS = [
    ("The active facial action units are AU1, AU2 and AU12.", {1, 2, 12}),
    ("Active units: AU06, AU 12. No AU4.", {6, 12}),
    ("The lip corner puller (AU12) and the cheek raiser are present; AU9 is absent.", {6, 12}),
    ("Action units 1, 2 and 4 are engaged.", {1, 2, 4}),
    ("The upper lip raiser is visible, indicating AU10.", {10}),
    ("The jaw drop and parted lips suggest AU25 and AU26.", {25, 26}),
    ("There are no visible action units without a brow lowerer.", set()),
    ("I see no clear facial muscle movements.", set()),
]

AGE_ANSWERS = [
    ("The individual appears to be about 35 years old, based on the smooth skin.", 35.0),
    ("I would estimate the person is between 30 and 40.", 35.0),
    ("She looks to be in her 30s.", 35.0),
    ("He is probably in his late twenties.", 28.0),
    ("The person is a teenager.", 16.0),
    ("Around twenty five, judging by the skin.", 25.0),
    ("Estimated age: 42.", 42.0),
    ("Mid-40s, with some wrinkles around the eyes.", 45.0),
    ("The person is 23-27 years old.", 25.0),
    ("It is hard to tell the age from this image.", None),
]

DEEPFAKE_ANSWERS = [
    ("The video is authentic; the lighting on the face is consistent.", "real"),
    ("There are no signs of manipulation.", "real"),
    ("This is not real; it is a deepfake.", "fake"),
    ("The video appears to be manipulated around the mouth.", "fake"),
    ("Visible blending artifacts around the jaw suggest it is fake.", "fake"),
    ("It is not fake.", "real"),
    ("I cannot tell.", None),
]


@pytest.mark.parametrize("text,label", EMOTION_ANSWERS)
def test_emotion_parser(text, label):
    assert answers.parse_emotion(text) == label


@pytest.mark.parametrize("text,label", AU_ANSWERS)
def test_action_unit_parser(text, label):
    assert answers.parse_action_units(text) == label


@pytest.mark.parametrize("text,label", AGE_ANSWERS)
def test_age_parser(text, label):
    assert answers.parse_age(text) == label


@pytest.mark.parametrize("text,label", DEEPFAKE_ANSWERS)
def test_deepfake_parser(text, label):
    assert answers.parse_deepfake(text) == label


def test_attribute_parser():
    parsed = answers.parse_attributes("A young woman with black hair and eyeglasses, smiling and wearing lipstick; "
                                      "she has no hat and no beard. Her mouth is not open.")
    assert {k for k, v in parsed.items() if v} == {"Young", "Black_Hair", "Eyeglasses", "Smiling",
                                                    "Wearing_Lipstick", "No_Beard"}
    assert len(parsed) == 40
    bearded = answers.parse_attributes("A bald man with a beard and a mustache.")
    assert bearded["Male"] and bearded["Bald"] and bearded["Mustache"] and not bearded["No_Beard"]


def test_metrics_against_hand_computed_values():
    labels = ["happy", "happy", "happy", "sad", "sad", "angry"]
    predictions = ["happy", "happy", "sad", "sad", None, "happy"]
    # recalls: happy 2/3, sad 1/2, angry 0/1 -> UAR (2/3 + 1/2 + 0) / 3; WAR = accuracy = 3/6
    assert metrics.unweighted_average_recall(predictions, labels) == pytest.approx((2 / 3 + 1 / 2) / 3)
    assert metrics.weighted_average_recall(predictions, labels) == pytest.approx(0.5)
    assert metrics.accuracy(predictions, labels) == pytest.approx(0.5)

    mae, coverage = metrics.mean_absolute_error([30.0, None, 50.0, 20.0], [35.0, 40.0, 44.0, 20.0])
    assert mae == pytest.approx((5 + 6 + 0) / 3) and coverage == pytest.approx(0.75)
    assert math.isnan(metrics.mean_absolute_error([None], [3.0])[0])

    predicted = [{1, 2}, {12}, set(), {1, 12}]
    truth = [{1}, {12, 6}, {6}, {1, 2}]
    f1 = metrics.f1_per_class(predicted, truth, [1, 2, 6, 12])
    # AU1: TP 2, FP 0, FN 0 -> 1; AU2: TP 0, FP 1, FN 1 -> 0; AU6: TP 0, FP 0, FN 2 -> 0; AU12: TP 1, FP 1, FN 0 -> 2/3
    assert f1 == pytest.approx({1: 1.0, 2: 0.0, 6: 0.0, 12: 2 / 3})

    mean, per = metrics.mean_attribute_accuracy(
        [{"Smiling": True, "Male": False}, {"Smiling": False, "Male": False}],
        [{"Smiling": True, "Male": True}, {"Smiling": True, "Male": False}], ["Smiling", "Male"])
    assert per == {"Smiling": 0.5, "Male": 0.5} and mean == 0.5
    with pytest.raises(ValueError):
        metrics.accuracy([1], [1, 2])
