"""MLP head in torch: softmax/cross-entropy for single-label, sigmoid/BCE for multilabel,
AdamW, early stopping with patience on the validation loss, deterministic on CPU."""

from __future__ import annotations

import copy

import numpy as np
import torch
from sklearn.base import BaseEstimator
from torch import nn
from torch.nn import functional as F

from hybridstack.progress import progress

_STD_FLOOR = 1e-6  # constant columns are centred, not blown up
_PREDICT_BATCH = 8192


def build_mlp(n_inputs: int, hidden_sizes: list[int], n_outputs: int, dropout: float) -> nn.Sequential:
    """Linear -> GELU -> Dropout per hidden size, then a linear output layer (logits)."""
    layers: list[nn.Module] = []
    width = n_inputs
    for size in hidden_sizes:
        layers += [nn.Linear(width, size), nn.GELU(), nn.Dropout(dropout)]
        width = size
    layers.append(nn.Linear(width, n_outputs))
    return nn.Sequential(*layers)


class TorchMLPHead(BaseEstimator):
    """A feed-forward network on dense features, standardised with training statistics.

    Parameters
    ----------
    multilabel : sigmoid + binary cross-entropy per label instead of softmax + cross-entropy.
    hidden_sizes : widths of the hidden layers ([] is logistic regression).
    dropout, lr, weight_decay : regularisation and AdamW settings.
    batch_size : training mini-batch size. max_epochs : upper bound on epochs.
    patience : epochs without a lower validation loss before stopping (best epoch restored).
    random_state : seeds weight init, dropout and the shuffling generator.
    """

    early_stops = True  # fit_oof passes it rows to stop on that are not the held-out fold

    def __init__(self, multilabel: bool = False, hidden_sizes: tuple[int, ...] = (512, 128),
                 dropout: float = 0.2, lr: float = 1e-3, weight_decay: float = 1e-2,
                 batch_size: int = 256, max_epochs: int = 100, patience: int = 8,
                 random_state: int = 42):
        self.multilabel = multilabel
        self.hidden_sizes = hidden_sizes
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.random_state = random_state

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.multilabel:
            return F.binary_cross_entropy_with_logits(logits, target)
        return F.cross_entropy(logits, target)  # target rows are class probabilities (one-hot)

    def _inputs(self, X: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((np.asarray(X, dtype=np.float32) - self.mean_) / self.scale_)

    def fit(self, X: np.ndarray, Y: np.ndarray, X_val: np.ndarray | None = None,
            Y_val: np.ndarray | None = None) -> TorchMLPHead:
        """Train on (n, d) ``X`` and (n, C) float32 ``Y``.

        With ``(X_val, Y_val)`` the weights of the epoch with the lowest validation loss
        are kept (``best_iteration_`` = that epoch, 1-based) and training stops after
        ``patience`` epochs without improvement; without them all ``max_epochs`` run.
        """
        # a private RNG state: seeding here must not change the caller's torch random stream
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.random_state)
            self._fit_seeded(X, Y, X_val, Y_val)
        return self

    def _fit_seeded(self, X: np.ndarray, Y: np.ndarray, X_val: np.ndarray | None,
                    Y_val: np.ndarray | None) -> None:
        shuffler = torch.Generator().manual_seed(self.random_state)
        X = np.asarray(X, dtype=np.float32)
        self.mean_ = X.mean(axis=0)
        self.scale_ = np.maximum(X.std(axis=0), _STD_FLOOR).astype(np.float32)
        inputs, target = self._inputs(X), torch.from_numpy(np.asarray(Y, dtype=np.float32))
        val = None
        if X_val is not None:
            val = (self._inputs(X_val), torch.from_numpy(np.asarray(Y_val, dtype=np.float32)))
        self.model_ = build_mlp(X.shape[1], list(self.hidden_sizes), Y.shape[1], self.dropout)
        optimizer = torch.optim.AdamW(self.model_.parameters(), lr=self.lr,
                                      weight_decay=self.weight_decay)
        best_loss, best_state, best_epoch = float("inf"), None, 0
        with progress(total=self.max_epochs, desc="mlp", unit="epochs") as bar:
            for epoch in range(1, self.max_epochs + 1):
                self._train_epoch(inputs, target, optimizer, shuffler)
                bar.update()
                if val is None:
                    continue
                loss = self._eval_loss(*val)
                if loss < best_loss:
                    best_loss, best_epoch = loss, epoch
                    best_state = copy.deepcopy(self.model_.state_dict())
                elif epoch - best_epoch >= self.patience:
                    break
        if best_state is not None:
            self.model_.load_state_dict(best_state)
        self.model_.eval()
        self.best_iteration_ = best_epoch if val is not None else self.max_epochs
        self.best_loss_ = best_loss if val is not None else None

    def _train_epoch(self, inputs: torch.Tensor, target: torch.Tensor,
                     optimizer: torch.optim.Optimizer, shuffler: torch.Generator) -> None:
        self.model_.train()
        order = torch.randperm(len(inputs), generator=shuffler)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            optimizer.zero_grad()
            self._loss(self.model_(inputs[batch]), target[batch]).backward()
            optimizer.step()

    @torch.no_grad()
    def _eval_loss(self, inputs: torch.Tensor, target: torch.Tensor) -> float:
        self.model_.eval()
        return float(self._loss(self._logits(inputs), target))

    def _logits(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.model_(inputs[i:i + _PREDICT_BATCH])
                          for i in range(0, len(inputs), _PREDICT_BATCH)])

    @torch.no_grad()
    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(n, C) float32 probabilities (softmax rows sum to 1; sigmoid per label if multilabel)."""
        self.model_.eval()
        logits = self._logits(self._inputs(X))
        proba = torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=1)
        return proba.numpy().astype(np.float32)
