"""Journal append and read (fsync never: the CPU cost; fsync itself is measured separately)."""

from __future__ import annotations

import time

import msgspec
import pytest

from nexus.protocol.events import encode
from nexus.router.journal import Entry, Journal, entry_encoder

from .conftest import BATCH, make_event, per_event


def bodies(n: int) -> list[bytes]:
    now = time.time()
    return [
        entry_encoder.encode(Entry("bench.event", i % 97, "", 0, msgspec.Raw(encode(make_event(i))), now))
        for i in range(n)
    ]


@pytest.fixture
def journal(tmp_path):
    j = Journal(str(tmp_path / "journal"), fsync="never", segment_bytes=2**30)
    j.open()
    yield j
    j.close()


def test_append_batch(benchmark, journal):
    """One router commit: BATCH events as batch records (a header and a CRC per 512
    events) + one write()."""
    b = bodies(BATCH)
    # bounded rounds: an endless append grows the file to GBs and measures the kernel's
    # dirty-page writeback throttling instead of the append
    benchmark.pedantic(journal.append, args=(b,), rounds=300, iterations=1, warmup_rounds=5)
    per_event(benchmark, BATCH)


def test_append_batch_one_event_records(benchmark, tmp_path):
    """The same batch as one record per event (the layout before batch records): a header,
    two crc32 calls and three list appends per event."""
    j = Journal(str(tmp_path / "journal"), fsync="never", segment_bytes=2**30, record_events=1)
    j.open()
    b = bodies(BATCH)
    try:
        benchmark.pedantic(j.append, args=(b,), rounds=300, iterations=1, warmup_rounds=5)
        per_event(benchmark, BATCH)
    finally:
        j.close()


def test_append_batch_fsync(benchmark, tmp_path):
    """fsync policy `always`: one write() + fsync per batch (disk dependent)."""
    j = Journal(str(tmp_path / "journal"), fsync="always", segment_bytes=2**30)
    j.open()
    b = bodies(BATCH)
    try:
        benchmark.pedantic(j.append, args=(b,), rounds=30, iterations=1)
        per_event(benchmark, BATCH)
    finally:
        j.close()


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    j = Journal(str(tmp_path_factory.mktemp("filled") / "journal"), fsync="never", segment_bytes=2**30)
    j.open()
    b = bodies(BATCH)
    for _ in range(200):  # 200,000 records
        j.append(b)
    yield j
    j.close()


def test_read_2000(benchmark, filled):
    """What one fetch needs at most (fetch_limit 2000 records)."""
    benchmark(filled.read, 100_000, 2000)
    per_event(benchmark, 2000)


def test_read_100000_fetch_scan_cap(benchmark, filled):
    """What Router.fetch actually reads for one fetch of limit 2000: scan_cap = 100,000 records."""
    benchmark.pedantic(filled.read, args=(50_000, 100_000), rounds=5, iterations=1)
    per_event(benchmark, 100_000)
