"""The training loops of a site: DP-SGD, and the non-private baseline.

Private steps are Opacus DP-SGD: Poisson sampling at rate q, per-example clipping
to C, Gaussian noise σ·C, accounted by an accountant that continues the site's
history. A Poisson batch is run as length-sorted chunks (Opacus virtual steps), so
one optimizer step = one sampled batch = one accounted step. An empty batch is a
noise-only step, as in Opacus: skipping it would show in the update that it was empty.
Sampling draws from the caller's CPU generator; the noise from a generator on the
model's device seeded from it, so one secret seed drives the round.

A simulated site under `fedcare audit empirical` may hold gradient canaries: records
whose per-example gradient is replaced, before clipping, by a fixed direction far
longer than C, so the mechanism (clipping, noise, accounting) is what the audit tests.

The same loops train either the whole classifier on token ids (LoRA + head) or, in a
head round, only the head on pooled features the frozen encoder computed once: the
mechanism (sampling, clipping, noise, accounting) is the same; only the cost differs.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from common.evaluation import Encoded, Features


@dataclass(frozen=True)
class PrivateStep:
    """The mechanism of one round: what the ledger records and the accountant composes."""
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float


@dataclass(frozen=True)
class TrainStats:
    loss: float            # mean training loss over the round's non-empty batches
    steps: int             # optimizer steps taken (= accounted steps when private)
    examples: int          # records sampled over the round
    empty_batches: int


Rows = Encoded | Features  # token ids for the whole classifier, or features for the head


@dataclass(frozen=True)
class GradientCanaries:
    """Audit records (common/privacy/canaries.py): the per-example gradient of training
    row r is set to `scale`·C along coordinate `rows[r]` of `target` (the head's weight,
    flattened) and zero elsewhere, before clipping. A correct mechanism clips it to
    exactly C; a mechanism that does not clip lets it through `scale` times larger."""
    target: torch.nn.Parameter
    rows: dict[int, int]
    scale: float = 100.0

    def plant(self, params: Sequence[torch.Tensor], piece: Sequence[int],
              max_grad_norm: float) -> None:
        at = [(j, self.rows[r]) for j, r in enumerate(piece) if r in self.rows]
        if not at:
            return
        positions = [j for j, _ in at]
        for p in params:
            p.grad_sample[positions] = 0.0
        flat = self.target.grad_sample.view(len(piece), -1)
        for j, coordinate in at:
            flat[j, coordinate] = self.scale * max_grad_norm


def _forward_loss(model, data: Rows, rows, device) -> torch.Tensor:
    return F.cross_entropy(data.logits(model, rows, device), data.labels[list(rows)].to(device))


def train_private(model, data: Rows, step: PrivateStep, learning_rate: float,
                  chunk_size: int, device: torch.device, accountant,
                  generator: torch.Generator,
                  progress: Callable[[int, float], None] | None = None,
                  public_size: int = 0,
                  canaries: GradientCanaries | None = None) -> TrainStats:
    """`step.steps` DP-SGD steps on `model`; each step is recorded in `accountant`.
    `public_size`: the training-set size the site states (a noisy count); the noisy sum
    is divided by q times it, so the update's scale does not reveal the exact n.

    The model's trainable parameters change in place. Per-sample gradient hooks are
    removed before returning, so the model can be wrapped again next round.
    """
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    n = len(data)
    params = [p for p in model.parameters() if p.requires_grad]
    # a head fed features has no input that needs a gradient; torch says so every step
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    gsm = GradSampleModule(model, loss_reduction="mean")
    optimizer = DPOptimizer(
        torch.optim.Adam(params, lr=learning_rate),
        noise_multiplier=step.noise_multiplier, max_grad_norm=step.max_grad_norm,
        # the sum is scaled by q·(the size the site states), never by the exact n
        expected_batch_size=max(1, round(step.sample_rate * (public_size or n))),
        loss_reduction="mean",
        generator=_noise_generator(generator, device),
    )
    optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(
        sample_rate=step.sample_rate))
    losses, examples, empty = [], 0, 0
    try:
        for k in range(step.steps):
            sampled = torch.nonzero(
                torch.rand(n, generator=generator) < step.sample_rate).flatten().tolist()
            if not sampled:
                noise_step(optimizer)
                empty += 1
                continue
            losses.append(private_batch(gsm, optimizer, data, sampled, chunk_size, device,
                                        canaries))
            examples += len(sampled)
            if progress:
                progress(k + 1, losses[-1])
    finally:
        gsm._close()  # remove hooks and per-sample buffers; model stays as it is
    return TrainStats(_mean(losses), step.steps, examples, empty)


def private_batch(gsm, optimizer, data: Rows, rows: Sequence[int], chunk_size: int,
                  device: torch.device, canaries: GradientCanaries | None = None) -> float:
    """One DP-SGD step on the sampled `rows`, run as chunks; returns the mean loss.

    Every chunk but the last only clips and accumulates (a skipped "virtual" step);
    the last adds noise once, scales by the expected batch size, and steps.
    """
    pieces = data.pieces(rows, chunk_size)
    total = 0.0
    for j, piece in enumerate(pieces):
        loss = _forward_loss(gsm, data, piece, device)
        loss.backward()
        if canaries is not None:
            canaries.plant(optimizer.params, piece, optimizer.max_grad_norm)
        total += loss.detach().item() * len(piece)
        optimizer.signal_skip_step(do_skip=j < len(pieces) - 1)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return total / len(rows)


def noise_step(optimizer) -> None:
    """The step of an empty Poisson batch: no gradients, but noise σ·C scaled by E[B],
    an optimizer step, and one accounted step through the optimizer's hook, exactly as
    Opacus takes it (its clipping accepts per-sample gradients of zero rows)."""
    for p in optimizer.params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _noise_generator(sampling: torch.Generator, device) -> torch.Generator:
    """A generator on `device` for the noise (a CPU generator cannot fill CUDA tensors),
    seeded from the sampling generator so one secret seed still drives the round."""
    seed = int(torch.randint(0, 2 ** 63 - 1, (1,), generator=sampling))
    return torch.Generator(device=device).manual_seed(seed)


def train_plain(model, data: Rows, batch_size: int, steps: int, learning_rate: float,
                chunk_size: int, device: torch.device, generator: torch.Generator,
                max_grad_norm: float = 1.0) -> TrainStats:
    """Non-private baseline: uniform batches without replacement, no noise."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=learning_rate)
    n, losses, examples = len(data), [], 0
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(n, generator=generator).tolist()
        batch, order = order[:batch_size], order[batch_size:]
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for rows in data.pieces(batch, chunk_size):
            loss = _forward_loss(model, data, rows, device) * (len(rows) / len(batch))
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        losses.append(total)
        examples += len(batch)
    return TrainStats(_mean(losses), steps, examples, 0)


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else math.nan
