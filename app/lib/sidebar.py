"""What the sidebar shows on every page: the model and data in use, and running jobs."""
from __future__ import annotations

import streamlit as st

from . import jobs, loading, state


def sidebar_status() -> None:
    with st.sidebar:
        st.markdown("### GRIP Studio")
        st.caption("Did this MoE forget, or just reroute? Unlearning with router constraints.")
        source = state.current_source()
        st.markdown(f"**Model:** `{loading.key_label(source)}`")
        st.markdown(f"**Data:** {state.data_label(state.data_key())}")
        pair = jobs.current_pair()
        if pair is not None and pair.running:
            st.info(f"Unlearning in progress: {pair.progress_text()}", icon=":material/hourglass_top:")
