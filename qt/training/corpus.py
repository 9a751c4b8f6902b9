"""A small English corpus found on any machine with Python: the docstrings of its standard library and
the language reference topics that `help()` shows (pydoc_data).

Real technical prose with plenty of learnable structure, made offline, and never committed to the
repository (it is read from the local Python installation each time).
"""

from __future__ import annotations

import contextlib
import gzip
import importlib
import inspect
import io
import itertools
import json
import sys
import warnings
from pathlib import Path

# Modules that act when imported (open a browser, print, start a GUI) or are large and unhelpful.
SKIPPED_MODULES = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3", "ensurepip",
                   "venv", "pydoc_data", "__hello__", "__phello__", "xxlimited", "xxsubtype"}
MIN_DOC_CHARS = 40


def stdlib_docstrings():
    """(object name, docstring) for the public modules, classes, functions and methods of the stdlib."""
    for module_name in sorted(sys.stdlib_module_names - SKIPPED_MODULES):
        if module_name.startswith("_"):
            continue
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                module = importlib.import_module(module_name)
        except Exception:  # platform-specific or optional modules: absent here, fine
            continue
        yield module_name, inspect.getdoc(module)
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or getattr(obj, "__module__", None) != module_name:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj):
                yield f"{module_name}.{name}", inspect.getdoc(obj)
            if inspect.isclass(obj):
                for attr, member in sorted(vars(obj).items()):
                    if not attr.startswith("_") and (inspect.isfunction(member) or inspect.ismethoddescriptor(member)):
                        yield f"{module_name}.{name}.{attr}", inspect.getdoc(member)


def reference_topics():
    """(topic, text) of the language reference shipped for help(); absent from some minimal installs."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return
    yield from sorted(topics.items())


def write_stdlib_corpus(path: Path) -> int:
    """Write the docstrings as gzip'd JSON lines, one document each; returns the number of documents."""
    seen, n_docs = set(), 0
    tmp = path.with_name(path.name + ".tmp")
    with gzip.open(tmp, "wt", encoding="utf-8") as f, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation warnings of modules imported for their docstrings
        for name, doc in itertools.chain(reference_topics(), stdlib_docstrings()):
            if not doc or len(doc) < MIN_DOC_CHARS or doc in seen:  # inherited docstrings repeat
                continue
            seen.add(doc)
            f.write(json.dumps({"text": f"{name}\n\n{doc}\n"}) + "\n")
            n_docs += 1
    tmp.replace(path)
    return n_docs


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "data/stdlib_docs.jsonl.gz")
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"wrote {write_stdlib_corpus(target)} documents to {target}")
