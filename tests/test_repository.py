"""The repository explains itself: its documents stay inside it, `--help` lists the
presets that exist, and the bench says which extra it lacks."""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

import pytest

from sparsemodel import cli, config

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", ROOT / "experiments" / "README.md", *ROOT.glob("docs/*.md")]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
PARENT_PATH = re.compile(r"(?:\.\./)+[\w./-]*")  # any ../ path, linked or not


def _relative_links(text: str) -> list[str]:
    """Link targets that are files of the repository: no URL, no anchor-only link."""
    targets = (t.split("#")[0] for t in LINK.findall(text))
    return [t for t in targets if t and not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_documents_name_no_path_outside_the_repository(doc):
    text = doc.read_text()
    for path in PARENT_PATH.findall(text) + _relative_links(text):
        resolved = (doc.parent / path).resolve()
        assert resolved.is_relative_to(ROOT), f"{doc.name} names {path}, outside the repository"


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_to_a_file_that_exists(doc):
    for target in _relative_links(doc.read_text()):
        assert (doc.parent / target).exists(), f"{doc.name} links {target}, which is missing"


def test_readme_links_the_design_document():
    assert "(docs/design.md)" in (ROOT / "README.md").read_text()
    assert (ROOT / "docs" / "design.md").is_file()


def test_design_document_names_every_module():
    design = (ROOT / "docs" / "design.md").read_text()
    modules = [p.name for p in (ROOT / "sparsemodel").glob("*.py") if p.stem != "__init__"]
    assert [m for m in modules if m not in design] == []


@pytest.mark.parametrize("command", ["train", "profile"])
def test_config_help_lists_the_presets_directory(command, tmp_path, monkeypatch, capsys):
    presets = tmp_path / "configs"
    shutil.copytree(config.PRESET_DIR, presets)
    shutil.copy(presets / "tiny.yaml", presets / "my-preset.yaml")
    monkeypatch.setattr(config, "PRESET_DIR", presets)
    monkeypatch.setenv("COLUMNS", "1000")  # one line per option: names are not wrapped
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    listed = re.search(r"--config CONFIG\s+preset name \(([^)]*)\)", capsys.readouterr().out)
    assert listed is not None
    assert listed.group(1).split(", ") == config.preset_names()
    assert "my-preset" in config.preset_names()


def _peer_mixtral():
    """experiments/peer_mixtral.py as a module (experiments/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        "peer_mixtral", ROOT / "experiments" / "peer_mixtral.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "absent, named",
    [({"transformers"}, "transformers not"), ({"torch", "transformers"}, "torch and transformers")],
)
def test_bench_names_the_missing_extra_in_one_line(absent, named, monkeypatch):
    peer_mixtral = _peer_mixtral()
    present = object()  # a stand-in spec: find_spec found the package
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *_: None if name in absent else present
    )
    line = peer_mixtral.missing_extra()
    assert "\n" not in line
    assert f"({named}" in line
    assert "`hf` extra" in line and "pip install -e '.[hf]'" in line and "make bench" in line


def test_bench_peer_needs_nothing_when_both_packages_are_there(monkeypatch):
    peer_mixtral = _peer_mixtral()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *_: object())
    assert peer_mixtral.missing_extra() is None
