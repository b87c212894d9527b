"""GRIP Studio dashboard (minimal first page; the full multi-page app replaces it)."""
import streamlit as st

from grip_core import load_model

st.set_page_config(page_title="GRIP Studio", layout="wide")
st.title("GRIP Studio")


@st.cache_resource
def _demo():
    return load_model("demo")


try:
    moe = _demo()
except Exception as exc:  # shown, not a traceback
    st.error(f"Could not load the demo model: {exc}")
    st.stop()
info = moe.describe()
st.write(f"**{info['family']}** · {info['num_moe_layers']} MoE layers · {info['num_parameters']:,} parameters")
st.dataframe(info["layers"])
