"""PDF intake: a document's bytes to one RGB image (and its text layer) per page.

Pages are rendered by a small pool of worker processes (`omni.media.pdf_worker`): PDFium is
not thread-safe, and a document that crashes or hangs it should cost one worker, not the
server. The pool starts its first worker on first use, keeps idle workers for the next
document, replaces one that died or timed out, and stops them all on `close()`.

Limits are checked before rendering: the byte count here, before the bytes leave the API
process; the page count and every page's pixel count (from its size in points and the DPI)
in the worker, before it renders any page. A page is then an ordinary image: it is hashed by
its pixels like any other, so a re-posted document, or the same page in another document,
hits the prefix and encoder caches.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from omni.media.errors import MediaError
from omni.media.limits import check_num_bytes
from omni.media.pdf_worker import MEMORY_CAP_ENV, read_frame, write_frame

logger = logging.getLogger(__name__)

WORKER_COMMAND = (sys.executable, "-m", "omni.media.pdf_worker")
# The spec lets a PDF header follow some leading junk; readers look in the first 1 KiB.
_HEADER_WINDOW = 1024
# Room for the msgpack framing and the text layer on top of the pages' pixels.
_REPLY_SLACK_BYTES = 1 << 20


def looks_like_pdf(data: bytes) -> bool:
    """Whether `data` carries a PDF header (`%PDF-`) where readers look for one."""
    return b"%PDF-" in data[:_HEADER_WINDOW]


@dataclass(frozen=True)
class PdfSettings:
    """How PDFs are rendered and bounded (`omni serve --pdf-*` flags)."""

    # 100 DPI keeps 10-point text legible while a Letter page stays ~0.9 M pixels (about 1200
    # vision tokens for Qwen2-VL); raise it for small print, lower it for long documents.
    dpi: float = 100.0
    # The range a request may choose its own DPI in (the upload form's `pdf_dpi`, the chat
    # request's `pdf_dpi`).
    min_dpi: float = 36.0
    max_dpi: float = 300.0
    max_bytes: int = 20 * 1000 * 1000
    # Pages of all a request's documents together: each page is an image item.
    max_pages: int = 16
    # A page past this many pixels at the chosen DPI is refused (A4 at 300 DPI is 8.7 M).
    max_page_pixels: int = 10_000_000
    # Whether each page's text layer goes into the prompt after its image; and how much.
    text: bool = True
    max_text_chars: int = 4000
    workers: int = 2
    timeout_s: float = 60.0
    # Each render process's address space (RLIMIT_AS), so that a document built to exhaust
    # memory fails alone instead of starving the host. 2 GiB holds PDFium, the interpreter and
    # a page at the pixel limit many times over.
    worker_memory_mib: int = 2048

    def __post_init__(self) -> None:
        for name in ("dpi", "min_dpi", "max_dpi", "timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"pdf {name} is {getattr(self, name)}; it must be > 0")
        for name in (
            "max_bytes", "max_pages", "max_page_pixels", "max_text_chars", "workers",
            "worker_memory_mib",
        ):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"pdf {name} is {value!r}; it must be an integer >= 1")
        if not self.min_dpi <= self.dpi <= self.max_dpi:
            raise ValueError(
                f"pdf dpi is {self.dpi:g}; it must be within [{self.min_dpi:g}, {self.max_dpi:g}]"
            )

    def check_dpi(self, dpi: float, *, name: str) -> float:
        """`dpi` if a request may use it; MediaError naming `name` otherwise."""
        if not self.min_dpi <= dpi <= self.max_dpi:
            raise MediaError(
                f"{name} asks for {dpi:g} DPI; the limits are {self.min_dpi:g} to "
                f"{self.max_dpi:g} DPI",
                item=name,
                limit="pdf_dpi",
            )
        return float(dpi)


@dataclass(frozen=True)
class PdfPage:
    """One page: `index` counts from 0; `text` is its text layer ("" where it has none);
    `text_problem` says why that layer cannot stand in for the page ("no text layer", "glyph
    garbage"), "" when it can. `image` is None for a page rendered only for its text."""

    index: int
    image: Image.Image | None
    text: str
    text_problem: str = ""


class PdfRenderer:
    """Renders whole documents in a pool of worker processes; safe to call from threads."""

    def __init__(
        self, settings: PdfSettings | None = None, command: Sequence[str] = WORKER_COMMAND
    ) -> None:
        self.settings = settings or PdfSettings()
        # The worker's command line; tests swap in workers that crash or hang.
        self.command = tuple(command)
        self._idle: list[_Worker] = []
        self._started = 0
        self._closed = False
        self._lock = threading.Condition()

    def render(
        self,
        data: bytes,
        *,
        name: str,
        dpi: float | None = None,
        max_pages: int | None = None,
        images: str = "all",
    ) -> list[PdfPage]:
        """Every page of the PDF `data` at `dpi` (default: the settings'), refusing it
        (MediaError naming `name`) past the limits; `max_pages` is what the request has left
        of its page budget (default: all of it). `images` "untexted" renders only the pages
        whose text layer cannot stand in for them (the others come with text alone)."""
        if images not in ("all", "untexted"):
            raise ValueError(f"images is {images!r}; it must be 'all' or 'untexted'")
        settings = self.settings
        check_num_bytes(len(data), settings.max_bytes, "max_pdf_bytes", name=name)
        if not looks_like_pdf(data):
            raise MediaError(f"{name} is not a PDF file (it has no %PDF- header)", item=name)
        dpi = settings.dpi if dpi is None else settings.check_dpi(dpi, name=name)
        pages_left = settings.max_pages if max_pages is None else max_pages
        request = {
            "data": data,
            "dpi": dpi,
            "max_pages": pages_left,
            "max_page_pixels": settings.max_page_pixels,
            "text": settings.text,
            "max_text_chars": settings.max_text_chars,
            "images": images,
        }
        max_reply = pages_left * (3 * settings.max_page_pixels + 4 * settings.max_text_chars)
        reply = self._call(request, max_reply + _REPLY_SLACK_BYTES, name)
        if "error" in reply:
            raise _refusal(reply, name=name, dpi=dpi, pages_left=pages_left, settings=settings)
        return [
            PdfPage(
                index,
                Image.frombytes("RGB", (int(width), int(height)), bytes(rgb)) if rgb else None,
                text,
                problem,
            )
            for index, (width, height, rgb, text, problem) in enumerate(reply["pages"])
        ]

    def worker_pids(self) -> list[int]:
        """Process ids of the idle workers (for tests and diagnostics)."""
        with self._lock:
            return [worker.process.pid for worker in self._idle]

    def close(self) -> None:
        """Stop every worker; a render in flight finishes, then its worker stops too."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            self._lock.notify_all()
        for worker in idle:
            worker.stop()

    def __enter__(self) -> PdfRenderer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the pool ---------------------------------------------------------------------------

    def _call(self, request: dict[str, Any], max_reply_bytes: int, name: str) -> dict[str, Any]:
        worker = self._acquire()
        try:
            return worker.call(request, self.settings.timeout_s, max_reply_bytes)
        except _WorkerFailed as failure:
            logger.warning("PDF worker %d failed on %s: %s", worker.process.pid, name, failure)
            if failure.timed_out:
                raise MediaError(
                    f"{name} took more than {self.settings.timeout_s:g} s to render; the limit "
                    f"is {self.settings.timeout_s:g} s",
                    item=name,
                    limit="pdf_timeout_s",
                ) from None
            raise MediaError(
                f"{name} could not be rendered: the PDF renderer failed on it ({failure})",
                item=name,
            ) from None
        finally:
            self._release(worker)

    def _acquire(self) -> _Worker:
        with self._lock:
            while True:
                if self._closed:
                    raise RuntimeError("the PDF renderer is closed")
                if self._idle:
                    return self._idle.pop()
                if self._started < self.settings.workers:
                    self._started += 1
                    break
                self._lock.wait()
        try:
            return _Worker(self.command, self.settings.worker_memory_mib)
        except BaseException:
            with self._lock:
                self._started -= 1
                self._lock.notify()
            raise

    def _release(self, worker: _Worker) -> None:
        with self._lock:
            keep = worker.alive() and not self._closed
            if keep:
                self._idle.append(worker)
            else:
                self._started -= 1
            self._lock.notify()
        if not keep:
            worker.stop()


class _WorkerFailed(Exception):
    def __init__(self, message: str, *, timed_out: bool) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class _Worker:
    """One render process: a request frame in on its stdin, a reply frame out on its stdout."""

    def __init__(self, command: Sequence[str], memory_mib: int) -> None:
        env = {
            **os.environ,
            MEMORY_CAP_ENV: str(memory_mib),
            # One BLAS thread: numpy's thread pools would reserve address space it never uses.
            "OPENBLAS_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1",
        }
        self.process = subprocess.Popen(
            list(command), stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True, env=env
        )

    def alive(self) -> bool:
        return self.process.poll() is None

    def call(self, request: dict[str, Any], timeout_s: float, max_reply_bytes: int) -> Any:
        assert self.process.stdin is not None and self.process.stdout is not None
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            self.process.kill()

        timer = threading.Timer(timeout_s, kill)
        timer.daemon = True
        timer.start()
        try:
            write_frame(self.process.stdin, request)
            reply = read_frame(self.process.stdout, max_reply_bytes)
            if reply is None:
                raise EOFError("the worker closed its output")
            return reply
        except (OSError, EOFError, ValueError) as error:
            # Whatever state it is in, this worker is done: the pool starts a fresh one.
            self.process.kill()
            code = self.process.wait()
            if timed_out.is_set():
                raise _WorkerFailed("timed out", timed_out=True) from None
            died = f"the worker exited with status {code}" if code else str(error)
            raise _WorkerFailed(died, timed_out=False) from None
        finally:
            timer.cancel()

    def stop(self) -> None:
        """Close its stdin (a worker exits at end of input), then make sure it is gone."""
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


def _refusal(
    reply: dict[str, Any], *, name: str, dpi: float, pages_left: int, settings: PdfSettings
) -> MediaError:
    """The worker's refusal of a document as a MediaError naming it."""
    kind = reply["error"]
    if kind == "encrypted":
        return MediaError(
            f"{name} is encrypted (password-protected); send a PDF that opens without one",
            item=name,
        )
    if kind == "out_of_memory":
        return MediaError(
            f"{name} needs more memory to render than a render worker may use "
            f"({settings.worker_memory_mib} MiB); send it at a lower pdf_dpi or with smaller pages",
            item=name,
            limit="pdf_worker_memory_mib",
        )
    if kind == "no_pages":
        return MediaError(f"{name} has no pages", item=name)
    if kind == "too_many_pages":
        pages = int(reply["pages"])
        used = settings.max_pages - pages_left
        before = f" (after {used} pages of earlier documents)" if used else ""
        return MediaError(
            f"{name} has {pages} pages{before}; the limit is {settings.max_pages} pages a request",
            item=name,
            limit="max_pdf_pages",
        )
    if kind == "page_too_large":
        return MediaError(
            f"{name} page {int(reply['page']) + 1} is {int(reply['width'])}x"
            f"{int(reply['height'])} pixels at {dpi:g} DPI; the limit is "
            f"{settings.max_page_pixels} pixels a page",
            item=name,
            limit="max_pdf_page_pixels",
        )
    return MediaError(f"{name} could not be read: the PDF is corrupt or truncated", item=name)
