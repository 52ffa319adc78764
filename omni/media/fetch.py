"""Media named by URL instead of inlined: `http(s)://` from allowed hosts, `file://` from one
allowed folder. Both are off unless the operator turns them on (`--allowed-media-domains`,
`--allowed-local-media-path`): a server that fetches whatever URL a client names can be made
to read internal services or local files (SSRF).

Rules, each refusal a `MediaError` naming the item and the rule:
- http(s): the URL's host must be one of the allowed host names exactly (no subdomains);
  redirects are refused, not followed (a redirect could leave the allowed hosts); connect,
  read and total time are bounded; the byte limit is enforced while streaming, so a server
  that lies about (or omits) Content-Length cannot make us buffer more; no compression, so
  the limit counts the bytes we keep.
- file: the path, symlinks resolved, must lie inside the allowed folder, also resolved;
  only regular files, bounded by the same byte limit before they are read.
"""

from __future__ import annotations

import asyncio
import os
import stat
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import httpx

from omni.media.errors import MediaError
from omni.media.limits import check_num_bytes

# Bytes asked for per read; small enough that the limit is never overshot by much.
_CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True)
class MediaFetchPolicy:
    # Lower-case host names http(s) URLs may name; empty: http(s) URLs are refused.
    allowed_domains: frozenset[str] = frozenset()
    # file:// URLs must resolve inside this folder; None: file URLs are refused.
    allowed_local_path: str | None = None
    # The whole fetch (connect, headers, body) must finish within this many seconds.
    timeout_s: float = 10.0
    connect_timeout_s: float = 3.0

    def __post_init__(self) -> None:
        if not self.timeout_s > 0 or not self.connect_timeout_s > 0:
            raise ValueError("media fetch timeouts must be > 0")


def is_data_url(url: str) -> bool:
    """Whether `url` is inline data (decoded, not fetched)."""
    return url[:5].lower() == "data:"


async def fetch_media_url(
    url: str, policy: MediaFetchPolicy, *, name: str, max_bytes: int, limit_name: str
) -> bytes:
    """The bytes behind an http(s) or file URL, under `policy` and `max_bytes`."""
    scheme = url.partition(":")[0].lower()
    if scheme in ("http", "https"):
        return await _fetch_http(url, policy, name=name, max_bytes=max_bytes, limit=limit_name)
    if scheme == "file":
        return await asyncio.to_thread(
            _read_file, url, policy, name=name, max_bytes=max_bytes, limit=limit_name
        )
    shown = url if len(url) <= 64 else url[:61] + "..."
    raise MediaError(
        f"{name} has URL {shown!r}; image URLs must be data:, http(s): or file: URLs",
        item=name,
    )


async def _fetch_http(
    url: str, policy: MediaFetchPolicy, *, name: str, max_bytes: int, limit: str
) -> bytes:
    try:
        host = httpx.URL(url).host.lower()
    except (httpx.InvalidURL, ValueError) as exc:
        raise MediaError(f"{name} is not a valid URL: {exc}", item=name) from None
    if not policy.allowed_domains:
        raise MediaError(
            f"{name}: this server does not fetch http(s) URLs (the operator can allow hosts "
            "with --allowed-media-domains); send the image as a data: URL",
            item=name,
        )
    if host not in policy.allowed_domains:
        raise MediaError(
            f"{name}: host {host!r} is not among the allowed media domains "
            f"({', '.join(sorted(policy.allowed_domains))})",
            item=name,
        )
    timeout = httpx.Timeout(
        policy.timeout_s, connect=min(policy.connect_timeout_s, policy.timeout_s)
    )
    try:
        # Per-phase timeouts alone let a server trickle one byte per read timeout forever.
        return await asyncio.wait_for(
            _download(url, timeout, name=name, host=host, max_bytes=max_bytes, limit=limit),
            policy.timeout_s,
        )
    except asyncio.TimeoutError:
        raise MediaError(
            f"{name}: fetching from {host!r} took longer than {policy.timeout_s:g} s", item=name
        ) from None
    except httpx.TimeoutException:
        raise MediaError(
            f"{name}: {host!r} did not answer within the fetch timeouts "
            f"(connect {timeout.connect:g} s, read {timeout.read:g} s)",
            item=name,
        ) from None
    except httpx.HTTPError as exc:
        raise MediaError(f"{name}: fetching from {host!r} failed: {exc}", item=name) from None


async def _download(
    url: str, timeout: httpx.Timeout, *, name: str, host: str, max_bytes: int, limit: str
) -> bytes:
    # trust_env=False: no proxy from the environment decides where requests go.
    async with (
        httpx.AsyncClient(follow_redirects=False, timeout=timeout, trust_env=False) as client,
        client.stream("GET", url, headers={"Accept-Encoding": "identity"}) as response,
    ):
        _check_response(response, name=name, max_bytes=max_bytes, limit=limit)
        body = bytearray()
        async for chunk in response.aiter_raw(_CHUNK_BYTES):
            body += chunk
            if len(body) > max_bytes:
                # Stop reading at once: the rest is never downloaded.
                raise MediaError(
                    f"{name} from {host!r} is more than {max_bytes} bytes (stopped at "
                    f"{len(body)}); the limit is {max_bytes} bytes",
                    item=name,
                    limit=limit,
                )
        check_num_bytes(len(body), max_bytes, limit, name=name)
        return bytes(body)


def _check_response(response: httpx.Response, *, name: str, max_bytes: int, limit: str) -> None:
    if response.is_redirect:
        raise MediaError(
            f"{name}: the server answered HTTP {response.status_code} (a redirect); "
            "redirects are not followed, give the final URL",
            item=name,
        )
    if response.status_code != 200:
        raise MediaError(
            f"{name}: the server answered HTTP {response.status_code}, not 200", item=name
        )
    encoding = response.headers.get("content-encoding", "identity").lower()
    if encoding != "identity":
        raise MediaError(
            f"{name}: the server sent Content-Encoding {encoding!r}; only identity is read",
            item=name,
        )
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        check_num_bytes(int(declared), max_bytes, limit, name=name)


def _path_of_fd(fd: int) -> Path | None:
    """Where an open file lives, from /proc (Linux); None where that is not available."""
    link = Path(f"/proc/self/fd/{fd}")
    try:
        return Path(os.readlink(link))
    except OSError:
        return None


def _read_file(
    url: str, policy: MediaFetchPolicy, *, name: str, max_bytes: int, limit: str
) -> bytes:
    if policy.allowed_local_path is None:
        raise MediaError(
            f"{name}: this server does not read file: URLs (the operator can allow a folder "
            "with --allowed-local-media-path)",
            item=name,
        )
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise MediaError(
            f"{name}: file URLs must name a local path, not host {parsed.netloc!r}", item=name
        )
    root = Path(os.path.realpath(policy.allowed_local_path))
    # Containment first, existence second: the answer must not tell a client whether a path
    # outside the folder exists.
    outside = MediaError(
        f"{name}: {parsed.path!r} is outside the allowed media folder {str(root)!r}", item=name
    )
    path = Path(os.path.realpath(urllib.parse.unquote(parsed.path)))
    if not path.is_relative_to(root):
        raise outside
    # Resolved, then opened: a folder inside the allowed one could be swapped for a symlink in
    # between. O_NOFOLLOW refuses a swapped last component, and on Linux the opened file's own
    # path (/proc/self/fd) is checked against the folder again.
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise MediaError(f"{name}: {parsed.path!r} does not exist", item=name) from None
    except OSError as exc:
        raise MediaError(
            f"{name}: {parsed.path!r} cannot be read ({exc.strerror})", item=name
        ) from None
    try:
        opened = _path_of_fd(fd)
        if opened is not None and not opened.is_relative_to(root):
            raise outside
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise MediaError(f"{name}: {parsed.path!r} is not a regular file", item=name)
        check_num_bytes(info.st_size, max_bytes, limit, name=name)
        file = os.fdopen(fd, "rb")  # owns fd from here on
    except BaseException:
        os.close(fd)
        raise
    with file:
        data = file.read(max_bytes + 1)  # the file may have grown since the stat
    check_num_bytes(len(data), max_bytes, limit, name=name)
    return data
