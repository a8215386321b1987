"""Compute-optimal model and data size (Hoffmann et al. 2022, "Training Compute-Optimal Large
Language Models", the Chinchilla paper).

Training compute is C ≈ 6·N·D FLOPs for N parameters and D tokens (Kaplan et al. 2020). Two
of the paper's answers to "which N and D for a budget C":

* approach 1 (section 3.1, table 3): N and D grow alike, about 20 tokens per parameter, so
  N = sqrt(C / 120) and D = 20·N;
* approach 3 (section 3.3, equation 10): the fitted loss L(N, D) = E + A/N^α + B/D^β with
  E = 1.69, A = 406.4, B = 410.7, α = 0.34, β = 0.28, minimised under C = 6·N·D:
  N = G·(C/6)^a, D = (C/6)^b / G, G = (α·A / (β·B))^(1/(α+β)), a = β/(α+β), b = α/(α+β).

The predicted loss is in nats per token on the paper's MassiveText data with its tokenizer:
it ranks choices, it does not predict another corpus's loss. N counts every parameter.

The fits are for dense models. For a mixture-of-experts model kiln uses its active parameters per
token as N, since they set the training compute C = 6·N·D that the fits trade against tokens, and
the report says so: its loss is that of a dense model of the MoE's active size and data, which an
MoE usually beats at equal compute (Clark et al. 2022, "Unified Scaling Laws for Routed Language
Models"), and the optimal N is a dense model's size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28
TOKENS_PER_PARAMETER = 20.0


def chinchilla_loss(parameters: float, tokens: float) -> float:
    """L(N, D) of the approach-3 fit."""
    return E + A / parameters**ALPHA + B / tokens**BETA


def optimal_by_rule(flops: float) -> tuple[float, float]:
    """(N, D) for a budget of ``flops`` by approach 1's ~20 tokens per parameter."""
    parameters = math.sqrt(flops / (6 * TOKENS_PER_PARAMETER))
    return parameters, TOKENS_PER_PARAMETER * parameters


def optimal_by_fit(flops: float) -> tuple[float, float]:
    """(N, D) minimising the approach-3 loss under C = 6·N·D."""
    g = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
    a, b = BETA / (ALPHA + BETA), ALPHA / (ALPHA + BETA)
    return g * (flops / 6) ** a, (flops / 6) ** b / g


@dataclass(frozen=True)
class ComputeOptimal:
    method: str
    parameters: float
    tokens: float
    predicted_loss: float


@dataclass(frozen=True)
class ScalingReport:
    parameters: int
    """N: every parameter of a dense model, the active parameters per token of an MoE model."""
    tokens: float
    """Tokens the config trains on: train.max_steps × global batch × seq_len."""
    tokens_per_parameter: float
    chinchilla_optimal_tokens: float
    """20 × parameters (approach 1)."""
    training_flops: float
    """6·N·D of the config."""
    predicted_loss: float
    budget_flops: float | None
    optimal: list[ComputeOptimal]
    """For budget_flops (or, without one, the config's own 6·N·D): approach 1 and approach 3."""
    moe_total_parameters: int | None = None
    """An MoE model's total parameters (None for a dense model): ``parameters`` is then its active ones."""

    def as_json(self) -> dict:
        return asdict(self)


def scaling_report(parameters: int, tokens: float, budget_flops: float | None = None,
                   moe_total: int | None = None) -> ScalingReport:
    """The report for N = ``parameters`` trained on ``tokens``; ``moe_total`` marks N as an MoE model's
    active parameters, of that many in all."""
    budget = budget_flops or 6.0 * parameters * tokens
    optimal = []
    for method, solve in (("approach 1: 20 tokens per parameter", optimal_by_rule),
                          ("approach 3: L = E + A/N^a + B/D^b", optimal_by_fit)):
        n, d = solve(budget)
        optimal.append(ComputeOptimal(method, n, d, chinchilla_loss(n, d)))
    return ScalingReport(parameters=parameters, tokens=tokens, tokens_per_parameter=tokens / parameters,
                         chinchilla_optimal_tokens=TOKENS_PER_PARAMETER * parameters,
                         training_flops=6.0 * parameters * tokens, predicted_loss=chinchilla_loss(parameters, tokens),
                         budget_flops=budget_flops, optimal=optimal, moe_total_parameters=moe_total)
