"""The authors' layout of the regularized loss, for benchmarks: their ``DenseEnergyLossFunction`` copies the
image and the masked probabilities to the host every step, filters on the CPU one class channel at a time
(``bilateralfilter_batch``), keeps ``AS`` on the host, and copies the gradient back to the device in
backward. Same operator and loss as ``RegularizedLoss`` (the serial lattice is the reference the compiled
op is tested against), so a step with this loss computes the same numbers; what differs is where and how
the filter runs. On a GPU the host round trip and the serial CPU filter are what the benchmark shows.
"""

from __future__ import annotations

import torch

from locbe.method.regloss import RegularizedLoss


class _HostGatedRegLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image_255, probs, crop_mask, pseudo_label, weight, sigma_xy, sigma_rgb):
        from locbe.lattice.reference import serial_lattice_filter

        n = probs.shape[0]
        gate = crop_mask - probs.detach().max(dim=1).values
        gate = torch.where(pseudo_label == 255, torch.ones_like(gate), gate).clamp_min(0).unsqueeze(1)
        seg = probs.detach() * crop_mask.unsqueeze(1)
        # host copies, as theirs: images.cpu(), segmentations.cpu(), Gate.cpu()
        seg_h, gate_h, image_h = seg.cpu(), gate.cpu(), image_255.detach().float().cpu()
        a = serial_lattice_filter(image_h, seg_h, sigma_xy, sigma_rgb).to(seg_h.dtype) * gate_h
        loss = -(seg_h * a).sum() / n
        ctx.a_host, ctx.n, ctx.weight = a, n, weight
        ctx.save_for_backward(crop_mask)
        return (weight * loss).to(probs.device)

    @staticmethod
    def backward(ctx, grad_out):
        (crop_mask,) = ctx.saved_tensors
        # theirs: -2 * grad * torch.from_numpy(AS) / N (times the weight applied outside their Function),
        # then .cuda() and the ROI mask on the device
        grad = (-2.0 * ctx.weight * grad_out.cpu() * ctx.a_host / ctx.n).to(crop_mask.device) * crop_mask.unsqueeze(1)
        return None, grad, None, None, None, None, None


class HostRegularizedLoss(RegularizedLoss):
    """``RegularizedLoss`` with the authors' host round trip and per-channel CPU filter (see module docstring);
    the weight multiplies inside the autograd function so that the gradient matches ``RegularizedLoss``."""

    def forward(self, images_255, probs, crop_mask, pseudo_label):
        img, small, mask, label, sigma_xy = self.downsample(images_255, probs, crop_mask, pseudo_label)
        return _HostGatedRegLoss.apply(img, small, mask, label, self.weight, sigma_xy, self.sigma_rgb)
