"""Small prediction sets whose metrics are computed by hand (shared by several test files)."""

from __future__ import annotations

from emomerge.evaluation.metrics import Predictions

# Single-label: 6 samples, 4 classes (D never occurs), one invalid answer (None).
#   gold  A A B B C C
#   pred  A B B B C -
# A: TP1 FP0 FN1 -> P 1,   R 1/2, F1 2/3
# B: TP2 FP1 FN0 -> P 2/3, R 1,   F1 4/5
# C: TP1 FP0 FN1 -> P 1,   R 1/2, F1 2/3      (the invalid answer is a miss, no class's FP)
# macro over the classes present (A, B, C) = (2/3 + 4/5 + 2/3) / 3 = 32/45
SINGLE_GOLD = ["A", "A", "B", "B", "C", "C"]
SINGLE_PRED = ["A", "B", "B", "B", "C", None]
SINGLE_LABELS = ["A", "B", "C", "D"]


def single_preds() -> Predictions:
    return Predictions(
        task="single",
        ids=[f"s{i}" for i in range(6)],
        groups=[f"s{i}" for i in range(6)],
        gold=[[g] for g in SINGLE_GOLD],
        pred=SINGLE_PRED,
        label_set=SINGLE_LABELS,
    )


# Multi-label: 4 utterances on 2 pages, Fear never gold nor predicted.
#   s1 gold {Anger}          pred {Anger}        F1 1
#   s2 gold {Joy, Sadness}   pred {Joy}          F1 2*1/(2+1) = 2/3
#   s3 gold {Sadness}        pred {Anger}        F1 0
#   s4 gold {Anger, Joy}     pred {Anger, Joy}   F1 1
# subset accuracy 2/4; example F1 (1 + 2/3 + 0 + 1)/4 = 2/3
# Anger TP2 FP1 FN0 -> F1 4/5; Joy TP2 -> 1; Sadness TP0 FN2 -> 0; macro (4/5+1+0)/3 = 3/5
# micro: TP4 FP1 FN2 -> P 4/5, R 2/3, F1 8/11
# single view (s1, s3 have one gold label), top1 Anger, Anger: accuracy 1/2;
#   Anger P 1/2 R 1 F1 2/3, Sadness F1 0 -> macro 1/3
MULTI_LABELS = ["Anger", "Joy", "Sadness", "Fear"]


def multi_preds() -> Predictions:
    return Predictions(
        task="multi",
        ids=["s1", "s2", "s3", "s4"],
        groups=["p1", "p1", "p2", "p2"],
        gold=[["Anger"], ["Joy", "Sadness"], ["Sadness"], ["Anger", "Joy"]],
        pred=[["Anger"], ["Joy"], ["Anger"], ["Anger", "Joy"]],
        label_set=MULTI_LABELS,
        top1=["Anger", "Joy", "Anger", "Anger"],
    )
