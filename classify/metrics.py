"""Unlearning metrics as in the machine-unlearning literature (Jia et al., NeurIPS 2023; Fan et al., ICLR 2024).

UA = 100 − accuracy on D_f; RA = accuracy on D_r; TA = accuracy on the test split; MIA-efficacy = % of D_f that an
RBF-SVC membership attack on prediction confidence (the softmax probability of the true label) calls a non-member,
the attack trained with retain samples as members and test samples as non-members (the reference ``SVC_MIA``:
``SVC(C=3, gamma="auto")``, equally many members as non-members); Avg.Gap = mean |metric − Retrain's| over
UA, RA, TA, MIA.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from sklearn.svm import SVC

from .data import Split

METRICS = ("UA", "RA", "TA", "MIA")
MIA_SVC = {"C": 3.0, "gamma": "auto", "kernel": "rbf"}


@torch.no_grad()
def predict(model: nn.Module, split: Split, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted labels, softmax probability of the true label) for every example."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    preds, confs = [], []
    for i in range(0, len(split), batch_size):
        x, y = split.x[i:i + batch_size].to(device), split.y[i:i + batch_size].to(device)
        prob = torch.softmax(model(x).float(), dim=1)
        preds.append(prob.argmax(1).cpu())
        confs.append(prob.gather(1, y[:, None]).squeeze(1).cpu())
    model.train(was_training)
    return torch.cat(preds), torch.cat(confs)


def accuracy(model: nn.Module, split: Split) -> float:
    pred, _ = predict(model, split)
    return 100.0 * float((pred == split.y).float().mean())


def mia_efficacy(conf_retain: torch.Tensor, conf_test: torch.Tensor, conf_forget: torch.Tensor, seed: int = 0) -> float:
    """% of D_f predicted non-member by an SVC trained on retain (member) vs. test (non-member) confidences."""
    n = min(len(conf_retain), len(conf_test))
    rng = np.random.default_rng(seed)
    members = conf_retain.numpy()[rng.choice(len(conf_retain), n, replace=False)]
    nonmembers = conf_test.numpy()[rng.choice(len(conf_test), n, replace=False)]
    features = np.concatenate([members, nonmembers])[:, None]
    labels = np.concatenate([np.ones(n), np.zeros(n)])
    svc = SVC(**MIA_SVC).fit(features, labels)
    return 100.0 * float((svc.predict(conf_forget.numpy()[:, None]) == 0).mean())


def evaluate(model: nn.Module, forget: Split, retain: Split, test: Split, seed: int = 0) -> dict[str, float]:
    """UA, RA, TA and MIA (all in percent) of one model."""
    pf, cf = predict(model, forget)
    pr, cr = predict(model, retain)
    pt, ct = predict(model, test)
    return {
        "UA": 100.0 - 100.0 * float((pf == forget.y).float().mean()),
        "RA": 100.0 * float((pr == retain.y).float().mean()),
        "TA": 100.0 * float((pt == test.y).float().mean()),
        "MIA": mia_efficacy(cr, ct, cf, seed),
    }


def avg_gap(row: dict[str, float], reference: dict[str, float]) -> float:
    """Mean absolute difference to the reference (Retrain) over UA, RA, TA, MIA."""
    return float(np.mean([abs(row[m] - reference[m]) for m in METRICS]))


def summary(values) -> dict[str, float]:
    """mean, sample std (0 for one value) and median."""
    v = np.asarray(list(values), dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "median": float(np.median(v))}
