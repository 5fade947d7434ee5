"""Synthetic people in patterned garments and the toy models pretrained on them (the embedded default)."""
