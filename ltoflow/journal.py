"""The backup journal: what a crash, a fault or Ctrl-C leaves behind so `--resume` can continue.

A job (one source onto one drive, with one capacity and container size) has three files in the
state directory, named after a key of those settings:

```
<key>.journal        JSON lines, each fsynced: begin, one line per container on tape (with its
                     hashes), catalog (when the set's catalog is known; catalog-on-tape for a
                     set of one tape), one line per tape done, a break where a tape filled
                     before its planned share
<key>.scan           the scan the plan was made from, so a resume rebuilds the very same plan
<key>.catalog.json   the set's catalog, once built (tape 1 finished): later tapes reuse it; a
                     set of one tape has none (a resume builds its catalog again)
```
Every line is written and fsynced after the thing it records is durable on tape, so the journal
never claims more than the tapes hold; a line torn by a crash is ignored. The files are removed
when the backup finishes.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import pickle
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import attrs
import orjson

from ltoflow.catalog import Catalog, CatalogCodec
from ltoflow.errors import JournalError, UsageError
from ltoflow.scan import FileTable, ScanResult

#: 3: the scan as the file table's columns; 4: its paths as one buffer; 5: a set of one tape
#: has no catalog copy (catalog-on-tape), which 4's readers would not resume.
JOURNAL_VERSION = 5
#: Versions this one reads: 4's journals mean the same, with a copy of every catalog.
READABLE_VERSIONS = (4, 5)
#: Set by tests and by operators who keep state next to the job, not in their home directory.
STATE_DIR_ENV = "LTOFLOW_STATE_DIR"


def default_state_dir() -> Path:
    """$LTOFLOW_STATE_DIR, else $XDG_STATE_HOME/ltoflow, else ~/.local/state/ltoflow."""
    if os.environ.get(STATE_DIR_ENV):
        return Path(os.environ[STATE_DIR_ENV])
    base = os.environ.get("XDG_STATE_HOME")
    return (Path(base) if base else Path("~/.local/state").expanduser()) / "ltoflow"


def job_key(source_root: Path, target: str, capacity_bytes: int, container_bytes: int) -> str:
    """Names the job: the same source, drive target and sizes give the same key."""
    text = f"{source_root.absolute()}\0{target}\0{capacity_bytes}\0{container_bytes}"
    return "job-" + hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:20]


@attrs.frozen
class JobStart:
    """What a journal's first line says of its job: which set, from where, onto what, with
    which sizes (None in journals written before they were kept)."""

    path: Path
    set_id: str
    source_root: str
    target: str | None
    capacity_bytes: int | None
    container_bytes: int | None


def interrupted_jobs(state_dir: Path) -> list[JobStart]:
    """The jobs whose journals are in `state_dir` (those whose first line can be read), by
    path."""
    found = []
    try:
        paths = sorted(state_dir.glob("job-*.journal"))
    except OSError:
        return []
    for path in paths:
        try:
            with open(path, "rb") as fh:
                rec = orjson.loads(fh.readline())
            found.append(JobStart(path, rec["set_id"], rec["source_root"], rec.get("target"),
                                  rec.get("capacity_bytes"), rec.get("container_bytes")))
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            continue
    return found


@attrs.frozen
class ContainerDone:
    index: int
    sha256: str | None
    #: Its segments' hashes as runs (first segment, their digests one after another): see
    #: plan.Digests.known_runs and plan.digest_pairs. The journal line holds them in hex.
    segment_runs: tuple[tuple[int, bytes], ...]
    #: (file, hash) of the file of several segments that ends in it, if any.
    files: tuple[tuple[int, str], ...]
    #: The job's unusable files so far (hashing.SourceFaults.snapshot), when there are any.
    faults: dict[str, Any] | None = None


@attrs.define
class ResumeState:
    """What an interrupted job got done, as its journal tells it."""

    set_id: str
    created_at: str
    scan: ScanResult
    containers: dict[int, ContainerDone] = attrs.field(factory=dict)
    tapes_done: dict[int, str | None] = attrs.field(factory=dict)  # index -> volume serial
    #: Containers before which a tape filled early (a new tape starts there), in order.
    breaks: list[int] = attrs.field(factory=list)
    #: Tape index -> how many breaks its catalog knew: fewer than now means a stale layout.
    tape_layouts: dict[int, int] = attrs.field(factory=dict)
    catalog: Catalog | None = None
    #: The latest SourceFaults.snapshot the journal holds (None: no file was skipped).
    faults: dict[str, Any] | None = None
    planned_containers: int = 0
    planned_tapes: int = 0

    def done_prefix(self) -> int:
        """Containers 0..n-1 are all on tape (the journal records them in order)."""
        n = 0
        while n in self.containers:
            n += 1
        return n

    def describe(self) -> str:
        done = (f"set {self.set_id}: {self.done_prefix()} of {self.planned_containers} "
                f"containers and {len(self.tapes_done)}")
        if not self.breaks:
            return f"{done} of {self.planned_tapes} tapes done"
        # the tapes it needs now follow from the plan; not known here
        return (f"{done} tape(s) done ({len(self.breaks)} filled early, so it may need more "
                f"than the {self.planned_tapes} planned)")


#: The scan's file columns, in the order they are kept.
_FILE_COLUMNS = ("relative_path", "size", "mtime_ns", "mode", "raw_path")


def _scan_bytes(scan: ScanResult) -> bytes:
    """The scan, for this machine's ltoflow only: the file table's columns as they are."""
    files = scan.files
    columns = [getattr(files, name) for name in _FILE_COLUMNS]
    return pickle.dumps((_FILE_COLUMNS, columns, attrs.evolve(scan, files=())), protocol=5)


def _scan_from_bytes(data: bytes) -> ScanResult:
    names, columns, rest = pickle.loads(data)
    if tuple(names) != _FILE_COLUMNS:
        raise ValueError("it was written by another version of ltoflow")
    files = FileTable()
    for name, column in zip(names, columns, strict=True):
        setattr(files, name, column)
    if len(set(map(len, columns[:4]))) != 1:
        raise ValueError("its file columns differ in length")
    result: ScanResult = attrs.evolve(rest, files=files)
    return result


def _start_again(path: Path) -> str:
    """What to do when the journal at `path` is no use: the tapes it wrote are no use either."""
    return f"delete {path} and start the backup again, on blank tapes"


def _runs(raw: list[list[Any]], path: Path) -> tuple[tuple[int, bytes], ...]:
    """A container record's segment runs, checked: each a whole number of hex digests."""
    try:
        runs = tuple((int(first), bytes.fromhex(hexes)) for first, hexes in raw)
    except (TypeError, ValueError):
        runs = ((0, b"?"),)
    if any(not digests or len(digests) % 32 for _, digests in runs):
        raise UsageError(f"the job journal {path} is damaged (a container's segment hashes "
                         f"are cut short); it cannot be resumed: {_start_again(path)}")
    return runs


def _try_lock(fd: int, path: Path, *, wait: float = 1.0) -> bool:
    """Take the journal's lock for this process; False when another process holds it. Another
    command that only looks (_is_free) holds a shared lock for an instant: waited for."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        except OSError as e:
            raise _cannot_lock(path, e) from e


def _is_free(fd: int, path: Path) -> bool:
    """Whether no running job holds the journal's lock. A shared lock, let go at once: two
    commands that look at the same time do not take each other for a running job."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as e:
        raise _cannot_lock(path, e) from e
    fcntl.flock(fd, fcntl.LOCK_UN)
    return True


def _cannot_lock(path: Path, e: OSError) -> UsageError:
    return UsageError(f"cannot lock the job journal {path}: {e.strerror}; give a --state-dir "
                      "on a local filesystem")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, chunks: Iterator[bytes] | Sequence[bytes]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        for chunk in chunks:
            fh.write(chunk)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    _fsync_dir(path.parent)


class CatalogCopy:
    """The journal's copy of the set's catalog while it is written; I/O errors are
    JournalErrors. Its methods block: call them in a thread."""

    def __init__(self, journal: Journal, fh: BinaryIO) -> None:
        self._journal = journal
        self._fh = fh

    def write(self, chunk: bytes) -> None:
        try:
            self._fh.write(chunk)
        except OSError as e:
            raise self._journal._error(e) from e

    def close(self) -> None:
        try:
            self._fh.close()
        except OSError as e:
            raise self._journal._error(e) from e


class Journal:
    """Appends fsynced lines to one job's journal. Its methods block: call them in a thread."""

    def __init__(self, state_dir: Path, key: str) -> None:
        self.state_dir = state_dir
        self.key = key
        self.path = state_dir / f"{key}.journal"
        self.scan_path = state_dir / f"{key}.scan"
        self.catalog_path = state_dir / f"{key}.catalog.json"
        self._fd = -1
        #: Whether anything durable on tape is recorded (else a failed job leaves no journal).
        self.has_progress = False

    def exists(self) -> bool:
        try:
            return self.path.exists()
        except OSError as e:  # the state directory cannot be searched (EACCES)
            raise UsageError(f"cannot look for the job journal in {self.state_dir}: "
                             f"{e.strerror}; give a --state-dir this user may use") from e

    def in_use(self) -> bool:
        """Whether a running job holds the journal (its lock)."""
        try:
            with open(self.path, "rb") as fh:
                return not _is_free(fh.fileno(), self.path)
        except FileNotFoundError:
            return False

    def is_stale(self) -> bool:
        """A journal with no beginning that nobody is writing: a job died while creating it."""
        try:
            with open(self.path, "rb") as fh:
                if not _is_free(fh.fileno(), self.path):
                    return False  # a running job's
                first = fh.readline()
        except FileNotFoundError:
            return False
        return not (first.startswith(b'{"kind":"begin"') and first.endswith(b"\n"))

    def begin(self, *, set_id: str, created_at: str, scan: ScanResult,
              containers: int, tapes: int, target: str, capacity_bytes: int,
              container_bytes: int) -> None:
        """Start a new journal: claimed (created exclusively and locked) first, then the
        scan, then its first line, so a journal with a beginning always has its scan."""
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            why = ("it exists and is not a directory" if isinstance(e, FileExistsError)
                   else e.strerror)
            raise UsageError(f"cannot use {self.state_dir} as the state directory (for the job "
                             f"journal): {why}; give a writable --state-dir") from e
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND
                         | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            raise UsageError(f"another backup of this source onto this drive has just started "
                             f"(journal {self.path}); let it finish") from None
        except OSError as e:
            raise UsageError(f"cannot create the job journal {self.path}: {e.strerror}; give "
                             "a writable --state-dir") from e
        self._fd = fd
        # Created just now, exclusively: only a command looking at it can hold the lock (for
        # an instant), never a job.
        if not _try_lock(fd, self.path, wait=10.0):
            self.close()
            raise UsageError(f"cannot lock the job journal {self.path} that this backup has "
                             "just created; try again")
        self._io(lambda: _fsync_dir(self.state_dir))
        self._io(lambda: _write_durably(self.scan_path, [_scan_bytes(scan)]))
        self._append({"kind": "begin", "version": JOURNAL_VERSION, "set_id": set_id,
                      "created_at": created_at, "source_root": str(scan.root),
                      "containers": containers, "tapes": tapes,
                      # what job_key hashes, for a resume given other flags to name them
                      "target": target, "capacity_bytes": capacity_bytes,
                      "container_bytes": container_bytes})
        self.has_progress = False

    def reopen(self) -> None:
        """Append to the existing journal (a resumed job). A line a crash left half-written
        is cut off first, so that the next record starts on a line of its own."""
        self.has_progress = True
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        except OSError as e:
            raise UsageError(f"cannot open the job journal {self.path}: {e.strerror}") from e
        if not _try_lock(self._fd, self.path):
            self.close()
            raise UsageError(f"another ltoflow is running this backup (its journal {self.path} "
                             "is locked); let it finish, or stop it first")

        def cut_torn_tail() -> None:
            data = self.path.read_bytes()
            keep = data.rfind(b"\n") + 1
            if keep < len(data):
                os.ftruncate(self._fd, keep)
                os.fsync(self._fd)

        self._io(cut_torn_tail)

    def container_done(self, done: ContainerDone) -> None:
        """One line: the container's hash, its files' and its segments'. The segment runs
        go out in hex a slice at a time: a container of half a million small files has
        32 MB of them, which are not also built as one string."""
        record: dict[str, Any] = {"kind": "container", "index": done.index,
                                  "sha256": done.sha256, "files": done.files}
        if done.faults is not None:
            record["faults"] = done.faults
        head = orjson.dumps(record)[:-1] + b',"segments":['

        def pieces() -> Iterator[bytes]:
            yield head
            for n, (first, raw) in enumerate(done.segment_runs):
                yield b'%s[%d,"' % (b"," if n else b"", first)
                for k in range(0, len(raw), 1 << 20):
                    yield raw[k:k + (1 << 20)].hex().encode()
                yield b'"]'
            yield b"]}\n"

        self._append_pieces(pieces())

    def catalog_known(self, catalog: Catalog, codec: CatalogCodec,
                      faults: dict[str, Any] | None = None) -> None:
        """Keep the set's catalog (a resume past tape 1 writes this very catalog again), and
        the unusable files as they were when it was built."""
        self._io(lambda: _write_durably(self.catalog_path, codec.encode(catalog)))
        self._append({"kind": "catalog", "faults": faults})

    def open_catalog_copy(self) -> CatalogCopy:
        """A file for the set's catalog as it is written to tape 1 (see `catalog_copied`)."""
        try:
            fh = open(  # noqa: SIM115  # CatalogCopy owns it and closes it
                self.catalog_path.with_name(self.catalog_path.name + ".tmp"), "wb")
        except OSError as e:
            raise self._error(e) from e
        return CatalogCopy(self, fh)

    def catalog_copied(self, faults: dict[str, Any] | None = None) -> None:
        """The copy from `open_catalog_copy` is complete (and on tape 1): keep it."""
        tmp = self.catalog_path.with_name(self.catalog_path.name + ".tmp")

        def keep() -> None:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            tmp.replace(self.catalog_path)
            _fsync_dir(self.state_dir)

        self._io(keep)
        self._append({"kind": "catalog", "faults": faults})

    def catalog_written(self, faults: dict[str, Any] | None = None) -> None:
        """The catalog of a set of one tape is on it; the journal keeps no copy (a resume
        builds it again from the containers' lines)."""
        self._append({"kind": "catalog-on-tape", "faults": faults})

    def tape_done(self, index: int, volume_serial: str | None, layout: int = 0) -> None:
        """Tape `index` is unloaded with its catalog, which knew `layout` tape breaks."""
        self._append({"kind": "tape", "index": index, "volume_serial": volume_serial,
                      "layout": layout})

    def tape_break(self, container: int) -> None:
        """The tape being written filled early: a new tape starts at `container`."""
        self._append({"kind": "break", "container": container})

    def finish(self) -> None:
        """The set is complete: the journal has nothing left to say."""
        self.close()
        for p in (self.path, self.scan_path, self.catalog_path):
            p.unlink(missing_ok=True)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _append(self, record: dict[str, Any]) -> None:
        self._append_pieces(iter((orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE),)))

    def _append_pieces(self, line: Iterator[bytes]) -> None:
        """Write one line, given in pieces, and make it durable. A crash part-way leaves a
        torn last line, which `reopen` cuts off and `load` ignores."""
        self.has_progress = True

        def write() -> None:
            for piece in line:
                view = memoryview(piece)
                while view:
                    view = view[os.write(self._fd, view):]
            os.fsync(self._fd)

        self._io(write)

    def _io(self, action: Callable[[], None]) -> None:
        """Run a write to the state directory; an OSError becomes a JournalError that says
        what is safe and what to do."""
        try:
            action()
        except OSError as e:
            raise self._error(e) from e

    def _error(self, e: OSError) -> JournalError:
        return JournalError(
            f"cannot write the job journal in {self.state_dir}: {e.strerror}; what it "
            "recorded before is safe: make room there (or repair it) and run the same "
            "command with --resume"
        )

    def load(self, codec: CatalogCodec) -> ResumeState:
        """What the journal says was done; raises UsageError when it cannot be used."""
        try:
            data = self.path.read_bytes()
            try:
                version = orjson.loads(data.split(b"\n", 1)[0]).get("version")
            except orjson.JSONDecodeError:
                version = JOURNAL_VERSION  # no beginning: said below
            if version not in READABLE_VERSIONS:
                raise UsageError(f"the job journal {self.path} was written by another version "
                                 "of ltoflow; finish that backup with it, or start again")
            scan = _scan_from_bytes(self.scan_path.read_bytes())
        except FileNotFoundError as e:
            if self.is_stale():  # a job that died starting: nothing of it is on tape
                raise UsageError(f"the job journal is incomplete ({e.filename} is missing): "
                                 "the backup never started; start it again without --resume"
                                 ) from e
            raise UsageError(f"the job journal is incomplete ({e.filename} is missing), so "
                             f"it cannot be resumed; {_start_again(self.path)}") from e
        except PermissionError as e:  # nothing wrong with it: the user may not read it
            raise UsageError(f"cannot read the job journal's {e.filename}: {e.strerror}; run "
                             "as the user who started the backup, or make the state "
                             "directory's files readable to this one") from e
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, TypeError,
                ValueError) as e:
            raise UsageError(f"cannot read the job journal {self.path} ({e}), so it cannot "
                             f"be resumed; {_start_again(self.path)}") from e
        state: ResumeState | None = None
        for raw in data.split(b"\n"):
            try:
                rec = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue  # a line torn by the crash: it recorded nothing that is sure
            kind = rec.get("kind")
            if kind == "begin":
                if rec.get("version") not in READABLE_VERSIONS:
                    raise UsageError(f"the job journal {self.path} was written by another "
                                     "version of ltoflow; start the backup again")
                state = ResumeState(rec["set_id"], rec["created_at"], scan,
                                    planned_containers=rec["containers"],
                                    planned_tapes=rec["tapes"])
            elif state is None:
                break
            elif kind == "container":
                state.containers[rec["index"]] = ContainerDone(
                    rec["index"], rec["sha256"],
                    _runs(rec["segments"], self.path),
                    tuple((i, h) for i, h in rec["files"]),
                    rec.get("faults"),
                )
                state.faults = rec.get("faults", state.faults)
            elif kind == "catalog":
                try:
                    data = self.catalog_path.read_bytes()
                except OSError as e:
                    raise UsageError(
                        f"the job journal's copy of the catalog {self.catalog_path} cannot be "
                        f"read ({e.strerror}); copy catalog/catalog.json from tape 1 of the set "
                        f"there, or {_start_again(self.path)}"
                    ) from e
                state.catalog = codec.decode(data, source=str(self.catalog_path))
                state.faults = rec.get("faults") or state.faults
            elif kind == "catalog-on-tape":
                state.faults = rec.get("faults") or state.faults
            elif kind == "tape":
                state.tapes_done[rec["index"]] = rec["volume_serial"]
                state.tape_layouts[rec["index"]] = rec.get("layout", 0)
            elif kind == "break":
                state.breaks.append(rec["container"])
        if state is None:
            raise UsageError(f"the job journal {self.path} has no beginning; start the "
                             "backup again without --resume")
        return state
