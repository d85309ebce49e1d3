"""The random subspace: a d-dim vector per layer -> (A_Q, B_Q, A_K, B_K) by fixed random maps.

`z` is cut into four chunks of d/4; chunk c is multiplied by a fixed map M_c (d/4, numel) and
reshaped to its matrix. Maps are Gaussian with std `alpha * s_l / (sqrt(d) * sigma0)` where `s_l`
is a robust spread measured once on the training data (docs/design.md §2). Every worker
regenerates the maps from (seed, layer, chunk) with its own CPU generator, so maps never travel
and two workers with the same seed and statistics hold bit-identical maps.

Departure from the letter of §2, measured on SmolLM2: the §2 scale makes a typical first candidate's
delta 0.001x the weight at layer 0 (its pre-attention norm has gains ~0.03) and < 0.05x on about
half the layers, where the search then cannot move the loss. With `ratio_bounds` (default
[0.1, 1.0], `qk-input` only) each layer's maps are rescaled by a common gain g so that the
*expected* ||A B|| / ||W|| of a z ~ N(0, sigma0^2 I) lies inside the bounds; layers already inside
keep the §2 scale exactly. The gain is a pure function of the statistics and the frozen weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from common.seeding import derive_seed


@dataclass(frozen=True)
class CalibrationStats:
    """Robust spreads measured with the zero adapter on the training examples (real tokens)."""

    qk_input: tuple[float, ...]  # what each layer's q/k projections receive
    hidden: tuple[float, ...]  # the hidden state entering each layer
    embedding: float  # the word-embedding matrix (the paper's rule for layer 0)
    # adapter.basis other than random: per searched layer, the top principal directions of its
    # q/k inputs, rows of unit length (p, in) as nested lists (None for the other layers)
    bases: tuple[list | None, ...] | None = None

    def to_dict(self) -> dict:
        out = {"qk_input": list(self.qk_input), "hidden": list(self.hidden),
               "embedding": self.embedding}
        if self.bases is not None:
            out["bases"] = list(self.bases)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> CalibrationStats:
        bases = tuple(d["bases"]) if d.get("bases") is not None else None
        return cls(tuple(d["qk_input"]), tuple(d["hidden"]), float(d["embedding"]), bases)


def principal_directions(x: torch.Tensor, p: int, centred: bool) -> list:
    """The top-p eigenvectors (rows, unit length) of the second moment of the rows of x (n, in),
    in float64, centred or not; each row's sign fixed so that its largest entry is positive."""
    x = x.double()
    if centred:
        x = x - x.mean(0)
    values, vectors = torch.linalg.eigh(x.T @ x / x.shape[0])  # ascending
    top = vectors[:, values.argsort(descending=True)[:p]].T
    signs = torch.sign(top.gather(1, top.abs().argmax(1, keepdim=True)))
    return (top * signs).float().tolist()


def robust_std(values: torch.Tensor, rounds: int = 5) -> float:
    """Std after clipping to mean +- 3 std and recomputing, `rounds` times (float64)."""
    x = values.detach().reshape(-1).double()
    for _ in range(rounds):
        mean, std = x.mean(), x.std()
        x = x.clamp(mean - 3 * std, mean + 3 * std)
    return float(x.std())


@dataclass(frozen=True)
class LayerShape:
    q_in: int
    q_out: int
    k_in: int
    k_out: int


class Projector:
    """Maps candidate vectors of one layer to low-rank factors; maps are built lazily per layer."""

    def __init__(self, shapes: list[LayerShape], *, rank: int, dim: int, init: str, alpha: float,
                 sigma0: float, seed: int, stats: CalibrationStats, device: torch.device,
                 weight_norms: list[tuple[float, float]] | None = None,
                 ratio_bounds: tuple[float, float] | None = None, param: str = "ab",
                 basis: str = "random"):
        self.shapes, self.rank, self.dim, self.init = shapes, rank, dim, init
        self.basis = basis
        self.alpha, self.sigma0, self.seed, self.stats = alpha, sigma0, seed, stats
        self.device, self.param = device, param
        # the chunks z is cut into (0: A_Q, 1: B_Q, 2: A_K, 3: B_K); the others are fixed
        self.searched = {"ab": (0, 1, 2, 3), "b": (1, 3), "a": (0, 2)}[param]
        self._maps: dict[int, list[torch.Tensor]] = {}
        self.gains = [1.0] * len(shapes)
        if ratio_bounds is not None and weight_norms is not None and init == "qk-input":
            lo, hi = ratio_bounds
            for layer, norms in enumerate(weight_norms):
                rho = self.expected_ratio(layer, norms) if min(norms) > 0 else 0.0
                if rho > 0:  # a zero spread or weight leaves nothing to rescale
                    self.gains[layer] = math.sqrt(min(max(rho, lo), hi) / rho)

    def expected_ratio(self, layer: int, norms: tuple[float, float]) -> float:
        """Geometric mean over q and k of sqrt(E||A B||^2) / ||W|| at the §2 scale.

        With iid entries, E||A B||_F^2 = in * out * r * var(A) * var(B), and an entry of A (or B)
        is a sum of d/4 terms z_i M_ij with z_i ~ N(0, sigma0^2).
        """
        s, r = self.shapes[layer], self.rank

        def entry_std(chunk: int) -> float:
            return self._entry_std(*self.scale(layer, chunk))

        rho_q = math.sqrt(s.q_in * s.q_out * r) * entry_std(0) * entry_std(1) / norms[0]
        rho_k = math.sqrt(s.k_in * s.k_out * r) * entry_std(2) * entry_std(3) / norms[1]
        return math.sqrt(rho_q * rho_k)

    def chunk_numel(self, layer: int) -> list[int]:
        s, r = self.shapes[layer], self.rank
        return [s.q_in * r, r * s.q_out, s.k_in * r, r * s.k_out]

    def scale(self, layer: int, chunk: int) -> tuple[str, float]:
        """('normal', std) or ('uniform', bound) for one map, per `init` (docs/design.md §2)."""
        d = self.dim
        if self.init == "random":
            return "normal", 1 / math.sqrt(d)
        if self.init == "qk-input":
            spread = self.stats.qk_input[layer]
        else:  # paper, paper-a-only: the hidden state entering the layer; embeddings for layer 0
            spread = self.stats.hidden[layer] if layer > 0 else self.stats.embedding
        if self.init == "paper-a-only" and (layer == 0 or chunk % 2 == 1):
            # the released code: only A-type maps of layers >= 1 get the rule; the others keep
            # the framework's default Linear init, uniform(+-1/sqrt(fan_in)) with fan_in = d/4
            return "uniform", 1 / math.sqrt(d // 4)
        return "normal", self.alpha * spread / (math.sqrt(d) * self.sigma0)

    def maps(self, layer: int) -> list[torch.Tensor]:
        """Per chunk: the map (n, numel) of a searched chunk, or the fixed factor (1, numel).

        With `param` b or a, z is cut into two chunks of d/2 (n = d/2), each map's std shrunk by
        sqrt(2) so that a candidate's factor entries keep the std they have with `ab`; a fixed
        factor is drawn once with that same entry std (a typical first candidate's), so
        `expected_ratio` and the ratio_bounds gains hold for every parametrisation.
        """
        if layer not in self._maps:
            built = []
            n = self.dim // len(self.searched)
            for c, numel in enumerate(self.chunk_numel(layer)):
                kind, size = self.scale(layer, c)
                if c in self.searched:
                    gen = torch.Generator().manual_seed(derive_seed(self.seed, "map", layer, c))
                    size *= math.sqrt((self.dim // 4) / n)
                    shape = (n, numel)
                else:
                    gen = torch.Generator().manual_seed(derive_seed(self.seed, "fixed", layer, c))
                    size = self._entry_std(kind, size)
                    kind, shape = "normal", (1, numel)
                if c in self.searched and c % 2 == 0 and self.basis != "random":
                    std = size if kind == "normal" else size / math.sqrt(3)  # uniform's std
                    m = self._basis_map(layer, n, std, gen)
                elif kind == "normal":
                    m = torch.randn(shape, generator=gen, dtype=torch.float32) * size
                else:
                    m = (torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1) * size
                built.append((m * self.gains[layer]).to(self.device))
            self._maps[layer] = built
        return self._maps[layer]

    def _basis_map(self, layer: int, n: int, std: float,
                   gen: torch.Generator) -> torch.Tensor:
        """A map (n, in * r) whose A = P^T G has its columns in the span of the layer's p
        principal directions P (p, in): G (p, r) is a Gaussian map of z, its entries' std (the
        random map's `std`) raised by sqrt(in / p) so that E||A||_F, and with it the scale rule
        and `ratio_bounds`, are those of the random map (P's rows are orthonormal)."""
        rows = self.stats.bases[layer] if self.stats.bases is not None else None
        if rows is None:
            raise ValueError(f"adapter.basis={self.basis}: no principal directions for layer "
                             f"{layer} in the calibration statistics")
        P = torch.tensor(rows, dtype=torch.float32)  # (p, in)
        p, width = P.shape
        G = torch.randn((n, p, self.rank), generator=gen, dtype=torch.float32)
        G *= std * math.sqrt(width / p)
        return torch.einsum("pi,npr->nir", P, G).reshape(n, width * self.rank)

    def _entry_std(self, kind: str, size: float) -> float:
        """Std of a factor entry sum_i z_i M_ij over d/4 terms with z_i ~ N(0, sigma0^2)."""
        spread = size if kind == "normal" else size / math.sqrt(3)
        return math.sqrt(self.dim // 4) * self.sigma0 * spread

    def factors(self, layer: int, z: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(A_Q, B_Q, A_K, B_K) for candidates z (C, d): shapes (C,in,r), (C,r,out), ..."""
        s, r = self.shapes[layer], self.rank
        z = z.to(self.device, torch.float32)
        maps = self.maps(layer)
        chunks = dict(zip(self.searched, z.reshape(z.shape[0], len(self.searched), -1).unbind(1),
                          strict=True))
        flat = [chunks[c] @ m if c in chunks else m.expand(z.shape[0], -1)
                for c, m in enumerate(maps)]
        shapes = [(s.q_in, r), (r, s.q_out), (s.k_in, r), (r, s.k_out)]
        return tuple(f.reshape(z.shape[0], *shp) for f, shp in zip(flat, shapes, strict=True))
