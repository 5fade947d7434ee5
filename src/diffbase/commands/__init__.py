"""The command-line commands beyond `diffbase.cli`'s own: argument handling around the methods' inference API."""
