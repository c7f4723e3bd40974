"""Manifest sources: a CSV/Parquet table with a ``uri`` column (optional ``size``/``etag``/``mtime``), read in record
batches and converted with Arrow compute, never a per-row Python loop over the whole table.

Each column is converted and checked for a whole batch at once; a batch that fails a fast check goes through the
exact per-value conversion (``_slow_column``), which either accepts it or names the column, the row and the value.
Uris take their one spelling (``sources``' rules) with vectorised fast paths for object-store keys and already
normal local paths; the few others (``file://`` urls, relative or unnormalised paths) go through ``resolve_uri``.
``user:password@`` is split off with one regex per batch; the distinct servers' credentials are kept, not stored.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from catalog_tagger.errors import UserError
from catalog_tagger.schema import LISTING_SCHEMA
from catalog_tagger.storage import (
    filesystem,
    is_local,
    is_transient,
    local_uri,
    protocol_of,
    redact,
    retry_transient,
    strip,
    unstrip,
)

BATCH_ROWS = 65_536  # Parquet rows per batch
CSV_BLOCK = 4 << 20  # CSV bytes per batch
COLUMNS = ("uri", "size", "etag", "mtime")
# scheme://user:password@rest (storage._USERINFO, anchored): greedy up to the authority's last '@'
_USERINFO = r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/?#\s'\"]*)@(?P<rest>.*)$"
_NOT_NORMAL = r"//|/\.\.?(/|$)|/$"  # what os.path.abspath would change in an absolute path
_EPOCH = (-62_135_596_800, 253_402_300_799)  # seconds of the years 1..9999: what a datetime holds
_FAILS = (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, OverflowError)


class _Slow(Exception):
    """A batch the fast conversion does not settle: the exact per-value path decides."""


def resolve_uri(uri: str, base: str) -> str:
    """Manifest URIs may be absolute (any scheme) or relative to the manifest's folder. A local file comes out in
    its one spelling (``local_uri``); an object-store key exactly as written."""
    if "://" in uri:
        return local_uri(uri) if is_local(uri) else uri
    if os.path.isabs(uri):
        return local_uri(uri)
    if is_local(base):
        return local_uri(os.path.join(os.path.dirname(strip(base)), uri))
    return unstrip(protocol_of(base), f"{strip(base).rsplit('/', 1)[0]}/{uri}")


# --------------------------------------------------------------------------------------------- one value (exact)
def as_datetime(v: Any) -> datetime | None:
    """A modification time: a datetime or date (UTC when naive), epoch seconds, or ISO-8601 / numeric text."""
    if v is None:
        return None
    if isinstance(v, datetime):
        return v if v.tzinfo else v.replace(tzinfo=UTC)
    if isinstance(v, date):
        return datetime(v.year, v.month, v.day, tzinfo=UTC)
    if isinstance(v, int | float | Decimal) and not isinstance(v, bool) and math.isfinite(v):
        return datetime.fromtimestamp(float(v), tz=UTC)
    if isinstance(v, str):
        try:
            return as_datetime(float(v))
        except ValueError:
            pass
        try:
            d = datetime.fromisoformat(v.strip().replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(v) from None
        return d if d.tzinfo else d.replace(tzinfo=UTC)
    raise ValueError(v)


def _whole(v: Any) -> int:
    """A size: a whole number of bytes, as a number or as text ("12", "12.0")."""
    n = Decimal(v.strip()) if isinstance(v, str) else v
    if isinstance(n, bool) or not isinstance(n, int | float | Decimal) or not math.isfinite(n) or n != int(n) or n < 0:
        raise ValueError(v)
    return int(n)


def _text(v: Any) -> str:
    """An ETag: text, or a whole number (a CSV reader's guess for an all-digit ETag), without its quotes."""
    if isinstance(v, bool) or not isinstance(v, str | int):
        raise ValueError(v)
    return str(v).strip('"')


# column -> (convert one value, the Arrow types accepted, what the column must hold)
_COLUMNS: dict[str, tuple[Callable[[Any], Any], tuple[str, ...], str]] = {
    "uri": (str, ("string",), "text"),
    "size": (_whole, ("integer", "floating", "decimal", "string"), "whole numbers of bytes"),
    "etag": (_text, ("integer", "string"), "text (an ETag)"),
    "mtime": (as_datetime, ("timestamp", "date", "integer", "floating", "decimal", "string"), "times (ISO-8601 "
              "text, or seconds since 1970)"),
}  # fmt: skip


def _kind(typ: pa.DataType) -> str:
    for kind in ("integer", "floating", "decimal", "timestamp", "date", "null"):
        if getattr(pa.types, f"is_{kind}")(typ):
            return kind
    return "string" if pa.types.is_string(typ) or pa.types.is_large_string(typ) else str(typ)


def _check_types(schema: pa.Schema, source: str) -> None:
    """Refuse a manifest without ``uri``, or with a column whose type cannot hold what it must."""
    if "uri" not in schema.names:
        raise UserError(f"manifest {redact(source)!r} has no 'uri' column (columns: {', '.join(schema.names)})")
    for name in COLUMNS:
        if name not in schema.names:
            continue
        _convert, kinds, what = _COLUMNS[name]
        kind = _kind(schema.field(name).type)
        if kind not in (*kinds, "null"):
            raise UserError(f"manifest {redact(source)!r}: column {name!r} has type {kind}; it must hold {what}")


def _slow_column(values: pa.Array, name: str, source: str, offset: int) -> pa.Array:
    """The exact conversion, value by value (a batch the fast path refused): a value that does not fit is a
    ``UserError`` naming the column, the row (counted over the whole manifest) and the value."""
    convert, _kinds, what = _COLUMNS[name]
    out = []
    for row, v in enumerate(values.to_pylist(), start=offset + 1):
        try:
            out.append(None if v is None or v == "" else convert(v))
        except (ValueError, TypeError, ArithmeticError, OSError):  # OSError, OverflowError: a time out of range
            raise UserError(
                f"manifest {redact(source)!r}: column {name!r} must hold {what}; row {row} has {v!r}"
            ) from None
    return pa.array(out, LISTING_SCHEMA.field(name).type)


# --------------------------------------------------------------------------------------------- a batch (fast)
def _blank_is_null(a: pa.Array) -> pa.Array:
    return pc.if_else(pc.equal(a, ""), pa.scalar(None, a.type), a) if pa.types.is_string(a.type) else a


def _fast_size(a: pa.Array) -> pa.Array:
    floating = pa.types.is_floating(a.type)
    if floating and (pc.any(pc.invert(pc.is_finite(a))).as_py() or pc.any(pc.not_equal(pc.floor(a), a)).as_py()):
        raise _Slow
    out = pc.cast(a, pa.int64())  # safe: text like "12.0", fractions and overflow raise
    if pc.any(pc.less(out, 0)).as_py():
        raise _Slow
    return out


def _fast_etag(a: pa.Array) -> pa.Array:
    return pc.utf8_trim(pc.cast(a, pa.string()), '"')


def _fast_mtime(a: pa.Array) -> pa.Array:
    ts = LISTING_SCHEMA.field("mtime").type
    if pa.types.is_timestamp(a.type) or pa.types.is_date(a.type):
        return pc.cast(a, ts)  # naive: taken as UTC; nanoseconds that do not fit raise
    if pa.types.is_string(a.type):
        text = pc.utf8_trim_whitespace(a)
        for attempt in (pa.float64(), ts, pa.timestamp("us")):  # epoch seconds, ISO-8601 with a zone, without
            try:
                out = pc.cast(text, attempt)
            except _FAILS:
                continue
            return _fast_mtime(out) if attempt == pa.float64() else pc.cast(out, ts)
        raise _Slow
    seconds = pc.cast(a, pa.float64())
    if not pc.all(pc.and_(pc.greater_equal(seconds, _EPOCH[0]), pc.less_equal(seconds, _EPOCH[1]))).as_py():
        raise _Slow  # NaN, infinities and times a datetime cannot hold: the exact path names the row
    micros = pc.cast(pc.round(pc.multiply(seconds, 1e6)), pa.int64())
    return pc.cast(micros, pa.timestamp("us")).cast(ts)


_FAST: dict[str, Callable[[pa.Array], pa.Array]] = {"size": _fast_size, "etag": _fast_etag, "mtime": _fast_mtime}


def _column(raw: pa.RecordBatch, name: str, source: str, offset: int) -> pa.Array:
    """The manifest's ``name`` column in the listing's type (all null when absent)."""
    target = LISTING_SCHEMA.field(name).type
    if name not in raw.schema.names:
        return pa.nulls(raw.num_rows, target)
    values = raw.column(name)
    if pa.types.is_null(values.type):
        return pa.nulls(raw.num_rows, target)
    if pa.types.is_large_string(values.type):
        values = values.cast(pa.string())
    try:
        return pc.cast(_FAST[name](_blank_is_null(values)), target)
    except (_Slow, *_FAILS):
        return _slow_column(values, name, source, offset)


# --------------------------------------------------------------------------------------------- uris
def _resolve(uris: pa.Array, source: str) -> pa.Array:
    """``resolve_uri`` for a batch of stripped, non-blank uris: object-store uris (and keys relative to an
    object-store manifest) by string operations, local paths already in their one spelling as they are, the rest
    (``file://`` urls, relative or unnormalised local paths) one by one."""
    scheme = pc.match_substring(uris, "://")
    relative = pc.invert(pc.or_(scheme, pc.starts_with(uris, "/")))
    if is_local(source):
        joined = pc.binary_join_element_wise(os.path.dirname(strip(source)), uris, "/")
        local = pc.invert(scheme)  # absolute, or relative to the manifest's folder
    else:
        joined = pc.binary_join_element_wise(unstrip(protocol_of(source), strip(source).rsplit("/", 1)[0]), uris, "/")
        local = pc.invert(pc.or_(scheme, relative))  # absolute paths only
    path = pc.if_else(relative, joined, uris)
    unnormal = pc.match_substring_regex(path, _NOT_NORMAL)
    exact = pc.or_(pc.and_(local, unnormal), pc.or_(pc.starts_with(uris, "file://"), pc.starts_with(uris, "local://")))
    if not pc.any(exact).as_py():
        return path
    fixed = [resolve_uri(u, source) for u in pc.filter(uris, exact).to_pylist()]
    return pc.replace_with_mask(path, exact, pa.array(fixed, pa.string()))


def _take_credentials(uris: pa.Array, source: str, credentials: dict[str, str]) -> pa.Array:
    """``uris`` without their ``user:password@``; each server's (``storage.origin``) goes in ``credentials``."""
    parts = pc.extract_regex(uris, _USERINFO)
    found = pc.and_(pc.is_valid(parts), pc.invert(pc.starts_with(uris, "file://")))  # local paths carry none
    if not pc.any(found).as_py():
        return uris
    scheme, userinfo, rest = (pc.struct_field(parts, i) for i in range(3))
    host = pc.struct_field(pc.extract_regex(rest, r"^(?P<host>[^/]*)"), 0)
    servers = pa.table({"origin": pc.utf8_lower(pc.binary_join_element_wise(scheme, host, "")), "info": userinfo})
    pairs = servers.filter(found).group_by(["origin", "info"]).aggregate([])
    for key, info in zip(pairs["origin"].to_pylist(), pairs["info"].to_pylist(), strict=True):
        if credentials.setdefault(key, info) != info:
            raise UserError(
                f"manifest {redact(source)!r}: uris of {key} carry different credentials (user:password@); "
                "give one per server"
            )
    return pc.if_else(found, pc.binary_join_element_wise(scheme, rest, ""), uris)


def _listing_batch(
    raw: pa.RecordBatch, source: str, offset: int, credentials: dict[str, str]
) -> tuple[pa.RecordBatch, int]:
    """One manifest batch as listing rows (blank uris dropped); returns it and the number of blanks."""
    columns = {name: _column(raw, name, source, offset) for name in ("size", "etag", "mtime")}
    if "uri" in raw.schema.names and not pa.types.is_null(raw.schema.field("uri").type):
        uris = pc.utf8_trim_whitespace(pc.cast(raw.column("uri"), pa.string()))
    else:
        uris = pa.nulls(raw.num_rows, pa.string())
    keep = pc.fill_null(pc.not_equal(uris, ""), False)
    kept = pc.filter(uris, keep)
    uris = _take_credentials(_resolve(kept, source), source, credentials)
    batch = pa.RecordBatch.from_arrays(
        [uris, *(pc.filter(columns[c], keep) for c in ("size", "etag", "mtime"))], schema=LISTING_SCHEMA
    )
    return batch, raw.num_rows - len(kept)


# --------------------------------------------------------------------------------------------- the file
def _raw_batches(source: str, storage_options: dict[str, Any] | None, stack: ExitStack) -> Iterator[pa.RecordBatch]:
    """The manifest's ``uri``/``size``/``etag``/``mtime`` columns in record batches: Parquet by row group slices,
    CSV (``.csv``, ``.csv.gz``, ``.tsv``) by blocks, every CSV column as text with empty cells null (so that
    ``01`` or ``true`` stay as written). The first batch comes after the columns' types are checked."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    name = source.lower().split("?", 1)[0]
    if not name.endswith((".csv", ".csv.gz", ".tsv")):
        parquet = pq.ParquetFile(_open(source, storage_options, stack))
        _check_types(parquet.schema_arrow, source)
        columns = [c for c in COLUMNS if c in parquet.schema_arrow.names]
        yield from parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns)
        return
    parse = pacsv.ParseOptions(delimiter="\t" if name.endswith(".tsv") else ",")
    read = pacsv.ReadOptions(block_size=CSV_BLOCK)
    with _open(source, storage_options, stack) as head:
        names = pacsv.open_csv(head, parse_options=parse, read_options=read).schema.names
    text = {c: pa.string() for c in names}
    convert = pacsv.ConvertOptions(column_types=text, null_values=[""], strings_can_be_null=True,
                                   include_columns=[c for c in COLUMNS if c in names])  # fmt: skip
    _check_types(pa.schema(list(text.items())), source)
    yield from pacsv.open_csv(_open(source, storage_options, stack), parse_options=parse, read_options=read,
                              convert_options=convert)  # fmt: skip


def _open(source: str, storage_options: dict[str, Any] | None, stack: ExitStack) -> pa.NativeFile:
    """The manifest as an Arrow file (a local one natively; gzip unpacked); closed with ``stack``."""
    shown = redact(source)
    try:
        if is_local(source):
            f: pa.NativeFile = pa.OSFile(strip(source))
        else:
            fs = filesystem(source, storage_options)
            f = pa.PythonFile(retry_transient(lambda: fs.open(strip(source), "rb"), f"open {shown}"), mode="r")
    except FileNotFoundError:
        raise UserError(f"manifest {shown!r} not found") from None
    except OSError as err:
        if is_transient(err):
            raise
        raise UserError(f"manifest {shown!r} cannot be read: {err}") from None
    stack.callback(f.close)
    if source.lower().split("?", 1)[0].endswith(".gz"):
        f = pa.CompressedInputStream(f, "gzip")
        stack.callback(f.close)
    return f


def read_manifest(
    source: str, storage_options: dict[str, Any] | None, credentials: dict[str, str], notes: list[str]
) -> Iterator[pa.RecordBatch]:
    """A CSV/Parquet table with a ``uri`` column as listing batches; optional ``size``/``etag``/``mtime`` are kept
    (checked first). Blank uris are counted and dropped; duplicates are the diff's to count."""
    offset = blanks = 0
    with ExitStack() as stack:
        raw_batches = _raw_batches(source, storage_options, stack)
        while True:
            try:
                raw = next(raw_batches)
            except StopIteration:
                break
            except (OSError, ValueError, EOFError, zlib.error) as err:  # ArrowInvalid is a ValueError
                if is_transient(err):
                    raise
                shown = redact(source)
                raise UserError(f"manifest {shown!r} cannot be read ({err}); give a Parquet or CSV file") from None
            batch, blank = _listing_batch(raw, source, offset, credentials)
            offset, blanks = offset + raw.num_rows, blanks + blank
            yield batch
    if blanks:
        notes.append(f"{blanks} blank uri(s) in the manifest ignored")
    if credentials:
        servers = len(credentials)
        notes.append(f"credentials (user:password@) in the uris of {servers} server(s): used to read, not stored")
