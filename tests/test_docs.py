"""The user docs cannot drift from the CLI: generated command reference, README command list,
relative links, and the README's library example runs."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path
from types import ModuleType

import pytest
import typer

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "gen_command_docs", ROOT / "scripts" / "gen_command_docs.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cli_commands() -> list[str]:
    from vlmcredit.cli.main import app

    group = typer.main.get_command(app)
    return list(group.list_commands(group.context_class(group, info_name="vlmcredit")))


def test_commands_md_is_what_the_generator_writes_now() -> None:
    expected = _generator().render()
    current = (DOCS / "commands.md").read_text(encoding="utf-8")
    assert current == expected, (
        "docs/commands.md is out of date with the CLI: run "
        ".venv/bin/python scripts/gen_command_docs.py and commit the result"
    )


def test_every_example_parses_with_its_command() -> None:
    from vlmcredit.cli.main import app

    group = typer.main.get_command(app)
    examples = _generator().EXAMPLES
    assert sorted(examples) == sorted(_cli_commands()), "one example per CLI command"
    for name, line in examples.items():
        words = shlex.split(line)
        assert words[:2] == ["vlmcredit", name], line
        cmd = group.commands[name]
        # Parses and type-converts the options without running the command.
        cmd.make_context(name, words[2:])


def _section(text: str, title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def _readme_examples() -> list[str]:
    """The `vlmcredit ...` code spans of README.md's command list."""
    section = _section(README.read_text(encoding="utf-8"), "Commands")
    return re.findall(r"`(vlmcredit [a-z][^`]*)`", section)


def test_readme_command_list_names_every_command() -> None:
    listed = {line.split()[1] for line in _readme_examples()}
    missing = [name for name in _cli_commands() if name not in listed]
    assert not missing, f"README.md '## Commands' does not list: {', '.join(missing)}"
    unknown = sorted(listed - set(_cli_commands()))
    assert not unknown, f"README.md '## Commands' lists commands the CLI lacks: {unknown}"


def test_readme_examples_parse_with_their_command() -> None:
    from vlmcredit.cli.main import app

    group = typer.main.get_command(app)
    for line in _readme_examples():
        # "[--quick]" marks an optional part: parse it as given
        words = [w.strip("[]") for w in shlex.split(line)]
        cmd = group.commands.get(words[1])
        if cmd is not None:  # unknown names fail the test above
            cmd.make_context(words[1], words[2:])


_FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _relative_links(path: Path) -> list[str]:
    text = _CODE_SPAN.sub("", _FENCE.sub("", path.read_text(encoding="utf-8")))
    links = []
    for target in _LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # http:, https:, mailto:, in-page anchors
        links.append(target)
    return links


@pytest.mark.parametrize(
    "doc",
    [README, *sorted(DOCS.glob("*.md"))],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_relative_links_point_to_files(doc: Path) -> None:
    broken = []
    for target in _relative_links(doc):
        file_part = target.split("#", 1)[0]
        if not (doc.parent / file_part).exists():
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)}: links to missing files: {broken}"


def test_readme_library_snippet_runs(tiny_ckpt) -> None:
    """The README's library example runs as printed (every name defined in it), on a tiny
    checkpoint in place of the 7B hub id and a real image for `image`."""
    from tests.helpers import noise_image

    block = re.search(r"```python\n(.*?)```", _section(README.read_text("utf-8"), "Library"), re.S)
    assert block, "README.md '## Library' has no python block"
    code = block.group(1)
    call = re.search(r"load_checkpoint\((.*?)\)", code)
    assert call, "the snippet no longer loads a checkpoint"
    ckpt = str(tiny_ckpt("qwen2.5-vl"))
    code = code.replace(call.group(0), f"load_checkpoint({ckpt!r}, dtype='fp32')")
    scope: dict = {"image": noise_image(56, 84, 1)}
    exec(compile(code, "README.md (Library)", "exec"), scope)
    capture = scope["items"][0].capture
    # the response -> image block, and the last layer's Q/K the snippet asked for
    assert capture.attention.shape[-1] == scope["layout"].images[0].cells.shape[0]
    assert capture.queries is not None and capture.keys is not None
