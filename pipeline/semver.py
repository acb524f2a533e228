"""Semantic versions: parsing, ordering (pre-releases below their release) and bumping."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import SEMVER


@dataclass(frozen=True, order=False)
class Version:
    """A parsed semantic version; build metadata is kept but never affects order."""

    major: int
    minor: int
    patch: int
    prerelease: tuple[str, ...] = ()
    build: str = ""

    @classmethod
    def parse(cls, text: str) -> Version:
        match = SEMVER.fullmatch(text)
        if not match:
            raise ValueError(f"{text!r} is not a semantic version (like 1.4.0)")
        major, minor, patch, pre, build = match.groups()
        return cls(
            int(major), int(minor), int(patch), tuple(pre.split(".")) if pre else (), build or ""
        )

    def key(self) -> tuple:
        """Sort key: releases above their pre-releases; numeric identifiers below others."""
        pre = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in self.prerelease)
        return (self.major, self.minor, self.patch, 0 if self.prerelease else 1, pre)

    def sort_text(self) -> str:
        """The same order as `key()`, as a string that sorts byte by byte (for an SQL index).

        Numbers are written with their length first, so that 10 sorts after 9; identifiers are
        joined by "!", which sorts below every character an identifier may hold; a release ends
        in "~", which sorts above the "-" that starts its pre-releases.
        """

        def number(value: int) -> str:
            digits = str(value)
            return f"{len(digits):02d}{digits}"

        text = ".".join(number(n) for n in (self.major, self.minor, self.patch))
        if not self.prerelease:
            return text + "~"
        parts = [f"0{number(int(p))}" if p.isdigit() else f"1{p}" for p in self.prerelease]
        return text + "-" + "!".join(parts)

    def bump(self, part: str) -> Version:
        if part == "major":
            return Version(self.major + 1, 0, 0)
        if part == "minor":
            return Version(self.major, self.minor + 1, 0)
        if self.prerelease:
            return Version(self.major, self.minor, self.patch)
        return Version(self.major, self.minor, self.patch + 1)

    def __str__(self) -> str:
        text = f"{self.major}.{self.minor}.{self.patch}"
        if self.prerelease:
            text += "-" + ".".join(self.prerelease)
        if self.build:
            text += "+" + self.build
        return text


def sort_key(text: str) -> tuple:
    return Version.parse(text).key()
