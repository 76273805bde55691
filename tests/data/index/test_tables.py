"""Caption tables as data.train_files (lilt_ds/data/index/tables.py): CSV and TSV with OpenCLIP's column
names, Parquet written by pyarrow and a datasets folder written by datasets' save_to_disk give the
samples of the same entries in the JSON format, with the JSON format's checks, messages and bad-sample
policy; a missing column stops the config load."""

import json

import pytest
import torch

from lilt_ds.config import load_config
from lilt_ds.data import DataError
from lilt_ds.errors import LiltError

from ..files import write_image, write_json
from ..test_loader import build

pa = pytest.importorskip("pyarrow", reason="tables need pyarrow (pip install -e .[test] installs it)")


@pytest.fixture
def rows(tmp_path):
    """12 real JPEGs; rows (filepath, title), every third with two captions (a list)."""
    result = []
    for k in range(12):
        image = write_image(tmp_path / "images" / f"{k}.jpg", colour=(20 * k, 90, 200 - 10 * k))
        result.append({"filepath": image, "title": [f"Photo {k}!", f"another {k}"] if k % 3 == 0 else f"Photo {k}!"})
    return result


def write_tables(folder, rows) -> dict[str, str]:
    """The rows as JSON (the original format), CSV, TSV, Parquet and a datasets folder."""
    import pyarrow.parquet as pq
    from datasets import Dataset

    paths = {"json": write_json(folder / "t.json", [{"image": r["filepath"], "caption": r["title"]} for r in rows])}
    single = [
        {"filepath": r["filepath"], "title": r["title"] if isinstance(r["title"], str) else r["title"][0]} for r in rows
    ]
    for name, separator in (("csv", ","), ("tsv", "\t")):
        lines = [f"filepath{separator}title"] + [f'{r["filepath"]}{separator}"{r["title"]}"' for r in single]
        (folder / f"t.{name}").write_text("\n".join(lines) + "\n")
        paths[name] = str(folder / f"t.{name}")
    listed = {
        "filepath": [r["filepath"] for r in rows],
        "title": [r["title"] if isinstance(r["title"], list) else [r["title"]] for r in rows],
    }
    pq.write_table(pa.table(listed), folder / "t.parquet")
    paths["parquet"] = str(folder / "t.parquet")
    Dataset.from_dict(listed).save_to_disk(str(folder / "t_dataset"))
    paths["datasets"] = str(folder / "t_dataset")
    return paths


def served(loader) -> dict[int, tuple]:
    """{index: (image tensor, tokens)} over one pass."""
    out = {}
    for batch in loader:
        for i, image, ids in zip(batch["index"].tolist(), batch["images"], batch["input_ids"]):
            out[i] = (image, ids.tolist())
    return out


def test_csv_tsv_parquet_and_datasets_tables_serve_the_json_formats_samples(rows, tmp_path, tokenizer):
    paths = write_tables(tmp_path, rows)
    reference = served(build({"train_files": [paths["json"]], "augment": {"randaugment": False}}, tokenizer, seed=3)[0])
    assert sorted(reference) == list(range(12))
    for kind in ("parquet", "datasets"):  # lists of captions, as in the JSON
        loader, dataset, _ = build({"train_files": [paths[kind]], "augment": {"randaugment": False}}, tokenizer, seed=3)
        got = served(loader)
        assert sorted(got) == list(range(12)) and dataset.table.captions(3) == ["photo 3", "another 3"], kind
        assert all(torch.equal(got[i][0], reference[i][0]) and got[i][1] == reference[i][1] for i in got), kind
    for kind in ("csv", "tsv"):  # one caption per row: the image and the first caption's entries agree
        loader, dataset, _ = build({"train_files": [paths[kind]], "augment": {"randaugment": False}}, tokenizer, seed=3)
        got = served(loader)
        assert sorted(got) == list(range(12)) and dataset.table.captions(4) == ["photo 4"], kind
        assert all(torch.equal(got[i][0], reference[i][0]) for i in got), kind
        assert all(got[i][1] == reference[i][1] for i in got if i % 3), kind


def test_other_column_names_and_separators_come_from_the_table_keys(rows, tmp_path, tokenizer):
    lines = ["url|text"] + [f"{r['filepath']}|caption {k}" for k, r in enumerate(rows)]
    (tmp_path / "pipes.csv").write_text("\n".join(lines) + "\n")
    table = {"image_key": "url", "caption_key": "text", "separator": "|"}
    _, dataset, _ = build({"train_files": [str(tmp_path / "pipes.csv")], "table": table}, tokenizer)
    assert len(dataset) == 12 and dataset.table.captions(5) == ["caption 5"]


def test_a_table_without_the_named_column_stops_at_config_load(rows, tmp_path):
    paths = write_tables(tmp_path, rows)
    for kind in ("csv", "parquet", "datasets"):
        with pytest.raises(LiltError, match=rf"{paths[kind]} \(in data\.train_files\[0\]\) has no column 'caption' "
                           r"\(its columns: filepath, title\): set data\.table\.image_key"):  # fmt: skip
            load_config("lilt", [f"data.train_files={json.dumps([paths[kind]])}", "data.table.caption_key=caption"])


def test_bad_rows_get_the_json_formats_messages_and_policy(rows, tmp_path, tokenizer):
    lines = ["filepath,title"] + [f"{r['filepath']},photo {k}" for k, r in enumerate(rows)]
    lines[3] = f"{rows[2]['filepath']},"  # entry 2: an empty caption
    lines[5] = f"{tmp_path}/gone.jpg,a photo"  # entry 4: a missing image
    (tmp_path / "bad.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(
        DataError,
        match=r"1 invalid entries in data\.train_files:\n  .*bad\.csv, entry 2: caption is empty; write a caption",
    ):
        build({"train_files": [str(tmp_path / "bad.csv")]}, tokenizer)
    lines[3] = f"{rows[2]['filepath']},photo 2"
    (tmp_path / "bad.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"(?s)1 of 12 images are missing:.*bad\.csv, entry 4"):
        build({"train_files": [str(tmp_path / "bad.csv")]}, tokenizer)
    _, dataset, _ = build(
        {"train_files": [str(tmp_path / "bad.csv")], "on_bad_sample": "skip", "max_bad_fraction": 0.2}, tokenizer
    )
    assert dataset.bad_samples.count == 1


def test_images_stored_as_bytes_serve_the_same_samples_as_their_files(rows, tmp_path, tokenizer):
    """A Parquet binary column and a datasets Image feature (what img2dataset's parquet output and
    HF image datasets hold) give the pixels of the same files, read from one memory-mapped store."""
    import pyarrow.parquet as pq
    from datasets import Dataset, Features, Image, Value

    paths = write_tables(tmp_path, rows)
    blobs = [open(r["filepath"], "rb").read() for r in rows]
    titles = [r["title"] if isinstance(r["title"], list) else [r["title"]] for r in rows]
    pq.write_table(pa.table({"filepath": blobs, "title": titles}), tmp_path / "bytes.parquet")
    features = Features({"filepath": Image(), "title": [Value("string")]})
    Dataset.from_dict(
        {"filepath": [{"bytes": b, "path": None} for b in blobs], "title": titles}, features=features
    ).save_to_disk(str(tmp_path / "bytes_dataset"))
    options = {"augment": {"randaugment": False}, "num_workers": 2}
    reference = served(build({"train_files": [paths["json"]], **options}, tokenizer, seed=3)[0])
    for table in (tmp_path / "bytes.parquet", tmp_path / "bytes_dataset"):
        loader, dataset, _ = build({"train_files": [str(table)], **options}, tokenizer, seed=3)
        assert dataset.table.image_path(0).startswith("stored:"), table
        got = served(loader)
        assert sorted(got) == list(range(12)), table
        assert all(torch.equal(got[i][0], reference[i][0]) and got[i][1] == reference[i][1] for i in got), table
