"""Plotly figure builders from RESULTS (plain dicts, saved runs, traces reduced to plain data).

The dashboard, the notebooks and the CLI's HTML exports all call these, so each figure is
defined once. Never imports streamlit; never reads a live model's tensors (traces are first
reduced by `summaries`).
"""
from .embed import Projection, embedding_pair, embedding_scatter, fit_projection, selected_rows
from .export import runs_figures, runs_html, write_runs_html
from .report import (as_report, compare_sentence, grip_mode, null_space_ranks, percent_strings, probes_table,
                     restoration_table, run_display_name, run_layer_series, run_names, run_summary_row, run_verdict,
                     runs_table, step_log_with_base)
from .routing import (expert_label_heatmap, load_entropy_bars, load_heatmap, nullspace_heatmap,
                      routing_shift_heatmap, shared_shift_range, token_routing_table)
from .runs import (COMPARE_SECTIONS, CompareFigure, attribution_bars, compare_figures, per_layer_compare_bars,
                   selection_shift_bars, stability_bars, stability_compare_bars, training_curves)
from .style import (BASE, GRIP, SPLIT_COLORS, VANILLA, VERDICT_COLORS, apply_style, pct, run_color, to_html)
from .summaries import display_tokens, finite, routing_summary, token_routing, top1_labels

__all__ = ["Projection", "embedding_pair", "embedding_scatter", "fit_projection", "selected_rows",
           "runs_figures", "runs_html", "write_runs_html", "as_report", "run_names", "compare_figures", "CompareFigure",
           "COMPARE_SECTIONS", "grip_mode", "null_space_ranks", "percent_strings", "compare_sentence", "probes_table", "restoration_table", "run_display_name", "run_layer_series",
           "run_summary_row", "run_verdict", "runs_table", "step_log_with_base", "expert_label_heatmap", "load_entropy_bars", "load_heatmap", "nullspace_heatmap",
           "routing_shift_heatmap", "shared_shift_range", "token_routing_table", "attribution_bars",
           "per_layer_compare_bars", "selection_shift_bars", "stability_bars", "stability_compare_bars",
           "training_curves", "BASE", "GRIP", "SPLIT_COLORS", "VANILLA", "VERDICT_COLORS", "apply_style", "pct", "run_color",
           "to_html", "display_tokens", "finite", "routing_summary", "token_routing", "top1_labels"]
