"""Classification metrics: pure functions on label ids / tag names (scikit-learn and seqeval do the math).

Names match launcher.config.TASK_METRICS (without the ``eval/`` prefix the caller adds):
accuracy, {precision,recall,f1}_{macro,micro,weighted}, {precision,recall,f1}/<label>, and for
IOB-tagged sequences entity_{precision,recall,f1}_{micro,macro,weighted} and
entity_{precision,recall,f1}/<TYPE> with seqeval's (conlleval) semantics: an entity counts only
when its type and its exact span match.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

_AVERAGES = ("macro", "micro", "weighted")
_BIO_PREFIXES = ("B-", "I-", "E-", "S-", "L-", "U-")


def label_metrics(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy and P/R/F1 per label and averaged (macro, micro, weighted) over every label id."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    ids = list(range(len(labels)))
    out = {"accuracy": float(accuracy_score(y_true, y_pred))} if len(y_true) else {"accuracy": 0.0}
    if not len(y_true):
        return out
    for avg in _AVERAGES:
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=ids, average=avg, zero_division=0)
        out.update({f"precision_{avg}": float(p), f"recall_{avg}": float(r), f"f1_{avg}": float(f)})
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=ids, average=None, zero_division=0)
    for i, name in enumerate(labels):
        out.update({f"precision/{name}": float(p[i]), f"recall/{name}": float(r[i]), f"f1/{name}": float(f[i])})
    return out


def confusion(y_true: Sequence[int], y_pred: Sequence[int], n_labels: int) -> list[list[int]]:
    """Rows = true label id, columns = predicted label id."""
    from sklearn.metrics import confusion_matrix

    if not len(y_true):
        return [[0] * n_labels for _ in range(n_labels)]
    return confusion_matrix(y_true, y_pred, labels=list(range(n_labels))).tolist()


def label_report(y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]) -> str:
    """scikit-learn's classification report (precision, recall, f1, support per label)."""
    from sklearn.metrics import classification_report

    if not len(y_true):
        return "(no labelled examples)\n"
    return classification_report(y_true, y_pred, labels=list(range(len(labels))), target_names=list(labels),
                                 digits=4, zero_division=0)


def is_iob(labels: Sequence[str]) -> bool:
    """Tags like O / B-PER / I-PER (IOB1, IOB2, IOBES, BILOU): entity-level scoring makes sense."""
    return any(t != "O" for t in labels) and all(t == "O" or t.startswith(_BIO_PREFIXES) for t in labels)


def entity_metrics(true_tags: list[list[str]], pred_tags: list[list[str]]) -> dict[str, float]:
    """Entity-level P/R/F1 per type and averaged, from per-sentence tag sequences (seqeval)."""
    from seqeval.metrics import classification_report

    rep = classification_report(true_tags, pred_tags, output_dict=True, zero_division=0)
    out: dict[str, float] = {}
    for name, row in rep.items():
        avg = name.split(" ")[0] if name.endswith(" avg") else None
        for m in ("precision", "recall", "f1"):
            key = "f1-score" if m == "f1" else m
            out[f"entity_{m}_{avg}" if avg else f"entity_{m}/{name}"] = float(row[key])
    for avg in _AVERAGES:  # seqeval leaves the averages out when there is no entity at all
        for m in ("precision", "recall", "f1"):
            out.setdefault(f"entity_{m}_{avg}", 0.0)
    return out


def entity_report(true_tags: list[list[str]], pred_tags: list[list[str]]) -> str:
    from seqeval.metrics import classification_report

    return classification_report(true_tags, pred_tags, digits=4, zero_division=0)


def confusion_png(matrix: list[list[int]], labels: Sequence[str], path: Path, title: str) -> Path:
    """The confusion matrix as an image (rows true, columns predicted), counts written in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(labels)
    size = min(16.0, 2.5 + 0.6 * n)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    im = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), labels=list(labels), rotation=45, ha="right", parse_math=False)  # `$` is text
    ax.set_yticks(range(n), labels=list(labels), parse_math=False)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, parse_math=False)
    if n <= 30:
        top = max((max(r) for r in matrix), default=0)
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(matrix[i][j]), ha="center", va="center",
                        color="white" if matrix[i][j] > top / 2 else "black", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
