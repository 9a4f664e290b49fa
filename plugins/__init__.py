"""The bundled plugins of harness, installed as ``harness_plugins``.

They register through the ``harness`` entry-point group exactly like third-party plugins.
"""
