"""Where llmprune may write: names built from user input, and links.

Every file the tool writes, renames or deletes lies inside a root it owns (a workdir, an export target). Two ways
out of a root exist, and each has one guard here:

- a name built from user input (a sweep point's name from ``--methods``/``--patterns``/``--structures``, any other
  name that becomes a path component): ``component`` refuses separators, ``..``, absolute paths, control characters
  and names too long for a filesystem, so a name is one entry of the folder it is put in;
- a symbolic link inside a root (a ``.lock``, a ``sweep/`` or a file in ``model/`` that points elsewhere): writing
  through it would change a file of the user's, and adopting it would ship that file. ``refuse_links`` checks the
  entries a command is about to use; a link is never followed, it is refused.
"""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

from llmprune.errors import IntegrityError, UserError

MAX_NAME_BYTES = 200  # filesystems allow 255; the rest is room for the suffixes we add (.tmp-PID, .old-PID)


def component(name: str, what: str) -> str:
    """``name`` if it is a single, ordinary path component; a one-line ``UserError`` naming ``what`` otherwise."""
    why = None
    if not isinstance(name, str) or name in ("", ".", ".."):
        why = "is empty or a relative path marker"
    elif "/" in name or "\\" in name or os.sep in name:
        why = "contains a path separator"
    elif any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in name):
        why = "contains a control character"
    elif len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        why = f"is longer than {MAX_NAME_BYTES} bytes"
    elif name.startswith("-"):
        why = "starts with '-'"
    if why:
        raise UserError(f"{what} {printable(name)} {why}; it names a folder, so it must be one plain name")
    return name


def printable(text: object, limit: int = 200) -> str:
    """``text`` quoted, with control characters and escape sequences shown as escapes (a terminal never interprets
    what a file or the user wrote), cut to ``limit`` characters."""
    s = str(text)
    shown = repr(s[:limit])
    return shown + ("…" if len(s) > limit else "")


def refuse_links(root: Path, *names: str, what: str = "workdir") -> None:
    """Refuse (exit 4) if ``root`` holds, among ``names`` (each a relative path; every component is checked), an
    entry that is a symbolic link. Entries that do not exist are fine: they will be made by us."""
    for rel in names:
        p = root
        for part in Path(rel).parts:
            p = p / part
            if p.is_symlink():
                raise _link(p, what)
            if not p.exists():
                break


def links_under(root: Path) -> list[Path]:
    """Every symbolic link at or below ``root`` (not followed)."""
    if root.is_symlink():
        return [root]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):  # os.walk does not descend into linked folders
        for n in dirnames + filenames:
            if os.path.islink(os.path.join(dirpath, n)):
                found.append(Path(dirpath, n))
    return found


def refuse_links_under(root: Path, what: str = "workdir") -> None:
    """Refuse (exit 4) if any entry at or below ``root`` is a symbolic link."""
    found = links_under(root)
    if found:
        raise _link(found[0], what)


def _link(path: Path, what: str) -> IntegrityError:
    return IntegrityError(f"{path} is a symbolic link inside the {what}; llmprune never follows links there (it would "
                          "write or ship a file outside it): remove the link")
