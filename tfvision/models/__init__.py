"""Models: backbones (registry), heads, U-Net later."""
