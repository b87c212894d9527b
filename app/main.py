"""GRIP Studio dashboard: `streamlit run app/main.py` (scripts/dashboard.sh).

Seven pages over grip_core: the app lays out figures from grip_core.viz and jobs from
grip_core.runs; it holds no tensor math and never touches router weights.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

st.set_page_config(page_title="GRIP Studio", page_icon=":material/alt_route:", layout="wide",
                   initial_sidebar_state="expanded")

from app.lib import state  # noqa: E402
from app.lib.sidebar import sidebar_status  # noqa: E402

PAGES = [
    st.Page("views/model.py", title="Model", icon=":material/memory:", default=True),
    st.Page("views/routing.py", title="Routing explorer", icon=":material/grid_on:", url_path="routing"),
    st.Page("views/embeddings.py", title="Embeddings", icon=":material/scatter_plot:", url_path="embeddings"),
    st.Page("views/unlearn.py", title="Unlearn", icon=":material/model_training:", url_path="unlearn"),
    st.Page("views/compare.py", title="Compare", icon=":material/compare:", url_path="compare"),
    st.Page("views/findings.py", title="Findings", icon=":material/article:", url_path="findings"),
    st.Page("views/diagnose.py", title="Diagnose", icon=":material/troubleshoot:", url_path="diagnose"),
]

page = st.navigation(PAGES, position="sidebar", expanded=True)
state.current_source()
sidebar_status()
page.run()
