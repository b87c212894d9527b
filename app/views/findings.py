"""Page 6 — Findings: the study report (docs/findings.md), with its figures."""
from __future__ import annotations

import os
import re
from pathlib import Path

import streamlit as st

from app.lib import ui
from grip_core.moe.load import REPO_ROOT

ui.page_header("Findings", "The study's report: what the grid of methods × GRIP modes measured on the demo.")

CANDIDATES = [Path(p) for p in [os.environ.get("GRIP_STUDIO_FINDINGS")] if p] + [
    REPO_ROOT / "docs" / "findings.md", REPO_ROOT / "docs" / "study" / "findings.md"]
IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")

report = next((p for p in CANDIDATES if p.is_file()), None)
if report is None:
    st.info("The study report is not there yet (`docs/findings.md`). Run the study to write it:\n\n"
            "```\npython -m grip_core study --quick\n```\n\nIt takes about 10 minutes on 2 CPU cores; this page "
            "shows it as soon as the file exists.", icon=":material/article:")
    st.stop()

text = report.read_text(encoding="utf-8")
st.caption(f"`{report}` · {len(text.splitlines())} lines")
st.download_button("Download markdown", data=text.encode(), file_name="findings.md", mime="text/markdown",
                   key="fd_md", icon=":material/download:", type="tertiary", on_click="ignore")


def _render(md: str, base: Path) -> None:
    """Markdown with its local images shown by st.image (st.markdown cannot load local files)."""
    pos = 0
    for m in IMAGE.finditer(md):
        if md[pos:m.start()].strip():
            st.markdown(md[pos:m.start()])
        alt, src = m.group(1), m.group(2)
        path = (base / src).resolve()
        if src.startswith(("http://", "https://")):
            st.markdown(m.group(0))
        elif path.is_file() and path.suffix.lower() in (".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp"):
            st.image(str(path), caption=alt or None)
        elif path.is_file() and path.suffix.lower() == ".html":
            st.components.v1.html(path.read_text(encoding="utf-8"), height=520, scrolling=True)
        else:
            st.caption(f"(figure not found: `{src}`)")
        pos = m.end()
    if md[pos:].strip():
        st.markdown(md[pos:])


_render(text, report.parent)
