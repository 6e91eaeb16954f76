"""Which tape is in the drive, and the one tape-change path backup, verify and restore share.

`load_requested_tape` asks the operator for a tape, loads it, checks it is the right one, and
asks again, naming what it found, when it is not: a wrong tape never fails the job by itself.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Awaitable, Callable, Mapping
from functools import partial

import orjson
import trio

from ltoflow import catalog as cat
from ltoflow.drives import LoadedTape, TapeDrive, TapeRequest
from ltoflow.errors import BackupError, TapeNotLoadedError, TapeReadError, WrongTapeError
from ltoflow.operator import Operator
from ltoflow.progress import Note, Reporter

#: Attempts at getting the right tape into the drive before the job gives up (the seed's 5).
MAX_TAPE_ATTEMPTS = 5
_SET_ID_RE = re.compile(rb'"backup_set_id"\s*:\s*"([^"]*)"')

Check = Callable[[LoadedTape, TapeRequest], Awaitable[None]]


async def load_requested_tape(
    drive: TapeDrive, operator: Operator, request: TapeRequest, check: Check
) -> LoadedTape:
    """The requested tape, loaded and checked; raises TapeNotLoadedError after the attempts."""
    problem: str | None = None
    for _ in range(MAX_TAPE_ATTEMPTS):
        await operator.insert_tape(request, problem=problem)
        try:
            loaded = await drive.load(request)
        except TapeNotLoadedError as e:
            problem = str(e)
            continue
        try:
            await check(loaded, request)
        except WrongTapeError as e:
            problem = str(e)
            with trio.CancelScope(shield=True):
                await drive.unload()
            continue
        except BaseException:
            with trio.CancelScope(shield=True):
                await drive.unload()
            raise
        return loaded
    raise TapeNotLoadedError(
        f"tape {request.describe()} is still not in the drive after {MAX_TAPE_ATTEMPTS} "
        f"attempts: {problem}"
    )


async def _catalog_head(tape: LoadedTape) -> bytes | None:
    if await tape.size_of(cat.CATALOG_JSON) is None:
        return None
    return await tape.read_small(cat.CATALOG_JSON, limit=4096) or b""


def _owner(head: bytes) -> str:
    m = _SET_ID_RE.search(head)
    return m.group(1).decode(errors="replace") if m else "an unknown set"


async def _which_of_ours(tape: LoadedTape) -> str:
    """Name this tape of our own set from its catalog, by its volume serial."""
    serial = tape.volume_serial
    if serial:
        data = await tape.read_small(cat.CATALOG_JSON, limit=1 << 30) or b""
        try:
            doc = orjson.loads(data)
            for t in doc.get("tapes", []):
                if t.get("volume_serial") == serial:
                    return f"{t['tape_id']} (tape {t['sequence_number']})"
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError):
            pass
    return "a tape of this set"


#: What a blank tape may hold: the simulator's own accounting (tape.json), and an empty
#: directory that a job stopped before its first container left.
_BOOKKEEPING = frozenset({"tape.json", "tape.json.tmp", "data"})


async def check_blank(tape: LoadedTape, request: TapeRequest) -> None:
    """For writing: the tape must be blank. A tape of another set is never written to."""
    head = await _catalog_head(tape)
    if head is not None:
        owner = _owner(head)
        if owner == request.backup_set_id:
            which = await _which_of_ours(tape)
            raise WrongTapeError(
                f"{tape.label} is {which}, already written; insert a blank tape for "
                f"{request.describe()}"
            )
        raise WrongTapeError(
            f"{tape.label} holds backup set {owner} and is never overwritten; insert a blank "
            f"tape for {request.describe()}"
        )
    if await tape.list_dir("data"):
        raise WrongTapeError(
            f"{tape.label} already holds data files but no catalog; insert a blank tape for "
            f"{request.describe()}"
        )
    others = [n for n in await tape.list_dir("") if n not in _BOOKKEEPING]
    if others:  # someone's own files: a set written beside them would mix with them
        raise WrongTapeError(
            f"{tape.label} is not blank (it holds {', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''}) and is never written to; insert a blank "
            f"tape for {request.describe()}"
        )


async def check_resumable(tape: LoadedTape, request: TapeRequest, *,
                          others: frozenset[str] = frozenset(),
                          needs: frozenset[str] = frozenset()) -> None:
    """For a resumed backup: the tape is blank, or holds only this set's files (containers, a
    catalog maybe torn by the interruption): the one the interrupted job was writing.

    `others` are containers on tape that belong on other tapes of the set: a tape holding one
    is another tape of the set. `needs` are containers this tape must hold (a finished tape
    loaded again for its catalog: a blank or other tape in its place would get the catalog).
    """
    set_id = request.backup_set_id
    names = await tape.list_dir("data")
    foreign = [n for n in names if set_id not in n]
    if foreign:
        raise WrongTapeError(
            f"{tape.label} holds data of another set ({foreign[0]}); insert "
            f"{request.describe()} as the interrupted backup left it, or a blank tape"
        )
    elsewhere = sorted(others.intersection(names))
    if elsewhere:
        raise WrongTapeError(
            f"{tape.label} is another tape of this set (it holds {elsewhere[0]}); insert "
            f"{request.describe()}"
        )
    missing = sorted(needs.difference(names))
    if missing:
        raise WrongTapeError(
            f"{tape.label} lacks {missing[0]}, which {request.describe()} holds; insert that "
            "tape: its catalog is to be replaced"
        )
    head = await _catalog_head(tape)
    if head is not None and _SET_ID_RE.search(head) and _owner(head) != set_id:
        raise WrongTapeError(
            f"{tape.label} holds backup set {_owner(head)}; insert {request.describe()} as "
            "the interrupted backup left it, or a blank tape"
        )


async def check_member(tape: LoadedTape, request: TapeRequest, *,
                       tape_of: Mapping[str, str] | None = None) -> None:
    """For reading: the tape must belong to the requested set (a damaged or unreadable catalog
    is let in, so that verify can report what exactly is wrong), and be the requested tape:
    by its volume serial where the catalog knows it, else (`tape_of`: the set's container ids
    and their tapes) by the containers on it."""
    try:
        head = await _catalog_head(tape)
    except TapeReadError:
        return
    if head is None:
        if not await tape.list_dir("data"):
            raise WrongTapeError(f"{tape.label} is blank; insert {request.describe()}")
        return
    if not _SET_ID_RE.search(head):
        # A catalog damaged where it names its set (emptied, overwritten): the containers on
        # the tape tell; with none there it is let in, as damaged.
        names = await tape.list_dir("data")
        if names and not any(request.backup_set_id in n for n in names):
            raise WrongTapeError(
                f"{tape.label} holds containers of another set ({names[0]}) and no readable "
                f"catalog; insert {request.describe()}")
    elif request.backup_set_id and (owner := _owner(head)) != request.backup_set_id:
        raise WrongTapeError(
            f"{tape.label} holds backup set {owner}, not {request.backup_set_id}; insert "
            f"{request.describe()}"
        )
    serial = tape.volume_serial
    if request.volume_serial and serial and serial != request.volume_serial:
        raise WrongTapeError(
            f"{tape.label} is another tape of this set, not volume {request.volume_serial}; "
            f"insert {request.describe()}"
        )
    if tape_of is not None and not (request.volume_serial and serial):
        which = await identify(tape, {}, tape_of)
        if which is not None and which != request.tape_id:
            raise WrongTapeError(f"{tape.label} is {which} of this set (by the containers on "
                                 f"it); insert {request.describe()}")


def check_member_of(catalog: cat.Catalog) -> Check:
    """check_member for reading the tapes of `catalog`: the right tape of the set, by its
    volume serial, else by the containers on it."""
    return partial(check_member,
                   tape_of={c.container_id: c.tape_id for c in catalog.containers})


class TapeHolder:
    """The tape in the drive across a read job: reused when it is the one asked for next,
    otherwise unloaded and the next one loaded through `load_requested_tape`."""

    def __init__(self, drive: TapeDrive, operator: Operator) -> None:
        self.drive = drive
        self.operator = operator
        self.tape_id: str | None = None
        self.loaded: LoadedTape | None = None

    def hold(self, tape_id: str | None, loaded: LoadedTape) -> None:
        """Adopt a tape loaded elsewhere; `tape_id` None when it is not known which one."""
        self.tape_id, self.loaded = tape_id, loaded

    async def get(self, request: TapeRequest, check: Check) -> LoadedTape:
        if self.loaded is not None and self.tape_id == request.tape_id:
            return self.loaded
        await self.release()
        loaded = await load_requested_tape(self.drive, self.operator, request, check)
        self.tape_id, self.loaded = request.tape_id, loaded
        return loaded

    async def release(self) -> None:
        if self.loaded is not None:
            self.loaded = self.tape_id = None
            with trio.CancelScope(shield=True):
                await self.drive.unload()

    async def release_or_warn(self, reporter: Reporter) -> None:
        """Unload once a tape's work is done; an unload that fails is reported and the job goes
        on (loading the next tape tells whether the drive still works)."""
        try:
            await self.release()
        except BackupError as e:
            reporter.event(Note(f"warning: {e}; going on with the next tape"))

    async def release_after_error(self) -> None:
        """Unload on the way out of an error; a failing unload must not replace that error."""
        with contextlib.suppress(BackupError):
            await self.release()


async def identify(tape: LoadedTape, tape_ids_by_serial: Mapping[str, str],
                   tape_of_container: Mapping[str, str]) -> str | None:
    """Which tape of the set this is: by its volume serial, else by the containers on it."""
    serial = tape.volume_serial
    if serial and serial in tape_ids_by_serial:
        return tape_ids_by_serial[serial]
    counts: dict[str, int] = {}
    for name in await tape.list_dir("data"):
        t = tape_of_container.get(name)
        if t is not None:
            counts[t] = counts.get(t, 0) + 1
    return max(counts, key=lambda t: counts[t]) if counts else None
