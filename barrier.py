"""Entropy-barrier weighting of the flow-matching loss (Eisbach).

From the DiT's velocity prediction v̂ (B, C, T), detached, each item gets a weight from how its energy is spread
over the valid frames: a prediction whose energy sits in a few frames (low temporal entropy, structured) keeps
nearly its full loss; one spread evenly over time (entropy near the maximum, flat) is damped. The weight is a log
barrier on the normalised entropy, w = exp(−λ·φ) = (1 − Ĥ + 1e-6)^λ, so λ = 0 is exactly the plain masked MSE.

Axes: B batch, C latent channels, T frames. `mask` (B, T) marks the valid frames; each item needs at least one.
The same function runs eagerly or through torch.compile (`fused=True`): one fused kernel on GPU, one C++ loop on
CPU, compiled once for every B, T and λ (shapes are dynamic, λ and τ are 0-d tensors, log T is a tensor op).
"""
import warnings

import torch


def frame_energy(v):
    # e[b,t] = mean_c v̂[b,c,t]²
    return v.square().mean(1)                                           # (B, T)


def temporal_distribution(e, mask, tau):
    # p[b,·] = softmax over the valid t of log(e + 1e-8)/τ   (τ = 1: p = each frame's share of the energy)
    return ((e + 1e-8).log() / tau).masked_fill(~mask, float("-inf")).softmax(-1)  # (B, T)


def normalized_entropy(p, mask):
    # Ĥ[b] = −Σ_t p·log p / log T_valid[b]   (0·log 0 = 0; clamped to [0, 1] against rounding)
    H = -torch.special.xlogy(p, p).sum(-1) / mask.sum(-1).to(p.dtype).log().clamp_min(1e-8)
    return H.clamp(0, 1)                                                # (B,)


def log_barrier(H):
    # φ[b] = −log(1 − Ĥ[b] + 1e-6)
    return -(1 - H + 1e-6).log()                                        # (B,)


def barrier_weight(phi, lam):
    # w[b] = exp(−λ·φ[b]) = (1 − Ĥ[b] + 1e-6)^λ
    return torch.exp(-lam * phi)                                        # (B,)


def masked_mse(pred, target, mask):
    # MSE[b] = mean over the valid (c, t) of (pred − target)²   (where(): padded frames may hold anything)
    se = torch.where(mask[:, None, :], (pred.float() - target.float()).square(), 0.0)
    return se.sum((1, 2)) / (mask.sum(-1) * pred.shape[1])              # (B,)


def _barrier_loss(pred, target, mask, lam, tau):
    v = pred.detach().float()                                           # v̂: the weight carries no gradient
    H = normalized_entropy(temporal_distribution(frame_energy(v), mask, tau), mask)
    w = barrier_weight(log_barrier(H), lam)
    # L = mean_b w[b]·MSE[b]
    return (w * masked_mse(pred, target, mask)).mean(), H, w


_fused_loss = torch.compile(_barrier_loss, dynamic=True)  # compiled on its first call
_fused_ok = True  # False after a failed compile, so it is tried once


def barrier_loss(pred, target, mask, lam=0.5, tau=1.0, fused=False):
    """Entropy-barrier weighted masked MSE. pred, target (B, C, T); mask (B, T), True = valid frame.
    Returns (loss, Ĥ (B,), w (B,)); Ĥ and w are detached, for logging."""
    global _fused_ok
    B, C, T = pred.shape
    if target.shape != pred.shape or mask.shape != (B, T):
        raise ValueError(f"barrier_loss: target {tuple(target.shape)}, mask {tuple(mask.shape)}; "
                         f"expected target {(B, C, T)} and mask {(B, T)} for pred {(B, C, T)}")
    args = (pred, target, mask.bool(), torch.as_tensor(lam, dtype=torch.float32, device=pred.device),
            torch.as_tensor(tau, dtype=torch.float32, device=pred.device))
    if fused and _fused_ok:
        try:
            return _fused_loss(*args)
        except Exception as e:  # no C++ compiler, unsupported platform, ...: the same math runs eagerly
            _fused_ok = False
            warnings.warn(f"barrier_loss: torch.compile failed ({type(e).__name__}); using the eager path")
    return _barrier_loss(*args)
