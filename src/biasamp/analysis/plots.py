"""Figures of rho_model against the swept sampling settings, and count heatmaps of single jobs.

Every figure is one file per format (PNG and PDF by default), sized for one paper column (``width_in``,
3.4 in by default) with 8 pt text, so it can be placed at 100 % without scaling. Each line is one setting
(the other swept keys held fixed), drawn with its confidence interval as a shaded band (an error bar where a
setting has a single point); reference lines mark rho_data (or y = x); legends sit below the axes, never over
the data. A plot whose x key does not vary in the data is skipped (the function returns []). Sweeps with many
settings are split into several files (one per value of the leading swept key) so that a figure never holds
more than MAX_LINES lines.

Figures are drawn on matplotlib ``Figure`` objects directly (Agg raster, PDF vector output), without pyplot,
so importing this module changes no global backend.
"""

from __future__ import annotations

import io
import itertools
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator
from matplotlib.transforms import offset_copy

from biasamp.analysis.tables import METHOD_NAMES, swept_keys
from biasamp.atomic import atomic_write_bytes
from biasamp.errors import UsageError

FIGURE_FORMATS = ("png", "pdf", "svg")
MAX_LINES = 8
DODGE_PT = 1.5  # sideways shift between neighbouring lines, points
COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")  # Okabe-Ito
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", ":", "-.")
RC = {
    "font.size": 8, "axes.labelsize": 8, "axes.titlesize": 8, "xtick.labelsize": 8, "ytick.labelsize": 8,
    "legend.fontsize": 8, "legend.title_fontsize": 8, "lines.linewidth": 1.2, "lines.markersize": 3.5,
    "axes.linewidth": 0.6, "xtick.major.width": 0.6, "ytick.major.width": 0.6, "xtick.major.size": 2.5,
    "ytick.major.size": 2.5, "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
    "grid.linewidth": 0.4, "grid.alpha": 0.5, "pdf.fonttype": 42, "svg.fonttype": "none",
    "mathtext.default": "regular",
}
RHO_MODEL_LABEL = r"$\rho_\mathrm{model}$ (bias-aligned share)"
RHO_DATA_LABEL = r"$\rho_\mathrm{data}$"
SHORT = {"sampler.num_steps": "N={}", "sampler.s_churn": r"$S_\mathrm{{churn}}$={}", "guidance": "w={}",
         "rho_data": r"$\rho_\mathrm{{data}}$={}", "seed": "seed {}", "sampler.order": "order {}",
         "sampler.eta": r"$\eta$={}", "n_per_class": "n/class={}", "guidance_uncond": "uncond. {}"}


# ------------------------------------------------------------------------------------------- helpers
def _fmt(value: Any) -> str:
    if isinstance(value, float | np.floating):
        return str(int(value)) if float(value).is_integer() else f"{float(value):g}"
    return str(value)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float | np.floating) and math.isnan(value))


def setting_label(row: pd.Series | dict[str, Any], keys: Sequence[str]) -> str:
    """A short legend label for the values of ``keys`` in ``row``, e.g. ``edm heun, N=18, w=1``."""
    parts = []
    for key in keys:
        value = row[key]
        if _missing(value):
            continue
        if key in ("sampler.name", "run", "dataset", "oracle"):
            parts.append(str(value))
        elif key == "sampler.solver":
            parts.append(str(value).capitalize())
        elif key in SHORT:
            parts.append(SHORT[key].format(_fmt(value)))
        else:
            parts.append(f"{key.removeprefix('sampler.')}={_fmt(value)}")
    return ", ".join(parts) if parts else "all settings"


def _distinct(values: pd.Series) -> list[Any]:
    return list(dict.fromkeys(v for v in values if not _missing(v)))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-") or "x"


def check_formats(formats: Sequence[str]) -> list[str]:
    """``formats`` as a list if every one is a figure format matplotlib writes here, else UsageError."""
    if isinstance(formats, str):
        formats = [formats]
    unknown = [f for f in formats if f not in FIGURE_FORMATS]
    if unknown:
        raise UsageError(f"formats={list(formats)!r}: unknown figure format(s) {unknown}; "
                         f"allowed: {list(FIGURE_FORMATS)}")
    return list(formats)


def _save(fig: Figure, stem: Path, formats: Sequence[str], dpi: int) -> list[Path]:
    formats = check_formats(formats)
    paths = []
    for fmt in formats:
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=dpi, bbox_inches="tight", pad_inches=0.03)  # wide legends stay whole
        path = stem.with_name(f"{stem.name}.{fmt}")
        atomic_write_bytes(path, buf.getvalue())
        paths.append(path)
    return paths


def _ci_note(df: pd.DataFrame) -> str:
    level = float(df.attrs.get("ci_level", df["ci_level"].iloc[0] if "ci_level" in df else 0.95))
    method = str(df.attrs.get("ci_method", df["ci_method"].iloc[0] if "ci_method" in df else ""))
    if df.attrs.get("seed_aggregate"):  # analysis.seeds.plot_frame: replicated settings drawn as their mean
        if "ci_method" in df and (df["ci_method"] == "t_seeds").all():
            return f"{100 * level:g}% CI over training seeds"
        return f"{100 * level:g}% CI (over seeds; one model: {METHOD_NAMES.get(method, method)})"
    return f"{100 * level:g}% CI ({METHOD_NAMES.get(method, method)})"


def _styles(groups: list[dict[str, Any]], keys: Sequence[str]) -> list[tuple[str, str, Any]]:
    """(colour, marker, linestyle) per line: with two or more keys, the last key (when it has at most four
    values) sets the line style and the others the colour and marker; otherwise every line has its own colour."""
    last_values = _distinct(pd.Series([g[keys[-1]] for g in groups])) if keys else []
    split = len(keys) >= 2 and len(last_values) <= len(LINESTYLES)
    if split:
        heads = list(dict.fromkeys(tuple(_fmt(g[k]) for k in keys[:-1]) for g in groups))
        out = []
        for g in groups:
            i = heads.index(tuple(_fmt(g[k]) for k in keys[:-1]))
            j = next((n for n, v in enumerate(last_values) if _fmt(v) == _fmt(g[keys[-1]])), 0)
            out.append((COLOURS[i % len(COLOURS)], MARKERS[i % len(MARKERS)], LINESTYLES[j]))
        return out
    return [(COLOURS[i % len(COLOURS)], MARKERS[i % len(MARKERS)], LINESTYLES[(i // len(COLOURS)) % 4])
            for i in range(len(groups))]


def _ticks(ax: Any, values: Sequence[float], axis: str = "x") -> None:
    """Major ticks at the swept values themselves when there are few of them."""
    target = ax.xaxis if axis == "x" else ax.yaxis
    values = sorted(set(float(v) for v in values))
    if len(values) <= 10:
        target.set_major_locator(FixedLocator(values))
        target.set_major_formatter(FuncFormatter(lambda v, _pos: _fmt(float(v))))
        target.set_minor_locator(NullLocator())


def _pad_x(ax: Any, lo: float, hi: float, frac: float = 0.07) -> None:
    """x limits ``frac`` of the span beyond the data on each side, measured in the axis' own scale."""
    scale = ax.xaxis.get_transform()
    a, b = scale.transform([lo, hi])
    pad = frac * (b - a)
    ax.set_xlim(*scale.inverted().transform([a - pad, b + pad]))


# ------------------------------------------------------------------------------------------- line plots
def _line_figure(data: pd.DataFrame, x: str, line_keys: list[str], *, xlabel: str, xscale: str,
                 reference: str, ci_note: str, width_in: float, title: str | None,
                 targets: Sequence[tuple[float, str]] = (), linthresh: float = 0.1) -> Figure:
    groups = []
    for _, g in data.groupby(line_keys, dropna=False, sort=False) if line_keys else [(None, data)]:
        g = g.sort_values(x)
        groups.append({**{k: g[k].iloc[0] for k in line_keys}, "_rows": g})
    styles = _styles(groups, line_keys)
    n_legend = len(groups) + 2
    ncol = 2 if len(groups) > 1 else 1
    legend_rows = math.ceil(n_legend / ncol)
    fig = Figure(figsize=(width_in, 0.68 * width_in + 0.16 * legend_rows + (0.15 if title else 0.0)),
                 layout="constrained")
    ax = fig.add_subplot()
    if xscale == "log":
        ax.set_xscale("log")
    elif xscale == "symlog":
        ax.set_xscale("symlog", linthresh=linthresh, linscale=0.5)
    handles: list[Any] = []
    band_alpha = 0.18 if len(groups) <= 3 else 0.12 if len(groups) <= 6 else 0.08  # many bands: lighter
    for i, (group, (colour, marker, ls)) in enumerate(zip(groups, styles, strict=True)):
        g = group["_rows"]
        xs, ys = g[x].to_numpy(float), g["rho_model"].to_numpy(float)
        lo, hi = g["ci_low"].to_numpy(float), g["ci_high"].to_numpy(float)
        # lines dodged sideways by a few points (display space) so that equal values stay visible
        dodge = offset_copy(ax.transData, fig=fig, x=DODGE_PT * (i - (len(groups) - 1) / 2), y=0.0, units="points")
        (line,) = ax.plot(xs, ys, color=colour, marker=marker, ls=ls, label=setting_label(group, line_keys),
                          zorder=3, transform=dodge)
        if len(g) > 1:  # the band moves with its line (drawn in data space first, so that it sets the limits)
            band = ax.fill_between(xs, lo, hi, color=colour, alpha=band_alpha, lw=0, zorder=2)
            band.set_transform(dodge)
        else:
            ax.errorbar(xs, ys, yerr=[ys - lo, hi - ys], fmt="none", ecolor=colour, elinewidth=0.8, capsize=2,
                        zorder=2, transform=dodge)
        handles.append(line)
    if reference == "identity":
        lo_x, hi_x = float(data[x].min()), float(data[x].max())
        ax.plot([lo_x, hi_x], [lo_x, hi_x], color="0.35", ls=(0, (4, 2)), lw=0.9, zorder=1)
        handles.append(Line2D([], [], color="0.35", ls=(0, (4, 2)), lw=0.9,
                              label=r"$\rho_\mathrm{model} = \rho_\mathrm{data}$"))
    else:
        for value in _distinct(data["rho_data"]):
            ax.axhline(float(value), color="0.35", ls=(0, (4, 2)), lw=0.9, zorder=1)
        handles.append(Line2D([], [], color="0.35", ls=(0, (4, 2)), lw=0.9,
                              label=RHO_DATA_LABEL + " (training data)"))
    for value, _ in targets:  # e.g. a steering target's aligned share
        ax.axhline(float(value), color="0.15", ls=":", lw=1.1, zorder=1)
    if targets:
        handles.append(Line2D([], [], color="0.15", ls=":", lw=1.1,
                              label="; ".join(f"{label} {value:g}" for value, label in targets)))
    handles.append(Patch(facecolor="0.5", alpha=0.3, lw=0, label=ci_note))

    _ticks(ax, data[x].to_numpy(float))
    _pad_x(ax, float(data[x].min()), float(data[x].max()))
    y_lo, y_hi = ax.get_ylim()
    ax.set_ylim(max(y_lo, -0.02), min(y_hi, 1.02))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(RHO_MODEL_LABEL)
    if title:
        ax.set_title(title)
    fig.legend(handles=handles, loc="outside lower center", ncol=ncol, frameon=False, handlelength=2.2,
               columnspacing=1.0, handletextpad=0.5, borderaxespad=0.2)
    return fig


def _line_plot(df: pd.DataFrame, x: str, stem: str, out_dir: str | Path, *, xlabel: str, xscale: str,
               reference: str = "rho_data", prefer: Sequence[str] = (), formats: Sequence[str] = ("png", "pdf"),
               width_in: float = 3.4, dpi: int = 200, targets: Sequence[tuple[float, str]] = (),
               linthresh: float = 0.1) -> list[Path]:
    if x not in df.columns:
        return []
    data = df[df[x].notna() & df["rho_model"].notna()]
    if len(_distinct(data[x])) < 2:
        return []
    keys = swept_keys(data, first=(x, "rho_data"))
    line_keys = [k for k in keys if k != x]
    # too many lines: split into one file per value of the keys the plot is least about (then the others)
    movable = [k for k in line_keys if k not in prefer] + [k for k in line_keys if k in prefer]
    panel_keys: list[str] = []
    while len(line_keys) > 1 and len(data.groupby(line_keys, dropna=False)) > MAX_LINES:
        panel_keys.append(movable.pop(0))
        line_keys.remove(panel_keys[-1])
    panels = data.groupby(panel_keys, dropna=False, sort=True) if panel_keys else [((), data)]
    out_dir = Path(out_dir)
    paths: list[Path] = []
    with mpl.rc_context(RC):
        for _, panel in panels:
            title = None
            name = stem
            if panel_keys:
                first = panel.iloc[0]
                title = setting_label(first, panel_keys)
                name += "__" + "_".join(f"{_slug(k.removeprefix('sampler.'))}-{_slug(_fmt(first[k]))}"
                                        for k in panel_keys)
            if len(_distinct(panel[x])) < 2:
                continue
            fig = _line_figure(panel, x, line_keys, xlabel=xlabel, xscale=xscale, reference=reference,
                               ci_note=_ci_note(df), width_in=width_in, title=title, targets=targets,
                               linthresh=linthresh)
            paths += _save(fig, out_dir / name, formats, dpi)
    return paths


def plot_rho_vs_rho_data(df: pd.DataFrame, out_dir: str | Path, **kw: Any) -> list[Path]:
    """rho_model (CI band) against rho_data, one line per setting, with the line y = x (no amplification).
    Skipped unless rho_data takes more than one value. ``kw``: formats, width_in, dpi."""
    return _line_plot(df, "rho_data", "rho_vs_rho_data", out_dir, reference="identity", xscale="linear",
                      xlabel=r"$\rho_\mathrm{data}$ (share of bias-aligned training images)", **kw)


def plot_rho_vs_steps(df: pd.DataFrame, out_dir: str | Path, **kw: Any) -> list[Path]:
    """rho_model against the number of sampling steps N (log x), one line per remaining setting (solver,
    churn, sampler, guidance, ...), with a line at rho_data. Skipped unless N varies."""
    return _line_plot(df, "sampler.num_steps", "rho_vs_steps", out_dir, xscale="log",
                      prefer=("sampler.name", "sampler.solver", "sampler.s_churn"),
                      xlabel="sampling steps N (log scale)", **kw)


def plot_rho_vs_churn(df: pd.DataFrame, out_dir: str | Path, **kw: Any) -> list[Path]:
    """rho_model against EDM's stochasticity S_churn (0 = deterministic ODE), one line per remaining setting,
    with a line at rho_data. Skipped unless S_churn varies."""
    return _line_plot(df, "sampler.s_churn", "rho_vs_churn", out_dir, xscale="linear",
                      prefer=("sampler.solver", "sampler.num_steps"),
                      xlabel=r"stochasticity $S_\mathrm{churn}$ (0 = deterministic)", **kw)


def plot_rho_vs_guidance(df: pd.DataFrame, out_dir: str | Path, **kw: Any) -> list[Path]:
    """rho_model against the guidance scale w on a symlog x axis (linear below 0.1, so w = 0 shows), one
    line per sampler and step count (and other swept keys), with a line at rho_data. Skipped unless w varies."""
    return _line_plot(df, "guidance", "rho_vs_guidance", out_dir, xscale="symlog",
                      prefer=("sampler.name", "sampler.solver", "sampler.num_steps"),
                      xlabel="guidance scale w (0 = none; symlog scale)", **kw)


def plot_rho_vs_scale(df: pd.DataFrame, out_dir: str | Path, **kw: Any) -> list[Path]:
    """Dose-response of h-space steering: rho_model against the steering scale (symlog; scale 0 = the unsteered
    sampler), one line per target and other swept keys, with lines at rho_data and at each target's aligned share
    (``target_aligned``: the class mean of the target's share of each class's aligned value). Skipped unless a
    steered job is in ``df``."""
    from biasamp.analysis.steering import dose_response_frame

    data = dose_response_frame(df)
    if data.empty:
        return []
    targets = []
    if "target_aligned" in data.columns:
        for label, value in data.groupby("steer_target")["target_aligned"].first().items():
            if pd.notna(value) and str(label) != "data":  # the data target is the rho_data line
                targets.append((float(value), f"target {label}"))
    positive = data.loc[data["steer_scale"] > 0, "steer_scale"]
    return _line_plot(data, "steer_scale", "rho_vs_steer_scale", out_dir, xscale="symlog",
                      prefer=("sampler.name", "sampler.solver", "sampler.num_steps"),
                      xlabel="steering scale (0 = unsteered; symlog scale)", targets=targets,
                      linthresh=float(positive.min()) if len(positive) else 0.1, **kw)


LINE_PLOTS = (plot_rho_vs_rho_data, plot_rho_vs_steps, plot_rho_vs_churn, plot_rho_vs_guidance)


# ------------------------------------------------------------------------------------------- heatmap
def count_matrix(counts: pd.DataFrame, rows: Sequence[str], values: Sequence[str], attribute: str) -> np.ndarray:
    """Counts of (row, value) for ``attribute`` (valid and invalid samples summed, other attributes summed out)."""
    table = counts.assign(_row=counts["class"].astype(str), _value=counts[attribute].astype(str))
    wide = table.groupby(["_row", "_value"])["count"].sum().unstack("_value")
    wide = wide.reindex(index=[str(r) for r in rows], columns=[str(v) for v in values]).fillna(0)
    return wide.to_numpy(np.int64)


def plot_count_heatmap(counts: pd.DataFrame, class_names: Sequence[str], value_names: Sequence[str],
                       attribute: str, out_stem: str | Path, title: str | None = None,
                       formats: Sequence[str] = ("png", "pdf"), width_in: float = 3.4, dpi: int = 200) -> list[Path]:
    """Class x bias-value counts of one job (counts.csv layout), each cell annotated with its count and
    coloured by its share of the row; aligned cells (class k, value k) are outlined. Valid and invalid samples
    are summed, as in rho_model. The unconditional row,
    when sampled, comes last below a rule. Writes ``out_stem.<fmt>``; [] when there are no counts."""
    if counts.empty or attribute not in counts.columns:
        return []
    rows = [str(c) for c in class_names]
    if (counts["class"].astype(str) == "uncond").any():
        rows.append("uncond")
    m = count_matrix(counts, rows, value_names, attribute)
    if m.sum() == 0:
        return []
    totals = m.sum(axis=1, keepdims=True)
    share = np.divide(m, totals, out=np.zeros(m.shape), where=totals > 0)
    n_rows, n_cols = m.shape
    label_w = 0.45 + 0.05 * max(len(r) for r in rows)
    cell = min((width_in - label_w - 0.75) / n_cols, 0.32)
    longest = max(len(str(v)) for v in value_names)
    rotate = n_cols > 4 and longest > 3
    height = n_rows * cell + 0.55 + (0.05 * longest if rotate else 0.15) + (0.2 if title else 0.0)
    text_size = 8 if n_cols <= 6 else 6.5
    with mpl.rc_context({**RC, "axes.grid": False, "axes.spines.top": True, "axes.spines.right": True}):
        fig = Figure(figsize=(width_in, max(height, 1.4)), layout="constrained")
        ax = fig.add_subplot()
        image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
        for i, j in itertools.product(range(n_rows), range(n_cols)):
            ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=text_size,
                    color="white" if share[i, j] > 0.6 else "black")
        for k in range(min(len(class_names), n_cols)):
            ax.add_patch(Rectangle((k - 0.44, k - 0.44), 0.88, 0.88, fill=False, ec="#D55E00", lw=1.5))
        if rows[-1] == "uncond":
            ax.axhline(n_rows - 1.5, color="black", lw=0.8)
        ax.set_xticks(range(n_cols), [str(v) for v in value_names], rotation=45 if rotate else 0,
                      ha="right" if rotate else "center", rotation_mode="anchor")
        ax.set_yticks(range(n_rows), rows)
        ax.tick_params(length=0)
        ax.set_xlabel(f"{attribute} (oracle's call; outlined: bias-aligned)")
        ax.set_ylabel("class label")
        if title:
            ax.set_title(title)
        bar = fig.colorbar(image, ax=ax, fraction=0.06, pad=0.02, aspect=15)
        bar.set_label("share of the row")
        bar.ax.tick_params(length=2)
        return _save(fig, Path(out_stem), formats, dpi)
