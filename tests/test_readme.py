"""The README and docs/*.md name only things that exist: scripts, make targets, configs, modules, model names.

Every fenced shell block (```sh, ```bash, ```console) is checked: the script paths it runs (pipelines/*.py,
tuning/*.py, benchmarks/*.py, cluster/...) exist, every `make TARGET` is a Makefile target, every configs/*.yaml and
every `--config X` exists, and every `python -m MODULE` is a module on disk (or installed, for a module outside the
repository). Everywhere in the text, a `models:/NAME@ALIAS` or `models:/NAME/...` must use a NAME that a config
registers (tracking.registered_model_name) and, with an alias, that config's tracking.alias. Placeholders such as
configs/NAME.yaml, models:/NAME@ALIAS or s3://<BUCKET>/... are skipped. No Ray, no torch: plain text and YAML.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]

SHELL_BLOCK = re.compile(r"^[ \t]*```(?:sh|bash|console|shell)[ \t]*\n(.*?)^[ \t]*```", re.M | re.S)
SCRIPT = re.compile(r"(?<![\w/.-])((?:pipelines|tuning|benchmarks)/[\w/.-]*\.py|cluster/[\w/.-]*[\w])")
MAKE = re.compile(r"(?<![\w-])make\s+([\w-]+)")
CONFIG_PATH = re.compile(r"(?<![\w/.-])(configs/[\w/.<>-]+\.yaml)")
CONFIG_FLAG = re.compile(r"--config[ =]+(\S+)")
PYTHON_M = re.compile(r"\bpython3?\s+-m\s+([\w.]+)")
MODEL_URI = re.compile(r"models:/([\w.<>-]+)([@/])([\w.<>-]*)")


def is_placeholder(text: str) -> bool:
    """configs/NAME.yaml, models:/NAME@ALIAS, s3://<BUCKET>/...: a word in capitals or angle brackets."""
    return bool(re.search(r"[<>]|\b[A-Z][A-Z_]{2,}\b", text))


def shell_blocks(text: str) -> list[str]:
    return SHELL_BLOCK.findall(text)


def make_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+)\s*:(?!=)", (ROOT / "Makefile").read_text(), re.M))


def registered_models() -> dict[str, str]:
    """registered_model_name → tracking.alias, from every configs/*.yaml."""
    models = {}
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        tracking = (yaml.safe_load(path.read_text()) or {}).get("tracking") or {}
        if "registered_model_name" in tracking:
            models[tracking["registered_model_name"]] = tracking.get("alias", "")
    return models


def module_exists(name: str) -> bool:
    top = name.split(".")[0]
    if (ROOT / top).is_dir():  # one of ours: look on disk, import nothing
        path = ROOT.joinpath(*name.split("."))
        return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()
    return importlib.util.find_spec(name) is not None


def block_problems(block: str, targets: set[str]) -> list[str]:
    """What a shell block names that does not exist."""
    problems = []
    for path in SCRIPT.findall(block):
        if not is_placeholder(path) and not (ROOT / path).exists():
            problems.append(f"no such file: {path}")
    for target in MAKE.findall(block):
        if target not in targets:
            problems.append(f"no make target: {target}")
    for path in dict.fromkeys(CONFIG_PATH.findall(block) + CONFIG_FLAG.findall(block)):  # each path once
        if not is_placeholder(path) and not (ROOT / path).is_file():
            problems.append(f"no such config: {path}")
    for module in PYTHON_M.findall(block):
        if not module_exists(module):
            problems.append(f"no such module: python -m {module}")
    return problems


def model_problems(text: str, models: dict[str, str]) -> list[str]:
    """models:/ URIs whose name no config registers (or whose alias that config does not set)."""
    problems = []
    for name, sep, rest in MODEL_URI.findall(text):
        if is_placeholder(name) or re.fullmatch(r"m-[0-9a-f.]*", name):  # a logged model's id
            continue
        if name not in models:
            problems.append(f"models:/{name}: no config registers {name!r} (registered: {sorted(models)})")
        elif sep == "@" and rest and not is_placeholder(rest) and rest != models[name]:
            problems.append(f"models:/{name}@{rest}: the config registering {name!r} sets alias {models[name]!r}")
    return problems


def page_problems(page: Path) -> list[str]:
    text = page.read_text()
    targets = make_targets()
    problems = [p for block in shell_blocks(text) for p in block_problems(block, targets)]
    problems += model_problems(text, registered_models())
    return [f"{page.relative_to(ROOT)}: {p}" for p in problems]


def test_every_page_names_only_what_exists():
    assert DOCS, "docs/ holds no pages"
    problems = [p for page in PAGES for p in page_problems(page)]
    assert not problems, "\n".join(problems)


def test_readme_is_a_short_front_door_linking_every_doc():
    assert README.stat().st_size <= 9000, f"README.md is {README.stat().st_size} bytes (at most 9000)"
    text = README.read_text()
    missing = [page.name for page in DOCS if f"(docs/{page.name})" not in text]
    assert not missing, f"README.md does not link: {missing}"


def test_the_checks_catch_wrong_names():
    """The checker itself: a wrong model name, a missing script, target, config or module are all reported."""
    bad = "python pipelines/nope.py --config configs/nope.yaml\nmake nope\npython -m cluster.nope\n"
    assert len(block_problems(bad, make_targets())) == 4
    assert model_problems("load models:/retinanet@champion", registered_models())
    assert model_problems("models:/retinanet-demo@latest", registered_models())
    assert not model_problems("models:/retinanet-demo@champion or models:/NAME@ALIAS", registered_models())
    good = "python pipelines/train.py --config configs/demo.yaml\nray job submit -- python -m cluster.local start"
    assert block_problems(good + "\nmake demo", make_targets()) == []
    assert shell_blocks("text\n```bash\nmake demo\n```\n```python\nmake nope\n```\n") == ["make demo\n"]
