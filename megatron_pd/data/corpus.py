"""Finding documents: input files/directories for the tools, and the embedded stdlib corpus.

The embedded default corpus is the Python standard library source of the running interpreter
(every ``.py`` under ``sysconfig``'s stdlib directory, without ``site-packages`` and the test
suites): about 12 MB of real code that every machine with Python has. Documents are one file
each, in sorted path order, so every machine builds the same corpus from the same Python.
"""

from __future__ import annotations

import fnmatch
import os
import sysconfig

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "__pycache__", "idle_test"}


def stdlib_source_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_corpus_files() -> list:
    """Sorted paths of the stdlib's own ``.py`` files (tests and third-party excluded)."""
    root = stdlib_source_dir()
    found = []
    for current, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        found.extend(os.path.join(current, name) for name in files if name.endswith(".py"))
    if not found:
        raise RuntimeError(f"no .py files under the stdlib directory {root}")
    return sorted(found)


def expand_inputs(inputs: list, pattern: str | None = None) -> list:
    """Files named directly, plus files under named directories (recursively, sorted).

    ``pattern`` (fnmatch, e.g. ``*.jsonl``) filters files found in directories. Raises
    ValueError naming any input that does not exist or any directory with no matching files.
    """
    files = []
    for item in inputs:
        if os.path.isfile(item):
            files.append(item)
        elif os.path.isdir(item):
            matched = []
            for current, dirs, names in os.walk(item):
                dirs.sort()
                matched.extend(
                    os.path.join(current, n)
                    for n in sorted(names)
                    if pattern is None or fnmatch.fnmatch(n, pattern)
                )
            if not matched:
                raise ValueError(f"input directory {item} has no files matching {pattern or '*'}")
            files.extend(matched)
        else:
            raise ValueError(f"input {item} does not exist")
    return files
