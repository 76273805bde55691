"""Caption tables as the field keeps them, read as `data.train_files` beside the original JSON: CSV
and TSV (OpenCLIP's `--csv-img-key filepath --csv-caption-key title`), Parquet, and Hugging Face
`datasets` folders (written by `save_to_disk`). Rows are streamed batch by batch through pyarrow
(the Arrow files of a `datasets` folder memory-mapped) into the same packed caption index as the
JSON, with the same checks and messages: memory does not grow with the table.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

from ..errors import DataError

CSV_SEPARATORS = {".csv": ",", ".tsv": "\t"}
PARQUET = ".parquet"
DATASETS_STATE = "state.json"  # what datasets' save_to_disk writes beside its Arrow files
ROWS_PER_BATCH = 65536


def table_kind(path: str) -> str | None:
    """ "csv", "parquet" or "datasets" for a table `data.train_files` may name; None for the JSON format."""
    if os.path.isdir(path):
        return "datasets" if os.path.isfile(os.path.join(path, DATASETS_STATE)) else None
    extension = os.path.splitext(path)[1].lower()
    if extension in CSV_SEPARATORS:
        return "csv"
    return "parquet" if extension == PARQUET else None


def datasets_files(folder: str) -> list[str]:
    """The Arrow files of a `datasets` folder, in order (its state.json lists them)."""
    with open(os.path.join(folder, DATASETS_STATE), encoding="utf-8") as handle:
        state = json.load(handle)
    return [os.path.join(folder, entry["filename"]) for entry in state.get("_data_files", [])]


def _pyarrow():
    try:
        import pyarrow
    except ImportError:
        raise DataError("CSV, Parquet and datasets tables need pyarrow: pip install pyarrow") from None
    return pyarrow


def _columns(path: str, kind: str, separator: str | None) -> list[str]:
    pa = _pyarrow()
    if kind == "parquet":
        import pyarrow.parquet as pq

        return list(pq.ParquetFile(path).schema_arrow.names)
    if kind == "datasets":
        files = datasets_files(path)
        if not files:
            raise DataError(f"{path}: a datasets folder without data files in its {DATASETS_STATE}")
        with pa.memory_map(files[0]) as source:
            return list(pa.ipc.open_stream(source).schema.names)
    import pyarrow.csv as pacsv

    options = pacsv.ParseOptions(delimiter=_separator(path, separator))
    with pacsv.open_csv(path, parse_options=options) as reader:
        return list(reader.schema.names)


def _separator(path: str, separator: str | None) -> str:
    return separator or CSV_SEPARATORS.get(os.path.splitext(path)[1].lower(), ",")


def check_table(path: str, image_key: str, caption_key: str, separator: str | None, setting: str) -> None:
    """The table has both named columns; else an error naming the file, its columns and the keys."""
    kind = table_kind(path)
    try:
        columns = _columns(path, kind, separator)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - pyarrow's errors for a file that is not what its name says
        raise DataError(f"{path} (in {setting}): not a readable {kind} table ({type(err).__name__}: {err})") from None
    missing = [key for key in (image_key, caption_key) if key not in columns]
    if missing:
        raise DataError(
            f"{path} (in {setting}) has no column {' or '.join(repr(k) for k in missing)} (its columns: "
            f"{', '.join(columns) or 'none'}): set data.table.image_key and data.table.caption_key to the columns "
            "that hold the image path and the caption"
        )


def _batches(path: str, kind: str, columns: list[str], separator: str | None) -> Iterator:
    pa = _pyarrow()
    if kind == "parquet":
        import pyarrow.parquet as pq

        yield from pq.ParquetFile(path).iter_batches(batch_size=ROWS_PER_BATCH, columns=columns)
    elif kind == "datasets":
        for file in datasets_files(path):
            with pa.memory_map(file) as source:
                for batch in pa.ipc.open_stream(source):
                    yield batch.select(columns)
    else:
        import pyarrow.csv as pacsv

        parse = pacsv.ParseOptions(delimiter=_separator(path, separator), newlines_in_values=True)
        convert = pacsv.ConvertOptions(include_columns=columns, column_types={c: pa.string() for c in columns})
        with pacsv.open_csv(path, parse_options=parse, convert_options=convert) as reader:
            yield from reader


def iter_table_entries(
    path: str, image_key: str, caption_key: str, separator: str | None, setting: str
) -> Iterator[dict]:
    """The rows of a table as entries of the JSON format, `{"image": ..., "caption": ...}` (a
    caption column of lists gives several captions; an image is a path or its stored bytes),
    checked by the JSON format's checks."""
    check_table(path, image_key, caption_key, separator, setting)
    kind = table_kind(path)
    for batch in _batches(path, kind, [image_key, caption_key], separator):
        images = batch.column(batch.schema.get_field_index(image_key)).to_pylist()
        captions = batch.column(batch.schema.get_field_index(caption_key)).to_pylist()
        for image, caption in zip(images, captions):
            if isinstance(image, dict):  # a datasets Image feature: {"bytes": ..., "path": ...}
                image = image.get("bytes") or image.get("path")
            yield {"image": image, "caption": caption}
