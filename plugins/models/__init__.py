"""Bundled model plugins."""
