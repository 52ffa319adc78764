"""image_url fetching: http(s) only from allowed hosts, no redirects, bounded in time and
bytes while streaming; file: only under the allowed folder, symlinks resolved."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

import pytest
from media_server import media_server

from omni.media import MediaError
from omni.media.fetch import MediaFetchPolicy, fetch_media_url

IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
ALLOWED = MediaFetchPolicy(allowed_domains=frozenset({"127.0.0.1"}), timeout_s=2.0)


def fetch(url: str, policy: MediaFetchPolicy = ALLOWED, max_bytes: int = 4096) -> bytes:
    return asyncio.run(
        fetch_media_url(url, policy, name="image 0", max_bytes=max_bytes, limit_name="max_bytes")
    )


@pytest.fixture(scope="module")
def server() -> object:
    with media_server(IMAGE) as url:
        yield url


def test_an_allowed_host_is_fetched(server: str) -> None:
    assert fetch(f"{server}/image.png") == IMAGE


@pytest.mark.parametrize(
    ("path", "policy", "max_bytes", "message"),
    [
        ("/image.png", MediaFetchPolicy(), 4096, "does not fetch http"),
        (
            "/image.png",
            MediaFetchPolicy(allowed_domains=frozenset({"images.example.com"})),
            4096,
            "host '127.0.0.1' is not among the allowed media domains (images.example.com)",
        ),
        ("/redirect", ALLOWED, 4096, "HTTP 302 (a redirect); redirects are not followed"),
        ("/missing", ALLOWED, 4096, "answered HTTP 404, not 200"),
        ("/image.png", ALLOWED, 100, "image 0 is 1032 bytes; the limit is 100 bytes"),
        ("/big-declared", ALLOWED, 4096, "image 0 is 1000000000 bytes; the limit is 4096"),
        ("/big-undeclared", ALLOWED, 100_000, "from '127.0.0.1' is more than 100000 bytes"),
        ("/slow", ALLOWED, 4096, "took longer than 2 s"),
    ],
)
def test_refusals_name_the_item_and_the_rule(
    server: str, path: str, policy: MediaFetchPolicy, max_bytes: int, message: str
) -> None:
    with pytest.raises(MediaError, match=re.escape(message)) as caught:
        fetch(server + path, policy, max_bytes)
    assert caught.value.item == "image 0"


def test_other_schemes_are_refused() -> None:
    with pytest.raises(MediaError, match="must be data:, http\\(s\\): or file: URLs"):
        fetch("ftp://127.0.0.1/image.png")


def test_files_only_inside_the_allowed_folder(tmp_path: Path) -> None:
    root = tmp_path / "media"
    root.mkdir()
    (root / "inside.png").write_bytes(IMAGE)
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"secret")
    (root / "escape.png").symlink_to(outside)  # a link inside that points outside
    (root / "sub").mkdir()
    policy = MediaFetchPolicy(allowed_local_path=str(root))

    assert fetch(f"file://{root}/inside.png", policy) == IMAGE
    assert fetch(f"file://{root}/sub/../inside.png", policy) == IMAGE
    for url, message in [
        (f"file://{root}/escape.png", "is outside the allowed media folder"),
        (f"file://{root}/../secret.png", "is outside the allowed media folder"),
        (f"file://{root}/missing.png", "does not exist"),
        # Outside and missing reads as outside: existence there is not revealed.
        (f"file://{tmp_path}/missing.png", "is outside the allowed media folder"),
        (f"file://{root}/sub", "is not a regular file"),
        (f"file://otherhost{root}/inside.png", "must name a local path"),
        (f"file://{root}/inside.png", "the limit is 10 bytes"),
    ]:
        with pytest.raises(MediaError, match=message):
            fetch(url, policy, max_bytes=10 if "limit" in message else 4096)
    with pytest.raises(MediaError, match="does not read file: URLs"):
        fetch(f"file://{root}/inside.png", MediaFetchPolicy())


def test_links_made_after_the_path_was_resolved_are_still_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A link swapped in between resolving the path and opening it: resolving is patched to
    see nothing, as it would have before the swap."""
    from omni.media import fetch as fetch_module

    root = tmp_path / "media"
    root.mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret.png").write_bytes(IMAGE)
    (root / "late.png").symlink_to(outside / "secret.png")  # the last component
    (root / "latedir").symlink_to(outside)  # a folder on the way
    monkeypatch.setattr(fetch_module.os.path, "realpath", lambda path: os.path.abspath(path))
    policy = MediaFetchPolicy(allowed_local_path=str(root))
    with pytest.raises(MediaError, match="cannot be read"):
        fetch(f"file://{root}/late.png", policy)
    with pytest.raises(MediaError, match="is outside the allowed media folder"):
        fetch(f"file://{root}/latedir/secret.png", policy)


def test_an_allowed_folder_given_through_a_symlink_still_admits_its_files(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "a.png").write_bytes(IMAGE)
    link = tmp_path / "link"
    os.symlink(real, link)
    assert fetch(f"file://{link}/a.png", MediaFetchPolicy(allowed_local_path=str(link))) == IMAGE
