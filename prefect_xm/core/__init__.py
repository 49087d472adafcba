"""Private implementation of the experiment API (prefect_xm.xm, prefect_xm.xm_local)."""
