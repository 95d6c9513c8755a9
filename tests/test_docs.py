"""The documentation's commands exist: every `sigma COMMAND --option` in README.md and BENCHMARKS.md (fenced shell
blocks and inline code) names a command of the app and an option that command takes, so a renamed or removed
option cannot leave the docs telling users to run something that fails."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INVOCATION = re.compile(r"(?:^|\s)(?:sigma|-m sigmacli)\s+([a-z][a-z-]*)(.*)")
OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


def app_options() -> dict[str, set[str]]:
    import typer

    from sigmacli.app import app

    group = typer.main.get_command(app)
    options = {}
    for name, command in group.commands.items():
        names = {"--help"}
        for param in command.params:
            names.update(param.opts)
            names.update(getattr(param, "secondary_opts", []))
        options[name] = names
    return options


def invocations(text: str):
    """(command, the rest of its line) for each sigma call in fenced shell blocks and in inline code spans."""
    for lang, block in re.findall(r"```(\w*)\n(.*?)```", text, re.S):
        if lang not in ("bash", "sh", "console", ""):
            continue
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            for part in re.split(r"&&|\|\||;|\|", line.split(" #")[0]):  # a shell line may chain several commands
                if m := INVOCATION.search(part):
                    yield m.group(1), m.group(2)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for span in re.findall(r"`([^`\n]*(?:\n[^`\n]*)?)`", prose):  # inline code may wrap onto a second line
        if m := INVOCATION.search(re.sub(r"\\?\n\s*", " ", span)):
            yield m.group(1), m.group(2)


def problems(text: str, options: dict[str, set[str]]) -> list[str]:
    found = []
    for command, rest in invocations(text):
        if command not in options:
            found.append(f"unknown command {command!r}")
            continue
        found += [f"sigma {command}: unknown option {opt}" for opt in OPTION.findall(rest) if opt not in options[command]]
    return found


def test_the_checker_finds_a_wrong_command_and_option():
    options = {"sample": {"--steps", "--help"}}
    text = ("```bash\nsigma sample --steps 2 --stepz 3   # a typo\nsigma sampel\n```\n"
            "Inline: `sigma sample --cfg 3`, and a wrapped one: `sigma sample\n--steps 1 --bogus`.")
    assert problems(text, options) == ["sigma sample: unknown option --stepz", "unknown command 'sampel'",
                                       "sigma sample: unknown option --cfg", "sigma sample: unknown option --bogus"]
    assert problems("```python\nsigma sample --nope\n```\n`sigma.json` and sigma's `--nope`", options) == []


@pytest.mark.parametrize("name", ["README.md", "BENCHMARKS.md"])
def test_documented_commands_exist(name):
    text = (ROOT / name).read_text(encoding="utf-8")
    assert len(list(invocations(text))) >= 20  # the parser still finds the docs' commands
    assert problems(text, app_options()) == []


@pytest.mark.parametrize("name", ["README.md", "BENCHMARKS.md"])
def test_documented_python_imports_work(name):
    """The import lines of the docs' Python examples run (a renamed module or function fails here)."""
    text = (ROOT / name).read_text(encoding="utf-8")
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        for line in block.splitlines():
            if re.match(r"(from \S+ import |import )", line):
                exec(line.split("#")[0], {})
