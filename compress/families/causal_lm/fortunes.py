"""The `fortunes` text source: BSD fortune cookie files, as Debian's `fortunes` package installs them.

A second kind of text beside pydoc: short prose (quotations, jokes, poems, aphorisms) rather than technical
documentation, installed offline from Debian (`apt-get install fortunes`; BSD licence, see
/usr/share/doc/fortunes/copyright). A fortune file is plain text whose records are separated by lines holding
a single `%`; `strfile` writes an index `NAME.dat` beside each, which is how the files are told from the
rest of the folder (the `NAME.u8` names are symbolic links to the same files and are skipped).

Order: the files are taken in sorted name order and their records interleaved round-robin (record 1 of every
file, then record 2 of every file, ...), so the first windows, the evaluation ones, sample every file rather
than the first one alone; the order is the same on every machine with the same package version.

By default the technical and pictorial files are left out (`TECHNICAL`): the point of this text is to be
unlike pydoc. `files:` names the files to read instead.
"""

from __future__ import annotations

from pathlib import Path

from compress.errors import ConfigError
from compress.families.causal_lm.options import TextSource

DEFAULT_FOLDER = Path("/usr/share/games/fortunes")
PACKAGE = "fortunes"  # Debian package
#: left out by default: computing jokes and quotes, Debian / IRC quotes, ASCII pictures, a stub for translators
TECHNICAL = frozenset({"ascii-art", "computers", "debian", "knghtbrd", "linux", "linuxcookie", "perl", "translate-me"})


def fortune_folder(source: TextSource, where: str) -> Path:
    """The folder of fortune files; ConfigError naming the package to install when it is not there."""
    folder = DEFAULT_FOLDER if source.path is None else Path(source.path).expanduser()
    if not folder.is_dir():
        if source.path is None:
            raise ConfigError(
                f"{where}: kind fortunes reads {DEFAULT_FOLDER}, which is missing: install the Debian package "
                f"'{PACKAGE}' (`apt-get install {PACKAGE}`; scripts/setup.sh does it), or set path: to a folder "
                "of fortune files"
            )
        raise ConfigError(f"{where}.path: '{source.path}': no such folder (relative paths start at {Path.cwd()})")
    return folder


def fortune_files(source: TextSource, where: str = "data.text") -> list[Path]:
    """The fortune files a source reads, in sorted name order."""
    folder = fortune_folder(source, where)
    found = {
        p.name: p
        for p in folder.iterdir()
        if p.is_file() and not p.is_symlink() and p.with_name(p.name + ".dat").is_file()
    }
    if source.files is not None:
        missing = [n for n in source.files if n not in found]
        if missing:
            raise ConfigError(
                f"{where}.files: {missing} not among the fortune files of {folder} (files with a .dat index beside "
                f"them): {sorted(found)}"
            )
        return [found[n] for n in sorted(source.files)]
    files = [found[n] for n in sorted(found) if n not in TECHNICAL]
    if not files:
        raise ConfigError(f"{where}: {folder} holds no fortune file (a file with a NAME.dat index beside it)")
    return files


def fortune_records(path: Path) -> list[str]:
    """The fortunes of one file: blocks between lines holding a single '%', stripped, empty ones dropped."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); fortunes are read as UTF-8") from None
    records, block = [], []
    for line in text.splitlines():
        if line.strip() == "%":
            records.append("\n".join(block).strip())
            block = []
        else:
            block.append(line)
    records.append("\n".join(block).strip())
    return [r for r in records if r]


def read_fortunes(source: TextSource, where: str = "data.text") -> list[str]:
    """Every fortune of the source's files, interleaved round-robin across files, at most `max_records`."""
    per_file = [fortune_records(p) for p in fortune_files(source, where)]
    longest = max((len(r) for r in per_file), default=0)
    mixed = [records[i] for i in range(longest) for records in per_file if i < len(records)]
    return mixed[: source.max_records]
