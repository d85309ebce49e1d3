"""A synthetic layered objective behind the evaluator interface (pure numpy, milliseconds).

The whole adapter is z = (z_0, ..., z_{L-1}); the training loss is ||M (z - t)||^2 / N with
M = I + coupling between neighbouring layers' blocks, so a layer's best vector depends on the
others (block-coordinate descent has something to do). Dev and test use shifted targets, and
their accuracy is quantised to 1/32 like a 32-example dev set, so dev ties happen.
"""

from __future__ import annotations

import numpy as np

from orchestrator.evaluation import Diagnostics, EvalResult, Evaluator, EvaluatorInfo


class LayeredQuadratic(Evaluator):
    def __init__(self, n_layers: int = 4, dim: int = 8, coupling: float = 0.4, seed: int = 0,
                 dev_shift: float = 0.3, nan_rows: tuple[int, ...] = ()) -> None:
        rng = np.random.default_rng(seed)
        self.n_layers, self.dim = n_layers, dim
        size = n_layers * dim
        self.M = np.eye(size)
        for layer in range(n_layers - 1):  # coupling of each layer with the next
            block = coupling * rng.standard_normal((dim, dim)) / np.sqrt(dim)
            rows, cols = slice(layer * dim, (layer + 1) * dim), slice((layer + 1) * dim,
                                                                      (layer + 2) * dim)
            self.M[rows, cols] = block
            self.M[cols, rows] = block.T
        target = rng.uniform(-1.0, 1.0, size)
        self.targets = {"train": target,
                        "dev": target + dev_shift * rng.standard_normal(size),
                        "test": target + dev_shift * rng.standard_normal(size)}
        self.z = np.zeros((n_layers, dim))
        # rows of a population (not the single reference row of loss* or a centre) returned
        # as NaN
        self.nan_rows = nan_rows
        self.calls: list[dict] = []  # every evaluate(): layer, Z, committed state

    @property
    def info(self) -> EvaluatorInfo:
        return EvaluatorInfo(self.n_layers, self.dim)

    def _loss(self, Z_all: np.ndarray, split: str) -> np.ndarray:
        r = (Z_all - self.targets[split]) @ self.M.T
        return (r**2).sum(axis=1) / Z_all.shape[1]

    def evaluate(self, layer, Z):
        self.calls.append({"layer": layer, "Z": Z.copy(), "committed": self.z.copy()})
        Z_all = np.repeat(self.z.reshape(1, -1), len(Z), axis=0)
        Z_all[:, layer * self.dim:(layer + 1) * self.dim] = Z
        losses = self._loss(Z_all, "train")
        if len(Z) > 1:  # a population
            losses[[r for r in self.nan_rows if r < len(Z)]] = np.nan
        return EvalResult(losses, np.exp(-losses))

    def commit(self, layer, z):
        self.z[layer] = z

    def score(self, split):
        loss = float(self._loss(self.z.reshape(1, -1), split)[0])
        accuracy = round(32 * np.exp(-loss)) / 32
        return {"loss": loss, "accuracy": accuracy, "f1": accuracy, "n": 32}

    def diagnostics(self, delta_norms=False):
        norms = [{"layer": k, "norm": float(np.linalg.norm(self.z[k]))}
                 for k in range(self.n_layers)] if delta_norms else []
        return Diagnostics(delta_norms=norms)
