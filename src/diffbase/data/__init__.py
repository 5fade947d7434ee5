"""Training data: image files and captions -> buckets -> batches (and cached latents)."""
