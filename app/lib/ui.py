"""Layout helpers every page shares: a figure with its HTML download, a table with its CSV, errors as st.error."""
from __future__ import annotations

import re
import traceback
from contextlib import contextmanager

import pandas as pd
import streamlit as st

from grip_core.moe.errors import GripStudioError
from grip_core.viz import to_html

PLOT_CONFIG = {"displaylogo": False, "toImageButtonOptions": {"format": "png", "scale": 2}}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "figure"


def figure(fig, key: str, file_name: str | None = None, *, on_select=None, selection_mode=None):
    """st.plotly_chart with the house config, and a download button for a standalone HTML file.

    The HTML (plotly.js embedded, so it opens offline) is built only when the button is clicked.
    Returns the selection state when `on_select` is given.
    """
    kwargs = {}
    if on_select is not None:
        kwargs = dict(on_select=on_select, selection_mode=selection_mode or ("lasso", "box", "points"))
    event = st.plotly_chart(fig, key=key, theme=None, config=PLOT_CONFIG, **kwargs)
    name = file_name or _slug(str(fig.layout.title.text or key).split("<br>")[0].replace("<b>", ""))
    st.download_button("Download HTML", data=lambda: to_html(fig), file_name=f"{name}.html", mime="text/html",
                       key=f"{key}__html", icon=":material/download:", type="tertiary", on_click="ignore")
    return event


def table(df: pd.DataFrame, key: str, file_name: str, *, hide_index: bool = True, column_config=None,
          height=None, display: pd.DataFrame | None = None):
    """st.dataframe plus a CSV download of the same table (`display`: a formatted copy to show instead)."""
    st.dataframe(df if display is None else display, hide_index=hide_index, column_config=column_config, key=key,
                 height=height or "auto")
    st.download_button("Download CSV", data=df.to_csv(index=not hide_index).encode(), file_name=f"{file_name}.csv",
                       mime="text/csv", key=f"{key}__csv", icon=":material/download:", type="tertiary",
                       on_click="ignore")


def error_message(exc: BaseException) -> str:
    """One clear line for the user; our own errors already carry the path / file / line."""
    if isinstance(exc, (GripStudioError, ValueError, FileNotFoundError, KeyError, OSError)):
        msg = str(exc).strip("'\"")
        return msg or type(exc).__name__
    return f"{type(exc).__name__}: {exc}"


@contextmanager
def guard(what: str, stop: bool = False):
    """Show an exception inside the block as st.error (with the traceback folded away), never as a crash."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - everything the user can cause ends here
        if type(exc).__name__ in ("RerunException", "StopException"):
            raise
        st.error(f"**{what}** — {error_message(exc)}", icon=":material/error:")
        with st.expander("Details (for a bug report)"):
            st.code("".join(traceback.format_exception(exc))[-4000:], language="text")
        if stop:
            st.stop()


def page_header(title: str, caption: str) -> None:
    st.title(title)
    st.caption(caption)


def metric_row(items: list[tuple[str, str, str | None]]) -> None:
    """A row of st.metric (label, value, help) for short numbers."""
    cols = st.columns(len(items))
    for col, (label, value, help_) in zip(cols, items):
        col.metric(label, value, help=help_, border=True)


def facts(items: list[tuple[str, str, str | None]], columns: int = 4) -> None:
    """A grid of label / value cards for values that are words, not numbers (never truncated)."""
    from html import escape

    cells = "".join(
        f"<div title='{escape(help_ or '')}' style='border:1px solid #DDE3EA;border-radius:6px;padding:0.55rem 0.8rem;"
        f"background:#FFFFFF'><div style='font-size:0.78rem;color:#5A6472;text-transform:uppercase;"
        f"letter-spacing:0.04em'>{escape(label)}</div><div style='font-size:1.15rem;font-weight:600;color:#1F2328;"
        f"word-break:break-word'>{escape(value)}</div></div>" for label, value, help_ in items)
    st.markdown(f"<div style='display:grid;grid-template-columns:repeat({columns},minmax(0,1fr));gap:0.6rem;"
                f"margin-bottom:0.6rem'>{cells}</div>", unsafe_allow_html=True)
