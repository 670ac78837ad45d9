"""One self-contained ``report.html``: the diagnostics table with a guide to reading it, then each variant's plots.

Images are embedded as base64 PNG data URIs; the page has no scripts and no external references, so it opens
offline and can be mailed as one file.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from vae_priors.experiments.files import write_text

# Column of diagnostics.csv -> (header shown in the report, how to read it). Columns not listed are shown as is.
COLUMN_HELP: dict[str, tuple[str, str]] = {
    "log_lik": ("test log p(x) ± SE", "held-out log-likelihood per test point (log p(y|x) for conditional pairs), "
                "the PSIS-smoothed importance-sampling estimate with S draws from q; higher is better; "
                "± one standard error over test points"),
    "elbo": ("ELBO", "evidence lower bound per test point; log p(x) - ELBO = E KL(q(z|x) || p(z|x)), the gap the "
             "guide leaves"),
    "mean_kl": ("mean KL", "1/N sum_n KL(q(z|x_n) || p(z)) over the N training points, the rate: nats the code "
                "spends per point"),
    "kl_prior_standard": ("KL(p(z|x)‖N(0,I))", "conditional pairs: how far the x-conditioned prior moves from the "
                          "independent one, mean over test points; 0 for an independent prior"),
    "mutual_info": ("I(x;z)", "mutual information between the training index and z under q = mean KL - "
                    "KL(q_agg || p) (Hoffman & Johnson 2016); 0 = z says nothing about x; at most log N"),
    "log_n": ("log N", "the upper bound of I(x;z) with N training points"),
    "kl_qagg_p": ("KL(q_agg‖p)", "how far the aggregated posterior q_agg(z) = 1/N sum_n q(z|x_n) is from the "
                  "prior; the part of the mean KL that is not information"),
    "kl_p_qagg": ("KL(p‖q_agg)", "the reverse: large when the prior puts mass where no training point is "
                  "encoded (holes), so samples from p(z) decode to something the decoder never learned"),
    "prior_hole_share": ("prior-hole share", "share of draws from p(z) where q_agg's density is below the 1st "
                         "percentile of its density on its own draws (Rosca et al. 2018); about 0.01 when the "
                         "prior matches q_agg, near 1 when prior samples land in holes"),
    "active_units": ("active units", "latent dimensions with Cov_x(E_q[z_d | x]) > 0.01 (Burda et al. 2016) "
                     "out of latent_dim; inactive dimensions have collapsed to the prior"),
    "khat_above": ("k-hat > thr", "share of test points whose importance weights have Pareto k-hat above "
                   "min(1 - 1/log10 S, 0.7): their log p(x) estimate is unreliable (Yao et al. 2018), usually "
                   "a guide narrower than the posterior"),
    "amortization_gap": ("amortization gap", "ELBO of a per-point Gaussian guide fitted to the test points with "
                         "this pair's decoder frozen minus the encoder's ELBO, same points (Cremer et al. 2018)"),
    "fd_prior": ("FD p(z)", "Frechet distance, in a data-set classifier's features, between draws x ~ p(x|z), "
                 "z ~ p(z) and the test split; lower = closer to the data; ± the bootstrap standard error over "
                 "the samples"),
    "fd_q_agg": ("FD q_agg", "the same with z ~ q_agg(z), the exact mixture of training encodings"),
    "fd_gmm": ("FD GMM", "the same with z from a Gaussian mixture fitted to one draw z ~ q(z|x_n) per training point "
               "(Ghosh et al. 2020)"),
    "gen_log_lik_prior": ("log p(x), z ~ p(z)", "held-out log-likelihood of the decoder with z drawn from the prior "
                          "(the pair's own model), on 1000 test points with 100 draws from q as the proposal"),
    "gen_log_lik_q_agg": ("log p(x), z ~ q_agg", "the same generative model with z ~ q_agg instead: higher = "
                          "generating from q_agg fits held-out data better (the findings give the paired difference)"),
    "gen_log_lik_gmm": ("log p(x), z ~ GMM", "the same with z from the GMM fitted to the training encodings"),
    "coverage_prior": ("coverage p(z)", "share of classes predicted for at least 1/(2K) of the samples from "
                       "p(z) (1 = all K classes appear)"),
    "max_prob_prior": ("max prob p(z)", "mean largest class probability of the samples from p(z): how "
                       "recognisable they are"),
}

# For pairs whose prior is p(z|x) the same columns mean something else: these headers and explanations replace
# COLUMN_HELP's in the conditional tables (the unconditional identities do not hold there).
CONDITIONAL_HELP: dict[str, tuple[str, str]] = {
    "log_lik": ("test log p(y|x) ± SE", "held-out log-likelihood of the hidden quadrants y given the visible x per "
                "test point, PSIS-smoothed importance sampling with S draws from q(z|x,y); higher is better"),
    "elbo": ("ELBO", "conditional evidence lower bound per test point"),
    "mean_kl": ("rate E KL(q(z|x,y)‖p(z|x))", "mean over training points of KL(q(z|x_n,y_n) || p(z|x_n)): nats "
                "the code spends beyond what the prior network already predicts from x; 0 for a pair whose guide is "
                "its prior (gsnn)"),
    "mutual_info": ("I(index; z)", "information z carries about the training index n = (x_n, y_n) under q, "
                    "E log q(z|x_n,y_n) - log q_agg(z), direct estimate; includes what p(z|x) already knows from x, "
                    "so it is not the rate; at most log N"),
    "surgery_residual": ("rate - I - KL(q_agg‖p_agg)", "the residual of the unconditional ELBO-surgery identity; "
                         "not 0 for an x-conditioned prior, which is why I(index; z) is not rate - KL"),
    "kl_prior_standard": ("KL(p(z|x)‖N(0,I))", "how far the x-conditioned prior moves from the independent one, "
                          "mean over test points; 0 for an independent prior"),
    "kl_prior_guide": ("KL(p(z|x)‖q(z|x,y))", "mean over test points: large where the prior puts mass the guide "
                       "does not, so predictions (z ~ p(z|x)) decode codes the generation net saw little of"),
    "conditional_hole_share": ("conditional holes", "share of draws z ~ p(z|x_n) whose log q(z|x_n,y_n) is below "
                               "the 1st percentile of log q at its own draws, mean over test points: about 0.01 when "
                               "p(z|x) matches q(z|x,y), near 1 when prediction lands in holes"),
    "kl_qagg_p": ("KL(q_agg‖p_agg) marginal", "a marginal check: q_agg against p_agg(z) = 1/N sum_n p(z|x_n); it "
                  "can be 0 while every conditional differs"),
    "kl_p_qagg": ("KL(p_agg‖q_agg) marginal", "the reverse marginal check"),
}

STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222;line-height:1.4}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}
th{background:#f0f0f0}td:first-child{text-align:left}dt{font-weight:bold;margin-top:.4em}
img{max-width:100%;border:1px solid #eee}figure{margin:1em 0}figcaption{font-size:13px;color:#555}
.note{background:#fff8e0;padding:.4em .8em;border-left:3px solid #e0b000}
table.findings td,table.findings th{text-align:left;vertical-align:top}table.findings{font-size:14px}"""


@dataclass
class Plot:
    title: str
    path: Path
    caption: str = ""


@dataclass
class VariantSection:
    name: str
    description: str
    plots: list[Plot] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _img(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(Path(path).name)}" src="data:image/png;base64,{data}">'


def _figure(plot: Plot) -> str:
    caption = html.escape(plot.title) + (": " + html.escape(plot.caption) if plot.caption else "")
    return f"<figure>{_img(plot.path)}<figcaption>{caption}</figcaption></figure>"


def _fmt(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.3g}" if abs(value) < 1e4 else f"{value:.0f}"
    return html.escape(str(value))


def _help(column: str, conditional: bool) -> tuple[str, str]:
    if conditional and column in CONDITIONAL_HELP:
        return CONDITIONAL_HELP[column]
    return COLUMN_HELP.get(column, (column, ""))


def table_html(table: pd.DataFrame, columns: list[str], conditional: bool = False) -> str:
    """One table: the rows of ``table``, the ``columns`` that exist, each with its SE where it has one."""
    shown = [c for c in columns if c in table.columns and table[c].notna().any()]
    head = "".join(f"<th>{html.escape(_help(c, conditional)[0])}</th>" for c in ["variant", *shown])
    rows = []
    for _, row in table.iterrows():
        cells = [_fmt(row["variant"])]
        for c in shown:
            se = row.get(f"{c}_se")
            shown_se = se is not None and not pd.isna(se) and se > 0  # analytic quantities have SE 0: not shown
            cells.append(_fmt(row[c]) + (f" ± {_fmt(se)}" if shown_se else ""))
        rows.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def legend_html(columns: list[str], conditional: bool = False) -> str:
    items = [f"<dt>{html.escape(_help(c, conditional)[0])}</dt><dd>{html.escape(_help(c, conditional)[1])}</dd>"
             for c in dict.fromkeys(columns) if c in COLUMN_HELP or (conditional and c in CONDITIONAL_HELP)]
    return f"<h3>How to read these tables</h3><dl>{''.join(items)}</dl>"


@dataclass
class TableGroup:
    """A few columns that answer one question, shown for the unconditional or the conditional pairs."""

    title: str
    columns: list[str]
    conditional: bool = False


def tables_html(table: pd.DataFrame, groups: list[TableGroup] | list[str]) -> str:
    """The diagnostics as small tables grouped by question (a table of 18 columns is unreadable), each kind of pair
    with its own headers and legend."""
    if groups and isinstance(groups[0], str):  # one plain list of columns: one table
        return table_html(table, groups) + legend_html(groups)
    parts = []
    for conditional in (False, True):
        rows = table[table["conditional"].astype(bool) == conditional] if "conditional" in table else table
        kind = [g for g in groups if g.conditional == conditional]
        if not len(rows) or not kind:
            continue
        parts.append(f"<h3>{'Conditional pairs p(y|x)' if conditional else 'Unconditional pairs p(x)'}</h3>")
        parts += [f"<h4>{html.escape(g.title)}</h4>" + table_html(rows, g.columns, conditional) for g in kind]
        parts.append(legend_html([c for g in kind for c in g.columns], conditional))
    return "".join(parts)


def findings_html(found: pd.DataFrame) -> str:
    """The findings (``evaluation.comparisons``): one row per question, the sentence first."""
    if found is None or not len(found):
        return ("<p>No question of the collection could be answered from this run: it did not train both variants "
                "of any compared pair (see <code>evaluation/comparisons.py: QUESTIONS</code>).</p>")
    rows = "".join(f"<tr><td>{html.escape(r.question)}</td><td>{html.escape(r.finding)}</td></tr>"
                   for r in found.itertuples())
    return ("<p>Paired differences of the held-out log-likelihood over the same test points, mean ± standard "
            "error over points; 'clear' at 3 SE or more, 'suggestive' at 2-3 SE. The SE covers the choice of "
            "test points, not the training seed.</p>"
            f"<table class='findings'><tr><th>question</th><th>finding</th></tr>{rows}</table>")


def _anchor(name: str) -> str:
    return "v-" + "".join(c if c.isalnum() else "-" for c in name)


def render(title: str, intro: list[str], table: pd.DataFrame, columns: list[str] | list[TableGroup],
           sections: list[VariantSection],
           comparisons: list[Plot] | None = None, found: pd.DataFrame | None = None) -> str:
    """The whole page as an HTML string: findings first, then a table of contents and the rest."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    parts += ["<h2 id='findings'>Findings</h2>", findings_html(found)]
    toc = [("findings", "Findings"), ("about", "About this run"), ("diagnostics", "Diagnostics")]
    toc += [("comparison", "Comparison of variants")] if comparisons else []
    toc += [(_anchor(s.name), s.name) for s in sections]
    parts.append("<nav><h2>Contents</h2><ul>" + "".join(f"<li><a href='#{a}'>{html.escape(t)}</a></li>"
                                                       for a, t in toc) + "</ul></nav>")
    parts.append("<h2 id='about'>About this run</h2>")
    parts += [f"<p>{html.escape(line)}</p>" for line in intro]
    parts += ["<h2 id='diagnostics'>Diagnostics</h2>", tables_html(table, columns)]
    if comparisons:
        parts += ["<h2 id='comparison'>Comparison of variants</h2>", *(_figure(plot) for plot in comparisons)]
    for section in sections:
        parts.append(f"<h2 id='{_anchor(section.name)}'>{html.escape(section.name)}</h2>")
        parts.append(f"<p>{html.escape(section.description)}</p>")
        parts += [f"<p class='note'>{html.escape(note)}</p>" for note in section.notes]
        parts += [_figure(plot) for plot in section.plots]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(path: str | Path, *args, **kwargs) -> Path:
    """``render(...)`` written atomically to ``path``."""
    write_text(path, render(*args, **kwargs))
    return Path(path)
