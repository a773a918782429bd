"""Plots and the HTML/Markdown reports each stage writes for the Kubeflow UI."""
