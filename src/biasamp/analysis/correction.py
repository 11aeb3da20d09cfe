"""Correcting rho_model for the oracle's own errors.

A trained oracle's confusion is measured on labelled real held-out data as counts N[i, j] = number of samples
with true value i predicted as j (rows true, columns predicted). Its row-normalised form C[i, j] =
P(pred j | true i) links the true value distribution p of a class's generated samples to the expected
distribution of the oracle's predictions: q = p @ C. Given observed prediction counts, the corrected p is the
maximum-likelihood p on the probability simplex (multinomial likelihood of the observations under q = p @ C).
When C is invertible and the naive solution p = q_obs C^-1 lies in the simplex, that is the MLE; otherwise
the MLE lies on the simplex boundary. It is found by EM (multiplicative updates, which stay on the simplex
and raise the likelihood) finished by an active-set Newton method, which lands on the KKT point exactly where
EM alone would crawl towards the boundary; plain EM is the fallback should Newton fail.

In meta.json the confusion is stored per attribute as ``{"<attribute>": {"labels": [...], "counts": [[...]]}}``;
``confusion_counts_for`` turns that into the square count array in a given value order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from biasamp.analysis.estimates import _aligned_counts, class_value_matrix
from biasamp.analysis.intervals import check_level, check_n_boot

# EM stopping rule (largest change of any p_i in one step) and step cap
EM_TOL = 1e-12
EM_MAX_ITER = 20000
EM_WARM = 50  # EM steps before the active-set Newton finish
NEWTON_SUPPORT = 1e-9  # components above this after EM span the face that Newton solves on
NEWTON_MAX_ITER = 50
KKT_TOL = 1e-9


def _as_counts(counts: Any, name: str = "confusion counts") -> np.ndarray:
    arr = np.asarray(counts, dtype=float)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] < 1:
        raise ValueError(f"{name} must be a square (V, V) array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"{name} must be finite and non-negative")
    return arr


def confusion_matrix(counts: Any) -> np.ndarray:
    """Row-normalised confusion C[i, j] = P(pred j | true i) from counts N[i, j] (rows true values).

    A row with no samples (a true value never seen) has no estimate: ValueError.
    """
    arr = _as_counts(counts)
    totals = arr.sum(axis=1)
    empty = np.flatnonzero(totals <= 0)
    if empty.size:
        raise ValueError(f"confusion counts: row(s) {empty.tolist()} (true value) have no samples")
    return arr / totals[:, None]


def confusion_counts_for(confusion: Mapping[str, Any], attribute: str | None, value_names: Sequence[str]
                         ) -> np.ndarray:
    """The (V, V) count array for ``attribute`` from the meta.json confusion format, in ``value_names`` order.

    ``confusion`` is either the whole per-attribute mapping or one attribute's ``{"labels", "counts"}`` entry.
    Labels must be exactly the value names (in any order).
    """
    entry = confusion
    if "counts" not in entry:
        if attribute is None or attribute not in confusion:
            raise ValueError(f"confusion has no entry for attribute {attribute!r}; has {list(confusion)}")
        entry = confusion[attribute]
    counts = _as_counts(entry["counts"])
    labels = [str(v) for v in entry.get("labels", value_names)]
    wanted = [str(v) for v in value_names]
    if sorted(labels) != sorted(wanted) or len(labels) != counts.shape[0]:
        raise ValueError(f"confusion labels {labels} do not match value_names {wanted}")
    order = [labels.index(v) for v in wanted]
    return counts[np.ix_(order, order)]


def _gradient(p: np.ndarray, conf: np.ndarray, q_obs: np.ndarray) -> np.ndarray:
    """d/dp_i of the mean log-likelihood sum_j q_obs_j log (p @ C)_j; equals 1 on the support at the MLE."""
    pred = np.einsum("bi,bij->bj", p, conf)
    ratio = np.divide(q_obs, pred, out=np.zeros_like(q_obs), where=pred > 0)
    return np.einsum("bij,bj->bi", conf, ratio)


def _em(p: np.ndarray, conf: np.ndarray, q_obs: np.ndarray, tol: float, max_iter: int
        ) -> tuple[np.ndarray, np.ndarray]:
    """EM steps p_i <- p_i * gradient_i until no p_i moves by more than ``tol``; (p, converged per item)."""
    p = p.copy()
    active = np.arange(p.shape[0])
    for _ in range(int(max_iter)):
        if active.size == 0:
            break
        pa = p[active]
        new = pa * _gradient(pa, conf[active], q_obs[active])
        new /= new.sum(axis=1, keepdims=True)
        p[active] = new
        active = active[np.abs(new - pa).max(axis=1) > tol]
    done = np.ones(p.shape[0], dtype=bool)
    done[active] = False
    return p, done


def _loglik(p: np.ndarray, conf: np.ndarray, q_obs: np.ndarray) -> np.ndarray:
    """Mean log-likelihood sum_j q_obs_j log (p @ C)_j per item (-inf where an observation is impossible)."""
    pred = np.einsum("bi,bij->bj", p, conf)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(q_obs > 0, q_obs * np.log(np.where(pred > 0, pred, np.nan)), 0.0)
    return np.where(np.isnan(terms).any(axis=1), -np.inf, terms.sum(axis=1))


def _active_set_newton(p: np.ndarray, conf: np.ndarray, q_obs: np.ndarray, support: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Maximise the likelihood over the simplex by a primal active-set method with damped Newton steps.

    Starts from the feasible ``p`` restricted to ``support`` (a face of the simplex). Each step is the Newton
    step within the current face (sum p = 1, p_i = 0 off it), cut where a component would turn negative (that
    component then leaves the face) and halved while the likelihood would fall. Once converged on a face, the
    zero component with the largest gradient above 1 (a violated KKT condition) joins the face. Returns
    (p, ok); ok where it stopped at a KKT point, which by concavity is the MLE.
    """
    b, v = p.shape
    support = support.copy()
    p = np.where(support, p, 0.0)
    p = p / p.sum(axis=1, keepdims=True)
    ok = np.zeros(b, dtype=bool)
    eye = np.eye(v, dtype=bool)
    active = np.arange(b)
    for _ in range(NEWTON_MAX_ITER):
        if active.size == 0:
            break
        pa, ca, qa, sa = p[active], conf[active], q_obs[active], support[active]
        pred = np.einsum("bi,bij->bj", pa, ca)
        ratio = np.divide(qa, pred, out=np.zeros_like(qa), where=pred > 0)
        inv_pred = np.divide(1.0, pred, out=np.zeros_like(qa), where=pred > 0)
        grad = np.einsum("bij,bj->bi", ca, ratio)
        hess = -np.einsum("bij,bkj,bj->bik", ca, ca, ratio * inv_pred)
        # the step on the face: [H 1_S; 1_S' 0] [d; nu] = [-g_S; 0], d_i = 0 off the face
        m = np.zeros((active.size, v + 1, v + 1))
        m[:, :v, :v] = np.where(sa[:, :, None] & sa[:, None, :], hess, 0.0) + (eye & ~sa[:, :, None])
        m[:, :v, v] = sa
        m[:, v, :v] = sa
        rhs = np.zeros((active.size, v + 1))
        rhs[:, :v] = np.where(sa, -grad, 0.0)
        d = np.where(sa, np.einsum("bij,bj->bi", np.linalg.pinv(m), rhs)[:, :v], 0.0)
        # longest step keeping p >= 0, and the component that blocks it
        with np.errstate(divide="ignore", invalid="ignore"):
            room = np.where(sa & (d < 0), pa / -d, np.inf)
        blocker = room.argmin(axis=1)
        t_max = room.min(axis=1)
        step = np.minimum(1.0, t_max)
        base = _loglik(pa, ca, qa)
        for _ in range(40):
            worse = ~(_loglik(pa + step[:, None] * d, ca, qa) >= base - 1e-15)
            if not worse.any():
                break
            step = np.where(worse, step / 2, step)
        new = pa + step[:, None] * d
        blocked = step >= t_max  # the full allowed step was taken and it reached the boundary
        rows = np.flatnonzero(blocked)
        new[rows, blocker[rows]] = 0.0
        sa[rows, blocker[rows]] = False
        new = np.clip(new, 0.0, None)
        new /= new.sum(axis=1, keepdims=True)
        p[active] = new
        # converged on its face: stop if KKT holds off the face, else free the worst violator
        still = np.abs(step[:, None] * d).max(axis=1) > 1e-13
        still |= blocked
        pred = np.einsum("bi,bij->bj", new, ca)
        grad = np.einsum("bij,bj->bi", ca, np.divide(qa, pred, out=np.zeros_like(qa), where=pred > 0))
        excess = np.where(sa, -np.inf, grad - 1.0)
        worst = excess.argmax(axis=1)
        violated = ~still & (excess.max(axis=1) > KKT_TOL)
        rows = np.flatnonzero(violated)
        sa[rows, worst[rows]] = True
        support[active] = sa
        finished = ~still & ~violated
        ok[active[finished]] = True
        active = active[~finished]
    return p, ok


def _batch_mle(observed: np.ndarray, conf: np.ndarray, tol: float = EM_TOL, max_iter: int = EM_MAX_ITER
               ) -> np.ndarray:
    """Simplex-constrained MLE of p for a batch: observed (B, V) prediction counts, conf (B, V, V) row-stochastic.

    Per item: the inverse solution where it is feasible and exact; else EM_WARM EM steps (multiplicative
    updates p_i <- p_i * sum_j q_obs_j C_ij / (p @ C)_j, which keep p on the simplex and increase the
    likelihood) from the clipped inverse solution, then active-set Newton to the KKT point; where that fails,
    EM to convergence. Items with no usable observation give NaN.
    """
    observed = np.asarray(observed, dtype=float)
    conf = np.asarray(conf, dtype=float)
    b, v = observed.shape
    # predictions no true value can produce (a zero column of C) carry no information on p: drop them
    explainable = conf.sum(axis=1) > 0  # (B, V) over predicted values
    obs = np.where(explainable, observed, 0.0)
    totals = obs.sum(axis=1)
    out = np.full((b, v), np.nan)
    live = totals > 0
    if not np.any(live):
        return out
    q_obs = np.zeros_like(obs)
    q_obs[live] = obs[live] / totals[live, None]

    p_inv = np.einsum("bj,bji->bi", q_obs, np.linalg.pinv(conf))
    resid = np.abs(np.einsum("bi,bij->bj", p_inv, conf) - q_obs).max(axis=1)
    exact = live & (p_inv.min(axis=1) >= -1e-12) & (resid <= 1e-9)
    p_ok = np.clip(p_inv[exact], 0.0, None)
    out[exact] = p_ok / p_ok.sum(axis=1, keepdims=True)

    todo = np.flatnonzero(live & ~exact)
    if todo.size == 0:
        return out
    # start: the clipped inverse mixed with uniform, strictly inside the simplex (EM never revives a zero)
    start = np.clip(np.nan_to_num(p_inv[todo], nan=0.0), 0.0, None)
    sums = start.sum(axis=1, keepdims=True)
    start = np.where(sums > 0, start / np.where(sums > 0, sums, 1.0), 1.0 / v)
    p = 0.9 * start + 0.1 / v
    c_t, q_t = conf[todo], q_obs[todo]
    p, _ = _em(p, c_t, q_t, tol, EM_WARM)
    # finish exactly: active-set Newton from the EM iterate, kept where it ends at a KKT point at least as
    # likely as that iterate; elsewhere plain EM goes on from the EM iterate with its zeros revived
    polished, ok = _active_set_newton(p, c_t, q_t, p > NEWTON_SUPPORT)
    better = ok & (_loglik(polished, c_t, q_t) >= _loglik(p, c_t, q_t) - 1e-12)
    p[better] = polished[better]
    rest = np.flatnonzero(~better)
    if rest.size:
        pr = 0.999 * p[rest] + 0.001 / v
        p[rest], _ = _em(pr, c_t[rest], q_t[rest], tol, max_iter)
    out[todo] = p
    return out


def correct_distribution(observed: Any, confusion_counts: Any) -> np.ndarray:
    """Estimated true value distribution p (V,) from observed prediction counts (V,) and confusion counts (V, V).

    Constrained maximum likelihood over the simplex for E[observed] proportional to p @ C, C the row-normalised
    confusion: equal to the naive inverse p = q_obs C^-1 when that is a probability vector, else the MLE on the
    simplex boundary. Always a valid probability vector. No observations: ValueError.
    """
    obs = np.asarray(observed, dtype=float)
    conf = confusion_matrix(confusion_counts)
    if obs.shape != (conf.shape[0],):
        raise ValueError(f"observed has shape {obs.shape}, confusion is {conf.shape}")
    if not np.all(np.isfinite(obs)) or np.any(obs < 0):
        raise ValueError("observed counts must be finite and non-negative")
    p = _batch_mle(obs[None, :], conf[None, :, :])[0]
    if np.any(np.isnan(p)):
        raise ValueError("no observations that the oracle's confusion can explain")
    return p


def rogan_gladen(p_obs: float, sensitivity: float, specificity: float) -> float:
    """Binary prevalence corrected for test error, (p_obs + spec - 1) / (sens + spec - 1), clipped to [0, 1].

    sensitivity = P(pred positive | positive), specificity = P(pred negative | negative); an oracle no better
    than chance (sens + spec <= 1) cannot be corrected: ValueError.
    """
    for name, value in (("p_obs", p_obs), ("sensitivity", sensitivity), ("specificity", specificity)):
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{name}={value!r} must be in [0, 1]")
    youden = float(sensitivity) + float(specificity) - 1.0
    if youden <= 0:
        raise ValueError(f"sensitivity + specificity = {youden + 1:.6g} <= 1: the oracle is no better than chance")
    return float(min(1.0, max(0.0, (float(p_obs) + float(specificity) - 1.0) / youden)))


def corrected_rho(counts: pd.DataFrame, class_names: Sequence[str], value_names: Sequence[str], attribute: str,
                  confusion_counts: Any, level: float = 0.95, n_boot: int = 2000, seed: int = 0,
                  valid_only: bool = False) -> dict[str, Any]:
    """rho_model corrected for oracle error, with a parametric-bootstrap percentile interval.

    ``confusion_counts``: (V, V) counts in ``value_names`` order, or the meta.json confusion mapping.
    Per class c with n_c samples: p_c = correct_distribution(its prediction counts, confusion); rho_corrected =
    sum_c n_c p_c[aligned value of c] / sum_c n_c. The bootstrap redraws both sources of error in each of
    ``n_boot`` seeded replicates: each class row's prediction counts ~ Multinomial(n_c, observed frequencies)
    and each confusion row ~ Multinomial(row total, its observed frequencies), then re-estimates everything.
    Predictions that no true value produced on the labelled data (a zero confusion column) are left out.

    Returns a plain dict: rho_raw, rho_corrected, ci_low, ci_high, n, ci_method ("bootstrap"), ci_level, n_boot,
    seed, and per_class: a list of dicts (class, n, rho_raw, rho_corrected, ci_low, ci_high, p_corrected).
    """
    level = check_level(level)
    n_boot = check_n_boot(n_boot)
    if isinstance(confusion_counts, Mapping):
        confusion_counts = confusion_counts_for(confusion_counts, attribute, value_names)
    n_conf = _as_counts(confusion_counts)
    if not np.all(n_conf == np.round(n_conf)):
        raise ValueError("confusion_counts must be whole counts (the bootstrap redraws them), not rates")
    conf = confusion_matrix(n_conf)
    v = len(value_names)
    if conf.shape != (v, v):
        raise ValueError(f"confusion is {conf.shape}, but {attribute!r} has {v} values")
    m = class_value_matrix(counts, class_names, value_names, attribute, valid_only)
    n_c = m.sum(axis=1)
    aligned_value = np.arange(len(class_names))
    has_own = aligned_value < v  # a class beyond the value list has no aligned value
    raw_aligned = _aligned_counts(m)
    total = int(n_c.sum())
    used = np.flatnonzero(n_c > 0)

    p_hat = np.full((len(class_names), v), np.nan)
    if used.size:
        p_hat[used] = _batch_mle(m[used].astype(float), np.broadcast_to(conf, (used.size, v, v)))
    own_hat = np.where(has_own, p_hat[np.arange(len(class_names)), np.minimum(aligned_value, v - 1)], 0.0)

    # bootstrap: confusion rows and class rows redrawn independently, B replicates at once
    rng = np.random.default_rng(seed)
    row_tot = n_conf.sum(axis=1)
    conf_b = np.stack([rng.multinomial(int(round(row_tot[i])), conf[i], size=n_boot) for i in range(v)], axis=1)
    conf_b = conf_b.astype(float)
    # a redrawn row can only be empty if its total is 0, which confusion_matrix already refused
    conf_b /= conf_b.sum(axis=2, keepdims=True)
    own_b = np.zeros((n_boot, len(class_names)))
    for c in used:
        obs_b = rng.multinomial(int(n_c[c]), m[c] / n_c[c], size=n_boot).astype(float)
        p_b = _batch_mle(obs_b, conf_b)
        if has_own[c]:
            own_b[:, c] = p_b[:, aligned_value[c]]
    alpha = 1.0 - level
    q = [alpha / 2, 1 - alpha / 2]

    per_class = []
    for c, name in enumerate(class_names):
        n = int(n_c[c])
        if n:
            low, high = (float(x) for x in np.nanquantile(own_b[:, c], q))
        else:
            low = high = math.nan
        per_class.append({"class": str(name), "n": n, "rho_raw": int(raw_aligned[c]) / n if n else math.nan,
                          "rho_corrected": float(own_hat[c]) if n else math.nan, "ci_low": low, "ci_high": high,
                          "p_corrected": [float(x) for x in p_hat[c]]})
    if total:
        rho_b = own_b[:, used] @ n_c[used] / total
        low, high = (float(x) for x in np.nanquantile(rho_b, q))
        rho_raw = int(raw_aligned.sum()) / total
        rho_corr = float(own_hat[used] @ n_c[used] / total)
    else:
        low = high = rho_raw = rho_corr = math.nan
    return {"rho_raw": rho_raw, "rho_corrected": rho_corr, "ci_low": low, "ci_high": high, "n": total,
            "ci_method": "bootstrap", "ci_level": level, "n_boot": n_boot, "seed": int(seed),
            "per_class": per_class}
