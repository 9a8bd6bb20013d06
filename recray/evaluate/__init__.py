"""Evaluation: grounding generated titles to catalog items, and the metrics of spec §4."""
