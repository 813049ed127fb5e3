"""Names of what lives in a run folder, and the one check that keeps every path the runner builds inside it.

A pipeline file names folders: the run (`name:`) and every artifact (a stage's `name:`). Those names are
checked when the file is validated (`artifact_name_problem`); `inside` checks again where the path is
built, so neither a name that slipped past validation nor a symlink planted in the run folder can make a
run replace or delete something outside its folder.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic_core import PydanticCustomError

from compress.errors import ConfigError

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
NAME_RULE = "letters, digits, '.', '_' and '-', starting with a letter or digit (it names a folder of the run)"

# Files the runner writes into the run folder: an artifact of one of these names would replace them.
MANIFEST_FILE = "manifest.json"
REPORT_FILE = "report.md"
REPORT_HTML_FILE = "report.html"
RESOLVED_FILE = "pipeline.resolved.json"
LOG_FILE = "run.log"
PLOT_FILE = "accuracy_vs_latency.png"
PRUNE_LAYERS_FILE = "_prune_layers.json"  # in a pruned artifact: per-layer widths ("_" files are side files)
RUN_FILES = (MANIFEST_FILE, REPORT_FILE, REPORT_HTML_FILE, RESOLVED_FILE, LOG_FILE, PLOT_FILE)

_NAME = re.compile(NAME_PATTERN)


def artifact_name_problem(name: str) -> str | None:
    """What is wrong with `name` as an artifact (folder) name, or None. The source's name is checked apart."""
    if not _NAME.fullmatch(name):
        return f"not a valid artifact name; allowed: {NAME_RULE}"
    if name.casefold() in {f.casefold() for f in RUN_FILES}:
        return f"reserved: the run folder's own files are {', '.join(RUN_FILES)}; choose another name"
    return None


def check_artifact_name(name: str | None) -> str | None:
    """Pydantic validator of a stage's `name:` / `input:`: the problem becomes the located config error."""
    if name is not None and (problem := artifact_name_problem(name)) is not None:
        raise PydanticCustomError("artifact_name", problem)
    return name


def inside(root: Path, name: str) -> Path:
    """`root / name`, refused unless it resolves (symlinks followed) strictly inside `root`."""
    path = root / name
    real_root, real = root.resolve(), path.resolve()
    if real == real_root or real_root not in real.parents:
        raise ConfigError(
            f"{path}: resolves to {real}, outside the folder {real_root} it must stay in; "
            "use a plain name (a link there must be removed)"
        )
    return path
