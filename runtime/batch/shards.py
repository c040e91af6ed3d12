"""The output folder of a batch job: WebDataset shards, the rows of each shard, the index, the job file.

    DIR/job.json          what the job is (the records' sha256, bundle, settings, sizes); a rerun must match it
    DIR/00000.tar ...     WebDataset shards: {key}.png, {key}.json (the image's info), {key}.txt (its prompt)
    DIR/rows/00000.jsonl  the index rows of each complete shard, images and error rows alike
    DIR/index.parquet     every row of every complete shard (index.jsonl with --index jsonl)

A shard is written under a temporary name and renamed when complete (`atomic_save`), after its rows
file, so a `NNNNN.tar` is always whole and always has its rows: a rerun skips exactly those shards.
The tar's bytes depend only on its records (members in row order, mtime 0, uid/gid 0, no names), so
an unchanged job writes the same shard on every run. The index is rewritten, atomically too, after
each shard at most once a minute, and at the end of every run, complete or interrupted; it can
always be made again from the rows files. A lock (`DIR/.lock`) keeps a second run out of the folder.
"""

import io
import json
import tarfile
import time
from pathlib import Path

from imagen._io import atomic_save, atomic_write

from .rows import PYARROW_HINT, BatchError, Row

OK, ERROR = "ok", "error"
JOB_FILE, ROWS_FOLDER, LOCK_FILE = "job.json", "rows", ".lock"
INDEX_FORMATS = ("parquet", "jsonl")
# the index's columns and their Arrow types; a record from a Ray worker also carries its PNG, its shard's
# number and its batch's (`shard` is the shard's file name, set when the shard is written)
INDEX_COLUMNS = {
    "key": "string",
    "id": "string",
    "line": "int64",
    "image": "int64",
    "shard": "string",
    "status": "string",
    "error": "string",
    "message": "string",
    "prompt": "string",
    "seed": "int64",
    "info": "string",
}
TRANSIT_COLUMNS = {**INDEX_COLUMNS, "png": "binary", "shard_index": "int64", "batch": "int64", "batch_records": "int64"}
INDEX_SECONDS = 60.0


def image_record(row: Row, index: int, png: bytes, info: dict) -> dict:
    """One image of a row: the index's columns, its PNG, and its info as canonical JSON."""
    text = json.dumps(info, sort_keys=True, ensure_ascii=False)
    return {
        "key": row.keys[index],
        "id": row.id,
        "line": row.line,
        "image": index,
        "status": OK,
        "error": None,
        "message": None,
        "prompt": row.prompt,
        "seed": row.seed,
        "info": text,
        "png": png,
    }


def error_record(row: Row, error: str, message: str) -> dict:
    """A row that made no image: the typed error's name and message."""
    return {
        **dict.fromkeys(("key", "image", "info", "png")),
        "id": row.id,
        "line": row.line,
        "status": ERROR,
        "error": error,
        "message": message,
        "prompt": row.prompt,
        "seed": row.seed,
    }


def arrow_schema(columns: dict):
    import pyarrow

    return pyarrow.schema([(name, getattr(pyarrow, kind)()) for name, kind in columns.items()])


def require_pyarrow(what: str) -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise BatchError(f"{what} needs pyarrow: {PYARROW_HINT}; or pass --index jsonl") from None


def write_tar(path: Path, records: list[dict]) -> None:
    """The images of `records` as a WebDataset tar, byte for byte the same for the same records."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for record in records:
            if record["status"] != OK:
                continue
            members = (("png", record["png"]), ("json", record["info"].encode()), ("txt", record["prompt"].encode()))
            for extension, data in members:
                member = tarfile.TarInfo(f"{record['key']}.{extension}")
                member.size, member.mtime, member.mode = len(data), 0, 0o644
                member.uid = member.gid = 0
                member.uname = member.gname = ""
                tar.addfile(member, io.BytesIO(data))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def to_jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


class JobFolder:
    """DIR of one job: `with JobFolder(out, job, index) as folder:` locks it, checks or writes its job
    file and removes temporary files a killed run left; `complete` says which shards are done."""

    def __init__(self, out, job: dict, index_format: str = "parquet"):
        if index_format not in INDEX_FORMATS:
            raise BatchError(f"unknown index format {index_format!r}; use parquet or jsonl")
        self.out, self.job, self.index_format = Path(out), job, index_format
        self.index_path = self.out / f"index.{index_format}"
        self._lock = None
        self._index_written = float("-inf")

    def __enter__(self) -> "JobFolder":
        if self.out.exists() and not self.out.is_dir():
            raise BatchError(f"{self.out} exists and is not a folder; pass --out a folder")
        (self.out / ROWS_FOLDER).mkdir(parents=True, exist_ok=True)
        self._take_lock()
        try:
            self._check_job()
            for leftover in [*self.out.glob(".*.tmp"), *(self.out / ROWS_FOLDER).glob(".*.tmp")]:
                leftover.unlink(missing_ok=True)  # a killed run's partial shard, never a shard's name
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file releases the lock
            self._lock = None

    def _take_lock(self) -> None:
        self._lock = open(self.out / LOCK_FILE, "a")  # noqa: SIM115 - held until __exit__
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, one run at a time is the user's to keep
            return
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.__exit__()
            raise BatchError(f"another imagen-batch is writing {self.out}; wait for it or pass another --out") from None

    def _check_job(self) -> None:
        path = self.out / JOB_FILE
        if not path.is_file():
            if any(self.out.glob("*.tar")):
                raise BatchError(f"{self.out} holds shards but no {JOB_FILE}; pass an empty or new --out")
            atomic_write(path, json.dumps(self.job, indent=1, sort_keys=True) + "\n")
            return
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise BatchError(f"{path} cannot be read ({error}); pass a new --out") from None
        differs = sorted(key for key in set(found) | set(self.job) if found.get(key) != self.job.get(key))
        if differs:
            name = differs[0]
            raise BatchError(
                f"{self.out} holds another job: its {name} is {found.get(name)!r}, this run's {self.job.get(name)!r}; "
                "rerun with the same prompts and options to resume it, or pass another --out"
            )

    def shard_path(self, name: str) -> Path:
        return self.out / name

    def rows_path(self, name: str) -> Path:
        return self.out / ROWS_FOLDER / (Path(name).stem + ".jsonl")

    def complete(self, name: str) -> list[dict] | None:
        """The index rows of shard `name` if its tar is there (it is whole), else None."""
        rows = self.rows_path(name)
        if not (self.shard_path(name).is_file() and rows.is_file()):
            return None
        return read_jsonl(rows)

    def write_shard(self, name: str, records: list[dict]) -> list[dict]:
        """The rows file, then the tar (each written whole, then renamed); returns the index rows."""
        records = sorted(records, key=lambda record: (record["line"], record["image"] or 0))
        rows = [{column: record.get(column) for column in INDEX_COLUMNS} | {"shard": name} for record in records]
        atomic_write(self.rows_path(name), to_jsonl(rows))
        atomic_save(self.shard_path(name), lambda tmp: write_tar(tmp, records))
        return rows

    def write_index(self, rows: list[dict], *, force: bool = True) -> None:
        """The index of these rows, in row order, written whole and renamed; without `force`, only if
        the last one is a minute old (a long job keeps a usable index without rewriting it per shard)."""
        if not force and time.monotonic() - self._index_written < INDEX_SECONDS:
            return
        rows = sorted(rows, key=lambda row: (row["line"], row["image"] or 0))
        if self.index_format == "jsonl":
            atomic_write(self.index_path, to_jsonl(rows))
        else:
            import pyarrow
            import pyarrow.parquet as parquet

            table = pyarrow.Table.from_pylist(rows, schema=arrow_schema(INDEX_COLUMNS))
            atomic_save(self.index_path, lambda tmp: parquet.write_table(table, tmp))
        self._index_written = time.monotonic()


class ShardCollector:
    """Records of engine batches, in any order, into shards: a shard is written once every one of its
    batches has come back whole (each record says how many its batch made); `on_shard(name)` follows."""

    def __init__(self, folder: JobFolder, shards: list, done_rows: list[dict], on_shard=None):
        self.folder, self.on_shard = folder, on_shard
        self.rows = list(done_rows)  # the index rows of complete shards
        self.names = {shard.index: shard.name for shard in shards}
        self.pending = {shard.index: len(shard.batches) for shard in shards}
        self.records = {
            shard.index: [error_record(row, *row.error) for row in shard.rows if row.error is not None]
            for shard in shards
        }
        self.batches: dict[tuple[int, int], list[dict]] = {}
        self.written = 0

    def start(self) -> None:
        """Writes the shards that have no batch (every row an error)."""
        for index in [index for index, count in self.pending.items() if count == 0]:
            self._write(index)

    def add(self, shard: int, records: list[dict]) -> None:
        for record in records:
            batch = self.batches.setdefault((shard, record["batch"]), [])
            batch.append(record)
            if len(batch) == record["batch_records"]:
                self.records[shard] += self.batches.pop((shard, record["batch"]))
                self.pending[shard] -= 1
                if self.pending[shard] == 0:
                    self._write(shard)

    def _write(self, index: int) -> None:
        name = self.names[index]
        self.rows += self.folder.write_shard(name, self.records.pop(index))
        del self.pending[index]
        self.written += 1
        self.folder.write_index(self.rows, force=False)
        if self.on_shard is not None:
            self.on_shard(name)

    def missing(self) -> list[str]:
        """Shards whose batches did not all come back."""
        return [self.names[index] for index in sorted(self.pending)]
