"""The demo's report: every number read from the metrics file that holds it, with that file named beside it."""
