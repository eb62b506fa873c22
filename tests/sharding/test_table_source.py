"""CSV, TSV and Parquet tables as catalog sources (sharding/catalog/tables.py), on real files that
world/table_files.py writes from the sample world, with renamed columns read through ``columns:``.

The same world as JSONL and as each table gives the same kept URLs, species, labels and splits. What
differs, and is asserted as such: CSV has text only (``plant_id`` and the integer extras are strings)
and no null (an empty value is a missing one: a blank ``latin_name`` is ``missing_field``, not
``empty_latin_name``, and an empty licence leaves no ``license_raw``); the Parquet file holds
``plant_id`` as a string column, since the world mixes integer and ``perenual-N`` ids.

Every source that cannot be read is one ``error:`` line, exit status 2, nothing written. Memory:
50,000 rows read with a tracemalloc peak far below the file's size, and a 5 MB line or an
unterminated quote costs at most about one ``MAX_ROW_BYTES`` row.
"""

import gzip
import json
import tracemalloc
from pathlib import Path

import pytest

import world
from flora.config import ConfigError
from flora.sharding.__main__ import main
from flora.sharding.catalog.records import INPUT_FIELDS
from flora.sharding.catalog.sources import Unparseable
from flora.sharding.catalog.tables import MAX_ROW_BYTES, TableSource
from flora.sharding.config import TableConfig
from world.table_files import write_table

SPEC = world.WorldSpec(n_species=40, n_records=3000, seed=1, duplicate_rate=0.3, invalid_rate=0.02)
#: The columns the tables are written with, and the mapping that reads them back.
RENAMED = {"image_url": "url", "latin_name": "scientificName", "plant_id": "id"}
#: A value that needs RFC 4180 quoting: the delimiters, doubled quotes, line breaks.
AWKWARD = 'Smith, "J."\tand co\nsecond line\r\nthird; line'
HEADER = "plant_id,latin_name,image_url\n"


def catalog(source: Path, out: Path, *extra: str) -> int:
    return main(["catalog", "--source", str(source), "--out", str(out), "--no-progress", *extra])


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def kept(out: Path) -> list[tuple]:
    return [
        (r["image_url"], r["latin_name"], r["label"], r["split"]) for r in read(out / "dataset_splits.jsonl")
    ]


def as_table(record: dict, text: bool) -> dict:
    """A kept record of the JSONL run as a table's run writes it: ``plant_id`` a string, no JSON null
    in meta; CSV (``text``): integers as strings, no empty licence spelling either."""
    meta = {k: v for k, v in record["meta"].items() if v is not None and not (text and v == "")}
    if text:
        meta = {k: str(v) if isinstance(v, int) else v for k, v in meta.items()}
    return {**record, "plant_id": str(record["plant_id"]), "meta": meta}


@pytest.fixture(scope="module")
def records() -> list[dict]:
    out = world.generate_catalog(SPEC)
    for i, record in enumerate(out):
        if i % 40 == 0 and "observer" in record:
            record["observer"] = AWKWARD + str(i)
    return out


@pytest.fixture(scope="module")
def jsonl_run(records, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("jsonl")
    world.write_jsonl(records, tmp / "world.jsonl")
    assert catalog(tmp / "world.jsonl", tmp / "out") == 0
    return tmp / "out"


def stats(out: Path) -> dict:
    return json.loads((out / "export_stats.json").read_text())


@pytest.mark.parametrize(
    ("name", "fmt", "via"),
    [("world.csv", "csv", "yaml"), ("world.csv.gz", "csv", "cli"), ("world.tsv", "tsv", "cli"),
     ("world.tab", "tsv", "yaml"), ("world.parquet", "parquet", "yaml"), ("world.pq", "parquet", "cli")],
)  # fmt: skip
def test_a_table_with_renamed_columns_gives_the_jsonl_run(records, jsonl_run, tmp_path, name, fmt, via):
    source, out = tmp_path / name, tmp_path / "out"
    assert write_table(iter(records), source, fmt, columns=RENAMED) == len(records)
    if via == "yaml":
        (tmp_path / "catalog.yaml").write_text(
            "columns:\n" + "".join(f"  {k}: {v}\n" for k, v in RENAMED.items())
        )
        extra = ["--config", str(tmp_path / "catalog.yaml")]
    else:
        extra = [f"columns.{k}={v}" for k, v in RENAMED.items()]
    assert catalog(source, out, *extra) == 0
    assert kept(out) == kept(jsonl_run)
    assert (out / "class_mapping.json").read_bytes() == (jsonl_run / "class_mapping.json").read_bytes()
    ours, theirs = stats(out), stats(jsonl_run)
    assert ours["accounting_ok"] and ours["input_records"] == theirs["input_records"] == len(records)
    assert (ours["rejected"], ours["duplicates"]) == (theirs["rejected"], theirs["duplicates"])
    rows = read(out / "dataset_splits.jsonl")
    reference = read(jsonl_run / "dataset_splits.jsonl")
    reasons = dict(theirs["rejects_by_reason"])
    assert rows == [as_table(r, text=fmt != "parquet") for r in reference]
    if fmt != "parquet":  # text: an empty latin_name is a missing one
        blank = sum(r.get("latin_name") == "" for r in records)
        assert blank > 0
        reasons["empty_latin_name"] -= blank
        reasons["missing_field"] += blank
    assert ours["rejects_by_reason"] == {k: v for k, v in reasons.items() if v}
    awkward = [r["meta"]["observer"] for r in rows if r["meta"].get("observer", "").startswith(AWKWARD)]
    assert awkward  # the quoted value survived whole, line breaks and all
    sources = json.loads((out / "sources.json").read_text())["sources"]
    assert sources[0]["format"] == fmt and sources[0]["name"] == name and len(sources[0]["sha256"]) == 64
    if fmt == "parquet":
        assert sources[0]["rows"] == len(records) and sources[0]["created_by"].startswith("parquet-cpp")


def test_format_tsv_reads_a_txt_file(records, jsonl_run, tmp_path):
    write_table(records, tmp_path / "export.tsv", "tsv")
    (tmp_path / "export.tsv").rename(tmp_path / "export.txt")
    assert catalog(tmp_path / "export.txt", tmp_path / "out", "--format", "tsv") == 0
    assert kept(tmp_path / "out") == kept(jsonl_run)
    assert stats(tmp_path / "out")["source"] == "tsv:export.txt"


def test_csv_quoting_bom_crlf_and_bad_rows_by_line(tmp_path):
    text = (
        "\ufeffplant_id, latin_name ,image_url,note,meta\r\n"
        '1,Olea europaea,http://h/1.jpg,"a, b ""quoted""\r\nnext line",m\r\n'
        "\r\n"
        "2,Olea europaea,http://h/2.jpg\r\n"  # too few fields: line 5 (the row before spans 2 and 3)
        '3,Olea europaea,http://h/3.jpg,"x"y,z\r\n'  # a quote then a letter: line 6
        "4,,http://h/4.jpg,,\r\n"  # an empty latin_name is a missing one
        "5,Quercus ilex,http://h/5.jpg,,\r\n"
    )
    source = tmp_path / "plants.csv"
    source.write_bytes(text.encode())
    rows = list(TableSource(source, "csv", {}, TableConfig()))
    assert [position for position, _ in rows] == ["line 2", "line 5", "line 6", "line 7", "line 8"]
    assert rows[0][1] == {
        "plant_id": "1", "latin_name": "Olea europaea", "image_url": "http://h/1.jpg",
        "note": 'a, b "quoted"\r\nnext line', "meta": {"meta": "m"},
    }  # fmt: skip
    bad = rows[1][1]
    assert (
        isinstance(bad, Unparseable)
        and bad.reason == "bad_row"
        and "3 fields, the header has 5" in bad.message
    )
    assert isinstance(rows[2][1], Unparseable) and rows[2][1].reason == "bad_row"
    assert rows[3][1] == {"plant_id": "4", "image_url": "http://h/4.jpg"}
    out = tmp_path / "out"
    assert catalog(source, out) == 0
    rejects = {r["position"]: r["reason"] for r in read(out / "rejects.jsonl")}
    assert rejects == {"line 5": "bad_row", "line 6": "bad_row", "line 7": "missing_field"}
    assert stats(out)["input_records"] == 5 and stats(out)["accounting_ok"]


def test_a_column_named_as_a_field_but_not_mapped_to_it_goes_to_meta(tmp_path):
    source = tmp_path / "plants.csv"
    source.write_text(
        "plant_id,latin_name,url,image_url\n1,Olea europaea,http://h/1.jpg,http://thumb/1.jpg\n"
    )
    [(_, raw)] = list(TableSource(source, "csv", {"image_url": "url"}, TableConfig()))
    assert raw == {"plant_id": "1", "latin_name": "Olea europaea", "image_url": "http://h/1.jpg",
                   "meta": {"image_url": "http://thumb/1.jpg"}}  # fmt: skip


def test_parquet_values_keep_their_types(tmp_path):
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "plant_id": pa.array([7, 8], pa.int64()), "latin_name": ["Olea europaea", None],
        "image_url": ["http://h/7.jpg", "http://h/8.jpg"], "score": [0.5, float("nan")],
        "seen": pa.array([datetime.datetime(2020, 5, 1, 12, 30), None], pa.timestamp("s")),
        "empty": ["", None],
    })  # fmt: skip
    pq.write_table(table, tmp_path / "t.parquet")
    reader = TableSource(tmp_path / "t.parquet", "parquet", {}, TableConfig(batch_rows=1))
    assert reader.count() == 2 and reader.describe() == "parquet:t.parquet"
    assert list(reader) == [
        ("row 1", {"plant_id": 7, "latin_name": "Olea europaea", "image_url": "http://h/7.jpg", "score": 0.5,
                   "seen": "2020-05-01T12:30:00", "empty": ""}),
        ("row 2", {"plant_id": 8, "image_url": "http://h/8.jpg"}),
    ]  # fmt: skip


def _parquet_bytes(tmp_path, rows: int = 50) -> bytes:
    write_table([{"plant_id": 1, "latin_name": "Olea europaea", "image_url": "http://h/1.jpg"}] * rows,
                tmp_path / "src.parquet", "parquet")  # fmt: skip
    return (tmp_path / "src.parquet").read_bytes()


def _gzip_cut(tmp_path) -> bytes:
    body = HEADER + "".join(f"{i},Olea europaea,http://h/{i}.jpg\n" for i in range(20_000))
    data = gzip.compress(body.encode())
    return data[: len(data) // 2]


BROKEN = [
    ("empty.csv", lambda _: b"", [], "csv file {src} is empty: a table needs a header line"),
    ("blank.tsv", lambda _: b"\n\n", [], "is empty"),
    ("json.csv", lambda _: b'{"plant_id": 1, "latin_name": "Olea europaea"}\n', [], "holds JSON"),
    ("semi.csv", lambda _: b"plant_id;latin_name;image_url\n1;Olea europaea;http://h/1.jpg\n", [],
     "does not split on the delimiter ',' but on ';'; use table.delimiter=';'"),
    ("tabs.csv", lambda _: b"plant_id\tlatin_name\timage_url\n", [], "use --format tsv"),
    ("other.csv", lambda _: b"id,species,url\n1,Olea europaea,http://h/1.jpg\n", [],
     "has no column for plant_id, latin_name, image_url (its columns: id, species, url); map them"),
    ("plants.csv", lambda _: HEADER.encode(), ["columns.image_url=photo"],
     "columns.image_url names column 'photo', which csv file {src} lacks (its columns: plant_id, latin_name, "
     "image_url)"),
    ("plants.csv", lambda _: HEADER.encode(), ["columns.url=image_url"],
     "columns: 'url' is not an input field; expected some of plant_id, latin_name, image_url"),
    ("twice.csv", lambda _: b"plant_id,latin_name,image_url,image_url\n", [], "'image_url' appear twice"),
    ("latin1.csv", lambda _: (HEADER + "1,Olea europaea,http://h/1.jpg\n2,Ol\xe9a,http://h/2.jpg\n").encode("latin-1"),
     [], "line 3 is not utf-8-sig text"),
    ("cut.csv.gz", _gzip_cut, [], "cannot read {src} after line "),
    ("fake.csv.gz", lambda _: HEADER.encode(), [], "cannot read {src} after line 0: Not a gzipped file"),
    ("text.parquet", lambda _: HEADER.encode(), [], "{src} is not a Parquet file (it starts with b'plan'"),
    ("half.parquet", lambda t: _parquet_bytes(t)[:300], [], "{src} is a truncated Parquet file"),
    ("footer.parquet", lambda _: b"PAR1" + b"\0" * 100 + b"\x10\0\0\0PAR1", [],
     "cannot read Parquet file {src}"),
    ("empty.parquet", lambda t: _parquet_bytes(t, rows=0), [],
     "no usable record in parquet:empty.parquet: it holds no row (columns: plant_id, latin_name, image_url,"),
    ("header.csv", lambda _: HEADER.encode(), [],
     "no usable record in csv:header.csv: it holds a header and no row (columns: plant_id, latin_name, "
     "image_url)"),
    ("ragged.csv", lambda _: (HEADER + "1,Olea europaea\n2,Olea europaea\n").encode(), [],
     "2 rows read, all rejected as bad_row; no row has the header's 3 fields split by ','"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "content", "extra", "expected"), BROKEN, ids=[b[0] for b in BROKEN])
def test_a_table_that_cannot_be_read_is_one_line_and_writes_nothing(
    tmp_path, capsys, name, content, extra, expected
):
    source, out = tmp_path / name, tmp_path / "out"
    source.write_bytes(content(tmp_path))
    assert catalog(source, out, *extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("flora catalog: error: ") and "Traceback" not in err, err
    assert expected.format(src=source) in err, err
    assert not out.exists()


def test_an_unknown_mapping_key_names_the_input_fields(tmp_path):
    (tmp_path / "t.csv").write_text(HEADER)
    with pytest.raises(ConfigError, match=", ".join(INPUT_FIELDS)):
        TableSource(tmp_path / "t.csv", "csv", {"species": "latin_name"}, TableConfig())


def peak_bytes(reader) -> tuple[int, int]:
    """(rows, tracemalloc peak) of reading every row of ``reader`` and dropping it."""
    tracemalloc.start()
    try:
        rows = sum(1 for _ in reader)
        return rows, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> dict[tuple[str, int], Path]:
    """The 5,000 and 50,000 first rows of one world as CSV and as Parquet (row groups of 5,000)."""
    tmp = tmp_path_factory.mktemp("big")
    rows = world.generate_catalog(
        world.WorldSpec(n_species=500, n_records=50_000, seed=3, duplicate_rate=0.3)
    )
    out = {}
    for fmt, suffix in (("csv", "csv"), ("parquet", "parquet")):
        for n in (5_000, 50_000):
            out[fmt, n] = tmp / f"world-{n}.{suffix}"
            write_table(rows[:n], out[fmt, n], fmt, row_group=5_000)
    return out


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_50k_rows_are_read_in_the_memory_of_a_few_rows(tables, fmt):
    small, big = (
        peak_bytes(TableSource(tables[fmt, n], fmt, {}, TableConfig(batch_rows=1_000)))
        for n in (5_000, 50_000)
    )
    assert (small[0], big[0]) == (5_000, 50_000)
    assert big[1] < 1.5 * small[1] + 256 * 1024, (small, big)  # ten times the rows, not ten times the memory
    text_size = (
        tables["csv", 50_000].stat().st_size
    )  # Parquet compresses these rows ~6x: compare with the text
    assert big[1] < text_size / 4, (big, text_size)


GOOD_ROWS = "".join(f"{i},Olea europaea,http://h/{i}.jpg\n" for i in range(40_000))  # about 1.3 MB


@pytest.mark.parametrize(
    ("bad_line", "bound"),
    [
        # the line is read in 1 MiB, the rest skipped in 64 KiB pieces
        ("1,Olea europaea,http://h/x" + "y" * 5_000_000 + ".jpg\n", 2.5 * MAX_ROW_BYTES),
        # the quote swallows rows until the row passes 1 MiB: csv's field buffer holds 4 bytes a character
        ('1,"Olea europaea\n', 4.5 * MAX_ROW_BYTES),
    ],
    ids=["5mb-line", "unterminated-quote"],
)
def test_an_oversized_row_is_one_bad_row_in_bounded_memory(tmp_path, bad_line, bound):
    source = tmp_path / "huge.csv"
    source.write_text(HEADER + bad_line + GOOD_ROWS)
    bad, n_ok = [], 0
    tracemalloc.start()
    try:
        for position, raw in TableSource(source, "csv", {}, TableConfig()):
            if isinstance(raw, Unparseable):
                bad.append((position, raw.message))
            else:
                n_ok += 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    [(position, message)] = bad
    assert position == "line 2" and message.startswith(f"row over {MAX_ROW_BYTES:,} bytes (lines 2")
    if bad_line.endswith("jpg\n"):  # one line: every row after it is read
        assert n_ok == 40_000 and "(lines 2;" in message
    else:  # the quote took about 1 MiB of rows (named in the message), then reading resumed
        assert 0 < n_ok < 40_000 and f"(lines 2-{40_002 - n_ok};" in message
    assert peak < bound, peak


def test_table_encoding_reads_latin_1_and_refuses_one_not_read_by_lines(tmp_path, capsys):
    source = tmp_path / "latin1.csv"
    source.write_bytes((HEADER + "1,Quercus ilex,http://h/1.jpg?n=ch\xeane\n").encode("latin-1"))
    [(_, raw)] = list(TableSource(source, "csv", {}, TableConfig(encoding="latin-1")))
    assert raw["image_url"] == "http://h/1.jpg?n=ch\xeane"
    with pytest.raises(ConfigError, match="'utf-16' is not read line by line"):
        TableSource(source, "csv", {}, TableConfig(encoding="utf-16"))
    assert catalog(source, tmp_path / "out", "table.encoding=klingon") == 2
    assert "table.encoding: unknown encoding 'klingon'" in capsys.readouterr().err


@pytest.mark.parametrize("others", ['"Creator {i}"', "Creator {i}"], ids=["quoted", "unquoted"])
def test_a_quote_left_open_is_one_bad_line_and_no_other_row_is_lost(tmp_path, others):
    """Row 3 opens a quote it never closes: with the other rows quoted, strict quoting stops at the
    next quote; unquoted, the quote runs to the end of the file. Either way only its line is lost."""
    rows = [f"{i},Olea europaea,http://127.0.0.1:9/q/{i}.jpg," + others.format(i=i) for i in range(40)]
    rows[2] = '2,Olea europaea,http://127.0.0.1:9/q/2.jpg,"Bob'
    path = tmp_path / "plants.csv"
    path.write_text("plant_id,latin_name,image_url,creator\n" + "\n".join(rows) + "\n", encoding="utf-8")
    got = list(TableSource(path, "csv", {}, TableConfig()))
    assert [position for position, _ in got] == [f"line {n}" for n in range(2, 42)]
    bad = [raw for _, raw in got if isinstance(raw, Unparseable)]
    assert (
        len(bad) == 1 and bad[0].reason == "bad_row" and "the lines after it are read again" in bad[0].message
    )
    creators = [raw["creator"] for _, raw in got if not isinstance(raw, Unparseable)]
    assert creators == [f"Creator {i}" for i in range(40) if i != 2]
