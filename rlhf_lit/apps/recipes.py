"""Where configs are found: ``recipe:NAME`` for the shipped recipes, and relative paths in pipeline and
study YAMLs looked up beside the YAML that names them, so a command works from any directory.

The recipes are the repository's ``configs/`` folder: read in place from a checkout (an editable
install), and installed as data files under ``<prefix>/share/rlhf-lit/configs`` by ``pip install``
(pyproject.toml's ``data-files``), so nothing is duplicated.

    rlhf-lit recipes list
    rlhf-lit pipeline --config recipe:pipeline/quickstart
    rlhf-lit fit --config recipe:sft/tiny --config recipe:strategy/zero2
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

from rlhf_lit.errors import InputError

PREFIX = "recipe:"


def recipe_dirs() -> list[Path]:
    """Folders that may hold the recipes, the checkout's first."""
    dirs = [Path(__file__).resolve().parents[2] / "configs"]  # a checkout: rlhf_lit/apps/ -> configs/
    for prefix in dict.fromkeys([sys.prefix, sysconfig.get_path("data")]):
        dirs.append(Path(prefix) / "share" / "rlhf-lit" / "configs")
    return [d for d in dirs if d.is_dir()]


def list_recipes() -> list[str]:
    """Every shipped recipe as ``stage/name`` (e.g. ``pipeline/quickstart``)."""
    found = {p.relative_to(d).with_suffix("").as_posix() for d in recipe_dirs() for p in d.rglob("*.yaml")}
    return sorted(found)


def resolve_recipe(value: str) -> str:
    """``recipe:stage/name`` (or a unique ``recipe:name``) -> the YAML file's path; anything else unchanged."""
    if not value.startswith(PREFIX):
        return value
    name = value[len(PREFIX) :].removesuffix(".yaml")
    names = list_recipes()
    matches = [n for n in names if n == name] or [n for n in names if n.rsplit("/", 1)[-1] == name]
    if len(matches) != 1:
        why = "is ambiguous" if matches else "does not exist"
        raise InputError(f"{value} {why}; recipes: {', '.join(names) or '(none installed)'}")
    for d in recipe_dirs():
        if (d / f"{matches[0]}.yaml").exists():
            return str(d / f"{matches[0]}.yaml")
    raise InputError(f"{value}: recipe file missing")  # unreachable: list_recipes found it


def expand_config_args(argv: list[str]) -> list[str]:
    """``--config recipe:X`` / ``--config=recipe:X`` arguments with the recipe's path."""
    out = []
    for i, arg in enumerate(argv):
        if arg.startswith("--config=") and arg[len("--config=") :].startswith(PREFIX):
            arg = "--config=" + resolve_recipe(arg[len("--config=") :])
        elif i and argv[i - 1] == "--config":
            arg = resolve_recipe(arg)
        out.append(arg)
    return out


def beside(value, base: Path):
    """A relative path that exists beside the YAML (folder ``base``) becomes that absolute path; anything
    else (absolute paths, paths relative to the working directory, hub names) is kept."""
    if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute() or value.startswith(PREFIX):
        return resolve_recipe(value) if isinstance(value, str) else value
    candidate = base / value
    return str(candidate.resolve()) if candidate.exists() else value


def resolve_pipeline_paths(cfg: dict, base: Path) -> dict:
    """Stage config files, data files and tokenizer directories named in a pipeline YAML, resolved beside
    it (in place; returns ``cfg``). Stage entries are the ``{config: ...}`` mappings of ``stages:``."""
    for value in cfg.get("stages") or []:
        if isinstance(value, dict) and "config" in value:
            value["config"] = beside(value["config"], base)
            _paths_beside(value.get("overrides"), base)
    for source in (cfg.get("blend") or {}).get("sources") or []:
        if isinstance(source, dict) and "path" in source:
            source["path"] = beside(source["path"], base)
    init = (cfg.get("tokenizer") or {}).get("init_args") or {}
    if "path" in init:
        init["path"] = beside(init["path"], base)
    models = (cfg.get("evaluation") or {}).get("models") or {}
    for name, path in models.items():
        models[name] = beside(path, base)
    return cfg


def _paths_beside(node, base: Path) -> None:
    """Every ``path:`` value in a stage's overrides (model, tokenizer, data file) resolved beside the YAML."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "path":
                node[key] = beside(value, base)
            else:
                _paths_beside(value, base)
    elif isinstance(node, list):
        for value in node:
            _paths_beside(value, base)


def main(argv: list[str]) -> int:
    if argv[:1] != ["list"]:
        print("usage: rlhf-lit recipes list   (then: --config recipe:NAME)", file=sys.stderr)
        return 2
    dirs = recipe_dirs()
    print(f"# recipes in {dirs[0] if dirs else '(none found)'}")
    for name in list_recipes():
        print(f"recipe:{name}")
    return 0
