"""Data layer: content-addressed dataset snapshots, schema and drift validation, bundled datasets."""
