"""The training loops of a site: DP-SGD, and the non-private baseline.

Private steps are Opacus DP-SGD: Poisson sampling at rate q, per-example clipping
to C, Gaussian noise σ·C, accounted by an accountant that continues the site's
history. A Poisson batch is run as length-sorted chunks (Opacus virtual steps), so
one optimizer step = one sampled batch = one accounted step. An empty batch is a
noise-only step, as in Opacus: skipping it would show in the update that it was empty.
Sampling draws from the caller's CPU generator; the noise from a generator on the
model's device seeded from it, so one secret seed drives the round.

Where the unit of privacy is the patient (user-level sampling, ULS), a step Poisson-
samples patients at rate q over patients; each sampled patient brings at most k of
their records, drawn afresh each step from the caller's generator; Opacus computes the
records' per-sample gradients, and before its optimizer clips them the rows of one
patient are summed (or averaged) into one row, so a patient, with all of their notes,
moves the noisy sum by at most C. Noise σ·C, normalised by the expected number of
patients: the accountant composes the same Poisson-subsampled Gaussian, over patients.

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
class Patients:
    """Who a patient-level step samples: each patient's training rows, the most rows a
    sampled patient brings to one step (k), and how a patient's rows' gradients become
    the patient's gradient before joint clipping ("sum" or "mean")."""
    rows: tuple[tuple[int, ...], ...]
    max_rows: int
    reduction: str = "mean"

    def __len__(self) -> int:
        return len(self.rows)

    def pick(self, patient: int, generator: torch.Generator) -> tuple[int, ...]:
        """At most k of the patient's rows, chosen uniformly at random."""
        rows = self.rows[patient]
        if len(rows) <= self.max_rows:
            return rows
        order = torch.randperm(len(rows), generator=generator)[: self.max_rows].tolist()
        return tuple(rows[i] for i in order)


def group_by_patient(params: Sequence[torch.Tensor], owner: torch.Tensor, units: int,
                     reduction: str) -> None:
    """Replace each parameter's per-record gradients (R, ...) by per-patient ones
    (`units`, ...): row u is the sum (or mean) of the rows whose `owner` is u. Opacus's
    optimizer then clips each patient's row to C, as it would clip a record's."""
    counts = torch.bincount(owner, minlength=units).clamp(min=1)
    for p in params:
        rows = p.grad_sample
        grouped = torch.zeros((units, *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
        grouped.index_add_(0, owner.to(rows.device), rows)
        if reduction == "mean":
            grouped /= counts.to(rows.device).view(-1, *([1] * (rows.dim() - 1)))
        p.grad_sample = grouped


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
                  canaries: GradientCanaries | None = None,
                  patients: Patients | None = None) -> TrainStats:
    """`step.steps` DP-SGD steps on `model`; each step is recorded in `accountant`.
    `public_size`: the training-set size the site states (a noisy count, in its unit);
    the noisy sum is divided by q times it, so the update's scale does not reveal the
    exact n. `patients`: sample and clip patients, not records (patient-level DP).

    The model's trainable parameters change in place. Per-sample gradient hooks are
    removed before returning, so the model can be wrapped again next round.
    """
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    n = len(patients) if patients is not None else len(data)
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
            if patients is None:
                losses.append(private_batch(gsm, optimizer, data, sampled, chunk_size,
                                            device, canaries))
                examples += len(sampled)
            else:
                groups = [patients.pick(u, generator) for u in sampled]
                losses.append(private_batch(gsm, optimizer, data, groups, chunk_size,
                                            device, canaries, patients.reduction))
                examples += sum(map(len, groups))
            if progress:
                progress(k + 1, losses[-1])
    finally:
        gsm._close()  # remove hooks and per-sample buffers; model stays as it is
    return TrainStats(_mean(losses), step.steps, examples, empty)


def private_batch(gsm, optimizer, data: Rows, rows: Sequence[int] | Sequence[Sequence[int]],
                  chunk_size: int, device: torch.device,
                  canaries: GradientCanaries | None = None,
                  reduction: str | None = None) -> float:
    """One DP-SGD step on the sampled `rows`, run as chunks; returns the mean loss per
    record. With `reduction` ("sum" or "mean"), `rows` holds each sampled patient's
    rows: a chunk holds whole patients, and their records' per-sample gradients are
    grouped into one row per patient before clipping.

    Every chunk but the last only clips and accumulates (a skipped "virtual" step);
    the last adds noise once, scales by the expected batch size, and steps.
    """
    if reduction is None:
        pieces, owners = data.pieces(rows, chunk_size), None
    else:  # token rows: patients in order of their longest note, for less padding
        if isinstance(data, Encoded):
            rows = sorted(rows, key=lambda group: max(len(data.ids[i]) for i in group))
        pieces, owners = patient_pieces(rows, chunk_size)
    total, count = 0.0, 0
    for j, piece in enumerate(pieces):
        loss = _forward_loss(gsm, data, piece, device)
        loss.backward()
        if canaries is not None:
            canaries.plant(optimizer.params, piece, optimizer.max_grad_norm)
        if owners is not None:
            group_by_patient(optimizer.params, owners[j], int(owners[j].max()) + 1, reduction)
        total += loss.detach().item() * len(piece)
        count += len(piece)
        optimizer.signal_skip_step(do_skip=j < len(pieces) - 1)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return total / count


def patient_pieces(groups: Sequence[Sequence[int]], size: int
                   ) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Chunks of whole patients (about `size` rows each; a patient with more rows is a
    chunk alone) and, per chunk, each row's patient within the chunk (0, 1, ...)."""
    pieces, owners, piece, owner = [], [], [], []
    for group in groups:
        if piece and len(piece) + len(group) > size:
            pieces.append(piece)
            owners.append(torch.tensor(owner))
            piece, owner = [], []
        unit = owner[-1] + 1 if owner else 0
        piece += list(group)
        owner += [unit] * len(group)
    if piece:
        pieces.append(piece)
        owners.append(torch.tensor(owner))
    return pieces, owners


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
