"""prefect-xm: XManager-style experiments on Prefect 3, and Prefect workers for batch schedulers."""
