"""Shards where web-scale sets live (lilt_ds/data/shards/sources.py): written by img2dataset itself from
a loopback HTTP server, then read back from disk, through pipe:cat, over HTTP and from a loopback S3
(moto's server); counted from img2dataset's _stats.json without opening a tar; a dropped connection
retried without repeating samples, a dead shard ending the run with its URL (or counted under skip),
a silent pipe timed out."""

import contextlib
import functools
import http.server
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lilt_ds.config import load_config
from lilt_ds.data import DataError, find_shards
from lilt_ds.errors import LiltError

from .test_shards import build

pytest.importorskip("webdataset", reason="needs the shards extra: pip install -e .[test]")
IMAGES = 10
CAPTION = "a photo number {}"


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class _FlakyHandler(_Quiet):
    """Serves a folder; the first GET of each path in ``server.cut`` sends half the file and drops."""

    def do_GET(self):
        name = self.path.lstrip("/")
        self.server.gets.append(name)
        if name in self.server.cut and self.server.gets.count(name) == 1:
            data = (Path(self.directory) / name).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        if name in self.server.broken:
            self.send_error(500, "broken on purpose")
            return
        super().do_GET()


@contextlib.contextmanager
def serve(folder, cut=(), broken=()):
    """A loopback HTTP server of ``folder``; yields its base URL (the server object as .server)."""
    handler = functools.partial(_FlakyHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.gets, server.cut, server.broken = [], set(cut), set(broken)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def img2dataset_shards(tmp_path_factory):
    """Shards as img2dataset writes them (two of 4 and one of 3 samples: 11 URLs, one missing on the
    server), with their _stats.json and .parquet; the images served from a loopback HTTP server."""
    program = Path(sys.executable).parent / "img2dataset"
    if not program.exists():
        pytest.skip("img2dataset is not installed (pip install -e .[test] installs it)")
    root = tmp_path_factory.mktemp("img2dataset")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for k in range(IMAGES):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(images / f"{k}.jpg", quality=90)
    with serve(images) as (base, _):
        rows = [f"{base}/{k}.jpg\t{CAPTION.format(k)}" for k in range(IMAGES)] + [f"{base}/missing.jpg\tgone"]
        (root / "urls.tsv").write_text("url\tcaption\n" + "\n".join(rows) + "\n")
        command = [str(program), "--url_list", str(root / "urls.tsv"), "--input_format", "tsv", "--url_col", "url"]
        command += ["--caption_col", "caption", "--output_format", "webdataset", "--output_folder", str(root / "out")]
        command += ["--processes_count", "1", "--thread_count", "2", "--image_size", "32"]
        command += ["--number_sample_per_shard", "4", "--timeout", "5", "--retries", "0"]
        result = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return root / "out"


def samples(loader) -> dict[int, list[int]]:
    """{sample index: caption tokens} over one pass."""
    found = {}
    for batch in loader:
        for index, ids, mask in zip(batch["index"].tolist(), batch["input_ids"], batch["attention_mask"]):
            found[index] = ids[mask.bool()].tolist()
    return found


@pytest.mark.slow  # img2dataset and loopback servers
def test_img2dataset_shards_are_counted_from_their_stats_and_read_alike_from_disk_pipe_and_http(
    img2dataset_shards, tokenizer
):
    out = img2dataset_shards
    stats = [json.loads((out / f"0000{k}_stats.json").read_text()) for k in range(3)]
    assert [s["successes"] for s in stats] == [4, 4, 2] and sum(s["count"] for s in stats) == 11  # one missing
    assert (out / "00000.parquet").exists()
    shards = find_shards(str(out / "{00000..00002}.tar"))
    assert shards.counts == (4, 4, 2) and not shards.estimated  # from _stats.json: no tar opened

    local, _, _ = build({"train_shards": str(out / "{00000..00002}.tar"), "shuffle_buffer": 0}, tokenizer, batch=2)
    from_disk = samples(local)
    assert len(from_disk) == 10
    piped = {"train_shards": f"pipe:cat {out}/{{00000..00002}}.tar", "samples_per_epoch": 10, "shuffle_buffer": 0}
    assert samples(build(piped, tokenizer, batch=2)[0]) == from_disk
    with serve(out) as (base, server):
        remote = {"train_shards": f"{base}/{{00000..00002}}.tar", "num_workers": 2, "shuffle_buffer": 0}
        loader, dataset, _ = build(remote, tokenizer, batch=2)
        assert dataset.shards.counts == (4, 4, 2)  # the _stats.json files read over HTTP
        assert samples(loader) == from_disk
        assert sorted(g for g in server.gets if g.endswith(".tar")) == ["00000.tar", "00001.tar", "00002.tar"]


@pytest.mark.slow  # img2dataset and loopback servers
def test_shards_on_a_loopback_s3(img2dataset_shards, tokenizer, monkeypatch):
    pytest.importorskip("s3fs", reason="s3:// shards need s3fs (pip install -e .[test] installs it)")
    boto3 = pytest.importorskip("boto3", reason="the loopback S3 needs moto[server] (in the test extra)")
    from moto.server import ThreadedMotoServer

    from tests.cluster import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        for name, value in dict(AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test").items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")  # botocore's and s3fs's endpoint
        client = boto3.client("s3")
        client.create_bucket(Bucket="lilt-shards")
        for path in img2dataset_shards.iterdir():
            if path.name.endswith((".tar", "_stats.json")):
                client.upload_file(str(path), "lilt-shards", f"laion/{path.name}")
        cfg = {"train_shards": "s3://lilt-shards/laion/{00000..00002}.tar", "shuffle_buffer": 0}
        loader, dataset, _ = build(cfg, tokenizer, batch=2)
        assert dataset.shards.counts == (4, 4, 2)
        local = build(
            {"train_shards": str(img2dataset_shards / "{00000..00002}.tar"), "shuffle_buffer": 0}, tokenizer, 0, 1, 2
        )
        assert samples(loader) == samples(local[0])
    finally:
        server.stop()


@pytest.mark.slow  # img2dataset and loopback servers
def test_a_dropped_connection_is_retried_and_no_sample_repeats(img2dataset_shards, tokenizer):
    with serve(img2dataset_shards, cut={"00001.tar"}) as (base, server):
        cfg = {"train_shards": f"{base}/{{00000..00002}}.tar", "shuffle_buffer": 0, "shard_retries": 2}
        served = [i for batch in build(cfg, tokenizer, batch=2)[0] for i in batch["index"].tolist()]
        assert server.gets.count("00001.tar") == 2  # cut half way, opened again
    assert len(served) == 10 and len(set(served)) == 10


@pytest.mark.slow  # img2dataset and loopback servers
def test_a_shard_that_stays_broken_ends_the_run_naming_it_or_is_counted_under_skip(img2dataset_shards, tokenizer):
    with serve(img2dataset_shards, broken={"00001.tar"}) as (base, server):
        cfg = {"train_shards": f"{base}/{{00000..00002}}.tar", "shuffle_buffer": 0, "shard_retries": 1}
        start = time.monotonic()
        with pytest.raises(DataError, match=rf"{base}/00001\.tar: unreadable after 2 attempts, the last .*500.*"
                           r"check the address and the network"):  # fmt: skip
            list(build(cfg, tokenizer, batch=2)[0])
        assert time.monotonic() - start < 30 and server.gets.count("00001.tar") == 2
        skip = {**cfg, "on_bad_sample": "skip", "max_bad_fraction": 0.5}
        loader, dataset, _ = build(skip, tokenizer, batch=2)
        served = [i for batch in loader for i in batch["index"].tolist()]
    assert len(served) == 10 and dataset.bad_samples.lost == {f"{base}/00001.tar": 4}


def test_a_pipe_that_sends_nothing_times_out(tokenizer):
    cfg = {"train_shards": "pipe:sleep 60", "samples_per_epoch": 4, "shard_timeout_s": 1, "shard_retries": 0}
    start = time.monotonic()
    with pytest.raises(DataError, match=r"pipe:sleep 60: .*the command sent nothing for 1 s"):
        list(build(cfg, tokenizer, batch=2)[0])
    assert time.monotonic() - start < 20


def test_a_failing_pipe_command_is_an_error_naming_it(tokenizer, tmp_path):
    cfg = {"train_shards": f"pipe:cat {tmp_path}/nothing.tar", "samples_per_epoch": 4, "shard_retries": 0}
    with pytest.raises(DataError, match=rf"pipe:cat {tmp_path}/nothing\.tar: .*exit 1"):
        list(build(cfg, tokenizer, batch=2)[0])


@pytest.mark.parametrize(
    "data, message",
    [
        ({"train_shards": "gs://bucket/{0..1}.tar"}, r"gs://bucket/0\.tar needs fsspec's gs:// backend: .*gcsfs"),
        ({"train_shards": "nosuch://bucket/a.tar"}, r"no fsspec backend knows nosuch://"),
        (
            {"train_shards": "pipe:aws s3 cp s3://b/{0..1}.tar -"},
            r"(?s)2 of the 2 shards .* have no sample count.*"
            r"pipe: commands have none.*data\.samples_per_epoch",
        ),  # fmt: skip
        (
            {"train_files": [], "samples_per_epoch": 5},
            r"data\.samples_per_epoch = 5 counts the samples of data\.train_shards",
        ),
        (
            {"train_shards": "pipe:cat x.tar", "samples_per_epoch": 0},
            r"data\.samples_per_epoch = 0: expected an integer >= 1",
        ),
        ({"train_shards": "pipe:cat x.tar", "shard_timeout_s": 0}, r"data\.shard_timeout_s = 0"),
    ],
)
def test_bad_shard_addresses_and_counts_stop_at_config_load(data, message):
    overrides = [f"data.{key}={json.dumps(value)}" for key, value in data.items()]
    with pytest.raises(LiltError, match=message):
        load_config("lilt", overrides)


@pytest.mark.slow  # img2dataset and loopback servers
def test_counts_files_that_disagree_with_samples_per_epoch_stop_at_config_load(img2dataset_shards):
    with pytest.raises(LiltError, match=r"data\.samples_per_epoch = 99, but the counts files .* hold 10 samples"):
        load_config(
            "lilt", [f"data.train_shards={img2dataset_shards}/{{00000..00002}}.tar", "data.samples_per_epoch=99"]
        )


def test_an_unreachable_counts_server_stops_at_config_load(tmp_path):
    from tests.cluster import free_port

    url = f"http://127.0.0.1:{free_port()}/{{00000..00001}}.tar"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(LiltError, match=r"http://127\.0\.0\.1:\d+/sizes\.json could not be read .*check the address"):
        load_config("lilt", [f"data.train_shards={url}"])
    assert time.monotonic() - start < 30
