"""Bridges to the attribution libraries Captum, pytorch-grad-cam and zennit.

Each library has its own module and its own entry point (``captum_bridge``, ``gradcam_bridge``,
``zennit_bridge``), so a missing library skips only its bridge: the module fails to import with a
message naming the install command (``pip install "harness[captum]"``), which ``harness plugins``
reports. ``common`` holds what the bridges share (baselines from the harness's fills, channel
reductions, feature masks, per-image seeding) and imports none of the libraries.

The harness only adapts: targets (the run's target classes), baselines (the fills of
``plugins/maskers/fills.py``), channel reduction to a (B, H, W) map (higher = more important) and
batching; the numbers are the library's.
"""
