"""PDF intake: pages rendered by the worker pool at a DPI, with their text layers, limits
checked before rendering, clear errors for encrypted, corrupt and non-PDF files, and a pool
that survives a worker that crashes or hangs."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fixtures_pdf import Page, encrypted_pdf, minimal_pdf, page_count

from omni.media import MediaError
from omni.media.pdf import WORKER_COMMAND, PdfRenderer, PdfSettings, looks_like_pdf
from omni.media.pdf_worker import page_pixels
from omni.media.sniff import sniff

TWO_PAGES = [Page(144, 72, (1, 0, 0), "Hello one"), Page(100, 200, (0, 0, 1))]


@pytest.fixture(scope="module")
def renderer() -> Iterator[PdfRenderer]:
    with PdfRenderer(PdfSettings(dpi=72, max_pages=4, workers=1)) as pool:
        yield pool


def test_pages_sizes_pixels_and_text_at_a_dpi(renderer: PdfRenderer) -> None:
    data = minimal_pdf(TWO_PAGES)
    assert data == minimal_pdf(TWO_PAGES) and page_count(data) == 2  # byte-deterministic
    pages = renderer.render(data, name="doc")
    assert [(p.index, p.image.mode, p.image.size, p.text) for p in pages] == [
        (0, "RGB", (144, 72), "Hello one"),
        (1, "RGB", (100, 200), ""),
    ]
    # The filled rectangle is inset 10 points; outside it the page is white.
    assert pages[0].image.getpixel((72, 60)) == (255, 0, 0)
    assert pages[1].image.getpixel((50, 100)) == (0, 0, 255)
    assert pages[1].image.getpixel((2, 2)) == (255, 255, 255)
    # At 100 DPI a page is ceil(points * 100 / 72) pixels a side, as pypdfium2 rounds.
    sizes = [p.image.size for p in renderer.render(data, name="doc", dpi=100)]
    assert sizes == [(200, 100), (139, 278)]
    assert page_pixels(100, 200, 90, 100) == (278, 139)
    # The same document renders to the same pixels (so to the same content hash) every time.
    again = renderer.render(data, name="doc")
    assert [np.asarray(p.image).tobytes() for p in again] == [
        np.asarray(p.image).tobytes() for p in pages
    ]


def test_text_layer_can_be_left_out_and_is_cut_to_its_limit() -> None:
    data = minimal_pdf(TWO_PAGES)
    with PdfRenderer(PdfSettings(dpi=72, text=False, workers=1)) as pool:
        assert [p.text for p in pool.render(data, name="doc")] == ["", ""]
    with PdfRenderer(PdfSettings(dpi=72, max_text_chars=5, workers=1)) as pool:
        assert pool.render(data, name="doc")[0].text == "Hello"


@pytest.mark.parametrize(
    ("data", "kwargs", "message", "limit"),
    [
        (b"", {}, "doc is empty (0 bytes)", None),
        (b"x" * 5001, {}, "doc is 5001 bytes; the limit is 5000 bytes", "max_pdf_bytes"),
        (b"hello, world", {}, "doc is not a PDF file (it has no %PDF- header)", None),
        (
            b"%PDF-1.4\nnot really a PDF",
            {},
            "doc could not be read: the PDF is corrupt or truncated",
            None,
        ),
        (
            encrypted_pdf([Page(100, 100)]),
            {},
            "doc is encrypted (password-protected); send a PDF that opens without one",
            None,
        ),
        (
            minimal_pdf([Page(50, 50)] * 5),
            {},
            "doc has 5 pages; the limit is 4 pages a request",
            "max_pdf_pages",
        ),
        (
            minimal_pdf([Page(50, 50)] * 3),
            {"max_pages": 2},
            "doc has 3 pages (after 2 pages of earlier documents); the limit is 4 pages a request",
            "max_pdf_pages",
        ),
        (
            minimal_pdf([Page(50, 50), Page(720, 720)]),
            {"dpi": 100},
            "doc page 2 is 1000x1000 pixels at 100 DPI; the limit is 250000 pixels a page",
            "max_pdf_page_pixels",
        ),
        (
            minimal_pdf([Page(50, 50)]),
            {"dpi": 20},
            "doc asks for 20 DPI; the limits are 36 to 300 DPI",
            "pdf_dpi",
        ),
    ],
)
def test_refusals_name_the_document_and_the_limit(
    data: bytes, kwargs: dict, message: str, limit: str | None
) -> None:
    settings = PdfSettings(dpi=72, max_pages=4, max_bytes=5000, max_page_pixels=250_000)
    with PdfRenderer(settings) as pool:
        with pytest.raises(MediaError) as info:
            pool.render(data, name="doc", **kwargs)
        assert (str(info.value), info.value.item, info.value.limit) == (message, "doc", limit)
        # Bytes, header and DPI are checked in this process: no worker was started for them.
        if not looks_like_pdf(data) or limit in ("max_pdf_bytes", "pdf_dpi"):
            assert pool.worker_pids() == []


def test_workers_run_under_their_memory_cap() -> None:
    settings = PdfSettings(dpi=72, workers=1, worker_memory_mib=1024)
    with PdfRenderer(settings) as pool:
        pool.render(minimal_pdf([Page(50, 50)]), name="doc")
        (pid,) = pool.worker_pids()
        limits = Path(f"/proc/{pid}/limits").read_text().splitlines()
        (line,) = [x for x in limits if x.startswith("Max address space")]
        assert line.split()[3:5] == [str(1024 << 20)] * 2  # soft and hard limits, in bytes


def test_a_document_past_the_memory_cap_fails_alone() -> None:
    # A 200-inch page at 150 DPI is 30000 x 30000 pixels: within this pixel limit, but its
    # bitmap alone (3.6 GB) is past the worker's 1 GiB.
    settings = PdfSettings(dpi=72, max_page_pixels=10**9, workers=1, worker_memory_mib=1024)
    with PdfRenderer(settings) as pool:
        pool.render(minimal_pdf([Page(50, 50)]), name="warm-up")
        (pid,) = pool.worker_pids()
        with pytest.raises(MediaError) as info:
            pool.render(minimal_pdf([Page(14400, 14400)]), name="huge", dpi=150)
        assert (str(info.value), info.value.item, info.value.limit) == (
            "huge needs more memory to render than a render worker may use (1024 MiB); send "
            "it at a lower pdf_dpi or with smaller pages",
            "huge",
            "pdf_worker_memory_mib",
        )
        # The worker answered and goes on: the next document renders in the same process.
        pages = pool.render(minimal_pdf(TWO_PAGES), name="doc")
        assert [p.image.size for p in pages] == [(144, 72), (100, 200)]
        assert pool.worker_pids() == [pid]


def test_the_pool_reuses_workers_and_replaces_one_that_crashes(tmp_path: Path) -> None:
    # A worker that aborts (as on a PDFium crash) on any document carrying a marker.
    script = tmp_path / "crashing_worker.py"
    script.write_text(
        "import os, sys\n"
        "from omni.media import pdf_worker\n"
        "real = pdf_worker.render_document\n"
        "def render(request):\n"
        "    if b'CRASH' in request['data']:\n"
        "        os.abort()\n"
        "    return real(request)\n"
        "pdf_worker.render_document = render\n"
        "sys.exit(pdf_worker.main())\n"
    )
    good = minimal_pdf(TWO_PAGES)
    crash = minimal_pdf([Page(60, 60, text="CRASH")])
    with PdfRenderer(PdfSettings(dpi=72, workers=1), (sys.executable, str(script))) as pool:
        assert len(pool.render(good, name="doc")) == 2
        [first_pid] = pool.worker_pids()
        assert len(pool.render(good, name="doc")) == 2
        assert pool.worker_pids() == [first_pid]  # reused, not restarted
        with pytest.raises(MediaError) as info:
            pool.render(crash, name="bad.pdf")
        assert str(info.value) == (
            "bad.pdf could not be rendered: the PDF renderer failed on it "
            "(the worker exited with status -6)"
        )
        assert pool.worker_pids() == []  # the crashed worker is gone ...
        pages = pool.render(good, name="doc")  # ... and a fresh one serves the next document
        assert [p.image.size for p in pages] == [(144, 72), (100, 200)]
        assert pool.worker_pids() not in ([], [first_pid])


def test_a_render_past_the_timeout_is_killed_and_the_pool_goes_on(tmp_path: Path) -> None:
    script = tmp_path / "slow_worker.py"
    script.write_text(
        "import sys, time\n"
        "from omni.media import pdf_worker\n"
        "real = pdf_worker.render_document\n"
        "def render(request):\n"
        "    if b'SLOW' in request['data']:\n"
        "        time.sleep(60)\n"
        "    return real(request)\n"
        "pdf_worker.render_document = render\n"
        "sys.exit(pdf_worker.main())\n"
    )
    settings = PdfSettings(dpi=72, workers=1, timeout_s=1.0)
    with PdfRenderer(settings, (sys.executable, str(script))) as pool:
        with pytest.raises(MediaError) as info:
            pool.render(minimal_pdf([Page(60, 60, text="SLOW")]), name="slow.pdf")
        assert str(info.value) == "slow.pdf took more than 1 s to render; the limit is 1 s"
        assert info.value.limit == "pdf_timeout_s"
        assert len(pool.render(minimal_pdf(TWO_PAGES), name="doc")) == 2


def test_close_stops_the_workers() -> None:
    pool = PdfRenderer(PdfSettings(dpi=72, workers=1), WORKER_COMMAND)
    pool.render(minimal_pdf(TWO_PAGES), name="doc")
    [worker] = pool._idle
    pool.close()
    assert worker.process.returncode == 0  # it saw the end of its input and exited
    with pytest.raises(RuntimeError, match="the PDF renderer is closed"):
        pool.render(minimal_pdf(TWO_PAGES), name="doc")


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match=r"pdf dpi is 400; it must be within \[36, 300\]"):
        PdfSettings(dpi=400)
    with pytest.raises(ValueError, match="pdf max_pages is 0; it must be an integer >= 1"):
        PdfSettings(max_pages=0)
    with pytest.raises(ValueError, match="pdf worker_memory_mib is 0; it must be an integer >= 1"):
        PdfSettings(worker_memory_mib=0)


def test_sniffing_types_files_by_their_bytes() -> None:
    cases = {
        b"\x89PNG\r\n\x1a\n" + bytes(8): ("image", "png"),
        b"\xff\xd8\xff\xe0" + bytes(12): ("image", "jpeg"),
        b"GIF89a" + bytes(10): ("image", "gif"),
        b"RIFF\x00\x00\x00\x00WEBPVP8 ": ("image", "webp"),
        b"RIFF\x00\x00\x00\x00WAVEfmt ": ("audio", "wav"),
        b"fLaC" + bytes(12): ("audio", "flac"),
        b"OggS" + bytes(12): ("audio", "ogg"),
        b"ID3\x04" + bytes(12): ("audio", "mp3"),
        b"\xff\xfb\x90\x00" + bytes(12): ("audio", "mp3"),
        minimal_pdf([Page(10, 10)]): ("pdf", "pdf"),
    }
    for data, expected in cases.items():
        found = sniff(data)
        assert found is not None and (found.kind, found.format) == expected, data[:8]
    assert sniff(b"hello") is None and sniff(b"") is None
    assert looks_like_pdf(b"junk first\n%PDF-1.7\n") and not looks_like_pdf(b"%PDF" + b"x" * 9)
