"""Build transfer sets with Apache Beam: `python -m data_pipeline --config X.yaml [Beam options]`."""
