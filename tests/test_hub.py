"""workers.hub: a Hugging Face id resolves through the local hub cache, offline, to a model that
generates; ids and paths that cannot be resolved fail with one line that says what to do.

The cache is faked the way huggingface_hub lays it out: HF_HUB_CACHE/models--org--name/ with
refs/main holding a commit hash and snapshots/<hash>/ holding the files (the bundled model's).
Nothing here touches the network: the download path is exercised with a stand-in.
"""

from __future__ import annotations

import shutil

import pytest

from dinfer_async import SamplingParams
from workers import Engine
from workers.bundled import MODEL_DIR
from workers.errors import ModelLoadError
from workers.hub import is_hub_id, resolve_model

HASH = "0123456789abcdef0123456789abcdef01234567"
PARAMS = SamplingParams(gen_length=32, block_length=32)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A hub cache holding the bundled model as `org/name`; HF_HUB_OFFLINE=1."""
    cache = tmp_path / "hub"
    repo = cache / "models--org--name"
    shutil.copytree(MODEL_DIR, repo / "snapshots" / HASH)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HASH)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_an_id_in_the_cache_loads_offline_and_generates(hub_cache):
    engine = Engine.from_pretrained("org/name")
    assert engine.name == "org/name"
    bundled = Engine.from_pretrained(None)
    ids = engine.encode(messages=[{"role": "user", "content": "reverse planet"}])
    [got] = engine.generate([ids], PARAMS)
    [want] = bundled.generate([ids], PARAMS)
    assert got.token_ids == want.token_ids and got.text == want.text and got.text


def test_the_cache_is_read_first_even_when_online(hub_cache, monkeypatch):
    """No network call when the cache has the id: a download attempt would fail the test."""
    import huggingface_hub

    real = huggingface_hub.snapshot_download

    def local_only(*args, **kwargs):
        assert kwargs.get("local_files_only"), "tried to download although the cache has the id"
        return real(*args, **kwargs)

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", local_only)
    assert resolve_model("org/name") == hub_cache / "models--org--name" / "snapshots" / HASH


def test_an_id_missing_offline_says_how_to_download_it(hub_cache):
    with pytest.raises(ModelLoadError) as e:
        Engine.from_pretrained("org/missing")
    message = str(e.value)
    assert "\n" not in message
    assert "org/missing" in message and "HF_HUB_OFFLINE" in message
    assert "hf download org/missing" in message and str(hub_cache) in message


def test_neither_a_directory_nor_an_id(tmp_path):
    for bad in [str(tmp_path / "no-such-model"), "no-such-model", "a/b/c"]:
        with pytest.raises(ModelLoadError, match="not a Hugging Face id") as e:
            resolve_model(bad)
        assert "\n" not in str(e.value) and bad in str(e.value)
    file = tmp_path / "config.json"
    file.write_text("{}")
    with pytest.raises(ModelLoadError, match="is a file"):
        resolve_model(file)


def test_a_local_directory_wins_over_an_id_of_the_same_name(hub_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    shutil.copytree(MODEL_DIR, tmp_path / "org" / "name")
    from pathlib import Path

    assert resolve_model("org/name") == Path("org/name")
    assert Engine.from_pretrained("org/name").name == "name"


def test_online_and_not_cached_downloads_only_the_files_the_loader_reads(
    hub_cache, tmp_path, monkeypatch
):
    """The download path, with snapshot_download stood in for (this suite never goes online)."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls: list[dict] = []

    def fake(repo_id, **kwargs):
        calls.append(kwargs)
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        return str(MODEL_DIR)

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert resolve_model("org/other") == MODEL_DIR
    assert calls[0]["local_files_only"] and not calls[1].get("local_files_only")
    assert "*.safetensors" in calls[1]["allow_patterns"]
    assert calls[1]["cache_dir"] == str(hub_cache)

    def unreachable(repo_id, **kwargs):
        if kwargs.get("local_files_only"):
            raise LocalEntryNotFoundError("not cached")
        raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(ModelLoadError, match="download failed.*hf download org/other") as e:
        resolve_model("org/other")
    assert "\n" not in str(e.value)


def test_id_syntax():
    assert is_hub_id("GSAI-ML/LLaDA-8B-Instruct") and is_hub_id("inclusionAI/LLaDA2.0-mini")
    for not_an_id in ["./model", "/abs/model", "a/b/c", "model", "org/", "a--b/c", "a/b..c"]:
        assert not is_hub_id(not_an_id), not_an_id


async def test_the_client_takes_an_id_and_its_worker_resolves_it(hub_cache):
    """The id travels to the worker process (which inherits HF_HUB_CACHE and HF_HUB_OFFLINE)."""
    from dinfer_async import Client

    async with Client(model="org/name", workers=1) as client:
        assert client.welcome.model == "org/name"
        completion = await client.generate(
            messages=[{"role": "user", "content": "reverse planet"}], params=PARAMS
        )
    bundled = Engine.from_pretrained(None)
    ids = bundled.encode(messages=[{"role": "user", "content": "reverse planet"}])
    [want] = bundled.generate([ids], PARAMS)
    assert completion.text == want.text and completion.token_ids == want.token_ids
