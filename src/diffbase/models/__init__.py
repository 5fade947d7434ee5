"""Backbones: family specs, building, local loading, the training interface, device placement."""
