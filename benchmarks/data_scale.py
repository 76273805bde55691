"""The caption index at the original scale: build and load time of a multi-million-entry JSON in
the original LilT format (or the same entries as a Parquet or CSV table: --format), and resident
memory (PSS) of the training process and each DataLoader worker at the start and end of a pass over
many samples.

    python benchmarks/data_scale.py [--n 5000000 --samples 200000 --workers 2 --batch 256
                                     --image-size 32 --dir /tmp/lilt_ds_data_scale --format json]

Generates (once, reused) a JSON of `--n` entries `{"image", "image_id", "caption"}` whose images
cycle through 1000 real 32 px JPEGs and whose captions are 6-18 words (about CC3M's length). Then,
each phase in a fresh process: builds the index cache (timed, peak RSS), and loads it through
`build_train_loader` (timed: the index, then the image existence check) and reads `--samples`
samples with `--workers` workers (RandAugment off, to keep the pass cheap); the start of the pass
is taken after 2 batches per worker. PSS is read from
/proc/<pid>/smaps_rollup, the index's share from the mapping of its cache file in
/proc/<pid>/smaps. Prints Markdown tables.
"""

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGES = 1000
WORDS = (
    "a an the man woman child dog cat bird horse car bus train boat street road building house "
    "tree field beach water river mountain sky table chair kitchen room window door people group "
    "red blue green white black yellow small large old young standing sitting walking running "
    "playing holding looking riding eating near next to in on at with of under over front behind "
    "top side city park snow grass wooden stone glass metal picture view photo shot"
).split()


def generate(folder: str, n: int) -> str:
    """The synthetic JSON (written once per n, streaming) and its 1000 images."""
    from PIL import Image

    images = os.path.join(folder, "images", "cc3m", "training")
    os.makedirs(images, exist_ok=True)
    for k in range(IMAGES):
        path = os.path.join(images, f"{k:08d}_0.jpg")
        if not os.path.exists(path):
            Image.new("RGB", (32, 32), (k % 256, (7 * k) % 256, (13 * k) % 256)).save(path, quality=90)
    target = os.path.join(folder, f"captions_{n}.json")
    if os.path.exists(target):
        return target
    rng = random.Random(0)
    scratch = target + ".tmp"
    with open(scratch, "w", encoding="utf-8") as out:
        out.write("[")
        for i in range(n):
            words = rng.choices(WORDS, k=rng.randint(6, 18))
            caption = " ".join(words).capitalize() + "."
            image = os.path.join(images, f"{i % IMAGES:08d}_0.jpg")
            out.write(f'{"," if i else ""}\n{{"image": "{image}", "image_id": {i}, "caption": "{caption}"}}')
        out.write("\n]\n")
    os.replace(scratch, target)
    return target


def as_table(json_path: str, kind: str) -> str:
    """The JSON's entries as a table of OpenCLIP's columns (filepath, title), written once, streaming."""
    if kind == "json":
        return json_path
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from lilt_ds.data.index.jsonfile import iter_json_list

    target = os.path.splitext(json_path)[0] + f".{kind}"
    if os.path.exists(target):
        return target
    schema = pa.schema([("filepath", pa.string()), ("title", pa.string())])
    scratch = target + ".tmp"
    writer = pq.ParquetWriter(scratch, schema) if kind == "parquet" else pacsv.CSVWriter(scratch, schema)
    rows = {"filepath": [], "title": []}
    for entry in iter_json_list(json_path, "--json"):
        rows["filepath"].append(entry["image"])
        rows["title"].append(entry["caption"])
        if len(rows["title"]) == 100_000:
            writer.write_table(pa.table(rows, schema=schema))
            rows = {"filepath": [], "title": []}
    if rows["title"]:
        writer.write_table(pa.table(rows, schema=schema))
    writer.close()
    os.replace(scratch, target)
    return target


def memory_kib(pid: int, index_file: str) -> dict:
    """A process's PSS (smaps_rollup) and, from its smaps, the shares of: anonymous memory (the
    heap, which grows if inherited objects get copied), the index cache file, and library code
    (.so files and the interpreter, whose share moves whenever unrelated processes on the machine
    map or unmap the same libraries)."""
    with open(f"/proc/{pid}/smaps_rollup") as handle:
        rollup = dict(line.split()[:2] for line in handle if line.startswith(("Pss:", "Pss_Anon:")))
    index = code = 0
    name = None
    with open(f"/proc/{pid}/smaps") as handle:
        for line in handle:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header line
                name = fields[5] if len(fields) >= 6 else ""
            elif fields[0] == "Pss:":
                if name == index_file:
                    index += int(fields[1])
                elif ".so" in name or name == os.path.realpath(sys.executable):
                    code += int(fields[1])
    return {"pss": int(rollup["Pss:"]), "anon": int(rollup["Pss_Anon:"]), "index": index, "code": code}


def phase_build(path: str) -> dict:
    import functools

    from lilt_ds.data import load_caption_files, pre_caption

    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    table = load_caption_files([path], clean=functools.partial(pre_caption, max_words=30))
    return {
        "build_s": time.perf_counter() - start,
        "entries": len(table),
        "build_peak_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024,
        "index_file": table.mapped_file,
        "index_bytes": os.path.getsize(table.mapped_file),
    }


def phase_load_and_pass(path: str, args) -> dict:
    import functools

    import psutil
    from data_throughput import load_tokenizer  # a sibling: the script's folder is first on sys.path

    from lilt_ds.data import build_train_loader, load_caption_files, pre_caption

    tokenizer = load_tokenizer()
    parent = os.getpid()
    before = memory_kib(parent, "")
    # Timed apart: the index (what this benchmark is about), then the whole loader.
    start = time.perf_counter()
    table = load_caption_files([path], clean=functools.partial(pre_caption, max_words=30))
    table.make_resident()
    index_load_s = time.perf_counter() - start
    del table
    start = time.perf_counter()
    cfg = {
        "train_files": [path],
        "num_workers": args.workers,
        "augment": {"randaugment": False},
        "persistent_workers": True,
    }
    loader = build_train_loader(
        cfg,
        tokenizer,
        image_size=args.image_size,
        mean=CLIP_MEAN,
        std=CLIP_STD,
        rank=0,
        world_size=1,
        micro_batch_size=args.batch,
        seed=0,
    )
    loader_s = time.perf_counter() - start
    index_file = loader.dataset.table.mapped_file
    after_load = memory_kib(parent, index_file)
    batches = iter(loader)
    warm_up = 2 * max(args.workers, 1)  # the start: each worker has delivered, the prefetch queue is full
    for _ in range(warm_up):
        next(batches)
    workers = [child.pid for child in psutil.Process(parent).children()]
    snapshot = lambda: {pid: memory_kib(pid, index_file) for pid in [parent] + workers}
    at_start = snapshot()
    seen, pass_start = warm_up * args.batch, time.perf_counter()
    while seen < args.samples:
        next(batches)
        seen += args.batch
    pass_s = time.perf_counter() - pass_start
    at_end = snapshot()
    return {
        "before_kib": before,
        "after_load_kib": after_load,
        "index_load_s": index_load_s,
        "loader_s": loader_s,
        "pass_s": pass_s,
        "samples": seen,
        "processes": [
            {
                "pid": pid,
                "role": "training process" if pid == parent else f"worker {k - 1}",
                "start": at_start[pid],
                "end": at_end[pid],
            }
            for k, pid in enumerate([parent] + workers)
        ],
    }


def run_phase(phase: str, path: str, args) -> dict:
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--phase",
        phase,
        "--json",
        path,
        "--samples",
        str(args.samples),
        "--workers",
        str(args.workers),
        "--batch",
        str(args.batch),
        "--image-size",
        str(args.image_size),
    ]
    result = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5_000_000, help="JSON entries (default 5,000,000)")
    parser.add_argument("--samples", type=int, default=200_000, help="samples read in the pass")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--dir", default="/tmp/lilt_ds_data_scale", help="where the synthetic data goes")
    parser.add_argument(
        "--format", choices=["json", "parquet", "csv"], default="json", help="the caption file's format"
    )
    parser.add_argument("--phase", choices=["build", "pass"], help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase == "build":
        print(json.dumps(phase_build(args.json)))
        return
    if args.phase == "pass":
        print(json.dumps(phase_load_and_pass(args.json, args)))
        return

    start = time.perf_counter()
    path = as_table(generate(args.dir, args.n), args.format)
    generate_s = time.perf_counter() - start
    for name in os.listdir(args.dir):  # a fresh build every time
        if ".lilt-caption-index" in name:
            os.unlink(os.path.join(args.dir, name))
    build = run_phase("build", path, args)
    scale = run_phase("pass", path, args)
    mib = lambda kib: f"{kib / 1024:.0f}"
    print(
        f"{build['entries']:,} entries, {args.format} {os.path.getsize(path) / 2**20:.0f} MiB "
        f"(generated in {generate_s:.0f} s), {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}), load average {os.getloadavg()[0]:.1f}; "
        f"pass: {scale['samples']:,} samples, batch {args.batch}, {args.workers} workers, "
        f"{args.image_size} px, RandAugment off.\n"
    )
    print(
        "| index build (once) | build: peak RSS above imports | index file | index load (cached) | "
        "build_train_loader (index + existence check) | pass |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {build['build_s']:.1f} s | {build['build_peak_mib']:.0f} MiB | "
        f"{build['index_bytes'] / 2**20:.0f} MiB | {scale['index_load_s']:.2f} s | "
        f"{scale['loader_s']:.1f} s | {scale['pass_s']:.0f} s ({scale['samples'] / scale['pass_s']:.0f} samples/s) |"
    )
    before, after = scale["before_kib"], scale["after_load_kib"]
    print(
        f"\nTraining process PSS (anonymous part): {mib(before['pss'])} ({mib(before['anon'])}) MiB "
        f"before the index, {mib(after['pss'])} ({mib(after['anon'])}) MiB after build_train_loader.\n"
    )
    print(
        "| process | PSS start -> end (MiB) | change | PSS less libraries | change "
        "| anonymous PSS | index cache share |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    index_total = 0
    for proc in scale["processes"]:
        start, end = proc["start"], proc["end"]
        index_total += end["index"]
        data = lambda m: m["pss"] - m["code"]
        change = lambda a, b: f"{100 * (b - a) / a:+.1f}%"
        print(
            f"| {proc['role']} | {mib(start['pss'])} -> {mib(end['pss'])} | {change(start['pss'], end['pss'])} "
            f"| {mib(data(start))} -> {mib(data(end))} | {change(data(start), data(end))} "
            f"| {mib(start['anon'])} -> {mib(end['anon'])} | {mib(start['index'])} -> {mib(end['index'])} |"
        )
    print(f"\nIndex resident for the rank (sum of the shares of its cache file mapping): {mib(index_total)} MiB.")


if __name__ == "__main__":
    main()
