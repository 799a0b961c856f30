"""The design-space explorer: a sweep spec -> ordinary megatron_pd runs -> tables, plots and
findings (``python -m megatron_pd.explore SPEC.yaml``; see spec.py for the spec)."""
