"""Images per second of the training loader reading the same tar shards from local disk, through
``pipe:cat`` and over HTTP from a loopback server (fsspec), for several DataLoader worker counts.

    python benchmarks/shard_sources.py [--size 224 --n 1000 --shard-size 100 --batch 32 --batches 20 --workers 1 2]

The shards are the demo images written by lilt-make-shards; the HTTP server is Python's threaded
http.server in this process (it shares the machine's cores with the loader, as a file server on the
same host would). Prints a Markdown table; the first batch of each run (worker start-up) is not timed.
"""

import argparse
import contextlib
import functools
import http.server
import os
import platform
import tempfile
import threading

import torch
from data_throughput import CLIP_MEAN, CLIP_STD, images_per_second, load_tokenizer

from lilt_ds.data import build_train_loader, ensure_demo_data, write_shards


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def http_server(folder: str):
    """A loopback HTTP server of ``folder``; yields its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=folder))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=224, help="training resolution (default 224)")
    parser.add_argument("--n", type=int, default=1000, help="demo images (default 1000)")
    parser.add_argument("--demo-size", type=int, default=128, help="side of the demo images on disk")
    parser.add_argument("--shard-size", type=int, default=100, help="samples per shard")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per run")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    if (args.batches + 1) * args.batch > args.n:
        parser.error("--n must hold (--batches + 1) * --batch images")

    demo = ensure_demo_data(n=args.n, seed=0, eval_n=100, size=args.demo_size)
    tokenizer = load_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        written = write_shards([demo["train"]], tmp, args.shard_size)
        pattern = written["train_shards"]  # tmp/shard-{000000..0000NN}.tar
        print(
            f"{written['samples']} demo images of {args.demo_size} px in {written['shards']} shards, resolution "
            f"{args.size}, no RandAugment, batch {args.batch}, {args.batches} timed batches; {os.cpu_count()} CPU "
            f"cores ({platform.processor() or platform.machine()}), torch {torch.__version__}, load average "
            f"{os.getloadavg()[0]:.1f} at start.\n"
        )
        print("| source | DataLoader workers | images/s |")
        print("|---|---:|---:|")
        with http_server(tmp) as base:
            sources = {
                "local disk": pattern,
                "pipe:cat": f"pipe:cat {pattern}",
                "HTTP (loopback, fsspec)": base + pattern[len(tmp) :],
            }
            for name, shards in sources.items():
                for workers in args.workers:
                    cfg = {
                        "train_shards": shards,
                        "samples_per_epoch": written["samples"] if shards.startswith("pipe:") else None,
                        "augment": {"randaugment": False},
                        "num_workers": workers,
                        "persistent_workers": False,
                    }
                    loader = build_train_loader(cfg, tokenizer, args.size, CLIP_MEAN, CLIP_STD, 0, 1, args.batch, 0)
                    rate = images_per_second(loader, args.batches, skip=1)
                    print(f"| {name} | {workers} | {rate:.1f} |", flush=True)


if __name__ == "__main__":
    main()
