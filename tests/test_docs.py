"""The documentation: a short README with the two commands, an architecture page that names
every layer of the agent (so the picture is checked against the code), and no project-history
talk (issue numbers, sessions) in the README or the docs site."""

from __future__ import annotations

import re

import yaml

from .test_layers import AGENT_LAYERS, REPO

README = REPO / "README.md"
DOCS = REPO / "docs"
RUN = "pip install -e . && quietwire replay"
TEST = "pip install -e '.[dev,train]' && pytest -q"
HISTORY = re.compile(r"issue [0-9]+|this session|last session|previous session", re.I)


def sh_blocks(text: str) -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```", text, re.M | re.S)


def test_readme_is_short_and_has_the_two_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    commands = [line for block in sh_blocks(text) for line in block.splitlines()]
    assert RUN in commands and TEST in commands
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    assert sh_blocks(section) == [RUN + "\n", TEST + "\n"]  # the two, in that order


def test_architecture_names_every_layer_of_the_agent():
    text = (DOCS / "architecture.md").read_text()
    packages = {name.split(".")[-1] for layer in AGENT_LAYERS for name in layer}
    on_disk = {p.parent.name for p in (REPO / "agent").glob("*/__init__.py")}
    assert packages == on_disk  # the layers table covers every package of agent/
    for package in sorted(packages):
        assert f"## agent/{package}\n" in text, package  # a section per package
        assert f"agent/{package}" in README.read_text(), package  # and in the README's picture


def test_no_history_talk_in_the_readme_or_the_docs():
    pages = [README, *sorted(DOCS.rglob("*.md"))]
    assert len(pages) > 10
    found = [
        f"{page.relative_to(REPO)}:{n}: {line.strip()}"
        for page in pages
        for n, line in enumerate(page.read_text().splitlines(), 1)
        if HISTORY.search(line)
    ]
    assert not found, "\n".join(found)


def test_mkdocs_nav_lists_every_page():
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    assert config["strict"] is True and config["theme"]["name"] == "material"

    def pages(nav) -> list[str]:
        out = []
        for item in nav:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            out += pages(value) if isinstance(value, list) else [value]
        return out

    listed = pages(config["nav"])
    assert len(listed) == len(set(listed))
    assert set(listed) == {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
