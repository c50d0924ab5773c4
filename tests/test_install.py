"""The install is reproducible: the lock file pins everything the tests install, at the versions
this venv has, and the llama.cpp server is built portable from pinned sources.

``make`` installs with ``-c .ci/constraints-cpu.txt``; ``make lock`` regenerates that file. A
dependency added to pyproject.toml without re-locking fails here (and so in CI), instead of
letting the next newcomer's install pick whatever release came out that morning.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / ".ci" / "constraints-cpu.txt"
SERVER_LOCK = REPO / ".ci" / "llama-server-constraints.txt"
EXTRAS = ("demo", "dev")  # what `make test` installs


def _pins(path: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;]+)", line)
        assert m, f"{path.name}: {line!r} is not an exact pin (name==version)"
        pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def _closure() -> dict[str, set[str]]:
    """Every distribution kernel-ext[demo,dev] needs, with the packages that asked for it."""
    needed: dict[str, set[str]] = {}
    todo: list[tuple[str, tuple[str, ...], str]] = [("kernel-ext", EXTRAS, "")]
    seen: set[tuple[str, tuple[str, ...]]] = set()
    while todo:
        name, extras, parent = todo.pop()
        key = (canonicalize_name(name), extras)
        if key in seen:
            continue
        seen.add(key)
        if parent:
            needed.setdefault(key[0], set()).add(parent)
        dist = metadata.distribution(name)
        for raw in dist.requires or []:
            req = Requirement(raw)
            envs = [{"extra": e} for e in extras] or [{"extra": ""}]
            if req.marker is not None and not any(req.marker.evaluate(env) for env in envs):
                continue
            todo.append((req.name, tuple(sorted(req.extras)), name))
    return needed


def test_the_lock_pins_every_distribution_the_tests_install() -> None:
    pins = _pins(LOCK)
    missing = {n: sorted(by) for n, by in _closure().items() if n not in pins}
    assert not missing, (f"not pinned in {LOCK.name} (needed by): {missing}; "
                         "run `make lock` and commit the result")


def test_this_venv_has_the_locked_versions() -> None:
    pins = _pins(LOCK)
    wrong = {}
    for name in _closure():
        installed = Version(metadata.version(name))
        locked = Version(pins.get(name, "0"))
        if installed.public != locked.public:  # torch 2.13.0+cpu is the pinned 2.13.0
            wrong[name] = (str(installed), str(locked))
    assert not wrong, f"installed != locked: {wrong}; reinstall with `make` (or `make lock`)"


def test_torch_is_pinned_to_the_cpu_build_on_disk() -> None:
    assert Version(_pins(LOCK)["torch"]).public == "2.13.0"


def test_the_llama_server_is_built_portable_from_pinned_sources() -> None:
    pins = _pins(SERVER_LOCK)
    for name in ("llama-cpp-python", "fastapi", "starlette", "sse-starlette", "uvicorn"):
        assert name in pins, f"{SERVER_LOCK.name} must pin {name}"
    script = (REPO / ".ci" / "build-llama-server.sh").read_text()
    assert "-DGGML_NATIVE=OFF" in script  # a CPU-tuned build crashed on another CPU of this kind
    assert "--no-binary llama-cpp-python" in script  # never a native wheel from pip's cache
    from llama_server import VERSION

    assert pins["llama-cpp-python"] == VERSION
