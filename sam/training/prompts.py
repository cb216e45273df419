"""Prompt simulation for training, as in the SAM paper's interactive training setup.

* The first prompt of a mask is, with equal probability, a foreground point sampled uniformly
  inside the mask, or its box with noise (each coordinate moved by a normal draw whose standard
  deviation is 10% of the box side, at most 20 pixels).
* Then 8 rounds each add a point sampled uniformly from the error region of the previous
  prediction (foreground on a false negative, background on a false positive), and 2 rounds add
  nothing, so the model learns to refine its own mask from the previous logits (given as
  ``mask_input`` every round). One of those 2 is placed at random among the point rounds, the
  other at the end.

Frames: boxes and points are (x, y) in the model-input frame (SAM 1: longest side 1024; SAM 2:
the 1024 square); masks and logits are on the low-res grid (h, w) = the prompt encoder's
``mask_input_size`` (256x256), one cell per `scale` (= 4) model-input pixels.
"""

from __future__ import annotations

import torch

BOX_NOISE_FRACTION = 0.1
BOX_NOISE_MAX = 20.0


def noisy_boxes(boxes: torch.Tensor, generator: torch.Generator, input_size: tuple[int, int],
                fraction: float = BOX_NOISE_FRACTION, max_std: float = BOX_NOISE_MAX) -> torch.Tensor:
    """(B, 4) xyxy boxes -> the same with noise: std `fraction` of the box's width (x) or
    height (y), capped at `max_std` pixels; clipped to the input (h, w) and kept ordered."""
    widths = (boxes[:, 2] - boxes[:, 0]).clamp(min=1.0)
    heights = (boxes[:, 3] - boxes[:, 1]).clamp(min=1.0)
    std = torch.stack([widths, heights, widths, heights], dim=1).mul(fraction).clamp(max=max_std)
    noise = torch.randn(boxes.shape, generator=generator, device=generator.device).to(boxes.device)
    noisy = boxes + noise * std
    height, width = input_size
    limits = torch.tensor([width - 1, height - 1, width - 1, height - 1], dtype=boxes.dtype, device=boxes.device)
    noisy = torch.minimum(noisy.clamp(min=0.0), limits)
    x0, x1 = torch.minimum(noisy[:, 0], noisy[:, 2]), torch.maximum(noisy[:, 0], noisy[:, 2])
    y0, y1 = torch.minimum(noisy[:, 1], noisy[:, 3]), torch.maximum(noisy[:, 1], noisy[:, 3])
    return torch.stack([x0, y0, x1, y1], dim=1)


def sample_cells(regions: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One cell drawn uniformly from each region (B, h, w) bool.

    Returns cells (B, 2) as (x, y) = (column, row) on the grid and `found` (B,) bool (False
    where a region is empty; its cell is then (0, 0))."""
    flat = regions.flatten(1).float()
    found = flat.sum(dim=1) > 0
    weights = torch.where(found[:, None], flat, torch.ones_like(flat))
    index = torch.multinomial(weights.to(generator.device), 1, generator=generator).to(regions.device)[:, 0]
    width = regions.shape[-1]
    cells = torch.stack([index % width, torch.div(index, width, rounding_mode="floor")], dim=1)
    return torch.where(found[:, None], cells, torch.zeros_like(cells)), found


def cells_to_input(cells: torch.Tensor, scale: float) -> torch.Tensor:
    """Grid cells (B, 2) -> (x, y) in the model-input frame: the centre of the cell's
    `scale` x `scale` block of pixels (pixel indices, as SAM's prompt encoder reads them)."""
    return cells.float() * scale + (scale - 1) / 2


def first_points(targets: torch.Tensor, generator: torch.Generator, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A foreground point inside each target (B, 1, h, w): coords (B, 1, 2) in the model-input
    frame and labels (B, 1) (1; -1 for an empty target, which SAM ignores)."""
    cells, found = sample_cells(targets[:, 0] > 0.5, generator)
    labels = torch.where(found, 1, -1).to(torch.int)
    return cells_to_input(cells, scale)[:, None], labels[:, None]


def error_points(logits: torch.Tensor, targets: torch.Tensor, generator: torch.Generator,
                 scale: float, threshold: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A corrective point per object, drawn uniformly from the error region of `logits`
    (B, 1, h, w) against `targets` (B, 1, h, w): label 1 on a false negative, 0 on a false
    positive, -1 (ignored) where the prediction is already exact. Returns coords (B, 1, 2) in the
    model-input frame and labels (B, 1)."""
    truth = targets[:, 0] > 0.5
    predicted = logits[:, 0] > threshold
    cells, found = sample_cells(truth != predicted, generator)
    on_object = truth[torch.arange(len(cells), device=cells.device), cells[:, 1], cells[:, 0]]
    labels = torch.where(found, on_object.to(torch.int), torch.full_like(on_object, -1, dtype=torch.int))
    return cells_to_input(cells, scale)[:, None], labels[:, None]


def round_schedule(num_points: int, num_refine: int, generator: torch.Generator) -> list[bool]:
    """The rounds after the first prompt: True adds an error-region point, False only feeds the
    previous logits back. The last refinement round comes last; the others are placed at random
    among the point rounds."""
    if num_points < 0 or num_refine < 0:
        raise ValueError("num_points and num_refine must be >= 0")
    rounds = [True] * num_points
    for _ in range(max(0, num_refine - 1)):
        position = int(torch.randint(0, len(rounds) + 1, (1,), generator=generator, device=generator.device))
        rounds.insert(position, False)
    if num_refine > 0:
        rounds.append(False)
    return rounds
