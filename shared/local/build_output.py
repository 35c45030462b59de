"""The deployment as Vercel's CLI built it (``.vercel/output``, the Build Output API), run locally.

``scripts/build`` writes it; this module reads it the way Vercel's platform does:

- each function is a ``<path>.func/`` folder whose ``.vc-config.json`` names its handler, runtime,
  environment, settings (``maxDuration``, ``memory``) and, in ``filePathMap``, every file it ships;
- ``config.json`` holds the routes (vercel.json's rewrites, compiled) and the crons.

``assemble`` lays a function out as Vercel would unpack it (only the files it ships), ``serve`` runs
it through Vercel's own Python entry (the ``vc__handler__python`` trampoline the builder wrote and the
vendored ``vercel_runtime``), on the bare interpreter so nothing outside the bundle can be imported,
and ``Routes`` sends a request to the function the platform would, keeping the path the browser asked
for. ``python -m shared.local.build_output`` prints every function's unzipped size; ``--stage``
copies the project to where ``scripts/build`` builds it, ``--build-env`` prints the variables
vercel.json sets for the build.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

ROOT = Path(__file__).resolve().parents[2]
# The build runs in a copy of the project (``stage_sources``), and its output lands there.
STAGE = ROOT / ".vercel" / "stage"
OUTPUT = STAGE / ".vercel" / "output"
ASSEMBLED = ROOT / ".vercel" / "assembled"
CONFIG_FILE = ".vc-config.json"


@dataclass(frozen=True)
class BuiltFunction:
    """One ``.func`` folder: ``name`` is its route destination, e.g. ``functions/health.py``."""

    name: str
    folder: Path
    root: Path = ROOT  # the project the build ran in: filePathMap's relative paths start there

    @property
    def config(self) -> dict[str, Any]:
        config: dict[str, Any] = json.loads((self.folder / CONFIG_FILE).read_text())
        return config

    def shipped_files(self) -> dict[str, Path]:
        """Path inside the function -> file on disk: ``filePathMap`` plus the files in the folder itself."""
        files = {
            inside: (source if Path(source).is_absolute() else self.root / source)
            for inside, source in self.config.get("filePathMap", {}).items()
        }
        for path in self.folder.rglob("*"):
            if path.is_file() and path.name != CONFIG_FILE:
                files[path.relative_to(self.folder).as_posix()] = path
        return {inside: Path(source) for inside, source in files.items()}

    def size_by_top_level(self, *, include_bytecode: bool = True) -> Counter[str]:
        """Unzipped bytes per top-level entry (``_vendor/<package>`` for dependencies)."""
        sizes: Counter[str] = Counter()
        for inside, source in self.shipped_files().items():
            if not include_bytecode and inside.endswith(".pyc"):
                continue
            parts = inside.split("/")
            key = "/".join(parts[:2]) if parts[0] == "_vendor" and len(parts) > 1 else parts[0]
            sizes[key] += source.stat().st_size
        return sizes

    @property
    def module(self) -> str:
        """The module Vercel's entry imports, as the builder recorded it in the trampoline."""
        trampoline = (self.folder / "vc__handler__python.py").read_text()
        match = re.search(r'"__VC_HANDLER_MODULE_NAME": "([\w.]+)"', trampoline)
        if match is None:
            raise ValueError(f"{self.name}: no handler module in its trampoline")
        return match.group(1)


def stage_sources(stage: Path = STAGE) -> Path:
    """Copy the project's files (tracked, and new ones not ignored) into ``stage`` for the build.

    The builder precompiles every module into a ``__pycache__`` beside its source, as bytecode that
    Python never re-checks against the source (``unchecked-hash``). Built in the working tree, an
    edit made after a build would silently not run; built here, the working tree never holds it.
    The stage's own ``.vercel`` (the builder's virtualenv, the output) is kept between builds.
    """
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],  # noqa: S607 - git on the PATH
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    stage.mkdir(parents=True, exist_ok=True)
    for entry in stage.iterdir():
        if entry.name != ".vercel":
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    for name in filter(None, listed.decode().split("\0")):
        source = ROOT / name
        if not source.is_file():  # deleted in the working tree, not yet in git
            continue
        destination = stage / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, destination)
    (stage / ".vercel").mkdir(exist_ok=True)
    link = ROOT / ".vercel" / "project.json"
    if link.is_file():  # a real `vercel link` of this checkout
        shutil.copy2(link, stage / ".vercel" / "project.json")
    return stage


def build_environment(vercel_json: Path = ROOT / "vercel.json") -> dict[str, str]:
    """vercel.json's ``build.env``: what Vercel sets while it builds a deployment of this project.

    ``vercel deploy`` sends it with the deployment, but ``vercel build`` on a machine does not read
    it, so ``scripts/build`` exports it (``--build-env``) and a local build matches a real one.
    """
    env: dict[str, str] = json.loads(vercel_json.read_text()).get("build", {}).get("env", {})
    return env


def built_functions(output: Path = OUTPUT) -> list[BuiltFunction]:
    found = []
    for config in sorted((output / "functions").rglob(f"*.func/{CONFIG_FILE}")):
        folder = config.parent
        name = folder.relative_to(output / "functions").as_posix()[: -len(".func")]
        found.append(BuiltFunction(name=name, folder=folder, root=output.parents[1]))
    return found


def output_config(output: Path = OUTPUT) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((output / "config.json").read_text())
    return config


def assemble(function: BuiltFunction, target: Path) -> Path:
    """The function's files and nothing else, as Vercel unpacks them (hard links where possible)."""
    if target.exists():
        shutil.rmtree(target)
    for inside, source in function.shipped_files().items():
        destination = target / inside
        destination.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, destination)
        except OSError:
            shutil.copy2(source, destination)
    return target


def runtime_interpreter(function: BuiltFunction) -> str:
    """The bare interpreter for the function's runtime (``python3.12``): no site-packages of ours."""
    runtime = function.config["runtime"]
    base = getattr(sys, "_base_executable", sys.executable)
    version = subprocess.run(  # noqa: S603 - our own interpreter
        [base, "-c", "import sys; print(f'python{sys.version_info[0]}.{sys.version_info[1]}')"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if version != runtime:
        raise RuntimeError(f"{function.name} runs on {runtime}; this interpreter is {version} ({base})")
    return base


@dataclass
class ServedFunction:
    """A function answering on ``base_url`` through Vercel's entry; ``messages`` are its IPC messages."""

    name: str
    base_url: str
    process: subprocess.Popen[bytes]
    messages: list[dict[str, Any]] = field(default_factory=list)
    output: list[str] = field(default_factory=list)

    def logs(self) -> list[str]:
        """What the function logged: its output, and the lines Vercel's entry forwards over IPC."""
        forwarded = [
            base64.b64decode(m["payload"]["message"]).decode(errors="replace").rstrip()
            for m in list(self.messages)
            if m.get("type") == "log"
        ]
        return self.output + forwarded


def _read_ipc(listener: socket.socket, messages: list[dict[str, Any]], started: threading.Event) -> None:
    with contextlib.suppress(OSError):
        connection, _ = listener.accept()
        with connection:
            buffer = b""
            while chunk := connection.recv(65536):
                buffer += chunk
                while b"\0" in buffer:
                    raw, buffer = buffer.split(b"\0", 1)
                    messages.append(json.loads(raw))
                    if messages[-1].get("type") in {"server-started", "unrecoverable-error"}:
                        started.set()
    started.set()


@contextlib.contextmanager
def serve(
    function: BuiltFunction, env: dict[str, str], *, timeout: float = 60.0, instance: str = "", reuse: bool = False
) -> Iterator[ServedFunction]:
    """Run one built function as Vercel's Python runtime does and yield where it answers.

    The function is assembled from what it ships, started with the environment its
    ``.vc-config.json`` sets plus ``env``, and it tells us its port over the IPC socket, as it tells
    Vercel's runtime. Fails with the function's own output if it cannot start. ``instance`` names a
    second copy of a function served at the same time (another environment), in its own folder.
    ``reuse`` starts from the folder a previous call assembled (a benchmark times the start only).
    """
    folder = ASSEMBLED / (function.name + instance)
    if not (reuse and folder.is_dir()):
        assemble(function, folder)
    with tempfile.TemporaryDirectory(prefix="vc-ipc-") as ipc_dir:
        ipc_path = os.path.join(ipc_dir, "ipc.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(ipc_path)
        listener.listen(1)
        messages: list[dict[str, Any]] = []
        started = threading.Event()
        threading.Thread(target=_read_ipc, args=(listener, messages, started), daemon=True).start()
        process_env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(folder),
            "LANG": "C.UTF-8",
            **function.config.get("environment", {}),
            **env,
            "VERCEL_IPC_PATH": ipc_path,
        }
        process = subprocess.Popen(  # noqa: S603 - the bundle's own entry on our interpreter
            [runtime_interpreter(function), "-s", "-c", "import vc__handler__python"],
            cwd=folder,
            env=process_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        served = ServedFunction(name=function.name, base_url="", process=process, messages=messages)
        stdout = process.stdout
        if stdout is None:  # pragma: no cover - stdout=PIPE always gives one
            raise RuntimeError("no output pipe")

        def collect() -> None:
            for line in stdout:
                served.output.append(line.decode(errors="replace").rstrip())

        reader = threading.Thread(target=collect, daemon=True)
        reader.start()
        try:
            deadline = time.monotonic() + timeout
            while not started.wait(0.05):
                if process.poll() is not None or time.monotonic() > deadline:
                    break
            ready = [m for m in messages if m.get("type") == "server-started"]
            if not ready:
                process.kill()
                reader.join(5)
                raise RuntimeError(f"{function.name} did not start:\n" + "\n".join(served.output[-40:]))
            served.base_url = f"http://127.0.0.1:{ready[0]['payload']['httpPort']}"
            yield served
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            listener.close()
            reader.join(5)
            stdout.close()


@dataclass(frozen=True)
class Routed:
    function: str  # e.g. functions/external/widget_chat.py
    target: str  # the path the function receives, with the query the route adds


def _substitute(dest: str, match: re.Match[str]) -> str:
    """``$1``... in a route's destination, from what its ``src`` captured."""
    return re.sub(r"\$(\d+)", lambda ref: match.group(int(ref.group(1))) or "", dest)


class Routes:
    """``config.json``'s routes after the filesystem: which function a request reaches, and with what."""

    def __init__(self, config: dict[str, Any]) -> None:
        routes = config["routes"]
        after = next((i for i, r in enumerate(routes) if r.get("handle") == "filesystem"), -1) + 1
        self._routes = [(re.compile(r["src"]), r["dest"]) for r in routes[after:] if "src" in r and "dest" in r]

    def resolve(self, path: str, query: str = "") -> Routed | None:
        for pattern, dest in self._routes:
            match = pattern.match(path)
            if match is None:
                continue
            function, _, added = _substitute(dest, match).partition("?")
            # As on Vercel, the function sees the URL that was asked for; the route's parameters are
            # added to its query.
            params = parse_qsl(query, keep_blank_values=True) + parse_qsl(added, keep_blank_values=True)
            return Routed(function=function.lstrip("/"), target=path + (f"?{urlencode(params)}" if params else ""))
        return None


def main() -> None:
    if sys.argv[1:] == ["--build-env"]:
        for name, value in build_environment().items():
            print(f"{name}={value}")
        return
    if sys.argv[1:] == ["--stage"]:
        print(stage_sources())
        return
    functions = built_functions()
    if not functions:
        sys.exit(f"No build output in {OUTPUT}: run scripts/build.")
    print(f"{'function':<46} {'files':>6} {'unzipped MB':>12}  settings; largest parts (MB)")
    for function in functions:
        missing = [inside for inside, source in function.shipped_files().items() if not source.exists()]
        if missing:
            sys.exit(
                f"{function.name} ships {len(missing)} files the build no longer has (e.g. {missing[0]}): the builder"
                " installs every manifest into one virtualenv in turn, so keep each package at one version in"
                " every uv.lock and the folders with the fewest dependencies first in vercel.json's builds."
            )
        sizes = function.size_by_top_level()
        config = function.config
        settings = ", ".join(f"{k}={config[k]}" for k in ("maxDuration", "memory") if k in config) or "defaults"
        compiled = sum(1 for inside in function.shipped_files() if inside.endswith(".pyc"))
        settings += f", {compiled} .pyc"
        largest = ", ".join(f"{name} {size / 1e6:.1f}" for name, size in sizes.most_common(6))
        total = sum(sizes.values()) / 1e6
        print(f"{function.name:<46} {len(function.shipped_files()):>6} {total:>12.1f}  {settings}; {largest}")


if __name__ == "__main__":
    main()
