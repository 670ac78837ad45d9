"""The HTML report: self-contained, escaped, with standard errors only where they are Monte Carlo errors."""

from __future__ import annotations

import base64
import math

import pandas as pd
from matplotlib.figure import Figure

from vae_priors.experiments.reporting import plots
from vae_priors.experiments.reporting.report import Plot, VariantSection, render, table_html


def test_table_shows_standard_errors_only_where_positive_and_escapes_names():
    table = pd.DataFrame([{"variant": "<b>vae</b>", "log_lik": -23.41, "log_lik_se": 0.19, "mean_kl": 3.7,
                           "mean_kl_se": 0.0, "kl_qagg_p": math.nan}])
    page = table_html(table, ["log_lik", "mean_kl", "kl_qagg_p", "not_a_column"])
    assert "-23.4 ± 0.19" in page
    assert "3.7<" in page and "3.7 ±" not in page  # analytic KL: SE 0 is not shown
    assert "&lt;b&gt;vae&lt;/b&gt;" in page and "<b>vae" not in page
    assert "not_a_column" not in page


def test_rendered_page_embeds_the_png_bytes_and_needs_no_network(tmp_path):
    fig = Figure(figsize=(1, 1))
    fig.add_subplot().plot([0, 1])
    path = plots.save_figure(fig, tmp_path / "a.png")
    section = VariantSection("vae", "a VAE", [Plot("line", path, "a caption")], ["refitted guide"])
    page = render("title", ["intro"], pd.DataFrame([{"variant": "vae", "log_lik": -1.0}]), ["log_lik"], [section])
    assert base64.b64encode(path.read_bytes()).decode() in page
    assert "http" not in page and "<script" not in page and "refitted guide" in page


def test_findings_come_first_and_every_contents_link_has_its_target():
    import re

    from vae_priors.experiments.evaluation.comparisons import findings

    found = findings({"vae": [-3.0, -2.0, -1.0, -2.5], "vae-vamp": [-2.0, -1.1, -0.2, -1.4]})
    section = VariantSection("vae-vamp", "a VampPrior VAE")
    page = render("title", ["intro"], pd.DataFrame([{"variant": "vae", "log_lik": -1.0}]), ["log_lik"], [section],
                  found=found)
    assert page.index("Findings") < page.index("Contents") < page.index("intro") < page.index("Diagnostics</h2>")
    assert "vae-vamp is ahead of vae by 0.95" in page
    links = re.findall(r"href='#([^']+)'", page)
    assert links and all(f"id='{target}'" in page for target in links)


def test_a_run_with_no_answerable_question_says_so():
    page = render("title", [], pd.DataFrame([{"variant": "vae", "log_lik": -1.0}]), ["log_lik"], [])
    assert "No question of the collection could be answered" in page
