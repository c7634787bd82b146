"""A user's own task for Presso: classification scored by balanced accuracy (the mean of per-class recalls).

    presso train presso:resnet8 --data digits --task docs/examples/balanced_task.py:Balanced --trust -o out

Presso hands the task batches ``(x, targets)``: ``x`` normalised and on the model's device, ``targets`` as the data
gives them (class indices here), or None when the data has no labels. ``loss`` returns a scalar to minimise;
``metric`` returns a dict holding ``headline`` (higher is better): the trainer keeps the epoch with the best one.
"""

import torch
import torch.nn.functional as F

from presso.tasks import Task


class Balanced(Task):
    name = "balanced"
    headline = "balanced_acc"

    def loss(self, model, x, targets, *, teacher, cfg):
        logits = model(x)
        if teacher is not None and targets is None:  # label-free: match the original's soft predictions
            with torch.no_grad():
                soft = teacher(x).softmax(1)
            return F.cross_entropy(logits, soft)
        return F.cross_entropy(logits, targets)

    def metric(self, model, batches, *, teacher, cfg, dist):
        n_classes = len(self.classes or []) or None
        hits = total = None
        for x, y in batches:
            pred = model(x).argmax(1)
            if hits is None:
                n_classes = n_classes or int(model(x).shape[1])
                hits, total = torch.zeros(n_classes), torch.zeros(n_classes)
            if y is None:
                continue
            total += torch.bincount(y.cpu(), minlength=n_classes).float()
            hits += torch.bincount(y[pred == y].cpu(), minlength=n_classes).float()
        hits, total = dist.sum(hits.double()), dist.sum(total.double())
        seen = total > 0
        return {"balanced_acc": round(float((hits[seen] / total[seen]).mean()), 5), "val_n": int(total.sum())}
