"""A method package that lives outside diffbase (added with DIFFBASE_METHODS=tests.toy_method): it trains
only the denoiser's biases. Its parts are the ones a built-in method package has: method.py (the record),
command.py (`diffbase bias-only`), ui.py (a web tab) and bench.py (a GPU benchmark stage)."""
