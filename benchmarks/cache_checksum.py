"""What the cache's per-entry sha256 costs, on the demo's own cache (600 try-on items on the toy SD1.5,
the demo's config): the time to open the cache with every entry verified against opening it from the
shard headers alone (what it cost before checksums), and the verified open (an upper bound of what the
checksums cost: it also parses what was parsed before) set against the time the demo's training spends
reading the cache (every entry read 2000 x 16 / 600 = 53 times).

    python benchmarks/cache_checksum.py
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from diffbase.config import configs_dir, load_config
from diffbase.data.cache import ShardStore, verified_entries
from diffbase.data.synthetic import write_dataset
from diffbase.demo import SEED, SIZE, toy_model
from diffbase.methods import train

N_TRAIN = 600


def median_time(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def open_from_headers(root: Path) -> dict[str, Path]:
    """The cache's index as it was read before checksums: tensor names from each shard's header."""
    from safetensors import safe_open

    locations = {}
    for shard in sorted(root.glob("shard-*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                locations[name.rsplit("/", 1)[0]] = shard
    return locations


def read_all(store: ShardStore) -> None:
    for key in store.locations:
        store.get(key)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        write_dataset(out / "data", N_TRAIN, 0, seed=SEED, size=(SIZE, SIZE))
        overrides = [f"model.pretrained_path={toy_model()}", f"data.train_path={out / 'data'}",
                     f"experiment.output_dir={out / 'run'}", "training.max_steps=1", "training.checkpoint_every=0"]  # fmt: skip
        config = load_config(configs_dir() / "experiments" / "demo" / "tryon.yaml", overrides)
        full = load_config(configs_dir() / "experiments" / "demo" / "tryon.yaml")
        train(config, show_progress=False)  # builds the demo's cache, exactly as the demo does
        root = out / "run" / "cache" / "latents"
        shards = sorted(root.glob("shard-*.safetensors"))
        size = sum(p.stat().st_size for p in shards) / 2**20
        store = ShardStore.open(root)
        entries = len(store.locations)
        verified = median_time(lambda: ShardStore.open(root))
        headers = median_time(lambda: open_from_headers(root))
        hashing = median_time(lambda: [verified_entries(p) for p in shards])
        epoch = median_time(lambda: read_all(ShardStore.open(root)))
        reads = full.training.max_steps * full.training.batch_size
        training_reads = epoch / entries * reads
    print(f"demo cache: {entries} entries in {len(shards)} shard(s), {size:.1f} MiB")
    print(
        f"open with every entry verified: {verified * 1e3:.1f} ms (parse + sha256 of the shards: {hashing * 1e3:.1f} ms)"
    )
    print(f"open from the headers alone (before checksums): {headers * 1e3:.1f} ms")
    print(f"one read of every entry: {epoch * 1e3:.1f} ms ({epoch / entries * 1e6:.0f} us per entry)")
    print(f"the demo's training reads {reads} entries: {training_reads:.2f} s of cache reads")
    print(f"checksum cost, at most the whole verified open: {verified * 1e3:.1f} ms = "
          f"{verified / training_reads:.2%} of the demo's cache read time ({verified / epoch:.1%} of one read of "
          "every entry)")  # fmt: skip


if __name__ == "__main__":
    main()
