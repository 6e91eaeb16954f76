"""The Python API as the README shows it, and the composition root's pluggable parts."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest

from ltoflow import BackupConfig, backup, compose, verify
from ltoflow.catalog import Catalog, JsonCatalogCodec, converter
from ltoflow.drives import TapeRequest

from .conftest import load_catalog_json, rebuild_files, write_tree

TREE = {"case-1/a.pdf": 90_000, "case-1/b.tif": 250_000, "case-2/c.csv": 3_000, "e": 0}


def test_readme_example(tmp_path: Path) -> None:
    contents = write_tree(tmp_path / "records", TREE)
    config = BackupConfig.simulator(tmp_path / "records", tmp_path / "tapes",
                                    capacity_tb="0.0000002", container_size_gb="0.00005")
    result = backup(config)
    assert len(result.tapes) >= 2
    assert len(result.catalog.source_files) == 4
    report = verify(config)
    assert report.ok
    assert report.tapes_checked == len(result.tapes)
    assert rebuild_files(tmp_path / "tapes", load_catalog_json(
        tmp_path / "tapes" / result.tapes[0].tape_id)) == contents


def two_tape_config(tmp_path: Path) -> BackupConfig:
    return BackupConfig.simulator(tmp_path / "src", tmp_path / "tapes",
                                  capacity_tb="0.0000002", container_size_gb="0.00005")


class RecordingOperator:
    def __init__(self) -> None:
        self.requests: list[TapeRequest] = []

    async def insert_tape(self, request: TapeRequest, *, problem: str | None = None) -> None:
        self.requests.append(request)


def test_operator_is_asked_for_each_tape_in_order(tmp_path: Path) -> None:
    write_tree(tmp_path / "src", TREE)
    config = two_tape_config(tmp_path)
    operator = RecordingOperator()
    result = backup(config, attrs.evolve(compose(config), operator=operator))
    assert [r.sequence_number for r in operator.requests] == list(
        range(1, len(result.tapes) + 1))
    assert [r.tape_id for r in operator.requests] == [t.tape_id for t in result.tapes]
    assert all(r.total_tapes == len(result.tapes) for r in operator.requests)


class IndentedJsonCodec(JsonCatalogCodec):
    """The seed's own style: one indented JSON document. A different size than ours."""

    def encode(self, catalog: Catalog) -> Iterator[bytes]:
        yield orjson.dumps(converter.unstructure(catalog), option=orjson.OPT_INDENT_2)


def test_a_swapped_codec_is_used_for_the_reserve_the_tapes_and_verify(tmp_path: Path) -> None:
    write_tree(tmp_path / "src", TREE)
    config = two_tape_config(tmp_path)
    codec = IndentedJsonCodec()
    result = backup(config, attrs.evolve(compose(config), codec=codec))
    raw = (tmp_path / "tapes" / result.tapes[0].tape_id / "catalog" / "catalog.json").read_bytes()
    assert raw.startswith(b'{\n  "')
    assert len(raw) <= result.catalog.tapes[0].reserved_catalog_bytes
    report = verify(attrs.evolve(compose(config), codec=codec))
    assert report.ok


class WrappingCodec:
    """A codec of its own (not a JsonCatalogCodec) that insists on bytes, as the protocol says."""

    def __init__(self) -> None:
        self.inner = JsonCatalogCodec()
        self.decoded = 0

    def encode(self, catalog: Catalog) -> Iterator[bytes]:
        return self.inner.encode(catalog)

    def decode(self, data: bytes, *, source: str) -> Catalog:
        assert type(data) is bytes
        self.decoded += 1
        return self.inner.decode(data, source=source)


def test_verify_gives_a_codec_of_its_own_the_catalogs_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """verify reads ltoflow's own catalogs lazily, mapped into memory; another codec gets
    the bytes and a plain decode, as the CatalogCodec protocol promises."""
    from ltoflow.drives import simulator

    monkeypatch.setattr(simulator, "MAP_BYTES", 1)  # every catalog would be mapped
    write_tree(tmp_path / "src", TREE)
    config = two_tape_config(tmp_path)
    backup(config)
    codec = WrappingCodec()
    assert verify(attrs.evolve(compose(config), codec=codec)).ok
    assert codec.decoded == 1


def test_readme_restore_example(tmp_path: Path) -> None:
    from ltoflow import restore

    contents = write_tree(tmp_path / "records", TREE)
    config = BackupConfig.simulator(tmp_path / "records", tmp_path / "tapes",
                                    capacity_tb="0.0000002", container_size_gb="0.00005")
    backup(config)
    report = restore(tmp_path / "tapes", tmp_path / "restore", ["case-1", "*.csv"])
    assert report.ok
    got = {str(p.relative_to(tmp_path / "restore")): p.read_bytes()
           for p in (tmp_path / "restore").rglob("*") if p.is_file()}
    assert got == {k: v for k, v in contents.items() if k.startswith("case-")}


def test_verify_reads_each_tapes_catalog_once_and_still_checks_every_copy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tape the set's catalog comes from is not read a second time (a million-file catalog
    is 700 MB); the other tapes' copies are still read and checked."""
    write_tree(tmp_path / "src", TREE)
    config = two_tape_config(tmp_path)
    result = backup(config)
    assert len(result.tapes) >= 2
    module = importlib.import_module("ltoflow.verify")  # `ltoflow.verify` is also a function
    read: list[str] = []
    for name in ("read_tape_catalog", "read_and_decode", "tape_catalog_sha"):
        real = getattr(module, name)

        async def counted(tape: object, tape_id: str, *rest: object, real: Any = real,
                          **options: object) -> object:
            read.append(tape_id)
            return await real(tape, tape_id, *rest, **options)

        monkeypatch.setattr(module, name, counted)
    assert verify(config).ok
    assert sorted(read) == sorted(t.tape_id for t in result.tapes)
    # a damaged copy on a later tape is still found
    last = tmp_path / "tapes" / result.tapes[-1].tape_id / "catalog" / "catalog.json"
    last.write_bytes(last.read_bytes().replace(b'"schema_version"', b'"schema_versioN"'))
    report = verify(config)
    assert [(p.tape_id, "does not match" in p.what) for p in report.problems] == [
        (result.tapes[-1].tape_id, True)]


def test_a_catalog_read_on_a_single_drive_counts_as_checked_only_for_the_tape_still_held(
        ) -> None:
    from ltoflow.verify import FoundCatalog

    held, other = object(), object()
    found = FoundCatalog(None, "sha", "volume VOL100L9", [], held=held)  # type: ignore[arg-type]
    assert found.read_from("TAPE-1", held)  # type: ignore[arg-type]
    # another cartridge (or the same one loaded again: the operator may have swapped it)
    assert not found.read_from("TAPE-1", other)  # type: ignore[arg-type]
    listed = FoundCatalog(None, "sha", "TAPE-1", [])  # type: ignore[arg-type]
    assert listed.read_from("TAPE-1", other)  # type: ignore[arg-type]
    assert not listed.read_from("TAPE-2", other)  # type: ignore[arg-type]


def test_reading_jobs_start_without_the_backups_modules() -> None:
    """verify, restore and catalog need neither the scan, the plan nor the engine: those load
    when a backup (or a plan) runs, and every public name still resolves."""
    import subprocess
    import sys

    code = ("import sys, ltoflow, ltoflow.cli\n"
            "heavy = {'ltoflow.engine', 'ltoflow.plan', 'ltoflow.scan', 'ltoflow.hashing',"
            " 'ltoflow.journal'}\n"
            "print(sorted(heavy & set(sys.modules)))\n"
            "names = [getattr(ltoflow, n) for n in ltoflow.__all__]\n"
            "print(ltoflow.BackupResult.__module__, callable(ltoflow.verify),"
            " callable(ltoflow.restore))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out == ["[]", "ltoflow.engine True True"]
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = importlib.import_module("ltoflow").nothing


def test_catalogs_name_the_installed_version() -> None:
    """`created_by` comes from ltoflow._version, which pyproject.toml also reads."""
    from importlib import metadata

    from ltoflow.api import created_by

    assert created_by() == f"ltoflow {metadata.version('ltoflow')}"
