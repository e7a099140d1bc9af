"""Independent numpy transcriptions of what tfmet computes, to check its values against."""

import math

import numpy as np


def numpy_gem(features, p=3.0, eps=1e-6, normalize=True):
    """GeM over H, W of [B, H, W, C] in float64: (mean max(x, eps)^p)^(1/p), then L2 per row."""
    pooled = (np.maximum(np.asarray(features, np.float64), eps) ** p).mean((1, 2)) ** (1 / p)
    if normalize:
        pooled = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    return pooled


def numpy_torch_bilinear(image, scale):
    """PyTorch upsample_bilinear2d (align_corners=False, scale_factor given), pixel by pixel."""
    h, w, c = image.shape
    oh, ow = int(math.floor(h * scale)), int(math.floor(w * scale))
    inv = np.float32(1.0 / scale)
    out = np.zeros((oh, ow, c), np.float32)
    for y in range(oh):
        sy = max(np.float32(inv * np.float32(y + 0.5) - np.float32(0.5)), np.float32(0))
        y0 = int(sy)
        y1 = y0 + (1 if y0 < h - 1 else 0)
        ly = np.float32(sy - y0)
        for x in range(ow):
            sx = max(np.float32(inv * np.float32(x + 0.5) - np.float32(0.5)), np.float32(0))
            x0 = int(sx)
            x1 = x0 + (1 if x0 < w - 1 else 0)
            lx = np.float32(sx - x0)
            out[y, x] = (1 - ly) * ((1 - lx) * image[y0, x0] + lx * image[y0, x1]) + ly * (
                (1 - lx) * image[y1, x0] + lx * image[y1, x1]
            )
    return out


def rule_by_loop(similarities, labels, num_classes, tau):
    """Independent per-query loop: dict of per-label max from 0, log-sum-exp over N classes."""
    preds, confs = [], []
    for sims, labs in zip(similarities, labels, strict=True):
        best = {}
        for s, label in zip(sims, labs, strict=True):
            best[int(label)] = max(best.get(int(label), 0.0), float(s))
        top = max(best.values())
        pred = min(label for label, s in best.items() if s == top)
        logits = [tau * s for s in best.values()] + [0.0] * (num_classes - len(best))
        log_denominator = np.logaddexp.reduce(np.array(logits))
        preds.append(pred)
        confs.append(math.exp(tau * top - log_denominator))
    return np.array(preds), np.array(confs)


def unit(x):
    """Rows of `x` scaled to unit L2 norm, as float32."""
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(seed, n, d, clusters, noise):
    """`n` unit vectors around `clusters` random centres: (vectors, owner index, centres)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d))
    owner = rng.integers(0, clusters, n)
    return unit(centres[owner] + noise * rng.normal(size=(n, d))), owner, centres


def brute_force(database, queries, k):
    """Exact inner-product top-k in float64: (top scores, top indices, all scores)."""
    scores = queries.astype(np.float64) @ database.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), order, scores


def assert_first_adam_step_of_decay_only(before, variables, learning_rate, weight_decay):
    """The first Adam step when the loss gradient is zero and only the decay term `wd * w`
    remains: w - lr * g / (|g| + eps), g = wd * w, written out in float64."""
    for w0, variable in zip(before, variables, strict=True):
        g = weight_decay * w0.astype(np.float64)
        expected = w0 - learning_rate * g / (np.abs(g) + 1e-8)
        np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-5, atol=1e-7)
