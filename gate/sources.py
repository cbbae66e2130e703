"""Where the package under test comes from: a local source tree, a git URL, or a requirement."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from gate import SetupError

PACKAGES = ("mlx-vlm", "mlx-lm")
GIT_PREFIXES = ("git+", "https://", "http://", "ssh://", "git@", "file://")
PINNED_VERSION = re.compile(r"\s*==\s*[0-9][0-9A-Za-z.+!-]*\s*")
COMMIT = re.compile(r"@[0-9a-f]{40}$")


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Source:
    text: str
    """As the user gave it."""
    kind: str
    """``path``, ``git`` or ``requirement``."""
    package: str
    """The distribution it provides, ``mlx-vlm`` or ``mlx-lm``."""

    def pip_argument(self) -> str:
        if self.kind == "path":
            return str(Path(self.text).expanduser().resolve())
        if self.kind == "git":  # a bare URL: pip refuses "name @ git+file://..." though it takes the URL itself
            return self.text if self.text.startswith("git+") else f"git+{self.text}"
        return self.text

    @property
    def pinned(self) -> bool:
        """Always installs the same code: an exact version, or a git URL at a full commit id."""
        if self.kind == "requirement":
            return PINNED_VERSION.fullmatch(self.text[len(_name(self.text)) :]) is not None
        return self.kind == "git" and COMMIT.search(self.text) is not None

    def slug(self) -> str:
        """A folder name for its environment."""
        if self.kind == "path":
            return f"{self.package}-{Path(self.text).expanduser().resolve().name}"
        if self.kind == "git":
            location, _, ref = self.text.rpartition("@") if "@" in self.text.split("/")[-1] else (self.text, "", "")
            name = location.rstrip("/").split("/")[-1].removesuffix(".git")
            return "-".join(part for part in (self.package, "git", name, ref[:12]) if part)
        return re.sub(r"[^A-Za-z0-9.+-]+", "-", self.text.replace("==", "-")).strip("-")[:80]


def _name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip())
    return match.group(0) if match else ""


def parse(text: str, package: str) -> Source:
    """The source `text` names, checked as far as can be without installing it; `SetupError` if unusable."""
    if text.startswith(GIT_PREFIXES):
        return Source(text, "git", package)
    path = Path(text).expanduser()
    if text.startswith((".", "/", "~")) or path.exists():
        if not path.is_dir():
            raise SetupError(f"source {text}: no such directory")
        if not (path / "pyproject.toml").exists() and not (path / "setup.py").exists():
            raise SetupError(f"source {text}: not a Python source tree (no pyproject.toml or setup.py)")
        return Source(text, "path", package)
    name = _name(text)
    if not name:
        raise SetupError(f"source {text!r}: not a path, a git URL or a requirement")
    if normalized(name) != package:
        raise SetupError(f"source {text!r} names {name}, but the gate tests {package} (see --package)")
    return Source(text, "requirement", package)
